"""Fused knn (docs/spec.md §1.2) and hardest negatives (docs/spec.md §1.3) on the CPU against the reference.

Exact comparisons use integer-valued rows with normalize=False: every S entry is an exact small integer in fp32
and float64 alike, so the ties (many of them) must be broken exactly like the reference (lower index first).
On random normalised rows the fp32 tiles and the float64 reference can swap two entries whose S values differ
by less than fp32 rounding; `_assert_selection` allows only such swaps.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flashdml as fd
from flashdml._debug import poison_outputs
from helpers import CPU_SHAPES, clustered

pytestmark = pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")

STRATEGIES = {"auto": 0, "one_pass": 1, "radix": 2}
TOL = 2e-6


@pytest.fixture
def strategy(request):
    torch.ops.flashdml._set_selection_strategy(STRATEGIES[request.param])
    yield request.param
    torch.ops.flashdml._set_selection_strategy(0)


def _int_rows(n, d, seed, lo=-2, hi=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, d), generator=g).float()


def _fused(fn, *args, **kw):
    with fd.backend("cpu"), poison_outputs():
        return fn(*args, **kw)


def _assert_selection(values, chosen_s64, ref_values):
    """values: the kernel's; chosen_s64: float64 S at the kernel's indices; ref_values: the reference's sorted
    float64 values. Same sorted values up to rounding, and the kernel's indices point at those values."""
    assert torch.isfinite(values).all()
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=TOL)
    torch.testing.assert_close(chosen_s64, ref_values, rtol=0, atol=TOL)


