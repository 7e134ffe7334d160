"""Triton contextual loss (docs/spec.md §2.5) against the reference, under the interpreter on CPU tensors (on a GPU the same
tests run on CUDA tensors): loss (1e-6 relative) and straight-through gradient (1e-5 relative to the largest entry)
vs float64 autograd through the reference, on poisoned outputs; the neighbour lists against docs/spec.md §2.5 step 3's fp32
arithmetic (exact duplicates, ties at the threshold, the inclusive ε band); k = 2, 4, 8 (and k > 64: thresholds
from the kNN op), ε = 0 and 0.05, ragged B and d; rows whose ε band overflows the list capacity (the exact rerun);
column splits; the collapsed-batch error; normalize=True on raw rows against the pre-normalised rows; the ops'
schemas (flashdml._schemas); the AOT specs covering every launch. The sparse stage itself (the C++ ops
flashdml::contextual_stage_*): tests/test_contextual_stage.py."""
import pytest
import torch

import flashdml as fd
from flashdml.ops import registry
from flashdml._debug import poison_outputs
from flashdml._math import l2_normalize

pytestmark = pytest.mark.skipif(not fd.available_backends()["triton"][0], reason="triton backend unavailable here")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL_LOSS, RTOL_GRAD = 1e-6, 1e-5


def _tk():
    from flashdml.triton_kernels import contextual as tk

    return tk


