"""flashdml's microbenchmark suite: ``python -m benchmarks --quick | --full | --op NAME``.

One module per op family (``benchmarks/<op>.py`` exporting ``OP``, see harness.Op / harness.Provider); add a new
family by writing that module and listing it in OPS. harness.py measures (with a tqdm progress bar on stderr),
report.py writes the table, the CSV and the matplotlib figures of plots.py into benchmarks/results/.
matplotlib and tqdm are benchmark-only extras, imported where they are used: the library never needs them.
"""

OPS = ("batch_softmax", "cross_example_softmax", "ntxent", "threshold_consistent_margin", "knn", "hardest_negatives",
       "xe_negative_mining", "contextual_loss", "metrics", "supcon", "multi_similarity", "circle", "triplet_margin")