# --------------------------------------------------------------------------------------------------- knn
@pytest.mark.parametrize("mode", ["self", "cross", "self_keep"])
def test_knn_exact_ties_match_reference(mode):
    for i, (B, d) in enumerate(CPU_SHAPES):
        M = B if mode != "cross" else (3 * B) // 2 + 1
        x = _int_rows(B, d, i)
        y = None if mode != "cross" else torch.cat([x[: B // 2], _int_rows(M - B // 2, d, 100 + i)])  # duplicates
        excl = mode == "self"
        n_cand = M - (1 if excl else 0)
        if n_cand < 1:
            continue
        for k in sorted({1, min(7, n_cand), n_cand}):
            got_v, got_i = _fused(fd.knn, x, y, k, normalize=False, exclude_self=excl)
            want_v, want_i = fd.reference.knn(x.double(), None if y is None else y.double(), k, normalize=False,
                                              exclude_self=excl)
            assert got_i.dtype == torch.int64 and got_v.dtype == torch.float32
            assert torch.equal(got_i, want_i), (B, d, k, mode)
            assert torch.equal(got_v.double(), want_v)


@pytest.mark.parametrize("k", [1, 10, 100, 1024])
def test_knn_random_normalized(k):
    x, _ = clustered(300, 33, 20, seed=1)
    y, _ = clustered(2100, 33, 20, seed=2)
    got_v, got_i = _fused(fd.knn, x, y, k)
    S = fd.reference.similarity(x.double(), y.double())
    want_v, _ = fd.reference.knn(x.double(), y.double(), k)
    _assert_selection(got_v, S.gather(1, got_i), want_v)
    assert (got_i >= 0).all() and (got_i < y.shape[0]).all()
    assert all(len(set(r.tolist())) == k for r in got_i)  # no column twice


def test_knn_gradient_matches_reference():
    x, _ = clustered(70, 9, 7, seed=3)
    y, _ = clustered(90, 9, 7, seed=4)
    g = torch.randn(70, 6, generator=torch.Generator().manual_seed(0))
    for yy in (y, None):
        xr, xf = x.double().requires_grad_(), x.clone().requires_grad_()
        yr = None if yy is None else yy.double().requires_grad_()
        yf = None if yy is None else yy.clone().requires_grad_()
        rv, ri = fd.reference.knn(xr, yr, 6)
        fv, fi = _fused(fd.knn, xf, yf, 6)
        assert torch.equal(fi, ri)
        (rv * g.double()).sum().backward()
        (fv * g).sum().backward()
        torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
        if yy is not None:
            torch.testing.assert_close(yf.grad.double(), yr.grad, rtol=1e-5, atol=1e-6)


def test_knn_half_precision_inputs_and_grad_dtype():
    x = torch.randn(40, 16).to(torch.bfloat16).requires_grad_()
    v, i = _fused(fd.knn, x, k=3)
    v.sum().backward()
    assert v.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    want_v, want_i = fd.reference.knn(x.detach().float(), k=3)
    torch.testing.assert_close(v, want_v, rtol=0, atol=1e-5)


def test_knn_errors():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="larger than the number of candidates"):
        fd.knn(x, k=6)
    with pytest.raises(ValueError, match="larger than the number of candidates"):
        fd.knn(x, torch.randn(4, 3), k=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fd.knn(x, k=0)
    with pytest.raises(TypeError, match="k must be an integer"):
        fd.knn(x, k=2.0)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        fd.knn(x, k=2, normalize=1)
    with pytest.raises(ValueError, match="same embedding dimension"):
        fd.knn(x, torch.randn(4, 2), k=2)
    v, i = fd.knn(x, k=6, exclude_self=False)  # with the query itself there are 6 candidates
    assert i.shape == (6, 6)


# ------------------------------------------------------------------------------------- hardest negatives
def _hn_inputs(mode, B, d, seed, integer):
    M = B if mode in ("self", "pair_self", "pair_cross") else (3 * B) // 2 + 1
    make = (lambda n, s: (_int_rows(n, d, s), torch.randint(0, max(1, B // 4), (n,),
                                                            generator=torch.Generator().manual_seed(s)))) \
        if integer else (lambda n, s: clustered(n, d, max(1, B // 4), seed=s))
    x, labels = make(B, seed)
    y, ref_labels = make(M, 50 + seed)
    if integer and mode == "cross":
        y[: B // 2] = x[: B // 2]  # duplicated rows: exact ties across x and y
    if mode == "self":
        y, ref_labels = None, None
    elif mode == "pair_cross":
        labels = ref_labels = None
    elif mode == "pair_self":
        y = labels = ref_labels = None
    return x, y, labels, ref_labels


def _n_neg(x, y, labels, ref_labels):
    batch = fd._validation.prepare_batch(x, y, labels, ref_labels)
    return int((batch.labels[:, None] != batch.ref_labels[None, :]).sum())


@pytest.mark.parametrize("strategy", list(STRATEGIES), indirect=True)
@pytest.mark.parametrize("mode", ["self", "cross", "pair_self", "pair_cross"])
def test_hardest_negatives_exact_ties_match_reference(strategy, mode):
    for i, (B, d) in enumerate(CPU_SHAPES):
        x, y, labels, ref_labels = _hn_inputs(mode, B, d, i, integer=True)
        n = _n_neg(x, y, labels, ref_labels)
        if n == 0:
            continue
        for k in sorted({1, min(B, n), min(5 * B, n), n}):
            got = _fused(fd.hardest_negatives, x, y, labels, ref_labels, k, normalize=False)
            want = fd.reference.hardest_negatives(x.double(), None if y is None else y.double(), labels,
                                                  ref_labels, k, normalize=False)
            assert got[1].dtype == got[2].dtype == torch.int64 and got[0].dtype == torch.float32
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), (mode, B, d, k)
            assert torch.equal(got[0].double(), want[0])


@pytest.mark.parametrize("strategy", list(STRATEGIES), indirect=True)
@pytest.mark.parametrize("mode", ["self", "cross", "pair_cross"])
def test_hardest_negatives_random_normalized(strategy, mode):
    x, y, labels, ref_labels = _hn_inputs(mode, 600, 129, 5, integer=False)
    S = fd.reference.similarity(x.double(), None if y is None else y.double())
    for k in (1, 600, 20000):
        v, r, c = _fused(fd.hardest_negatives, x, y, labels, ref_labels, k)
        want_v, _, _ = fd.reference.hardest_negatives(x.double(), None if y is None else y.double(), labels,
                                                      ref_labels, k)
        _assert_selection(v, S[r, c], want_v)
        flat = r * S.shape[1] + c
        assert torch.unique(flat).numel() == k
        lab = labels if labels is not None else torch.arange(x.shape[0])
        ref = ref_labels if ref_labels is not None else (lab if y is None else torch.arange(S.shape[1]))
        assert (lab[r] != ref[c]).all()  # negatives only


@pytest.mark.parametrize("strategy", ["radix", "one_pass"], indirect=True)
def test_hardest_negatives_one_value_everywhere(strategy):
    """~1.3M negatives with the same S value: the radix path's third pass (a boundary bin above 2^20 entries)
    must keep the k lowest flat indices."""
    B = 1200
    x = torch.ones(B, 1)
    labels = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(0))
    for k in (1, 5000, 300_000):
        v, r, c = _fused(fd.hardest_negatives, x, None, labels, None, k, normalize=False)
        _, wr, wc = fd.reference.hardest_negatives(x.double(), None, labels, None, k, normalize=False)
        assert torch.equal(r, wr) and torch.equal(c, wc) and (v == 1).all()


def test_hardest_negatives_gradient_matches_reference():
    x, labels = clustered(60, 7, 6, seed=8)
    y, ref_labels = clustered(80, 7, 6, seed=9)
    g = torch.randn(150, generator=torch.Generator().manual_seed(1))
    for yy, rl in ((y, ref_labels), (None, None)):
        xr, xf = x.double().requires_grad_(), x.clone().requires_grad_()
        yr = None if yy is None else yy.double().requires_grad_()
        yf = None if yy is None else yy.clone().requires_grad_()
        rv, rr, rc = fd.reference.hardest_negatives(xr, yr, labels, rl, 150)
        fv, fr, fc = _fused(fd.hardest_negatives, xf, yf, labels, rl, 150)
        assert torch.equal(fr, rr) and torch.equal(fc, rc)
        (rv * g.double()).sum().backward()
        (fv * g).sum().backward()
        torch.testing.assert_close(xf.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
        if yy is not None:
            torch.testing.assert_close(yf.grad.double(), yr.grad, rtol=1e-5, atol=1e-6)


def test_hardest_negatives_errors_and_defaults():
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="larger than the number of negative pairs"):
        fd.hardest_negatives(x, labels=labels, k=19)  # 18 negatives
    with pytest.raises(ValueError, match="larger than the number of negative pairs"):
        fd.hardest_negatives(x, labels=torch.zeros(6, dtype=torch.long), k=1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        fd.hardest_negatives(x, k=0)
    with pytest.raises(ValueError, match="ref_labels is required"):
        fd.hardest_negatives(x, torch.randn(4, 3), labels)
    with fd.backend("cpu"):
        v, r, c = fd.hardest_negatives(x, labels=labels, k=18)  # k = all negatives
        assert v.shape == (18,)
        v, r, c = fd.hardest_negatives(x)  # pair mode, k = B
        assert v.shape == (6,) and (r != c).all()


def test_selection_ops_pass_opcheck():
    x, labels = clustered(30, 7, 6, seed=8)
    y, ref_labels = clustered(20, 7, 6, seed=9)
    x, y = x.requires_grad_(), y.requires_grad_()
    torch.library.opcheck(torch.ops.flashdml.knn_fwd, (x, y, 5, False, True))
    torch.library.opcheck(torch.ops.flashdml.knn_fwd, (x, x, 5, True, False))
    torch.library.opcheck(torch.ops.flashdml.hardest_negatives_fwd, (x, y, labels, ref_labels, 40, False, True))
    torch.library.opcheck(torch.ops.flashdml.hardest_negatives_fwd, (x, x, labels, labels, 40, True, True))


_MEMORY_SCRIPT = textwrap.dedent("""
    import re, sys, torch
    import flashdml as fd
    torch.ops.flashdml._set_selection_strategy(int(sys.argv[1]))
    B, d, k = 20000, 16, 20000
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(B) // 4
    def kib(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
    with fd.backend("cpu"):
        fd.hardest_negatives(x[:600], labels=labels[:600], k=100)  # warm up threads and allocator
        base = kib("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        v, r, c = fd.hardest_negatives(x, labels=labels, k=k)
    print((kib("VmHWM") - base) / 1024.0)
""")


@pytest.mark.parametrize("strategy", [1, 2])
def test_hardest_negatives_memory_is_not_b_by_m(strategy):
    """B = M = 20000 (S would be 1.6 GB in fp32): the peak RSS above the inputs stays below 64 MiB."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(strategy)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    peak_mib = float(out.stdout.strip().splitlines()[-1])
    assert peak_mib < 64, f"peak {peak_mib:.1f} MiB above the inputs"


def test_hardest_negatives_beyond_int32_pair_count():
    """B = M = 50000 (2.5e9 pairs > 2^31), d = 16, k = 100000, pair mode, both strategies, against float64
    chunks: same k-th value, every pair clearly above it selected, the selected values right.
    The one slow test of this file: about a minute on 2 idle cores (two fused runs of 2.5e9 pairs each and
    the check); measured 1.5-3 min on the shared, loaded machine."""
    B, d, k = 50_000, 16, 100_000
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)
    results = {}
    for name in ("one_pass", "radix"):
        torch.ops.flashdml._set_selection_strategy(STRATEGIES[name])
        try:
            with fd.backend("cpu"):
                results[name] = fd.hardest_negatives(x, y, k=k, normalize=False)
        finally:
            torch.ops.flashdml._set_selection_strategy(0)
    v, r, c = results["radix"]
    assert all(torch.equal(a, b) for a, b in zip(results["one_pass"], results["radix"]))
    flat = r * B + c
    assert flat.max().item() > 2**31  # the index range beyond int32 is really used
    x64, y64 = x.double(), y.double()
    torch.testing.assert_close((x64[r] * y64[c]).sum(1), v.double(), rtol=0, atol=1e-6)
    kth = v[-1].item()
    # Screen in fp32 with a margin far above fp32's error (|S| <= 1, d = 16: ~1e-7), then decide in float64 on
    # the candidates: every pair whose float64 value is within 1e-6 of the k-th value or above is a candidate.
    buf = torch.empty(2000, B)
    cand_r, cand_c = [], []
    for r0 in range(0, B, 2000):
        s = torch.mm(x[r0:r0 + 2000], y.T, out=buf)
        s[torch.arange(2000), torch.arange(r0, r0 + 2000)] = -2.0  # pair mode: (i, i) is the positive
        hit = torch.nonzero(s >= kth - 1e-5)
        cand_r.append(hit[:, 0] + r0)
        cand_c.append(hit[:, 1])
    cand_r, cand_c = torch.cat(cand_r), torch.cat(cand_c)
    s64 = (x64[cand_r] * y64[cand_c]).sum(1)
    above_flat = (cand_r * B + cand_c)[s64 > kth + 1e-6]
    assert above_flat.numel() < k <= int((s64 >= kth - 1e-6).sum())
    assert torch.isin(above_flat, flat).all()


def test_benchmark_baselines_select_like_the_reference():
    """The chunked-PyTorch benchmark providers compute the same selections (up to their tie order)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import hardest_negatives as HN
    from benchmarks import knn as KNN

    x, y = KNN.make_inputs({"B": 50, "M": 300, "d": 8}, "cpu")
    v, i = KNN.chunked_knn(x, y, 7, block=16)
    want_v, want_i = fd.reference.knn(x, y, 7)
    assert torch.equal(i, want_i) and torch.allclose(v, want_v)
    x, labels = HN.make_inputs({"B": 90, "d": 8}, "cpu")
    v, r, c = HN.chunked_hardest_negatives(x, labels, 500, block=16)
    want_v, _, _ = fd.reference.hardest_negatives(x, labels=labels, k=500)
    # self mode: S is symmetric, so (i, j) and (j, i) tie and torch.topk orders them its own way
    S = fd.reference.similarity(x)
    assert torch.allclose(v, want_v) and torch.allclose(S[r, c], v) and (labels[r] != labels[c]).all()
