"""torch.compile(fullgraph=True) on every public op and loss module: forward and backward equal eager, and the
checks that read tensor values (a tensor temperature, non-finite rows, the number of negatives) raise the same
errors inside a compiled graph as in eager mode.

Compiles are slow on a small machine, so the batches are tiny and each case compiles once (``_compiled``
resets dynamo first, so cases do not share or evict each other's graphs).
"""
from __future__ import annotations

import pytest
import torch

import flashdml as fd
from flashdml import losses

from helpers import clustered

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

B, D = 16, 8


def _compiled(fn, backend="inductor"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def _compiler_for(backend):
    """The reference is plain PyTorch: tracing it whole is the point, Inductor's code generation is not."""
    return "aot_eager" if backend == "reference" else "inductor"


def _inputs(seed=0, n=B):
    x, labels = clustered(n, D, 4, seed=seed)
    y, _ = clustered(n, D, 4, seed=seed + 1)
    return x, y, labels


def _loss_of(out):
    """A scalar from an op's output: the loss itself, or a weighted sum of a selection's values."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else (out * torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)).sum()
    return _loss_of(out[0])


# name -> (fn(x, y, labels, t), needs y, uses t); t is a learnable 0-dim temperature tensor
CASES = {
    "similarity": lambda x, y, lab, t: fd.similarity(x, y),
    "knn": lambda x, y, lab, t: fd.knn(x, y, k=3),
    "knn_self": lambda x, y, lab, t: fd.knn(x, k=3),
    "hardest_negatives": lambda x, y, lab, t: fd.hardest_negatives(x, labels=lab, k=20),
    "batch_softmax": lambda x, y, lab, t: fd.batch_softmax(x, y, temperature=t, symmetric=True),
    "ntxent": lambda x, y, lab, t: fd.ntxent(x, lab, temperature=t),
    "cross_example_softmax": lambda x, y, lab, t: fd.cross_example_softmax(x, labels=lab, temperature=t),
    "cross_example_softmax_top_k": lambda x, y, lab, t: fd.cross_example_softmax(x, labels=lab, temperature=t,
                                                                                top_k=12),
    "threshold_consistent_margin": lambda x, y, lab, t: fd.threshold_consistent_margin(x, lab, pos_margin=0.8),
    "contrastive_margin": lambda x, y, lab, t: fd.contrastive_margin(x, lab),
    "contextual_loss": lambda x, y, lab, t: fd.contextual_loss(x, lab, k=4),
    "supcon": lambda x, y, lab, t: fd.supcon(x, lab, temperature=t),
    "multi_similarity": lambda x, y, lab, t: fd.multi_similarity(x, lab),
    "circle": lambda x, y, lab, t: fd.circle(x, lab),
}


def _run(fn, x, y, lab, t):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    t = t.clone().requires_grad_()
    out = fn(x, y, lab, t)
    loss = _loss_of(out)
    grads = torch.autograd.grad(loss, (x, y, t), allow_unused=True)
    return out, grads


def _assert_same(got, want, rtol=2e-5, atol=2e-6):
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        return
    for g, w in zip(got, want):
        if g is None or w is None:
            assert g is None or not g.abs().any()
            assert w is None or not w.abs().any()
        else:
            _assert_same(g, w, rtol, atol)


@pytest.mark.parametrize("backend", ["auto", "reference"])  # "auto": the C++ kernels here (similarity: reference)
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_eager(backend, name):
    fn = CASES[name]
    x, y, lab = _inputs()
    t = torch.tensor(0.1)
    with fd.backend(backend):
        want_out, want_grads = _run(fn, x, y, lab, t)
        got_out, got_grads = _run(_compiled(fn, _compiler_for(backend)), x, y, lab, t)
    _assert_same(got_out, want_out)
    _assert_same(got_grads, want_grads)
    assert any(g is not None and g.abs().sum() > 0 for g in got_grads[:1]), "no gradient reached x"


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiled_top_k_at_least_all_negatives_is_plain_cross_example_softmax(backend):
    """top_k >= |N| (and a batch with one class: no negative at all) follow the eager path's plain-XE result."""
    x, _, lab = _inputs(seed=3)
    fn = _compiled(lambda x, lab: fd.cross_example_softmax(x, labels=lab, top_k=B * B, temperature=0.2),
                   _compiler_for(backend))
    for labels in (lab, torch.zeros(B, dtype=torch.int64), torch.arange(B)):
        with fd.backend(backend):
            xg = x.clone().requires_grad_()
            got = fn(xg, labels)
            (gx,) = torch.autograd.grad(got, xg)
            xe = x.clone().requires_grad_()
            want = fd.cross_example_softmax(xe, labels=labels, temperature=0.2)
        (wx,) = torch.autograd.grad(want, xe)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, wx, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_tensor_temperature_is_validated_when_the_graph_runs(backend):
    x, _, lab = _inputs()
    with fd.backend(backend):
        fn = _compiled(lambda x, lab, t: fd.ntxent(x, lab, temperature=t))
        fn(x, lab, torch.tensor(0.07))  # compiles with a valid temperature
        for bad, match in ((-0.07, "must be > 0"), (float("inf"), "finite"), (1e-20, "below")):
            with pytest.raises(ValueError, match=f"temperature.*{match}"):
                fn(x, lab, torch.tensor(bad))
    top_k = _compiled(lambda x, lab, t: fd.cross_example_softmax(x, labels=lab, top_k=4, temperature=t))
    top_k(x, lab, torch.tensor(0.07))
    with pytest.raises(ValueError, match="must be > 0"):
        top_k(x, lab, torch.tensor(-0.07))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiled_selection_checks_raise_like_eager(backend):
    x, _, lab = _inputs()
    bad = x.clone()
    bad[5, 2] = float("nan")
    fd.set_backend(backend)
    knn = _compiled(lambda x: fd.knn(x, k=3), _compiler_for(backend))
    knn(x)
    with pytest.raises(ValueError, match=r"knn: x\[5\] has a NaN"):
        knn(bad)
    for hn in (lambda x, lab: fd.hardest_negatives(x, labels=lab, k=40),
               lambda x, lab: fd.reference.hardest_negatives(x, labels=lab, k=40)):  # without the glue's own check
        hn = _compiled(hn, _compiler_for(backend))
        hn(x, lab)
        few = (torch.arange(B) < 1).long()  # one row against fifteen: 2 * 15 = 30 negative pairs < k = 40
        with pytest.raises(ValueError, match=r"k = 40 is larger than the number of negative pairs in the batch \(30\)"):
            hn(x, few)
        with pytest.raises(ValueError, match=r"hardest_negatives: x\[5\] has a NaN"):
            hn(bad, lab)


def test_compiled_reference_contextual_loss_raises_on_a_collapsed_batch_when_the_graph_runs():
    """The reference's empty-set checks (|N(i)| = B, |R(i)| = 0) run as an op inside the compiled graph."""
    x, _, lab = _inputs()
    fn = _compiled(lambda x, lab: fd.reference.contextual_loss(x, lab, k=4), "aot_eager")
    torch.testing.assert_close(fn(x, lab), fd.reference.contextual_loss(x, lab, k=4), rtol=0, atol=0)
    same_rows = x[:1].expand(B, D).clone()  # every row identical: every sample is in every k-neighbourhood
    with pytest.raises(ValueError, match=r"contextual_loss: collapsed batch .* row\(s\) \[0, 1, 2, 3, 4\]"):
        fd.reference.contextual_loss(same_rows, lab, k=4)
    with pytest.raises(ValueError, match=r"contextual_loss: collapsed batch .* row\(s\) \[0, 1, 2, 3, 4\]"):
        fn(same_rows, lab)
    nan_rows = same_rows.clone()
    nan_rows[3, 1] = float("nan")  # the non-finite rule wins over the collapsed batch, compiled as in eager
    assert torch.isnan(fn(nan_rows, lab)) and torch.isnan(fd.reference.contextual_loss(nan_rows, lab))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiled_non_finite_rows_give_nan_losses(backend):
    x, _, lab = _inputs()
    bad = x.clone()
    bad[2, 0] = float("inf")
    fd.set_backend(backend)
    for fn in (lambda x, lab: fd.contextual_loss(x, lab), lambda x, lab: fd.cross_example_softmax(x, labels=lab,
                                                                                                   top_k=8)):
        compiled = _compiled(fn, _compiler_for(backend))
        assert torch.isfinite(compiled(x, lab))
        xb = bad.clone().requires_grad_()
        loss = compiled(xb, lab)
        assert torch.isnan(loss)
        (g,) = torch.autograd.grad(loss, xb)
        assert torch.isnan(g).any()


def test_compiled_loss_modules_with_learnable_temperature():
    x, y, lab = _inputs(seed=7)
    # the module convention forward(embeddings, labels=None, ref_emb=None, ref_labels=None): the earlier call
    # orders warn, and a warning is a graph break
    mods = [(losses.BatchSoftmaxLoss(learnable_temperature=True), (x, None, y)),
            (losses.NTXentLoss(learnable_temperature=True), (x, lab)),
            (losses.CrossExampleSoftmaxLoss(learnable_temperature=True), (x, lab)),
            (losses.CrossExampleSoftmaxLoss(top_k=10, learnable_temperature=True), (x, lab)),
            (losses.ThresholdConsistentMarginLoss(), (x, lab)),
            (losses.ContrastiveMarginLoss(), (x, lab)),
            (losses.ContextualLoss(), (x, lab))]
    for mod, args in mods:
        torch._dynamo.reset()
        compiled = torch.compile(mod, fullgraph=True)
        got = compiled(*args)
        want = mod(*args)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
        params = list(mod.parameters())
        if params:
            (gt,) = torch.autograd.grad(got, params)
            (wt,) = torch.autograd.grad(want, params)
            assert wt.abs() > 0
            torch.testing.assert_close(gt, wt, rtol=1e-4, atol=1e-6)


def test_metrics_pass_opcheck_including_aot_dispatch():
    """The op behind fd.metrics: schema, fake kernel (data-dependent sizes) and autograd registration."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(13, 5, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(11, 5, generator=g), dim=1)
    lx, ly = torch.arange(13) % 4, torch.arange(11) % 4
    rows = torch.arange(13)
    keep = torch.full((13,), 3)
    xs = x[:11]
    by_class = torch.argsort(ly, stable=True)  # per-class histograms read the rows grouped by class
    for args in ((x, y, lx, ly, rows, keep, False, True, 0), (xs, xs, ly, ly, by_class, keep[:11], True, False, 8)):
        res = torch.library.opcheck(torch.ops.flashdml.metrics_pass, args,
                                    test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        assert set(res.values()) == {"SUCCESS"}, res
    res = torch.library.opcheck(torch.ops.flashdml.metrics_pass, (xs, xs, ly, ly, by_class,
                                                                  torch.full((11,), 2), True, True, 4))
    assert set(res.values()) == {"SUCCESS"}, res


def test_compiled_ops_follow_a_changing_batch_size():
    """A second batch size recompiles with a symbolic B (the fakes and the traced paths take symbolic sizes)."""
    for fn in (lambda x, lab: fd.cross_example_softmax(x, labels=lab, top_k=12),
               lambda x, lab: fd.contextual_loss(x, lab)):
        compiled = _compiled(fn)
        for n in (16, 24):
            x, _, lab = _inputs(seed=n, n=n)
            torch.testing.assert_close(compiled(x, lab), fn(x, lab), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compiled_contextual_without_normalize_checks_overflow_when_the_graph_runs(backend):
    """normalize=False: a row whose squared norm overflows fp32 raises the eager ValueError from the compiled graph
    (the check is a flashdml_checks op there), and unit rows give eager's value."""
    x, _, lab = _inputs(seed=5)
    x = torch.nn.functional.normalize(x, dim=1)
    fn = _compiled(lambda x, lab: fd.contextual_loss(x, lab, k=4, normalize=False),
                   "aot_eager" if backend == "reference" else "inductor")
    with fd.backend(backend):
        torch.testing.assert_close(fn(x, lab), fd.contextual_loss(x, lab, k=4, normalize=False),
                                   rtol=2e-5, atol=2e-6)
        bad = x.clone()
        bad[3] *= 1e30
        for run in (fn, lambda x, lab: fd.contextual_loss(x, lab, k=4, normalize=False)):
            with pytest.raises(ValueError, match=r"normalize=False.*float32; row 3 has norm"):
                run(bad, lab)
