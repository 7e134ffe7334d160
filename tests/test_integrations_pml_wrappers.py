"""pml's loss wrappers around flashdml's drop-ins: CrossBatchMemory (flashdml's and pml's own), SelfSupervisedLoss
and DistributedLossWrapper. The fused path must equal pml's original (values and gradients, 1e-5 relative) and
must actually run (pml's pair-based NT-Xent is made to fail where the fused path is expected)."""
import pytest
import torch

pytest.importorskip("pytorch_metric_learning")

from pytorch_metric_learning import losses as pml_losses, miners  # noqa: E402
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu  # noqa: E402
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper  # noqa: E402

import flashdml as fd  # noqa: E402
from flashdml.integrations import pml as fdp  # noqa: E402
from flashdml.integrations.pml._excluded import excluded_self_pairs  # noqa: E402
from helpers import clustered  # noqa: E402

pytestmark = pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")

B, D, M, CLASSES = 24, 16, 64, 6


def _batches(n, dtype=torch.float32, seed=0):
    return [clustered(B, D, CLASSES, seed=seed + i, dtype=dtype) for i in range(n)]


def _assert_close(got, want, rtol=1e-5):
    """Equal within ``rtol`` relative to the largest entry of ``want`` (a loss, or a whole gradient)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * max(float(want.abs().max()), 1e-30), (err, got, want)


@pytest.fixture
def no_pml_ntxent(monkeypatch):
    """pml's NT-Xent computation fails the test: the call must have run flashdml's fused path."""
    def boom(self, *args, **kwargs):
        raise AssertionError("pml's NTXentLoss._compute_loss ran where the fused path was expected")
    monkeypatch.setattr(pml_losses.NTXentLoss, "_compute_loss", boom)


def _steps(loss_fn, batches, **kwargs):
    """(loss, grad) per step; the wrapper keeps its memory between steps."""
    out = []
    for x, labels in batches:
        xx = x.detach().clone().requires_grad_(True)
        loss = loss_fn(xx, labels, **kwargs)
        grad, = torch.autograd.grad(loss, xx)
        out.append((loss.detach(), grad))
    return out


def _pml_reference(batches, wrapper_cls=pml_losses.CrossBatchMemory, **kwargs):
    return _steps(wrapper_cls(pml_losses.NTXentLoss(temperature=0.1), D, memory_size=M), batches, **kwargs)


@pytest.mark.parametrize("wrapper", ["flashdml", "pml"])
def test_cross_batch_memory_ntxent_equals_pml(wrapper, no_pml_ntxent):
    """Five steps (the 64-row memory fills at step 3 and wraps): loss and gradient equal pml's within 1e-5.
    ``wrapper="pml"``: pml's own CrossBatchMemory builds the index tuple, the drop-in recognises it."""
    batches = _batches(5)
    cls = fdp.CrossBatchMemory if wrapper == "flashdml" else pml_losses.CrossBatchMemory
    got = _steps(cls(fdp.NTXentLoss(temperature=0.1), D, memory_size=M), batches)
    want = _WANT_CBM
    for (lg, gg), (lw, gw) in zip(got, want):
        _assert_close(lg, lw)
        _assert_close(gg, gw)


# pml's values, computed once at import (before any test replaces pml's NT-Xent).
_WANT_CBM = _pml_reference(_batches(5))


def test_cross_batch_memory_enqueue_mask_and_miner(no_pml_ntxent, monkeypatch):
    """enqueue_mask (no own-copy removal) runs fused and equals pml; with a miner the wrapper runs pml's path."""
    batches = _batches(3, seed=20)
    masks = [torch.arange(B) % 3 == 0 for _ in batches]
    got, want = [], []
    fused = fdp.CrossBatchMemory(fdp.NTXentLoss(temperature=0.1), D, memory_size=M)
    for (x, labels), mask in zip(batches, masks):
        xx = x.clone().requires_grad_(True)
        loss = fused(xx, labels, enqueue_mask=mask)
        got.append((loss.detach(), torch.autograd.grad(loss, xx)[0]))
    monkeypatch.undo()
    orig = pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(temperature=0.1), D, memory_size=M)
    for (x, labels), mask in zip(batches, masks):
        xx = x.clone().requires_grad_(True)
        loss = orig(xx, labels, enqueue_mask=mask)
        want.append((loss.detach(), torch.autograd.grad(loss, xx)[0]))
    for (lg, gg), (lw, gw) in zip(got, want):
        _assert_close(lg, lw)
        _assert_close(gg, gw)
    # A miner: pml's slow path (bit-identical to pml's own wrapper).
    miner_batches = _batches(2, seed=30)
    a = _steps(fdp.CrossBatchMemory(fdp.NTXentLoss(temperature=0.1), D, memory_size=M,
                                    miner=miners.MultiSimilarityMiner(epsilon=0.2)), miner_batches)
    b = _steps(pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(temperature=0.1), D, memory_size=M,
                                           miner=miners.MultiSimilarityMiner(epsilon=0.2)), miner_batches)
    for (lg, gg), (lw, gw) in zip(a, b):
        assert torch.equal(lg, lw) and torch.equal(gg, gw)


