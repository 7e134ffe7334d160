"""flashdml.integrations.pml selection pieces: FlashdmlKNN as AccuracyCalculator's knn_func (equal to pml's own
exact CustomKNN(CosineSimilarity())) and HardestNegativesMiner (pml pair tuples of the batch's hardest negatives)."""
import pytest
import torch

pytest.importorskip("pytorch_metric_learning")

from pytorch_metric_learning import distances, losses as pml_losses  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # noqa: E402
from pytorch_metric_learning.utils.inference import CustomKNN  # noqa: E402

import flashdml as fd  # noqa: E402
from flashdml.integrations import pml as fdp  # noqa: E402
from helpers import clustered  # noqa: E402

pytestmark = pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_reciprocal_rank")


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_knn_func_equals_custom_knn(ref_includes_query):
    q, _ = clustered(300, 24, 30, seed=0)
    ref, _ = clustered(500, 24, 30, seed=1)
    if ref_includes_query:
        ref = torch.cat([q, ref])
    want_d, want_i = CustomKNN(distances.CosineSimilarity())(q, 12, ref, ref_includes_query)
    with fd.backend("cpu"):
        got_d, got_i = fdp.FlashdmlKNN()(q, 12, ref, ref_includes_query)
    assert got_i.shape == want_i.shape == (300, 12)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_d, want_d, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_accuracy_calculator_with_flashdml_knn(cross):
    e, el = clustered(1100, 16, 25, seed=2)  # one set of class centres for queries and references
    q, ql, r, rl = e[:400], el[:400], e[400:], el[400:]
    args = (q, ql, r, rl) if cross else (q, ql)
    want = AccuracyCalculator(include=METRICS, knn_func=CustomKNN(distances.CosineSimilarity())).get_accuracy(*args)
    with fd.backend("cpu"):
        got = AccuracyCalculator(include=METRICS, knn_func=fdp.FlashdmlKNN()).get_accuracy(*args)
    assert set(got) == set(METRICS)
    for m in METRICS:
        assert abs(got[m] - want[m]) < 1e-6, (m, got[m], want[m])
    assert 0.05 < got["precision_at_1"] < 1.0  # a case that exercises something


def _pml_hardest(emb, labels, ref, ref_labels, k):
    """pml's own pieces: every pair index and the cosine matrix, the k most similar negatives by a stable sort."""
    a1, p, a2, n = lmu.get_all_pairs_indices(labels, ref_labels)
    S = distances.CosineSimilarity()(emb, ref).double()
    flat = a2 * S.shape[1] + n
    order = torch.sort(S[a2, n], descending=True, stable=True).indices
    # get_all_pairs_indices lists pairs in row-major order (= increasing flat index): the stable sort keeps ties
    # at the lower flat index
    assert torch.equal(flat, torch.sort(flat).values)
    return a1, p, a2[order[:k]], n[order[:k]]


@pytest.mark.parametrize("cross", [False, True])
def test_miner_matches_pml_pairs(cross):
    e, el = clustered(210, 10, 15, seed=4)
    emb, labels = e[:120], el[:120]
    ref, ref_labels = (e[120:], el[120:]) if cross else (None, None)
    miner = fdp.HardestNegativesMiner(k=200)
    with fd.backend("cpu"):
        got = miner(emb, labels, ref, ref_labels)
    want = _pml_hardest(emb, labels, emb if ref is None else ref, labels if ref is None else ref_labels, 200)
    for g, w in zip(got, want):
        assert g.dtype == torch.int64 and torch.equal(g, w)
    assert miner.num_pos_pairs == want[0].numel() and miner.num_neg_pairs == 200


def test_miner_default_k_clamp_and_use_in_a_pml_loss():
    emb, labels = clustered(64, 8, 8, seed=6)
    emb.requires_grad_()
    with fd.backend("cpu"):
        tup = fdp.HardestNegativesMiner()(emb, labels)
        assert tup[2].numel() == 64  # k = batch size
        small = fdp.HardestNegativesMiner(k=10**9)(emb[:6], torch.tensor([0, 0, 0, 1, 1, 1]))
        assert small[2].numel() == 18  # clamped to the 18 negative pairs
        none = fdp.HardestNegativesMiner()(emb[:4], torch.zeros(4, dtype=torch.long))
        assert none[2].numel() == 0 and none[0].numel() == 12
    loss = pml_losses.ContrastiveLoss(pos_margin=0.75, neg_margin=0.6, distance=distances.CosineSimilarity())(
        emb, labels, tup)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad.abs().sum() > 0
