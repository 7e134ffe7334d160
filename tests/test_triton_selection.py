"""Numerics of the Triton selection kernels — kNN (docs/spec.md §1.2) and batch-wide hardest negatives (1.3) — against
``flashdml.reference.knn`` / ``flashdml.reference.hardest_negatives`` in float64 (``normalize=False``: the raw ops
take rows as given).

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 must be set before any
kernel is defined: tests/conftest.py does it). Production tile configurations; column splits forced where a case
says so. Two kinds of data:

* "grid": entries on a 1/8 grid, many duplicated rows, so every similarity is exact in fp16 / fp32 (and the float64
  reference sees the same numbers): huge numbers of exact ties, which must be broken toward the lower column / flat
  index exactly as the reference does, bit for bit.
* "rand": random unit rows: values must agree to rounding, and the returned indices must point at entries with
  those values (a near-tie may legitimately swap two indices between fp32 and float64).

Every launcher output starts poisoned (NaN / sentinel), so an unwritten element fails. bf16 is not tested here:
the interpreter's bf16 ``tl.dot`` is broken (docs/verification.md).
"""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 set before triton kernels are defined",
)
DEVICE = "cpu" if INTERPRET else "cuda"

import flashdml.reference as ref  # noqa: E402
from flashdml.triton_kernels import selection as sel  # noqa: E402
from helpers import varied_norm_rows  # noqa: E402

@pytest.fixture(autouse=True)
def poisoned(poison_triton_outputs):
    return poison_triton_outputs  # conftest.py