def test_self_mode_all_pairs_tuple_and_learnable_temperature():
    """A user-built ``lmu.get_all_pairs_indices(labels)`` (self mode, diagonal dropped) runs fused and equals
    pml; under CrossBatchMemory a learnable temperature gets pml's gradient too."""
    x, labels = clustered(B, D, CLASSES, seed=70)
    want = _SELF_TUPLE_PML
    xx = x.clone().requires_grad_(True)
    tup = lmu.get_all_pairs_indices(labels)
    got = _run_without_pml(lambda: fdp.NTXentLoss(temperature=0.1)(xx, labels, tup))
    _assert_close(got, want[0])
    _assert_close(torch.autograd.grad(got, xx)[0], want[1])
    results = {}
    for tag, pkg in (("fd", fdp), ("pml", pml_losses)):
        t = torch.tensor(0.1, requires_grad=True)
        cbm = pkg.CrossBatchMemory(pkg.NTXentLoss(temperature=t), D, memory_size=M)
        for xb, lb in _batches(3, seed=80):
            loss = cbm(xb, lb)
        results[tag] = (loss.detach(), torch.autograd.grad(loss, t)[0])
    _assert_close(results["fd"][0], results["pml"][0])
    _assert_close(results["fd"][1], results["pml"][1])


def _run_without_pml(fn):
    real = pml_losses.NTXentLoss._compute_loss
    pml_losses.NTXentLoss._compute_loss = _boom
    try:
        return fn()
    finally:
        pml_losses.NTXentLoss._compute_loss = real


def _self_tuple_pml():
    x, labels = clustered(B, D, CLASSES, seed=70)
    xx = x.clone().requires_grad_(True)
    loss = pml_losses.NTXentLoss(temperature=0.1)(xx, labels, lmu.get_all_pairs_indices(labels))
    return loss.detach(), torch.autograd.grad(loss, xx)[0]


_SELF_TUPLE_PML = _self_tuple_pml()


def _xe_oracle(x, labels, mem, mem_labels, self_cols, t):
    """Cross-Example Softmax over pml's own index tuple (all pairs minus the own copies), written out."""
    a1, p, a2, n = lmu.remove_self_comparisons(lmu.get_all_pairs_indices(labels, mem_labels), self_cols, len(mem))
    xs, ms = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(mem, dim=1)
    lam = torch.logsumexp((xs[a2] * ms[n]).sum(1) / t, 0)
    return torch.nn.functional.softplus(lam - (xs[a1] * ms[p]).sum(1) / t).mean()


def test_cross_batch_memory_accepts_cross_example_softmax():
    """pml refuses CrossExampleSoftmaxLoss; flashdml's wrapper takes it, and each step equals the loss written
    out over pml's index tuple (fused on CPU fp32, the dense fallback in float64)."""
    with pytest.raises(Exception, match="not supported"):
        pml_losses.CrossBatchMemory(fdp.CrossExampleSoftmaxLoss(), D, memory_size=M)
    for dtype in (torch.float32, torch.float64):
        cbm = fdp.CrossBatchMemory(fdp.CrossExampleSoftmaxLoss(temperature=0.1), D, memory_size=M)
        for x, labels in _batches(4, dtype=dtype, seed=40):
            xx = x.clone().requires_grad_(True)
            loss = cbm(xx, labels)
            g, = torch.autograd.grad(loss, xx)
            mem = cbm.embedding_memory if cbm.has_been_filled else cbm.embedding_memory[:cbm.queue_idx]
            mem_labels = cbm.label_memory[:len(mem)]
            xo = x.clone().requires_grad_(True)
            want = _xe_oracle(xo, labels, mem, mem_labels, cbm.curr_batch_idx, 0.1)
            gw, = torch.autograd.grad(want, xo)
            _assert_close(loss, want)
            _assert_close(g, gw)
    with pytest.raises(ValueError, match="top_k"):
        fdp.CrossBatchMemory(fdp.CrossExampleSoftmaxLoss(top_k=4), D, memory_size=M)(*_batches(1)[0])