def _batch(B, d, per_class, seed, spread=0.7):
    """Clustered embeddings, ``per_class`` samples per class (the last class may be smaller), shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(B) // per_class)[torch.randperm(B, generator=g)]
    centres = torch.randn((B + per_class - 1) // per_class, d, generator=g)
    return centres[labels] + spread * torch.randn(B, d, generator=g), labels


def _exact_vectors():
    """Unit vectors with similarities exact in fp32 ({0, ±1/2, ±1}) and exact duplicates (as test_contextual.py)."""
    signs = torch.tensor([[1 - 2 * ((m >> b) & 1) for b in range(4)] for m in range(16)], dtype=torch.float32)
    basis = torch.cat([torch.eye(4), -torch.eye(4)])
    x = torch.cat([0.5 * signs, basis, 0.5 * signs[:5], basis[:3]])
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]


def _compare(x, labels, upstream=0.7, **kw):
    xr = x.detach().double().requires_grad_(True)
    ref = fd.reference.contextual_loss(xr, labels, **kw)
    (gr,) = torch.autograd.grad(ref * upstream, xr)
    xf = x.detach().to(DEV).clone().requires_grad_(True)
    with fd.backend("triton"), poison_outputs():
        got = fd.contextual_loss(xf, labels.to(DEV), **kw)
        assert got.dtype == torch.float32 and got.dim() == 0
        (gf,) = torch.autograd.grad(got * upstream, xf)
    assert gf.dtype == x.dtype and torch.isfinite(gf).all()
    assert abs(got.item() - ref.item()) <= RTOL_LOSS * abs(ref.item()) + 1e-9, (got.item(), ref.item())
    scale = gr.abs().max().item()
    assert scale > 0
    gerr = (gf.double().cpu() - gr).abs().max().item()
    assert gerr <= RTOL_GRAD * scale + 1e-12, f"grad max error {gerr:.3e} vs scale {scale:.3e}"


def _lists(x, labels, k, eps, cap=None, num_splits=None):
    """Dense N, P, clamped (bool [B, B]) from the Triton forward's CSR lists, and the forward's outputs."""
    tk = _tk()
    xh = torch.nn.functional.normalize(x.float(), dim=1).to(DEV)
    with poison_outputs():
        out = tk.fwd_impl(xh, labels.to(DEV), k, eps, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, cap=cap,
                          num_splits=num_splits)
    loss, terms, ptr, col, flag, counts = (t.cpu() for t in out)
    B = x.shape[0]
    assert ptr[0] == 0 and ptr[-1] == col.numel() == flag.numel() and (flag < 4).all()
    rows = torch.repeat_interleave(torch.arange(B), ptr[1:] - ptr[:-1])
    assert ((col[1:] > col[:-1]) | (rows[1:] != rows[:-1])).all(), "columns must ascend within a row"
    N, P, C0 = (torch.zeros(B, B, dtype=torch.bool) for _ in range(3))
    N[rows, col.long()] = True
    P[rows, col.long()] = (flag & 1).bool()
    C0[rows, col.long()] = (flag & 2).bool()
    return N, P, C0, out


def _reference_lists(x, labels, k, eps):
    from flashdml.reference.contextual import _context_forward

    F = torch.nn.functional.normalize(x.float(), dim=1)
    f = _context_forward(F @ F.T, labels[:, None] == labels[None, :], k, eps, 10.0)
    return f["N"].bool(), f["P"].bool(), ~f["C"]


def test_dispatch_lists_triton():
    assert "triton" in registry.family_of("contextual_loss").backends


CASES = [  # (B, d, per_class, k, eps, seed)
    (8, 5, 4, 2, 0.05, 0), (8, 3, 4, 4, 0.0, 1), (37, 16, 4, 4, 0.05, 2), (37, 129, 5, 2, 0.0, 3),
    (70, 3, 6, 8, 0.05, 4), (96, 33, 8, 8, 0.0, 5), (65, 1, 8, 4, 0.0, 6), (96, 64, 4, 4, 0.05, 7),
]


@pytest.mark.parametrize("B,d,per_class,k,eps,seed", CASES)
def test_matches_reference(B, d, per_class, k, eps, seed):
    x, labels = _batch(B, d, per_class, seed)
    if d == 1:  # S = ±1 only: two groups of exact duplicates; unit rows as given (normalising kills the gradient)
        labels = (x[:, 0] > 0).long() * 2 + labels % 2
        _compare(torch.sign(x), labels, k=k, eps=eps, normalize=False)
        return
    _compare(x, labels, k=k, eps=eps)


def test_other_weights_and_upstream():
    x, labels = _batch(48, 24, 4, 12)
    _compare(x, labels, k=4, eps=0.04, context_weight=0.95, contrastive_weight=0.05, reg_weight=0.1,
             reg_target=0.3, pos_margin=0.7, neg_margin=0.2, ste_slope=3.0)
    _compare(x, labels, upstream=-2.5, context_weight=1.0, contrastive_weight=0.0, reg_weight=0.0, ste_slope=20.0)
    _compare(x, labels, context_weight=0.0)  # the sparse stage skipped in the backward


def test_single_terms_match_reference_terms():
    x, labels = _batch(40, 16, 4, 13)
    _, _, _, out = _lists(x, labels, 4, 0.05)
    terms = out[1].cpu()
    t = fd.reference.contextual.contextual_loss_terms(x.double(), labels)
    assert terms[0].item() == pytest.approx(t["L_ctx"].item(), rel=1e-6)
    assert terms[1].item() == pytest.approx(t["L_reg"].item(), rel=1e-5, abs=1e-9)
    assert terms[2].item() == pytest.approx(t["L_con"].item(), rel=1e-6)


def test_large_classes_dense_label_part():
    x, labels = _batch(60, 8, 30, 14, spread=1.5)
    _compare(x, labels, k=4, eps=0.05)
    _compare(x, torch.zeros(60, dtype=torch.long), k=6, eps=0.0)


@pytest.mark.parametrize("k,eps", [(2, 0.0), (4, 0.0), (4, 0.05), (8, 1.0), (2, 1.0)])
def test_exact_ties_neighbour_lists_and_loss(k, eps):
    x = _exact_vectors()
    labels = torch.arange(x.shape[0]) % 5
    N, P, C0, _ = _lists(x, labels, k, eps)
    Nr, Pr, C0r = _reference_lists(x, labels, k, eps)
    assert torch.equal(N, Nr) and torch.equal(P, Pr) and torch.equal(C0, C0r)
    assert (N.sum(1) > k).any(), "the case must have ties / band members beyond k"
    assert C0.sum() > x.shape[0], "exact duplicates must be clamped (C = 0) too"
    _compare(x, labels, k=k, eps=eps)


def test_duplicates_and_band_lists_equal_fp32_reference():
    x, labels = _batch(90, 12, 4, 20)
    x[7] = x[3]
    x[50] = x[3]
    for k, eps in ((2, 0.0), (4, 0.05), (8, 0.1)):
        N, P, _, _ = _lists(x, labels, k, eps)
        Nr, Pr, _ = _reference_lists(x, labels, k, eps)
        assert torch.equal(N, Nr) and torch.equal(P, Pr)
        _compare(x, labels, k=k, eps=eps)


def test_band_overflowing_the_list_capacity():
    """cap = 16: rows whose ε band holds more than 16 neighbours take the exact rerun path."""
    x, labels = _batch(64, 6, 4, 31)
    x[5] = x[9] = x[40] = x[2]
    N, P, C0, _ = _lists(x, labels, 4, 0.6, cap=16)
    Nr, Pr, _ = _reference_lists(x, labels, 4, 0.6)
    sizes = Nr.sum(1)
    assert (sizes > 16).any() and (sizes <= 16).any(), "the case must overflow some rows only"
    assert torch.equal(N, Nr) and torch.equal(P, Pr)
    dup = torch.zeros(64, 64, dtype=torch.bool)  # S >= 1 (C = 0) off the diagonal only between the duplicates
    dup[[2, 5, 9, 40], :] = True
    assert not (C0 & ~torch.eye(64, dtype=torch.bool) & ~(dup & dup.T)).any()
    N2, _, _, _ = _lists(x, labels, 4, 0.6)  # the default capacity gives the same lists
    assert torch.equal(N2, Nr)


def test_column_splits_and_k_above_the_register_list():
    x, labels = _batch(80, 8, 8, 33)
    for k, eps, splits in ((4, 0.05, 2), (8, 0.0, 3), (66, 0.0, 1), (17, 0.0, 2)):
        N, P, _, _ = _lists(x, labels, k, eps, num_splits=splits)
        Nr, Pr, _ = _reference_lists(x, labels, k, eps)
        assert torch.equal(N, Nr) and torch.equal(P, Pr), (k, splits)
    _compare(x, labels, k=66, eps=0.0)
    _compare(x, labels, k=17, eps=0.05)


def _grid_rows(B, d, pool, seed):
    """Rows drawn from a pool of ``pool`` vectors on a 1/8 grid: S exact in fp32 in any summation order (so the
    gathered rerun sees the same bits under the interpreter's BLAS as well) and ties everywhere."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-4, 5, (pool, d), generator=g).float() / 8
    return base[torch.randint(0, pool, (B,), generator=g)]


def test_list_pass_column_splits_bit_for_bit():
    """The list pass with several column splits (B = 300: five 64-column blocks; 2 and 5 splits) gives the CSR
    of one split bit for bit — ptr, columns (ascending), flags — with cap = 16 (some rows' bands overflow: the
    gathered rerun) and the default capacity, on rows with many exact ties (threshold ties, duplicates)."""
    tk = _tk()
    for seed, k, eps in ((36, 4, 0.25), (37, 8, 0.0)):
        xp = tk._tiles.pad16(_grid_rows(300, 6, 40, seed).to(DEV))
        B = xp.shape[0]
        t, h, _, _ = tk._stats(xp, torch.zeros(B, dtype=torch.int32, device=DEV), k, 0.75, 0.6, 1)
        thr = torch.stack([t, h], 1).contiguous()
        for cap in (16, tk.list_capacity(k)):
            with poison_outputs():
                one = tk.neighbour_lists(xp, t, h, eps, cap, num_splits=1)
            sizes = (one[0][1:] - one[0][:-1]).cpu()
            if cap == 16:
                assert (sizes > 16).any() and (sizes <= 16).any(), "some rows only must overflow"
            for ns in (2, 5):
                with poison_outputs():
                    cnt = tk._lists(xp, torch.arange(B, dtype=torch.int32, device=DEV), thr, eps, cap, ns)[2]
                    many = tk.neighbour_lists(xp, t, h, eps, cap, num_splits=ns)
                assert cnt.shape == (B, ns) and torch.equal(cnt.sum(1).cpu(), sizes)
                for a, b in zip(one, many):
                    assert a.dtype == b.dtype and torch.equal(a, b), (seed, cap, ns)


def test_backward_splits_match_one_split():
    tk = _tk()
    x, labels = _batch(50, 20, 5, 34)
    xh = torch.nn.functional.normalize(x, dim=1).to(DEV)
    lab = labels.to(DEV)
    args = (4, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0)
    out = tk.fwd_impl(xh, lab, *args)
    g = torch.tensor(1.3, device=DEV)
    a = tk.bwd_impl(g, xh, lab, *args, *out[2:], num_splits=1)
    b = tk.bwd_impl(g, xh, lab, *args, *out[2:], num_splits=3)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_errors_match_cpu():
    with fd.backend("triton"):
        with pytest.raises(ValueError, match="collapsed batch — every sample is in the k-neighbourhood of row 0"):
            fd.contextual_loss(torch.ones(5, 3, device=DEV), torch.tensor([0, 0, 1, 1, 2], device=DEV))
        with pytest.raises(ValueError, match="collapsed"):  # k small, but every point is inside the ε band
            fd.contextual_loss(torch.randn(6, 3, device=DEV) * 1e-3 + 1.0, torch.arange(6, device=DEV) % 2, k=2,
                               eps=0.5)
        x, labels = _batch(6, 3, 2, 9)
        with pytest.raises(ValueError, match="k = 7"):
            fd.contextual_loss(x.to(DEV), labels.to(DEV), k=7)
        with pytest.raises(ValueError, match="eps"):
            fd.contextual_loss(x.to(DEV), labels.to(DEV), eps=-0.1)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEV == "cpu", reason="the interpreter's numpy dot has no bfloat16"))])
