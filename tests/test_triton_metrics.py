"""The Triton metrics pass (triton_kernels/metrics.py) against a dense float64 model of the pass, the C++ CPU
``flashdml::metrics_pass`` and, through ``flashdml.metrics``, the reference metrics.

Without a GPU the kernel runs on CPU tensors under the Triton interpreter (tests/conftest.py), so shapes are small.
Data: "unit grid" rows — exactly unit-norm vectors whose entries are signed powers of two (an entry 1 split into
four entries 1/2, recursively), so the L2 normalisation is exact and every similarity is exact in fp32 (and fp16)
in any summation order: both kernels see bitwise the same S, with huge numbers of exact ties and values on bin
edges. On such data the top-k lists, the fine pair histograms and the per-class OPIS histograms must equal the
float64 model's and the CPU kernel's exactly, and so must every metric computed from them. Random rows check the
exactness of recall@k / MAP@R (the re-ranking in flashdml.metrics) and the histograms up to edge crossings.
Every output starts poisoned (NaN / sentinel): an element the kernel forgets to write fails.
"""
from __future__ import annotations

import math

import pytest
import torch

import flashdml as fd
from flashdml._debug import poison_outputs

pytestmark = pytest.mark.skipif(not fd.available_backends()["triton"][0], reason="triton backend unavailable here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAVE_CPU = fd.available_backends()["cpu"][0]
BINS = 1 << 16

from flashdml.triton_kernels import metrics as tm  # noqa: E402


def unit_grid(n, d, g, max_splits=None):
    """float32 [n, d] rows of norm exactly 1 with signed power-of-two entries (random splits 1 -> 4 x 1/2)."""
    out = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        vals = {int(torch.randint(0, d, (1,), generator=g)): 1.0}
        splits = int(torch.randint(0, 1 + (max_splits if max_splits is not None else d // 3), (1,), generator=g))
        for _ in range(splits):
            free = [c for c in range(d) if c not in vals]
            if len(free) < 3:
                break
            c = list(vals)[int(torch.randint(0, len(vals), (1,), generator=g))]
            if vals[c] < 2.0 ** -4:
                continue
            half = vals[c] / 2
            vals[c] = half
            for f in torch.randperm(len(free), generator=g)[:3].tolist():
                vals[free[f]] = half
        for c, v in vals.items():
            out[i, c] = v if torch.rand(1, generator=g) < 0.5 else -v
    return out


def grid_data(n, d, seed, pool=None):
    """Unit-grid rows drawn from a small pool (repeated rows: exact duplicates and ties)."""
    g = torch.Generator().manual_seed(seed)
    base = unit_grid(pool or max(1, n // 3), d, g)
    return base[torch.randint(0, base.shape[0], (n,), generator=g)]


def labels_with_singletons(n, seed):
    """Labels with classes of 1..6 samples (several singletons), shuffled."""
    g = torch.Generator().manual_seed(seed)
    sizes, total = [], 0
    while total < n:
        s = min(int(torch.randint(1, 7, (1,), generator=g)), n - total)
        sizes.append(s)
        total += s
    lab = torch.repeat_interleave(torch.arange(len(sizes)) * 3 + 1, torch.tensor(sizes))  # non-dense label values
    return lab[torch.randperm(n, generator=g)]


# ----------------------------------------------------------------------------------------------- dense model
def model_pass(x, y, labels, ref_labels, rows, keep, self_mode, pair_hist, opis_bins):
    """float64 dense model of metrics_pass (the op's documented semantics)."""
    S = x.double()[rows] @ y.double().T
    R, M = S.shape
    offsets = torch.zeros(R + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(keep, 0)
    idx, val = [], []
    for r in range(R):
        s = S[r].clone()
        cand = torch.arange(M)
        if self_mode:
            cand = cand[cand != rows[r]]
        order = cand[torch.sort(-s[cand], stable=True).indices][: int(keep[r])]
        idx.append(order)
        val.append(s[order])
    idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    val = torch.cat(val) if val else torch.zeros(0, dtype=torch.float64)
    b = torch.clamp(torch.floor((S + 1.0) * (BINS // 2)), 0, BINS - 1).long()
    same = labels[rows][:, None] == ref_labels[None, :]
    above = torch.arange(M)[None, :] > rows[:, None]
    fine = pair_hist or opis_bins > 0
    hist = torch.zeros((2, BINS) if fine else (0, 0), dtype=torch.int64)
    if fine:
        counted = above if self_mode else torch.ones_like(same)
        hist[0] = torch.bincount(b[counted & same], minlength=BINS)
        hist[1] = torch.bincount(b[counted & ~same], minlength=BINS)
    cpos = cneg = torch.zeros(0, 0, dtype=torch.int64)
    if opis_bins and R:
        shift = int(round(math.log2(BINS // opis_bins)))
        classes = torch.unique(ref_labels)
        cls = torch.searchsorted(classes, labels[rows])
        first, n_cls = int(cls[0]), int(cls[-1] - cls[0]) + 1
        cpos = torch.zeros(n_cls, opis_bins, dtype=torch.int64)
        cneg = torch.zeros(n_cls, opis_bins, dtype=torch.int64)
        cb = b >> shift
        for r in range(R):
            c = int(cls[r]) - first
            cpos[c] += torch.bincount(cb[r][same[r] & above[r]], minlength=opis_bins)
            cneg[c] += torch.bincount(cb[r][~same[r]], minlength=opis_bins)
    return offsets, idx, val, hist, cpos, cneg


NAMES = ("offsets", "indices", "values", "pair_hist", "class_pos", "class_neg")


def assert_same(got, want, what):
    for name, a, b in zip(NAMES, got, want):
        a = a.cpu()
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if name == "values":
            assert torch.equal(a.double(), b.double()), f"{what} {name} differ"
        else:
            assert torch.equal(a, b), f"{what} {name}: {int((a != b).sum())} entries differ"


@pytest.fixture(autouse=True)
def poisoned(poison_triton_outputs):
    return poison_triton_outputs  # conftest.py


# (B, M, d, mode, keep kind, pair_hist, opis_bins, dtype, num_splits, rows kind)
CASES = [
    (5, 5, 1, "self", "all", True, 256, torch.float32, None, "all"),
    (37, 37, 1, "self", "mixed", True, 1024, torch.float32, 2, "all"),
    (37, 37, 3, "self", "mixed", False, 0, torch.float32, None, "subset"),
    (130, 130, 3, "self", "big", True, 2048, torch.float32, 2, "all"),        # keep up to 129: three rounds
    (37, 70, 129, "cross", "mixed", True, 0, torch.float32, 3, "subset"),
    (70, 37, 129, "cross", "none", True, 0, torch.float32, None, "all"),     # histograms only
    (37, 37, 129, "self", "mixed", True, 512, torch.float16, None, "all"),   # tensor-core path
    (130, 70, 16, "cross", "big", False, 0, torch.float16, 2, "subset"),
]


def _case_inputs(B, M, d, mode, keep_kind, opis_bins, rows_kind, seed):
    self_mode = mode == "self"
    x = grid_data(B, d, seed)
    y = x if self_mode else torch.cat([x[: B // 3], grid_data(M - B // 3, d, seed + 1)])
    labels = labels_with_singletons(B, seed)
    ref_labels = labels if self_mode else labels_with_singletons(M, seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    if rows_kind == "all":
        rows = torch.arange(B)
    else:
        rows = torch.randperm(B, generator=g)[: max(1, 2 * B // 3)]
    if opis_bins:  # rows sorted by class (stable)
        cls = torch.searchsorted(torch.unique(ref_labels), labels[rows])
        rows = rows[torch.argsort(cls, stable=True)]
    C = M - 1 if self_mode else M
    R = rows.shape[0]
    if keep_kind == "all":
        keep = torch.full((R,), C)
    elif keep_kind == "none":
        keep = torch.zeros(R, dtype=torch.int64)
    elif keep_kind == "mixed":
        keep = torch.randint(0, min(C, 20) + 1, (R,), generator=g)
        keep[0] = C
    else:
        keep = torch.randint(0, C + 1, (R,), generator=g)
        keep[: min(3, R)] = C
    return x, y, labels, ref_labels, rows, keep, self_mode


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}M{c[1]}d{c[2]}_{c[3]}_{c[4]}_o{c[6]}_{str(c[7])[6:]}")
def test_raw_pass_matches_dense_model_and_cpu_kernel(case):
    B, M, d, mode, keep_kind, pair_hist, opis_bins, dtype, splits, rows_kind = case
    x, y, labels, ref_labels, rows, keep, self_mode = _case_inputs(B, M, d, mode, keep_kind, opis_bins, rows_kind,
                                                                   seed=B + M + d)
    want = model_pass(x, y, labels, ref_labels, rows, keep, self_mode, pair_hist, opis_bins)
    xt, yt = x.to(dtype).to(DEVICE), y.to(dtype).to(DEVICE)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    with poison_outputs():
        got = tm.metrics_pass_impl(xt, xt if self_mode else yt, dev(labels), dev(ref_labels), dev(rows), dev(keep),
                                   self_mode, pair_hist, opis_bins, num_splits=splits)
    assert_same(got, want, "triton vs float64 model")
    if HAVE_CPU:
        with poison_outputs():
            cpu = torch.ops.flashdml.metrics_pass(x.to(dtype).float(), y.to(dtype).float(), labels, ref_labels, rows,
                                                  keep, self_mode, pair_hist, opis_bins)
        assert_same(got, cpu, "triton vs CPU kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_each_round_computes_s_once(dtype):
    """The launches of the pass (recorded dry: no kernel runs): round 0 makes the top-k lists and both histograms in
    one kernel for every dtype (fp16 / bf16 used to make a histogram-only pass over S first), the later rounds of
    the rows keeping more than 64 only lists; a call keeping nothing makes one histogram-only launch."""
    from flashdml.triton_kernels import _launch_log

    B = 150
    x = grid_data(B, 8, 3).to(dtype)
    labels = torch.sort(labels_with_singletons(B, 3)).values  # rows in class order (OPIS)
    keep = torch.full((B,), 10)
    keep[:2] = 130  # two rows need three rounds

    def passes(keep):
        with _launch_log.record_launches(dry=True) as log:
            tm.metrics_pass_impl(x, x, labels, labels, torch.arange(B), keep, True, True, 256)
        return [(a.params["TOPK"], a.params["FINE"], a.params["USE_BOUND"], a.grid[0]) for a in log.launches
                if a.kernel == "_metrics_pass_kernel"]

    bm = tm.CONFIGS[dtype][0]["BLOCK_M"]
    later = -(-2 // tm.CONFIGS[dtype][1]["BLOCK_M"])
    assert passes(keep) == [(True, True, False, -(-B // bm)), (True, False, True, later), (True, False, True, later)]
    assert passes(torch.zeros(B, dtype=torch.int64)) == [(False, True, False, -(-B // bm))]


def _cuda_kernel_available():
    try:
        return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "flashdml::metrics_pass", "CUDA")
    except Exception:  # noqa: BLE001  (no flashdml._C)
        return False


@pytest.mark.skipif(not _cuda_kernel_available(), reason="needs a GPU and flashdml._C built with the CUDA kernels")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}M{c[1]}d{c[2]}_{c[3]}_{c[4]}_o{c[6]}_{str(c[7])[6:]}")
def test_cuda_kernel_matches_dense_model(case):
    """The C++ CUDA metrics_pass (csrc/cuda/metrics.cu; emulated on the CPU by tests/test_cuda_emulation.py) on the
    same cases, on the GPU."""
    B, M, d, mode, keep_kind, pair_hist, opis_bins, dtype, _, rows_kind = case
    x, y, labels, ref_labels, rows, keep, self_mode = _case_inputs(B, M, d, mode, keep_kind, opis_bins, rows_kind,
                                                                   seed=B + M + d)
    want = model_pass(x, y, labels, ref_labels, rows, keep, self_mode, pair_hist, opis_bins)
    for dt in (dtype, torch.bfloat16):
        xt, yt = x.to(dt).cuda(), y.to(dt).cuda()
        with poison_outputs():
            got = torch.ops.flashdml.metrics_pass(xt, xt if self_mode else yt, labels.cuda(), ref_labels.cuda(),
                                                  rows.cuda(), keep.cuda(), self_mode, pair_hist, opis_bins)
        assert_same(got, want, f"CUDA kernel {dt}")


def test_registered_op_and_input_errors():
    x = grid_data(9, 4, 0).to(DEVICE)
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4], device=DEVICE)
    rows, keep = torch.arange(9, device=DEVICE), torch.full((9,), 3, device=DEVICE)
    out = torch.ops.flashdml_triton.metrics_pass(x, x, lab, lab, rows, keep, True, True, 256)
    want = model_pass(x.cpu(), x.cpu(), lab.cpu(), lab.cpu(), rows.cpu(), keep.cpu(), True, True, 256)
    assert_same(out, want, "registered op")
    with pytest.raises(ValueError, match="self mode"):
        tm.metrics_pass_impl(x, x[:5], lab, lab[:5], rows, keep, False, False, 256)
    with pytest.raises(ValueError, match="power of two"):
        tm.metrics_pass_impl(x, x, lab, lab, rows, keep, True, False, 300)
    with pytest.raises(ValueError, match="sorted by class"):
        tm.metrics_pass_impl(x, x, lab, lab, rows.flip(0), keep, True, False, 256)
    with pytest.raises(ValueError, match="keep"):
        tm.metrics_pass_impl(x, x, lab, lab, rows, torch.full((9,), 9, device=DEVICE), True, False, 0)
    with pytest.raises(ValueError, match="out of range"):
        tm.metrics_pass_impl(x, x, lab, lab, rows + 1, keep, True, False, 0)
    with pytest.raises(RuntimeError, match="fewer candidates"):
        bad = x.clone()
        bad[3] = float("nan")
        tm.metrics_pass_impl(bad, bad, lab, lab, rows, torch.full((9,), 8, device=DEVICE), True, False, 0)
    empty = tm.metrics_pass_impl(x, x, lab, lab, rows[:0], keep[:0], True, True, 256)
    assert empty[0].tolist() == [0] and empty[1].numel() == 0 and empty[3].shape == (2, BINS)
    assert empty[4].shape == (0, 256)


# ----------------------------------------------------------------------------------------------- through fd.metrics
ALL = ("recall_at_k", "map_at_r", "pr_auc", "opis")


def _evaluate(backend, x, labels, y=None, ref_labels=None, metrics=ALL, ks=(1, 2, 4, 10)):
    with fd.backend(backend), poison_outputs():
        return fd.metrics.evaluate(x, labels, metrics=metrics, ks=ks, y=y, ref_labels=ref_labels)


@pytest.mark.parametrize("n,d", [(37, 1), (130, 3), (37, 129)])
def test_evaluate_self_mode_grid_equals_reference_and_cpu(n, d):
    x = grid_data(n, d, 10 + n + d)
    labels = labels_with_singletons(n, n + d)
    got = _evaluate("triton", x.to(DEVICE), labels.to(DEVICE))
    ref = fd.reference.evaluate(x, labels, metrics=ALL, ks=(1, 2, 4, 10))
    for k in ("recall@1", "recall@2", "recall@4", "recall@10", "map@r"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), (k, got[k], ref[k])  # same ranks; sums rounded
    if HAVE_CPU:
        cpu = _evaluate("cpu", x, labels)
        assert got == cpu or all(got[k] == cpu[k] or (math.isnan(got[k]) and math.isnan(cpu[k])) for k in cpu)


@pytest.mark.parametrize("nq,ng,d", [(37, 70, 3), (70, 37, 129)])
def test_evaluate_cross_mode_grid_equals_reference_and_cpu(nq, ng, d):
    q = grid_data(nq, d, 20 + d)
    g = torch.cat([q[:10], grid_data(ng - 10, d, 21 + d)])
    ql, gl = labels_with_singletons(nq, 3), labels_with_singletons(ng, 4)
    metrics = ("recall_at_k", "map_at_r", "pr_auc")
    got = _evaluate("triton", q.to(DEVICE), ql.to(DEVICE), g.to(DEVICE), gl.to(DEVICE), metrics)
    ref = fd.reference.evaluate(q, ql, metrics=metrics, ks=(1, 2, 4, 10), y=g, ref_labels=gl)
    for k in ("recall@1", "recall@2", "recall@4", "recall@10", "map@r"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), (k, got[k], ref[k])  # same ranks; sums rounded
    if HAVE_CPU:
        cpu = _evaluate("cpu", q, ql, g, gl, metrics)
        assert got["pr_auc"] == cpu["pr_auc"]
        assert all(got[k] == cpu[k] for k in cpu)


def test_evaluate_random_rows_recall_map_exact_histograms_close():
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(12, 16, generator=g)
    labels = torch.randint(0, 12, (130,), generator=g)
    x = centers[labels] + 0.7 * torch.randn(130, 16, generator=g)
    got = _evaluate("triton", x.to(DEVICE), labels.to(DEVICE))
    ref = fd.reference.evaluate(x, labels, metrics=ALL, ks=(1, 2, 4, 10))
    for k in ("recall@1", "recall@2", "recall@4", "recall@10", "map@r"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), (k, got[k], ref[k])  # same ranks; sums rounded
    assert abs(got["pr_auc"] - ref["pr_auc"]) < 1e-3
    if HAVE_CPU:  # fp32 S from two summation orders: a few pairs may cross a bin edge (|dS| ~ 1e-7, h = 3e-5)
        cpu = _evaluate("cpu", x, labels)
        for k in ("recall@1", "recall@10", "map@r"):
            assert got[k] == cpu[k]  # the same exact ranks through the same host code: bitwise equal
        assert abs(got["pr_auc"] - cpu["pr_auc"]) < 1e-5
        assert abs(got["opis"] - cpu["opis"]) < 1e-4 and abs(got["eps_opis"] - cpu["eps_opis"]) < 1e-4


def test_single_metric_functions_dispatch_to_triton(monkeypatch):
    x = grid_data(20, 4, 1)
    labels = labels_with_singletons(20, 1)
    calls = []
    real = tm.metrics_pass_impl
    monkeypatch.setattr(tm, "metrics_pass_impl", lambda *a, **k: calls.append(1) or real(*a, **k))
    with fd.backend("triton"):
        r = fd.metrics.recall_at_k(x.to(DEVICE), labels.to(DEVICE), ks=(1, 3))
        m = fd.metrics.map_at_r(x.to(DEVICE), labels.to(DEVICE))
    assert len(calls) == 2
    ref = fd.reference.evaluate(x, labels, metrics=("recall_at_k", "map_at_r"), ks=(1, 3))
    assert r == pytest.approx({1: ref["recall@1"], 3: ref["recall@3"]}, abs=1e-12)
    assert m == pytest.approx(ref["map@r"], abs=1e-12)


# ----------------------------------------------------------------------------------------------- tracing the op
def _trace_args():
    x = grid_data(9, 4, 0).to(DEVICE)
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4], device=DEVICE)
    return (x, x, lab, lab, torch.arange(9, device=DEVICE), torch.full((9,), 3, device=DEVICE), True, True, 256)


def test_metrics_op_opcheck_with_aot_dispatch():
    """torch.library.opcheck of flashdml_triton::metrics_pass including its AOT-dispatch test (tracing with fake
    tensors under functionalisation, as torch.compile does): its output sizes depend on the data (sum of keep, the
    rows' classes), so the op must be traced through its fake kernel, never by running its body on fake tensors
    (the body reads sizes on the host)."""
    res = torch.library.opcheck(torch.ops.flashdml_triton.metrics_pass.default, _trace_args(),
                                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert set(res.values()) == {"SUCCESS"}, res


def test_metrics_op_compiles_through_its_fake():
    """torch.compile (fullgraph, AOT dispatch with functionalisation: aot_eager) traces the op on fake tensors
    through its fake kernel (data-dependent output sizes) and the compiled function gives the eager op's outputs."""
    torch._dynamo.reset()

    def f(x, y, labels, ref_labels, rows, keep):
        return torch.ops.flashdml_triton.metrics_pass(x, y, labels, ref_labels, rows, keep, True, True, 256)

    args = _trace_args()[:6]
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    for a, b in zip(got, f(*args)):
        assert torch.equal(a, b)
