"""``knn_func`` for pml's ``AccuracyCalculator`` (``flashdml.integrations.pml.inference``), backed by
``flashdml.knn``."""
from __future__ import annotations

from pytorch_metric_learning.utils import common_functions as _c_f
from pytorch_metric_learning.utils.inference import return_results as _pml_return_results

import flashdml as _fd

__all__ = ["FlashdmlKNN"]


class FlashdmlKNN:
    """A ``knn_func`` for pml's ``AccuracyCalculator``, computed by ``flashdml.knn`` (docs/spec.md §1.2): exact kNN that
    never materialises the query × reference matrix (memory O((N + M)·d + N·k); pml's ``CustomKNN`` builds it,
    ``FaissKNN`` needs faiss)::

        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        calc = AccuracyCalculator(knn_func=FlashdmlKNN())
        calc.get_accuracy(query, query_labels)                         # self mode, pml drops the query itself

    ``__call__(query, k, reference, ref_includes_query=False) -> (similarities [N, k], indices [N, k])`` — pml's
    interface. Like ``CustomKNN(CosineSimilarity())`` it returns similarities, largest first (ties → lower
    reference index); ``normalize=False`` uses dot products (``DotProductSimilarity``). With
    ``ref_includes_query`` (the first N references are the queries) it searches k + 1 neighbours and removes
    each query's own index with pml's ``return_results``, exactly as pml's own knn functions do.

    Args:
        normalize: cosine similarity (default) or dot products.

    Returns:
        ``(similarities, indices)``, each ``[N, k]`` (k capped at the number of references).

    Raises:
        ValueError: from ``flashdml.knn`` for bad inputs (a NaN row, mismatched dimensions, ...).

    Example:
        >>> import torch
        >>> from pytorch_metric_learning.distances import CosineSimilarity
        >>> from pytorch_metric_learning.utils.inference import CustomKNN
        >>> from flashdml.integrations.pml import FlashdmlKNN
        >>> query, reference = torch.randn(5, 8), torch.randn(20, 8)
        >>> sims, idx = FlashdmlKNN()(query, 3, reference)
        >>> sims.shape, idx.shape
        (torch.Size([5, 3]), torch.Size([5, 3]))
        >>> pml_sims, pml_idx = CustomKNN(CosineSimilarity())(query, 3, reference)
        >>> torch.equal(idx, pml_idx), torch.allclose(sims, pml_sims)
        (True, True)
        >>> from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        >>> calc = AccuracyCalculator(include=("precision_at_1",), knn_func=FlashdmlKNN())
        >>> list(calc.get_accuracy(query, torch.arange(5) // 2))
        ['precision_at_1']
    """

    def __init__(self, normalize: bool = True):
        self.normalize = bool(normalize)

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        query = _c_f.numpy_to_torch(query)
        reference = query if reference is None else _c_f.numpy_to_torch(reference)
        if ref_includes_query:
            k = k + 1
        k = min(int(k), reference.shape[0])
        values, indices = _fd.knn(query, reference, k, normalize=self.normalize)
        return _pml_return_results(values, indices, ref_includes_query)