def test_recogniser_rejects_other_tuples():
    """Only pml's all-pairs tuple minus at most one positive per row is recognised; the own-copy columns come out."""
    labels, ref = torch.randint(0, 4, (10,)), torch.randint(0, 4, (30,))
    ref[5:15] = labels
    full = lmu.get_all_pairs_indices(labels, ref)
    tup = lmu.remove_self_comparisons(full, torch.arange(5, 15), 30)
    assert torch.equal(excluded_self_pairs(labels, ref, tup), torch.arange(5, 15))
    assert torch.equal(excluded_self_pairs(labels, ref, full), torch.full((10,), -1))
    a1, p, a2, n = tup
    bad = [
        (a1, p, a2[1:], n[1:]),                      # a negative missing
        (a1[2:], p[2:], a2, n),                      # row 0 misses more than its own copy
        (a1.flip(0), p.flip(0), a2, n),              # not pml's row-major order
        (a1, p, a2, (n + 1) % 30),                   # pairs that are not negatives
        (a1, p, a2),                                 # a triplet tuple
    ]
    for t in bad:
        assert excluded_self_pairs(labels, ref, t) is None
    miner_tuple = miners.MultiSimilarityMiner(epsilon=0.2)(*clustered(20, 8, 4, seed=1))
    with pytest.raises(ValueError, match="indices_tuple"):
        fdp.CrossExampleSoftmaxLoss()(*clustered(20, 8, 4, seed=1), miner_tuple)


@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_loss(symmetric, no_pml_ntxent):
    """NT-Xent drop-in under SelfSupervisedLoss runs fused and equals pml's values (computed before the patch
    would bite: pml's SelfSupervisedLoss over pml's NT-Xent is evaluated through fd.ntxent's definition);
    CrossExampleSoftmaxLoss is accepted and equals fd.cross_example_softmax with one class per row pair."""
    x, v = _views()
    idx = torch.arange(B)
    xx = x.clone().requires_grad_(True)
    got = fdp.SelfSupervisedLoss(fdp.NTXentLoss(temperature=0.1), symmetric=symmetric)(xx, v)
    if symmetric:
        want = fd.ntxent(torch.cat([x, v]), torch.cat([idx, idx]), temperature=0.1)
    else:
        want = fd.ntxent(x, idx, v, idx, temperature=0.1)
    _assert_close(got, _SSL_PML[symmetric])
    _assert_close(got, want)
    with pytest.raises(Exception, match="not supported"):
        pml_losses.SelfSupervisedLoss(fdp.CrossExampleSoftmaxLoss())
    got_xe = fdp.SelfSupervisedLoss(fdp.CrossExampleSoftmaxLoss(temperature=0.1), symmetric=symmetric)(x, v)
    if symmetric:
        want_xe = fd.cross_example_softmax(torch.cat([x, v]), labels=torch.cat([idx, idx]), temperature=0.1)
    else:
        want_xe = fd.cross_example_softmax(x, v, temperature=0.1)  # pair mode: row i matches row i
    _assert_close(got_xe, want_xe)


def _views():
    x, _ = clustered(B, D, CLASSES, seed=50)
    return x, x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(51))


# pml's values, computed at import (before any test replaces pml's NT-Xent).
_SSL_PML = {sym: pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature=0.1), symmetric=sym)(*_views())
            for sym in (True, False)}


def test_distributed_loss_wrapper_single_process():
    """Outside torch.distributed pml's DistributedLossWrapper passes the call through: the drop-in is accepted
    and gives the unwrapped value. (pml 2.9's pass-through hands CrossBatchMemory five arguments it does not take,
    for pml's own CrossBatchMemory too, so the memory wrapper is only checked in the two-process test below.)"""
    x, labels = clustered(B, D, CLASSES, seed=60)
    with pytest.warns(UserWarning, match="non-distributed"):
        got = DistributedLossWrapper(fdp.NTXentLoss(temperature=0.1))(x, labels)
    _assert_close(got, pml_losses.NTXentLoss(temperature=0.1)(x, labels))


def _boom(*args, **kwargs):
    raise AssertionError("pml's NTXentLoss._compute_loss ran where the fused path was expected")