def test_low_precision_inputs(dtype):
    x, labels = _batch(40, 16, 4, 41)
    xl = x.to(dtype)
    ref = fd.reference.contextual_loss(xl.double(), labels)
    xf = xl.to(DEV).clone().requires_grad_(True)
    with fd.backend("triton"):
        got = fd.contextual_loss(xf, labels.to(DEV))
        got.backward()
    assert got.dtype == torch.float32 and xf.grad.dtype == dtype and torch.isfinite(xf.grad.float()).all()
    assert got.item() == pytest.approx(ref.item(), rel=1e-2)


def test_normalize_inside_matches_prenormalised():
    """normalize=True on raw rows: the forward of the pre-normalised rows (same lists, same loss) and the gradient of
    the pre-normalised rows mapped back through the normalisation by autograd."""
    _tk()
    ops = torch.ops.flashdml_triton
    x, labels = _batch(40, 12, 4, 71)
    x = (x * torch.linspace(0.2, 5.0, 40)[:, None]).to(DEV)
    lab = labels.to(DEV)
    args = (4, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0)
    xr = x.clone().requires_grad_(True)
    xh = l2_normalize(xr)  # the arithmetic of flashdml._math.normalized_rows, differentiable
    with poison_outputs():
        raw = ops.contextual_fwd(x, lab, *args, True)
        pre = ops.contextual_fwd(xh.detach().contiguous(), lab, *args, False)
    for a, b in zip(raw, pre):
        assert torch.equal(a, b)
    g = torch.tensor(0.7, device=DEV)
    with poison_outputs():
        d_raw = ops.contextual_bwd(g, x, lab, *args, True, *raw[2:])
        d_pre = ops.contextual_bwd(g, xh.detach().contiguous(), lab, *args, False, *pre[2:])
    (want,) = torch.autograd.grad(xh, xr, d_pre)
    assert d_raw.dtype == x.dtype and torch.isfinite(d_raw).all()
    torch.testing.assert_close(d_raw, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_aot_specs_cover_every_launch(monkeypatch):
    """Every kernel launch of the forward and backward (each dtype, k <= 16, k <= 64, ragged B) matches an AOT spec."""
    from flashdml.triton_kernels import _aot

    tk = _tk()
    specs = tk.AOT_SPECS
    launches = []
    real = tk.wrap_triton

    def recording(kernel):
        def at(grid):
            def launch(*args, **kwargs):
                launches.append((kernel, args, kwargs))
                return real(kernel)[grid](*args, **kwargs)
            return launch
        return type("R", (), {"__getitem__": lambda self, grid: at(grid)})()

    monkeypatch.setattr(tk, "wrap_triton", recording)
    types = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
             torch.int32: "i32", torch.uint8: "u8", torch.float64: "fp64"}
    for dtype in (torch.float32, torch.float16):
        for k in (4, 20):
            x, labels = _batch(30, 5, 5, 60)
            xh = torch.nn.functional.normalize(x, dim=1).to(dtype).to(DEV)
            args = (k, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0)
            out = tk.fwd_impl(xh, labels.to(DEV), *args, cap=16)
            tk.bwd_impl(torch.tensor(1.0, device=DEV), xh, labels.to(DEV), *args, *out[2:])
    assert launches
    for kernel, args, kwargs in launches:
        fn = _aot._jit_function(kernel)
        runtime = dict(zip(fn.arg_names, args))
        sig = {n: ("*" + types[v.dtype]) if isinstance(v, torch.Tensor) else ("fp32" if isinstance(v, float) else "i32")
               for n, v in runtime.items()}
        constexprs = {n: v for n, v in kwargs.items() if n not in ("num_warps", "num_stages")}
        pool = specs if fn.fn.__module__ == tk.__name__ else _aot.all_specs()
        ok = [s for s in pool if _aot._jit_function(s.kernel) is fn and s.constexprs == constexprs
              and s.signature == sig and s.num_warps == kwargs["num_warps"] and s.num_stages == kwargs["num_stages"]]
        assert ok, f"no AOT spec for {fn.__name__} with {sig} {kwargs}"


def test_opcheck_registration():
    """Schema, fake kernel (data-dependent list length) and autograd registration of the Triton op."""
    ops = registry.compiled_ops("triton", registry.family_of("contextual_loss"))
    x, labels = _batch(16, 5, 4, 70)
    for normalize in (False, True):
        xh = torch.nn.functional.normalize(x, dim=1).to(DEV).requires_grad_(True)
        args = (xh, labels.to(DEV), 4, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, normalize)
        res = torch.library.opcheck(ops.contextual_fwd, args,
                                    test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        assert set(res.values()) == {"SUCCESS"}


def test_schemas_are_the_cpp_ones():
    from flashdml._schemas import SCHEMAS

    _tk()
    for name in ("contextual_fwd", "contextual_bwd"):
        schema = str(getattr(torch.ops.flashdml_triton, name).default._schema)
        assert schema == f"flashdml_triton::{name}{SCHEMAS[name]}"
