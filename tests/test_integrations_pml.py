"""flashdml.integrations.pml: the pytorch-metric-learning drop-ins equal pml's originals (values and gradients),
take pml's own path where flashdml does not cover an option, and are right in cross mode."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")

from pytorch_metric_learning import distances, losses as pml_losses, miners, reducers, regularizers  # noqa: E402

import flashdml as fd  # noqa: E402
from flashdml.integrations import pml as fdp  # noqa: E402
from helpers import clustered  # noqa: E402

OPS = ("threshold_consistent_margin", "ntxent", "contrastive_margin", "cross_example_softmax")

# name -> (constructor kwargs, the flashdml op the drop-in must call)
CASES = {
    "ThresholdConsistentMarginLoss": (dict(), "threshold_consistent_margin"),
    "TCM-custom": (dict(lambda_plus=0.7, lambda_minus=1.3, margin_plus=0.8, margin_minus=0.3),
                   "threshold_consistent_margin"),
    "NTXentLoss": (dict(), "ntxent"),
    "NTXent-t0.2": (dict(temperature=0.2), "ntxent"),
    "ContrastiveLoss": (dict(pos_margin=0.75, neg_margin=0.6, distance=distances.CosineSimilarity()),
                        "contrastive_margin"),
    "Contrastive-m+0.95": (dict(pos_margin=0.95, neg_margin=0.1, distance=distances.CosineSimilarity()),
                           "contrastive_margin"),
}


def _classes(name: str) -> str:
    return {"TCM-custom": "ThresholdConsistentMarginLoss", "NTXent-t0.2": "NTXentLoss",
            "Contrastive-m+0.95": "ContrastiveLoss", "Contrastive-m+0": "ContrastiveLoss"}.get(name, name)


def make_pair(name: str, **extra):
    """(pml original, flashdml drop-in) built with the same arguments."""
    kwargs, _ = CASES[name] if name in CASES else ({}, None)
    cls = _classes(name)
    return getattr(pml_losses, cls)(**kwargs, **extra), getattr(fdp, cls)(**kwargs, **extra)


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the public flashdml ops (calling through)."""
    counts = {op: 0 for op in OPS}
    for op in OPS:
        real = getattr(fd, op)

        def spy(*args, _real=real, _op=op, **kwargs):
            counts[_op] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(fd, op, spy)
    return counts


@pytest.fixture
def forbid_flashdml(monkeypatch):
    """Any call of a public flashdml op fails the test (the fallback must be pml alone)."""
    for op in OPS:
        def boom(*args, _op=op, **kwargs):
            raise AssertionError(f"flashdml.{_op} was called on a path that must fall back to pml")

        monkeypatch.setattr(fd, op, boom)


def run(loss_fn, x, *args, **kwargs):
    """(loss, d loss / d x) for a fresh leaf copy of x."""
    xx = x.detach().clone().requires_grad_(True)
    loss = loss_fn(xx, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, xx, allow_unused=False)
    return loss.detach(), grad