def _dlw_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    real_compute = pml_losses.NTXentLoss._compute_loss
    results = {}
    for name, efficient, make in [
        ("ntxent", False, lambda pkg: pkg.NTXentLoss(temperature=0.1)),
        ("ntxent-efficient", True, lambda pkg: pkg.NTXentLoss(temperature=0.1)),
        ("cbm", False, lambda pkg: pkg.CrossBatchMemory(pkg.NTXentLoss(temperature=0.1), D, memory_size=M)),
    ]:
        for tag, pkg in (("fd", fdp), ("pml", pml_losses)):
            loss_fn = DistributedLossWrapper(make(pkg), efficient=efficient)
            # flashdml's runs must not reach pml's pair-based NT-Xent (the fused path must run).
            pml_losses.NTXentLoss._compute_loss = _boom if tag == "fd" else real_compute
            steps = []
            for step in range(3 if name == "cbm" else 1):
                x, labels = clustered(B, D, CLASSES, seed=100 * step + rank)
                xx = x.clone().requires_grad_(True)
                loss = loss_fn(xx, labels)
                steps.append((loss.detach(), torch.autograd.grad(loss, xx)[0]))
            results[(name, tag)] = steps
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_distributed_loss_wrapper_two_processes(tmp_path):
    """pml's DistributedLossWrapper over two gloo processes: the NT-Xent drop-in (plain and efficient=True, whose
    all-pairs tuple the drop-in recognises) and flashdml's CrossBatchMemory equal pml's originals on every rank."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_dlw_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ("ntxent", "ntxent-efficient", "cbm"):
            for (lg, gg), (lw, gw) in zip(res[(name, "fd")], res[(name, "pml")]):
                _assert_close(lg, lw)
                _assert_close(gg, gw)


def test_pml_style_layout():
    """The names sit where pml users look for them, and ``knn_func`` plugs into AccuracyCalculator."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    import flashdml.integrations.pml.losses as fl
    import flashdml.integrations.pml.miners as fm

    assert fl.NTXentLoss is fdp.NTXentLoss and fl.CrossBatchMemory is fdp.CrossBatchMemory
    assert fm.HardestNegativesMiner is fdp.HardestNegativesMiner
    assert isinstance(fdp.knn_func, fdp.FlashdmlKNN)
    x, labels = clustered(60, 8, 6, seed=90)
    calc = AccuracyCalculator(include=("precision_at_1",), knn_func=fdp.knn_func)
    assert 0.0 < calc.get_accuracy(x, labels)["precision_at_1"] <= 1.0


@pytest.mark.parametrize("loss_name", ["NTXentLoss", "CrossExampleSoftmaxLoss"])
def test_memory_of_one_batch_is_self_mode(loss_name, no_pml_ntxent):
    """pml's own sanity check, for the fused path: with memory_size == batch size the memory holds exactly the
    batch, so every step's value equals the plain self-mode loss (own pairs dropped) — for NT-Xent and for XE.
    (Gradients differ by design: the memory is detached, self mode also differentiates the reference side.)"""
    fn = fd.ntxent if loss_name == "NTXentLoss" else (lambda x, l, **kw: fd.cross_example_softmax(x, labels=l, **kw))
    for size in (20, 25, 35):
        cbm = fdp.CrossBatchMemory(getattr(fdp, loss_name)(temperature=0.1), D, memory_size=size)
        for step in range(3):
            x, labels = clustered(size, D, 4, seed=200 + 10 * size + step)
            _assert_close(cbm(x, labels), fn(x, labels, temperature=0.1))


def _dot_ntxent(pkg):
    from pytorch_metric_learning.distances import DotProductSimilarity

    return pkg.NTXentLoss(temperature=1.0, distance=DotProductSimilarity(normalize_embeddings=False))


def _dot_batches():
    return [(0.3 * x, labels) for x, labels in _batches(4, seed=300)]


_WANT_CBM_DOT = _steps(pml_losses.CrossBatchMemory(_dot_ntxent(pml_losses), D, memory_size=M), _dot_batches())


def test_cross_batch_memory_dot_product(no_pml_ntxent):
    """DotProductSimilarity(normalize_embeddings=False): the own-copy logit x_i·x_i has a gradient into x_i, which the
    fused path must remove too (with cosine similarity that gradient is zero)."""
    got = _steps(fdp.CrossBatchMemory(_dot_ntxent(fdp), D, memory_size=M), _dot_batches())
    for (lg, gg), (lw, gw) in zip(got, _WANT_CBM_DOT):
        _assert_close(lg, lw)
        _assert_close(gg, gw)