def rows(n, d, data, g):
    """float64 [n, d]: "rand" unit rows; "grid" entries in {-1, -7/8, ..., 1} with rows repeated (ties)."""
    if data == "rand":
        return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    base = torch.randint(-8, 9, (max(1, n // 3), d), generator=g).double() / 8
    return base[torch.randint(0, base.shape[0], (n,), generator=g)]


def make(B, M, d, mode, data, dtype, seed=0):
    """(x, y, x64, y64-or-None) with y = x in self mode (y64 None: the reference's self mode)."""
    g = torch.Generator().manual_seed(seed + 1000 * B + 7 * M + d)
    x64 = rows(B, d, data, g)
    if mode == "self":
        x = x64.to(dtype).to(DEVICE)
        return x, x, x.double().cpu(), None
    y64 = rows(M, d, data, g)
    x, y = x64.to(dtype).to(DEVICE), y64.to(dtype).to(DEVICE)
    return x, y, x.double().cpu(), y.double().cpu()


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-3


# (B, M, d, k, mode, data, dtype, num_splits). k up to "all candidates"; k > 64 runs rounds of 64.
KNN_CASES = [
    (1, 1, 1, 1, "cross", "grid", torch.float32, None),
    (2, 3, 3, 3, "cross", "grid", torch.float32, None),
    (5, 5, 1, 4, "self", "grid", torch.float32, None),
    (37, 70, 3, 5, "cross", "rand", torch.float32, 2),
    (37, 37, 129, 36, "self", "grid", torch.float16, 2),
    (70, 130, 16, 17, "cross", "grid", torch.float16, 3),
    (9, 200, 8, 130, "cross", "grid", torch.float32, 2),
    (65, 65, 5, 64, "self", "rand", torch.float16, None),
    (3, 140, 2, 140, "cross", "grid", torch.float16, 2),
]


@pytest.mark.parametrize("B,M,d,k,mode,data,dtype,splits", KNN_CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-k{c[3]}-{c[4]}-{c[5]}-{str(c[6])[6:]}" for c in KNN_CASES])
def test_knn_matches_reference(B, M, d, k, mode, data, dtype, splits):
    x, y, x64, y64 = make(B, M, d, mode, data, dtype)
    vals, idx = sel.knn_impl(x, y, k, mode == "self", num_splits=splits)
    rv, ri = ref.knn(x64, y64, k, normalize=False, exclude_self=True)
    assert vals.shape == (B, k) and idx.shape == (B, k)
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64
    vals, idx = vals.cpu(), idx.cpu()
    assert torch.isfinite(vals).all()
    torch.testing.assert_close(vals.double(), rv, atol=tol(dtype), rtol=0)
    if data == "grid":  # exact similarities: the tie-breaking must be the reference's, element for element
        assert torch.equal(vals.double(), rv)
        assert torch.equal(idx, ri)
    else:
        assert ((idx >= 0) & (idx < M)).all()
        assert (idx.sort(1).values.diff(dim=1) > 0).all(), "an index returned twice in a row"
        S = x64 @ (x64 if y64 is None else y64).T
        torch.testing.assert_close(S.gather(1, idx), rv, atol=2 * tol(dtype), rtol=0)
        assert (vals.diff(dim=1) <= 0).all()
    if mode == "self":
        assert not (idx == torch.arange(B)[:, None]).any()


def test_knn_signed_zero_ties():
    """S entries -0.0 and +0.0 compare equal: the lower column wins, whatever the sign."""
    x = torch.tensor([[0.0], [1.0]], device=DEVICE)
    y = torch.tensor([[-1.0], [1.0], [-1.0]], device=DEVICE)
    vals, idx = sel.knn_impl(x, y, 3, False)
    assert idx[0].tolist() == [0, 1, 2] and idx[1].tolist() == [1, 0, 2]
    assert vals.cpu().tolist() == [[0.0, 0.0, 0.0], [1.0, -1.0, -1.0]]


def test_knn_through_the_registered_op():
    x, y, x64, y64 = make(20, 30, 7, "cross", "grid", torch.float32)
    vals, idx = torch.ops.flashdml_triton.knn_fwd(x, y, 6, False, False)
    rv, ri = ref.knn(x64, y64, 6, normalize=False)
    assert torch.equal(idx.cpu(), ri) and torch.equal(vals.cpu().double(), rv)


def test_knn_rejects_bad_inputs():
    x, y, _, _ = make(5, 6, 3, "cross", "rand", torch.float32)
    with pytest.raises(ValueError, match="k must be"):
        sel.knn_impl(x, y, 0, False)
    with pytest.raises(ValueError, match="k must be"):
        sel.knn_impl(x, y, 7, False)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        sel.knn_impl(x, x, 5, True)
    with pytest.raises(ValueError, match="B == M"):
        sel.knn_impl(x, y, 2, True)
    with pytest.raises(TypeError, match="dtype"):
        sel.knn_impl(x, y.half(), 2, False)
    with pytest.raises(TypeError, match="dtype"):
        sel.knn_impl(x.double(), y.double(), 2, False)
    with pytest.raises(ValueError, match="same d"):
        sel.knn_impl(x, y[:, :2].contiguous(), 2, False)
    with pytest.raises(ValueError, match="contiguous"):
        sel.knn_impl(x.t().contiguous().t(), y, 2, False)


def make_labels(B, M, mode, labels_mode, g):
    if labels_mode == "pair":
        return torch.arange(B), torch.arange(M)
    if labels_mode == "one":
        return torch.zeros(B, dtype=torch.int64), torch.zeros(M, dtype=torch.int64)
    lab = torch.randint(0, max(2, B // 4), (B,), generator=g)
    if mode == "self":
        return lab, lab
    return lab, torch.randint(0, max(2, B // 4) + 3, (M,), generator=g)  # some labels occur on one side only


# (B, M, d, k, mode, data, labels, dtype, num_splits); k = None: all negatives.
HN_CASES = [
    (1, 2, 1, 1, "cross", "grid", "dup", torch.float32, None),
    (5, 5, 3, None, "self", "grid", "pair", torch.float32, None),
    (37, 70, 3, 100, "cross", "rand", "dup", torch.float32, 2),
    (40, 40, 16, 200, "self", "grid", "dup", torch.float16, 3),
    (30, 50, 129, None, "cross", "grid", "dup", torch.float16, 2),
    (20, 20, 1, 37, "self", "grid", "pair", torch.float32, 2),
    (66, 33, 4, 1, "cross", "grid", "dup", torch.float32, None),
    (17, 90, 8, 500, "cross", "rand", "dup", torch.float16, None),
]


@pytest.mark.parametrize("B,M,d,k,mode,data,labels_mode,dtype,splits", HN_CASES,
                         ids=[f"{c[0]}x{c[1]}x{c[2]}-k{c[3]}-{c[4]}-{c[5]}-{c[6]}-{str(c[7])[6:]}" for c in HN_CASES])
def test_hardest_negatives_match_reference(B, M, d, k, mode, data, labels_mode, dtype, splits):
    x, y, x64, y64 = make(B, M, d, mode, data, dtype, seed=1)
    g = torch.Generator().manual_seed(B + M)
    lab, rlab = make_labels(B, M, mode, labels_mode, g)
    neg = lab[:, None] != rlab[None, :]
    if mode == "self":
        neg &= ~torch.eye(B, dtype=torch.bool)
    n_neg = int(neg.sum())
    k = n_neg if k is None else k
    vals, r, c = sel.hardest_negatives_impl(x, y, lab.to(DEVICE), rlab.to(DEVICE), k, mode == "self",
                                            num_splits=splits)
    rv, rr, rc = ref.hardest_negatives(x64, y64, lab, None if y64 is None else rlab, k, normalize=False)
    assert vals.shape == (k,) and r.shape == (k,) and c.shape == (k,)
    assert vals.dtype == torch.float32 and r.dtype == torch.int64 and c.dtype == torch.int64
    vals, r, c = vals.cpu(), r.cpu(), c.cpu()
    assert torch.isfinite(vals).all()
    torch.testing.assert_close(vals.double(), rv, atol=tol(dtype), rtol=0)
    if data == "grid":
        assert torch.equal(vals.double(), rv)
        assert torch.equal(r, rr) and torch.equal(c, rc)
    else:
        assert ((r >= 0) & (r < B) & (c >= 0) & (c < M)).all()
        flat = r * M + c
        assert flat.unique().numel() == k
        assert neg[r, c].all()
        S = x64 @ (x64 if y64 is None else y64).T
        torch.testing.assert_close(S[r, c], rv, atol=2 * tol(dtype), rtol=0)
        assert (vals.diff() <= 0).all()


def test_hardest_negatives_rejects_bad_inputs():
    x, y, _, _ = make(5, 6, 3, "cross", "rand", torch.float32)
    lab, rlab = torch.arange(5, device=DEVICE), torch.arange(6, device=DEVICE)
    with pytest.raises(ValueError, match="larger than the number of negative pairs"):
        sel.hardest_negatives_impl(x, y, lab, rlab, 26, False)
    with pytest.raises(ValueError, match="k must be"):
        sel.hardest_negatives_impl(x, y, lab, rlab, 31, False)
    with pytest.raises(ValueError, match="k must be"):
        sel.hardest_negatives_impl(x, y, lab, rlab, 0, False)
    with pytest.raises(TypeError, match="labels must be an int64"):
        sel.hardest_negatives_impl(x, y, lab.int(), rlab, 3, False)
    with pytest.raises(ValueError, match="ref_labels must have shape"):
        sel.hardest_negatives_impl(x, y, lab, rlab[:5], 3, False)
    with pytest.raises(ValueError, match="B == M"):
        sel.hardest_negatives_impl(x, y, lab, rlab, 3, True)
    one = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="larger than the number of negative pairs"):
        sel.hardest_negatives_impl(x, x, one, one, 1, True)


def test_opcheck():
    """Schema, fake (meta) implementations and autograd registration of the raw ops. (test_aot_dispatch_dynamic
    needs traceable kernels, which interpreted ones are not; it belongs to a GPU run.)"""
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    if not INTERPRET:
        utils += ("test_aot_dispatch_dynamic",)
    x, y, _, _ = make(6, 9, 5, "cross", "rand", torch.float32)
    for norm in (False, True):
        torch.library.opcheck(torch.ops.flashdml_triton.knn_fwd.default, (x, y, 3, False, norm), test_utils=utils)
        torch.library.opcheck(torch.ops.flashdml_triton.knn_fwd.default, (x, x, 5, True, norm), test_utils=utils)
        lab, rlab = torch.arange(6, device=DEVICE) % 3, torch.arange(9, device=DEVICE) % 4
        torch.library.opcheck(torch.ops.flashdml_triton.hardest_negatives_fwd.default,
                              (x, y, lab, rlab, 7, False, norm), test_utils=utils)


def _cuda_selection_kernels() -> bool:
    try:
        import flashdml._C  # noqa: F401
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("flashdml::knn_fwd", "CUDA"))
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not torch.cuda.is_available() or not _cuda_selection_kernels(),
                    reason="needs a CUDA device and flashdml._C built with the CUDA selection kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_ops_match_reference_and_triton(dtype):
    """GPU only: csrc/cuda/selection.cu (flashdml::knn_fwd / hardest_negatives_fwd) against the reference on exact
    (1/8 grid) data, and the Triton ops on the same inputs, bit for bit (k across the round boundaries)."""
    for B, M, d, mode in ((300, 300, 100, "self"), (129, 1000, 64, "cross")):
        x, y, x64, y64 = make(B, M, d, mode, "grid", dtype, seed=3)
        for k in (1, 31, 33, 100):
            v, i = torch.ops.flashdml.knn_fwd(x, y, k, mode == "self", False)
            rv, ri = ref.knn(x64, y64, k, normalize=False)
            assert torch.equal(i.cpu(), ri) and torch.equal(v.cpu().double(), rv)
            tv, ti = torch.ops.flashdml_triton.knn_fwd(x, y, k, mode == "self", False)
            assert torch.equal(ti, i) and torch.equal(tv, v)
        g = torch.Generator().manual_seed(B)
        lab, rlab = make_labels(B, M, mode, "dup", g)
        for k in (1, B, 20 * B):
            out = torch.ops.flashdml.hardest_negatives_fwd(x, y, lab.cuda(), rlab.cuda(), k, mode == "self", False)
            want = ref.hardest_negatives(x64, y64, lab, None if y64 is None else rlab, k, normalize=False)
            for o, w in zip(out, want):
                assert torch.equal(o.cpu().to(w.dtype), w)
            tri = torch.ops.flashdml_triton.hardest_negatives_fwd(x, y, lab.cuda(), rlab.cuda(), k, mode == "self",
                                                                  False)
            for o, t in zip(out, tri):
                assert torch.equal(o, t)


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                      torch.int32: "i32"}[value.dtype]
    assert isinstance(value, int) and not isinstance(value, bool), type(value)
    return "i32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_specs_cover_every_launch(dtype, monkeypatch):
    """Every launch the selection launchers make (kNN with and without rounds, all hardest-negatives passes) matches
    an AOT spec (types, constexprs, warps, stages), so tests/test_triton_aot.py compiles what runs."""
    from flashdml.triton_kernels import _aot

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel, args, kwargs))
            return launch

    monkeypatch.setattr(sel, "wrap_triton", Recorder)
    x = torch.zeros(40, 48, dtype=dtype)
    y = torch.zeros(150, 48, dtype=dtype)
    sel.knn_impl(x, y, 5, False)
    sel.knn_impl(x, y, 130, False)
    lab = torch.arange(40)
    sel.hardest_negatives_impl(x, y, lab, torch.arange(150) + 1000, 7, False)
    kernels = {_aot._jit_function(k).fn for k, _, _ in launches}
    assert len(kernels) == 3
    for kernel, args, kwargs in launches:
        fn = _aot._jit_function(kernel)
        runtime = dict(zip(fn.arg_names, args))
        constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        signature = {k: _triton_type(v) for k, v in runtime.items()}
        matches = [s for s in sel.AOT_SPECS if _aot._jit_function(s.kernel) is fn and s.constexprs == constexprs
                   and s.signature == signature and s.num_warps == kwargs["num_warps"]
                   and s.num_stages == kwargs["num_stages"]]
        assert matches, f"no AOT spec for {fn.__name__} with {signature} {kwargs}"


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_normalize_flag_on_raw_rows(mode):
    """normalize=True on raw rows (norms 1e-3 .. 1e3, one x row below the 1e-12 clamp; self mode: y is x): kNN and
    hardest negatives return bitwise what normalize=False returns on the op's own normalised rows
    (flashdml._math.normalized_rows), and values matching flashdml.reference(normalize=True) in float64 with
    indices that point at entries of those values. Bound: this module's fp32 ``tol`` (1e-5) covers the fp32 dot
    (d·u) plus the normalisation's rounding ((d + 4)·u), 36·2^-24 ~ 2e-6 at d = 16."""
    from flashdml._math import normalized_rows

    B, M, d, k = 37, 50, 16, 7
    xu, yu, _, _ = make(B, M, d, mode, "rand", torch.float64, seed=4)
    self_mode = mode == "self"
    x = varied_norm_rows(xu, 3, tiny_row=True)
    y = x if self_mode else varied_norm_rows(yu, 5)
    xh = normalized_rows(x)[0]
    yh = xh if self_mode else normalized_rows(y)[0]
    x64, y64 = x.double().cpu(), None if self_mode else y.double().cpu()
    S = ref.similarity(x64, y64, normalize=True)
    ops = torch.ops.flashdml_triton

    got = ops.knn_fwd(x, y, k, self_mode, True)
    for a, b in zip(got, ops.knn_fwd(xh, yh, k, self_mode, False)):
        assert torch.equal(a, b)
    rv, _ = ref.knn(x64, y64, k, normalize=True, exclude_self=True)
    vals, idx = got[0].cpu(), got[1].cpu()
    torch.testing.assert_close(vals.double(), rv, atol=tol(torch.float32), rtol=0)
    torch.testing.assert_close(S.gather(1, idx), rv, atol=2 * tol(torch.float32), rtol=0)
    if self_mode:
        assert not (idx == torch.arange(B)[:, None]).any()

    g = torch.Generator().manual_seed(6)
    lab, rlab = make_labels(B, M, mode, "dup", g)
    kn = 60
    got = ops.hardest_negatives_fwd(x, y, lab.to(DEVICE), rlab.to(DEVICE), kn, self_mode, True)
    for a, b in zip(got, ops.hardest_negatives_fwd(xh, yh, lab.to(DEVICE), rlab.to(DEVICE), kn, self_mode, False)):
        assert torch.equal(a, b)
    rv, _, _ = ref.hardest_negatives(x64, y64, lab, None if self_mode else rlab, kn, normalize=True)
    vals, r, c = (v.cpu() for v in got)
    torch.testing.assert_close(vals.double(), rv, atol=tol(torch.float32), rtol=0)
    assert (lab[r] != rlab[c]).all() and (r * S.shape[1] + c).unique().numel() == kn
    torch.testing.assert_close(S[r, c], rv, atol=2 * tol(torch.float32), rtol=0)


@pytest.mark.parametrize("c_gt, r_eq", [(3, 1), (0, 2)])
def test_hneg_collect_never_writes_past_k(c_gt, r_eq):
    """Issue 16 item 6: the collect pass is told (state) that c_gt keys lie above the threshold T and r_eq keys at
    T belong to the top k = c_gt + r_eq, but every one of the B·M negatives here is above T (T = 0 is below every
    key), as if a separately compiled pass had computed different S values. Its stores must stay inside the k
    slots: the outputs get a poisoned guard region after slot k that must come back untouched, and the slots
    for keys > T must hold real entries (slots [c_gt, k) belong to keys == T, of which there are none)."""
    B, M, d, guard = 5, 9, 16, 40
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, d, generator=g).to(DEVICE)
    y = torch.randn(M, d, generator=g).to(DEVICE)
    key_x = torch.arange(B, dtype=torch.int32, device=DEVICE)  # all labels distinct: every pair is a negative
    key_y = torch.arange(B, B + M, dtype=torch.int32, device=DEVICE)
    k = c_gt + r_eq
    state = torch.tensor([0, c_gt, r_eq], dtype=torch.int64, device=DEVICE)
    base = torch.zeros((2, B, 1), dtype=torch.int64, device=DEVICE)
    unused = torch.zeros((sel.NBINS,), dtype=torch.int64, device=DEVICE)
    cnt = torch.zeros((2, B, 1), dtype=torch.int32, device=DEVICE)
    values = torch.full((k + guard,), -123.0, dtype=torch.float32, device=DEVICE)
    flat = torch.full((k + guard,), -7777777, dtype=torch.int64, device=DEVICE)
    cfg = sel.HNEG_CONFIGS[torch.float32]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    sel._hneg_pass_kernel[(-(-B // bm), 1)](
        x, y, key_x, key_y, state, unused, cnt, base, values, flat, B, M, d, -(-M // bn) * bn, 1, 0, 0, 0,
        PASS=sel.COLLECT, PRECISION="ieee", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], NBINS=sel.NBINS,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    values, flat = values.cpu(), flat.cpu()
    assert (values[k:] == -123.0).all() and (flat[k:] == -7777777).all(), (values, flat)
    s = (x.double() @ y.double().T).cpu().flatten()
    assert ((flat[:c_gt] >= 0) & (flat[:c_gt] < B * M)).all(), flat
    assert torch.allclose(values[:c_gt].double(), s[flat[:c_gt]], atol=1e-4)
    assert (values[c_gt:k] == -123.0).all() and (flat[c_gt:k] == -7777777).all()