def assert_same(got, want, *, vtol=1e-6, gtol=1e-5):
    (lg, gg), (lw, gw) = got, want
    assert lg.dim() == 0 and lg.dtype == lw.dtype, (lg.shape, lg.dtype, lw.dtype)
    assert torch.isfinite(lg) and torch.isfinite(gg).all()
    assert abs(float(lg) - float(lw)) <= vtol * (1 + abs(float(lw))), (float(lg), float(lw))
    assert torch.allclose(gg, gw, rtol=0, atol=gtol * (1 + float(gw.abs().max()))), float((gg - gw).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# drop-ins equal pml (self mode), through flashdml
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("B,d", [(8, 3), (8, 32), (64, 3), (64, 32), (200, 3), (200, 32)])
@pytest.mark.parametrize("seed", [0, 1])
def test_drop_in_equals_pml(name, B, d, seed, calls):
    x, labels = clustered(B, d, max(2, B // 4), seed=seed)  # ~4 per class: NT-Xent's |P|x|N| stays small
    original, drop_in = make_pair(name)
    want = run(original, x, labels)
    got = run(drop_in, x, labels)
    assert calls[CASES[name][1]] == 1 and sum(calls.values()) == 1  # the fused path ran, once
    assert float(want[0]) > 0  # a batch with something to learn
    assert_same(got, want)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("labels_kind", ["one_class", "all_distinct", "two_classes", "single_row"])
def test_drop_in_edge_cases(name, labels_kind, calls):
    B = 1 if labels_kind == "single_row" else 33
    x, _ = clustered(B, 5, 3, seed=3)
    labels = {"one_class": torch.zeros(B, dtype=torch.long), "all_distinct": torch.arange(B),
              "two_classes": torch.arange(B) % 2, "single_row": torch.zeros(1, dtype=torch.long)}[labels_kind]
    original, drop_in = make_pair(name)
    want = run(original, x, labels)
    got = run(drop_in, x, labels)
    assert calls[CASES[name][1]] == 1
    assert_same(got, want)
    if labels_kind == "single_row" or (labels_kind == "one_class" and name.startswith("NTXent")) or (
            labels_kind == "all_distinct" and name.startswith("NTXent")):
        assert float(got[0]) == 0.0 and not got[1].any()  # pml's zero loss, exactly zero gradient


@pytest.mark.parametrize("name", ["ThresholdConsistentMarginLoss", "NTXentLoss", "ContrastiveLoss"])
def test_drop_in_equals_pml_float64_and_int32_labels(name, calls):
    x, labels = clustered(40, 7, 9, seed=5, dtype=torch.float64)
    original, drop_in = make_pair(name)
    want = run(original, x, labels.int())
    got = run(drop_in, x, labels.int())
    assert got[0].dtype == torch.float64 and calls[CASES[name][1]] == 1
    assert_same(got, want, vtol=1e-12, gtol=1e-11)


@pytest.mark.parametrize("name", ["ThresholdConsistentMarginLoss", "NTXentLoss", "ContrastiveLoss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_drop_in_half_precision_returns_pml_dtype(name, dtype, calls):
    x, labels = clustered(32, 16, 6, seed=9)
    original, drop_in = make_pair(name)
    want = original(x.to(dtype), labels)
    got = drop_in(x.to(dtype), labels)
    exact = original(x.double(), labels)
    assert calls[CASES[name][1]] == 1
    assert got.dtype == want.dtype == dtype  # pml returns the embeddings' dtype
    assert abs(float(got) - float(exact)) < 2e-2 * (1 + abs(float(exact)))


def test_ntxent_dot_product_distance_and_tensor_temperature(calls):
    x, labels = clustered(30, 6, 6, seed=7)
    x = 0.3 * x  # raw dot products: keep logits moderate
    original, drop_in = make_pair("NTXentLoss", distance=distances.DotProductSimilarity(normalize_embeddings=False))
    assert_same(run(drop_in, x, labels), run(original, x, labels))
    assert calls["ntxent"] == 1
    t_pml = torch.tensor(0.1, requires_grad=True)
    t_fd = torch.tensor(0.1, requires_grad=True)
    l_pml = pml_losses.NTXentLoss(temperature=t_pml)(x, labels)
    l_fd = fdp.NTXentLoss(temperature=t_fd)(x, labels)
    g_pml, = torch.autograd.grad(l_pml, t_pml)
    g_fd, = torch.autograd.grad(l_fd, t_fd)
    assert abs(float(l_fd.detach()) - float(l_pml.detach())) < 1e-6
    assert abs(float(g_fd) - float(g_pml)) < 1e-4 * (1 + abs(float(g_pml)))


def test_drop_ins_are_pml_losses():
    for cls in ("ThresholdConsistentMarginLoss", "NTXentLoss", "ContrastiveLoss"):
        drop_in = getattr(fdp, cls)()
        assert isinstance(drop_in, getattr(pml_losses, cls))
        assert isinstance(drop_in, pml_losses.BaseMetricLossFunction)
    # same defaults as pml
    assert fdp.NTXentLoss().temperature == pml_losses.NTXentLoss().temperature == 0.07
    assert (fdp.ContrastiveLoss().pos_margin, fdp.ContrastiveLoss().neg_margin) == (0, 1)
    tcm = fdp.ThresholdConsistentMarginLoss()
    assert (tcm.lambda_plus, tcm.lambda_minus, tcm.margin_plus, tcm.margin_minus) == (1.0, 1.0, 0.9, 0.5)
    assert isinstance(fdp.CrossExampleSoftmaxLoss(), pml_losses.BaseMetricLossFunction)
    with pytest.raises(AssertionError):  # pml's own constructor check is kept
        fdp.ThresholdConsistentMarginLoss(distance=distances.LpDistance())


# ----------------------------------------------------------------------------------------------------------------
# fallbacks: pml's own forward, flashdml not called
# ----------------------------------------------------------------------------------------------------------------
FALLBACKS = [
    ("NTXentLoss", dict(distance=distances.LpDistance()), None),
    ("NTXentLoss", dict(reducer=reducers.SumReducer()), None),
    ("NTXentLoss", dict(embedding_regularizer=regularizers.LpRegularizer()), None),
    ("NTXentLoss", dict(distance=distances.CosineSimilarity(power=2)), None),
    ("ThresholdConsistentMarginLoss", dict(reducer=reducers.SumReducer()), None),
    ("ThresholdConsistentMarginLoss", dict(embedding_regularizer=regularizers.LpRegularizer()), None),
    ("ContrastiveLoss", dict(), None),  # pml's default LpDistance
    ("ContrastiveLoss", dict(pos_margin=0.75, neg_margin=0.6, distance=distances.CosineSimilarity(),
                             reducer=reducers.MeanReducer()), None),
    ("ContrastiveLoss", dict(pos_margin=1.2, neg_margin=0.6, distance=distances.CosineSimilarity()), None),
    ("ContrastiveLoss", dict(pos_margin=0.75, neg_margin=0.6, distance=distances.CosineSimilarity()), "zero_row"),
    ("ContrastiveLoss", dict(pos_margin=0.75, neg_margin=0.6, distance=distances.CosineSimilarity(),
                             embedding_regularizer=regularizers.LpRegularizer()), None),
    ("NTXentLoss", dict(), "miner"),
    ("ThresholdConsistentMarginLoss", dict(), "miner"),
    ("ContrastiveLoss", dict(pos_margin=0.75, neg_margin=0.6, distance=distances.CosineSimilarity()), "miner"),
    ("NTXentLoss", dict(), "float_labels"),
]


@pytest.mark.parametrize("cls,kwargs,variant", FALLBACKS,
                         ids=[f"{c}-{v or next(iter(k), 'default')}" for c, k, v in FALLBACKS])
def test_fallback_runs_pml(cls, kwargs, variant, forbid_flashdml):
    x, labels = clustered(24, 8, 5, seed=11)
    if variant == "zero_row":
        x[3] = 0.0
    original, drop_in = getattr(pml_losses, cls)(**kwargs), getattr(fdp, cls)(**kwargs)
    extra = {}
    if variant == "miner":
        extra["indices_tuple"] = miners.MultiSimilarityMiner(epsilon=0.2)(x, labels)
        assert len(extra["indices_tuple"][0]) > 0
    if variant == "float_labels":
        labels = labels.float()
    want = run(original, x, labels, **extra)
    got = run(drop_in, x, labels, **extra)
    assert_same(got, want, vtol=0, gtol=0)  # bit-identical: it is pml's code


def test_contrastive_diagonal_is_where_spec_differs_from_pml():
    """docs/spec.md §2.4 keeps (i, i) as a positive: equal to pml while [m+ - s_ii]_+ = 0 (m+ < 1, no zero row), not after."""
    x, labels = clustered(24, 8, 5, seed=11)
    for m_pos, zero_row, same in [(0.75, False, True), (1.2, False, False), (0.75, True, False)]:
        xx = x.clone()
        if zero_row:
            xx[3] = 0.0
        want = pml_losses.ContrastiveLoss(pos_margin=m_pos, neg_margin=0.6, distance=distances.CosineSimilarity())
        ref = fd.reference.contrastive_margin(xx, labels, pos_margin=m_pos, neg_margin=0.6)
        assert (abs(float(ref) - float(want(xx, labels))) < 1e-6) == same, (m_pos, zero_row)
        # the drop-in always equals pml (it falls back where docs/spec.md §2.4 would differ)
        got = fdp.ContrastiveLoss(pos_margin=m_pos, neg_margin=0.6, distance=distances.CosineSimilarity())(xx, labels)
        assert abs(float(got) - float(want(xx, labels))) < 1e-6


def test_contrastive_margin_mapping_by_hand():
    """pml's cosine contrastive = mean of non-zero pos hinges + mean of non-zero neg hinges, diagonal dropped."""
    x, labels = clustered(20, 4, 4, seed=2, dtype=torch.float64)
    S = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(x).T
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(20, dtype=torch.bool)
    ph = (0.8 - S)[same & off].clamp_min(0)
    nh = (S - 0.3)[~same].clamp_min(0)
    by_hand = ph[ph > 0].mean() + nh[nh > 0].mean()
    got = fdp.ContrastiveLoss(pos_margin=0.8, neg_margin=0.3, distance=distances.CosineSimilarity())(x, labels)
    want = pml_losses.ContrastiveLoss(pos_margin=0.8, neg_margin=0.3, distance=distances.CosineSimilarity())(x, labels)
    assert abs(float(got) - float(by_hand)) < 1e-12 and abs(float(want) - float(by_hand)) < 1e-12


# ----------------------------------------------------------------------------------------------------------------
# cross mode: flashdml's semantics (pml's TCM is wrong there)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ThresholdConsistentMarginLoss", "NTXentLoss", "ContrastiveLoss"])
def test_cross_mode_equals_reference(name, calls):
    x, labels = clustered(48, 16, 6, seed=21)
    y, ref_labels = x[24:] + 0.3 * torch.randn(24, 16, generator=torch.Generator().manual_seed(1)), labels[24:]
    x, labels = x[:24], labels[:24]
    original, drop_in = make_pair(name)
    kwargs = CASES[name][0]
    ref_fn = {"ThresholdConsistentMarginLoss": lambda a, b, c, e: fd.reference.threshold_consistent_margin(a, b, c, e),
              "NTXentLoss": lambda a, b, c, e: fd.reference.ntxent(a, b, c, e),
              "ContrastiveLoss": lambda a, b, c, e: fd.reference.contrastive_margin(
                  a, b, c, e, pos_margin=kwargs["pos_margin"], neg_margin=kwargs["neg_margin"])}[name]

    xx, yy = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    got = drop_in(xx, labels, ref_emb=yy, ref_labels=ref_labels)
    gx, gy = torch.autograd.grad(got, (xx, yy))
    got = got.detach()
    assert calls[CASES[name][1]] == 1
    xr, yr = x.double().requires_grad_(True), y.double().requires_grad_(True)
    want = ref_fn(xr, labels, yr, ref_labels)
    wx, wy = torch.autograd.grad(want, (xr, yr))
    want = want.detach()
    assert abs(float(got) - float(want)) < 1e-6 * (1 + abs(float(want)))
    assert torch.allclose(gx.double(), wx, atol=1e-5) and torch.allclose(gy.double(), wy, atol=1e-5)

    pml_value = original(x, labels, ref_emb=y, ref_labels=ref_labels)
    if name == "ThresholdConsistentMarginLoss":
        # pml indexes the queries with the reference indices: its value is x-vs-x on the cross label pattern
        assert abs(float(pml_value) - float(got)) > 1e-3
        S = torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(x).T
        pos, neg = labels[:, None] == ref_labels[None, :], labels[:, None] != ref_labels[None, :]
        hp, hn = pos & (S <= 0.9), neg & (S >= 0.5)
        buggy = (0.9 - S)[hp].mean() + (S - 0.5)[hn].mean()
        assert abs(float(pml_value) - float(buggy)) < 1e-5
    else:  # pml's NT-Xent and Contrastive are right in cross mode
        assert abs(float(pml_value) - float(got)) < 1e-6 * (1 + abs(float(got)))


def test_ref_emb_is_embeddings_is_self_mode(calls):
    x, labels = clustered(20, 5, 4, seed=8)
    original, drop_in = make_pair("NTXentLoss")
    want = run(original, x, labels)
    got = drop_in(x, labels, ref_emb=x, ref_labels=labels)  # pml: `ref_labels is labels` drops the diagonal
    assert abs(float(got) - float(want[0])) < 1e-6 and calls["ntxent"] == 1
    # ref_emb without ref_labels (labels reused, diagonal dropped by pml): pml's own path
    y = x + 0.1
    assert abs(float(drop_in(x, labels, ref_emb=y)) - float(original(x, labels, ref_emb=y))) < 1e-7
    assert calls["ntxent"] == 1


# ----------------------------------------------------------------------------------------------------------------
# CrossExampleSoftmaxLoss
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:flashdml.cross_example_softmax_top_k")
@pytest.mark.parametrize("top_k", [None, 50])
@pytest.mark.parametrize("mode", ["self", "cross", "pairs"])
def test_xe_module_equals_reference(top_k, mode, calls):
    x, labels = clustered(40, 12, 6, seed=31)
    y, ref_labels = None, None
    if mode != "self":
        y = x.flip(0) + 0.2 * torch.randn(40, 12, generator=torch.Generator().manual_seed(3))
        ref_labels = labels.flip(0)
    if mode == "pairs":
        labels = ref_labels = None
    loss_fn = fdp.CrossExampleSoftmaxLoss(temperature=0.1, top_k=top_k)
    xx = x.clone().requires_grad_(True)
    yy = None if y is None else y.clone().requires_grad_(True)
    got = loss_fn(xx, labels, ref_emb=yy, ref_labels=ref_labels)
    grads = torch.autograd.grad(got, [t for t in (xx, yy) if t is not None])
    got = got.detach()
    assert calls["cross_example_softmax"] == 1
    xr = x.double().requires_grad_(True)
    yr = None if y is None else y.double().requires_grad_(True)
    want = fd.reference.cross_example_softmax(xr, yr, labels, ref_labels, temperature=0.1, top_k=top_k)
    wgrads = torch.autograd.grad(want, [t for t in (xr, yr) if t is not None])
    want = want.detach()
    assert float(want) > 0 and abs(float(got) - float(want)) < 1e-6 * (1 + abs(float(want)))
    for g, w in zip(grads, wgrads):
        assert torch.allclose(g.double(), w, atol=1e-5)


def test_xe_module_interface():
    x, labels = clustered(16, 4, 3, seed=4)
    loss_fn = fdp.CrossExampleSoftmaxLoss()
    assert (loss_fn.temperature, loss_fn.top_k) == (0.05, None)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_fn(x, labels, indices_tuple=miners.MultiSimilarityMiner()(x, labels))
    assert float(loss_fn(x)) == 0.0  # self mode without labels: no positive pair
    with pytest.raises(ValueError, match="ref_labels"):
        loss_fn(x, labels, ref_emb=x + 1)
    want = fd.reference.cross_example_softmax(x, labels=labels, normalize=False)
    dot = fdp.CrossExampleSoftmaxLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))
    assert abs(float(dot(x, labels)) - float(want)) < 1e-5 * (1 + float(want))
    reg = fdp.CrossExampleSoftmaxLoss(embedding_regularizer=regularizers.LpRegularizer())
    expected = float(loss_fn(x, labels)) + float(x.norm(dim=1).mean())
    assert abs(float(reg(x, labels)) - expected) < 1e-5
    with pytest.raises(AssertionError):
        fdp.CrossExampleSoftmaxLoss(distance=distances.LpDistance())


# ----------------------------------------------------------------------------------------------------------------
# pytorch-metric-learning stays optional
# ----------------------------------------------------------------------------------------------------------------
def test_flashdml_imports_without_pml():
    code = textwrap.dedent("""
        import sys
        sys.modules["pytorch_metric_learning"] = None   # makes `import pytorch_metric_learning` fail
        import flashdml, flashdml.integrations
        assert "flashdml.integrations.pml" not in sys.modules
        try:
            import flashdml.integrations.pml
        except ImportError as e:
            assert "pip install pytorch-metric-learning" in str(e), str(e)
            print("OK")
        else:
            raise SystemExit("import flashdml.integrations.pml succeeded without pytorch-metric-learning")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
