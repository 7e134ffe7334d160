"""The contextual loss's device-generic sparse stage (csrc/aten/contextual_stage.cpp: the ops
flashdml::contextual_stage_loss / _grad / _grad_parts, which the CUDA op calls directly and the Triton backend through
torch.ops), run on CPU tensors here (on a GPU the same tests run on CUDA tensors too).

From neighbour lists built by the float64 reference (docs/spec.md §2.5 step 3 on exact S): L_ctx against the reference's loss, the
gradient (contextual_stage_grad) and the parts a tile kernel consumes (contextual_stage_grad_parts, recombined densely
as the Triton gradient kernel combines them) against docs/spec.md's closed form (dL_ctx/dF = (Gc + Gcᵀ) F). From the CPU op's
own lists: L_ctx and the gradient against the CPU op (its separate loop implementation), across its one-tile
(B <= 256) and streaming paths. Exact duplicates (clamped entries off the diagonal), arbitrary label values (one of
them the unused-slot label −2), the collapsed-batch and empty-R(i) errors, and the input checks."""
import pytest
import torch

from flashdml import _ext
from flashdml.reference.contextual import _context_forward, contextual_context_grad_closed_form

pytestmark = pytest.mark.skipif(
    not (_ext.C_LOADED and hasattr(torch.ops.flashdml, "contextual_stage_loss")),
    reason="flashdml._C with the contextual_stage ops is not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ops = torch.ops.flashdml if _ext.C_LOADED else None


def _batch(B, d, per_class, seed, spread=0.7):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(B) // per_class)[torch.randperm(B, generator=g)]
    centres = torch.randn((B + per_class - 1) // per_class, d, generator=g)
    return centres[labels] + spread * torch.randn(B, d, generator=g), labels


def _reference_lists(F, labels, k, eps):
    """N(i) as the CSR lists the ops take (ptr, int32 columns, flags: bit 0 in P, bit 1 clamped) from the float64
    reference, and the reference's forward intermediates."""
    B = F.shape[0]
    f = _context_forward(F @ F.T, labels[:, None] == labels[None, :], k, eps, 10.0)
    N, P, C = f["N"].bool(), f["P"].bool(), f["C"]
    rows, cols = torch.nonzero(N, as_tuple=True)
    ptr = torch.zeros(B + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(N.sum(1), 0)
    flag = (P[rows, cols].long() | ((~C[rows, cols]).long() << 1)).to(torch.uint8)
    return ptr, cols.int(), flag, f


def _recombine(parts, labels, C, F):
    """G F + Gᵀ F from contextual_stage_grad_parts: sparse_grad plus the dense C ⊙ (u 1ᵀ + LB) part, with
    LB_ij = Σ_{slots q of row i with label_q = labels_j} coef_q (c_i − a_j) (what the Triton gradient kernel forms)."""
    sparse, u, a, slot_label, slot_coef = (t.cpu() for t in parts)
    B = F.shape[0]
    c = float(B) - a
    rho = (slot_coef[:, :, None] * (slot_label[:, :, None] == labels[None, None, :])).sum(1)
    dense = C.double() * (u[:, None] + rho * (c[:, None] - a[None, :]))
    return sparse.double() + (dense + dense.T) @ F


CASES = [  # (B, d, per_class, k, eps, seed, duplicates)
    (8, 5, 4, 2, 0.05, 0, False), (37, 16, 4, 4, 0.05, 1, True), (60, 6, 30, 4, 0.05, 2, False),
    (70, 3, 6, 8, 0.0, 3, True), (45, 6, 5, 4, 1.5, 4, False), (33, 4, 1, 3, 0.1, 5, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,d,per_class,k,eps,seed,dups", CASES)
def test_stage_matches_reference(device, B, d, per_class, k, eps, seed, dups):
    x, labels = _batch(B, d, per_class, seed)
    if dups:
        x[3] = x[5] = x[0]  # exact duplicates: clamped entries (C = 0) off the diagonal
    labels = labels * 7 - 2  # arbitrary label values, class 0 labelled −2 (the unused-slot label)
    F = torch.nn.functional.normalize(x.double(), dim=1)
    ptr, col, flag, f = _reference_lists(F, labels, k, eps)
    if dups:
        assert ((flag & 2).bool() & (col.long() != torch.repeat_interleave(torch.arange(B), ptr[1:] - ptr[:-1]))).any()
    dev = [t.to(device) for t in (ptr, col, flag, labels)]
    lc = ops.contextual_stage_loss(*dev)
    assert lc.dtype == torch.float64 and lc.dim() == 0 and lc.device.type == device
    assert lc.item() == pytest.approx(f["L_ctx"].item(), rel=1e-12, abs=1e-15)
    Gc = contextual_context_grad_closed_form(F, labels, k=k, eps=eps, ste_slope=10.0, normalize=False) / 20.0
    want = (Gc + Gc.T) @ F
    tol = 1e-10 * want.abs().max().item()
    g = ops.contextual_stage_grad(*dev, F.to(device))
    assert g.dtype == torch.float64 and g.shape == (B, d)
    assert (g.cpu() - want).abs().max().item() <= tol
    parts = ops.contextual_stage_grad_parts(*dev, F.to(device))
    sparse, u, a, slot_label, slot_coef = parts
    assert sparse.dtype == torch.float64 and sparse.shape == (B, d)
    assert u.dtype == a.dtype == slot_coef.dtype == torch.float64 and slot_label.dtype == torch.int64
    assert slot_label.shape == slot_coef.shape and slot_label.shape[0] == B
    assert torch.equal(a.cpu(), f["a"].double())
    unused = slot_coef.cpu() == 0
    assert (slot_label.cpu()[unused] == -2).all()
    assert (_recombine(parts, labels, f["C"], F) - want).abs().max().item() <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_grad_parts_in_the_rows_dtype(device):
    x, labels = _batch(40, 8, 4, 7)
    F = torch.nn.functional.normalize(x.double(), dim=1)
    ptr, col, flag, f = _reference_lists(F, labels, 4, 0.05)
    dev = [t.to(device) for t in (ptr, col, flag, labels)]
    p64 = ops.contextual_stage_grad_parts(*dev, F.to(device))
    p32 = ops.contextual_stage_grad_parts(*dev, F.float().to(device))
    assert p32[0].dtype == torch.float32
    scale = p64[0].abs().max().item()
    assert (p32[0].double() - p64[0]).abs().max().item() <= 1e-5 * scale
    for a, b in zip(p32[1:], p64[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B,d,per_class,k,eps,seed,dups", [
    (96, 12, 4, 4, 0.05, 10, True), (300, 16, 6, 6, 0.05, 11, True), (300, 24, 50, 8, 0.0, 12, False),
])
def test_stage_matches_cpu_op(B, d, per_class, k, eps, seed, dups):
    """On the CPU op's own lists (fp32 S): L_ctx = terms[0] and the L_ctx gradient = the CPU backward's (one-tile path
    for B <= 256, streaming path above)."""
    x, labels = _batch(B, d, per_class, seed)
    if dups:
        x[7] = x[9] = x[1]
    F = torch.nn.functional.normalize(x, dim=1)
    args = (k, eps, 1.0, 0.0, 0.0, 0.25, 0.75, 0.6, 10.0, False)
    loss, terms, ptr, col, flag, counts = ops.contextual_fwd(F, labels, *args)
    if dups:
        assert (flag & 2).sum() > B, "the duplicates must give clamped entries off the diagonal"
    lc = ops.contextual_stage_loss(ptr, col, flag, labels)
    assert lc.item() == pytest.approx(terms[0].item(), rel=1e-6)
    dx = ops.contextual_bwd(torch.tensor(1.0), F, labels, *args, ptr, col, flag, counts)
    g = 20.0 * ops.contextual_stage_grad(ptr, col, flag, labels, F.double())
    scale = g.abs().max().item()
    assert scale > 0 and (dx.double() - g).abs().max().item() <= 1e-5 * scale
    C = torch.ones(B, B, dtype=torch.bool)  # C = 0 exactly on the flagged entries (−D = 0 passes every test)
    C[torch.repeat_interleave(torch.arange(B), ptr[1:] - ptr[:-1]), col.long()] = (flag & 2) == 0
    got = 20.0 * _recombine(ops.contextual_stage_grad_parts(ptr, col, flag, labels, F.double()), labels, C, F.double())
    assert (got - g).abs().max().item() <= 1e-9 * scale


@pytest.mark.parametrize("device", DEVICES)
def test_collapsed_batch_and_empty_reciprocal_set_raise_value_error(device):
    B = 5
    ptr = torch.arange(B + 1, device=device) * B
    col = torch.arange(B, device=device).repeat(B).int()
    flag = torch.full((B * B,), 3, dtype=torch.uint8, device=device)
    labels = torch.zeros(B, dtype=torch.long, device=device)
    F = torch.ones(B, 2, dtype=torch.float64, device=device)
    msg = "collapsed batch — every sample is in the k-neighbourhood of row 0 \\(\\|N\\(i\\)\\| = B = 5\\)"
    for call in (lambda: ops.contextual_stage_loss(ptr, col, flag, labels),
                 lambda: ops.contextual_stage_grad(ptr, col, flag, labels, F),
                 lambda: ops.contextual_stage_grad_parts(ptr, col, flag, labels, F)):
        with pytest.raises(ValueError, match=msg):
            call()
    # row 2 is in N(0) but only row 0 lists itself with the P flag: R(1) is empty
    ptr = torch.tensor([0, 2, 3, 4, 5, 6], device=device)
    col = torch.tensor([0, 2, 1, 2, 3, 4], dtype=torch.int32, device=device)
    flag = torch.tensor([1, 0, 0, 1, 1, 1], dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"row 1 has an empty reciprocal half-neighbourhood R\(i\)"):
        ops.contextual_stage_loss(ptr, col, flag, labels)


def test_cpu_op_raises_the_same_collapsed_batch_message():
    x = torch.ones(5, 3)
    labels = torch.tensor([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="collapsed batch — every sample is in the k-neighbourhood of row 0 "
                                         r"\(\|N\(i\)\| = B = 5\), so the complement intersection J is 0/0"):
        ops.contextual_fwd(x, labels, 4, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, True)


def test_input_checks():
    ptr, col, flag, labels = torch.tensor([0, 1, 2]), torch.tensor([0, 1], dtype=torch.int32), \
        torch.tensor([1, 1], dtype=torch.uint8), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="nbr_ptr must be int64"):
        ops.contextual_stage_loss(ptr.int(), col, flag, labels)
    with pytest.raises(RuntimeError, match="nbr must be int32"):
        ops.contextual_stage_loss(ptr, col.long(), flag, labels)
    with pytest.raises(RuntimeError, match="nbr_flags must be uint8"):
        ops.contextual_stage_loss(ptr, col, flag[:1], labels)
    with pytest.raises(RuntimeError, match="rows must be a floating"):
        ops.contextual_stage_grad(ptr, col, flag, labels, torch.ones(3, 2))


def _cuda_op_available():
    return torch.cuda.is_available() and _ext.C_HAS_CUDA and bool(
        torch._C._dispatch_has_kernel_for_dispatch_key("flashdml::contextual_fwd", "CUDA"))


@pytest.mark.skipif(not _cuda_op_available(), reason="needs a CUDA device and the CUDA build of flashdml._C")
@pytest.mark.parametrize("B,d,per_class,k,eps", [(8, 5, 4, 2, 0.05), (70, 3, 6, 8, 0.0), (257, 129, 4, 4, 0.05),
                                                 (600, 64, 8, 40, 0.05)])
def test_cuda_backend_matches_reference(B, d, per_class, k, eps):
    import flashdml as fd
    from flashdml._debug import poison_outputs

    x, labels = _batch(B, d, per_class, B + k)
    xr = x.double().requires_grad_(True)
    ref = fd.reference.contextual_loss(xr, labels, k=k, eps=eps)
    (gr,) = torch.autograd.grad(ref * 0.7, xr)
    xf = x.cuda().requires_grad_(True)
    with fd.backend("cuda"), poison_outputs():
        got = fd.contextual_loss(xf, labels.cuda(), k=k, eps=eps)
        (gf,) = torch.autograd.grad(got * 0.7, xf)
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item()) + 1e-9
    assert (gf.double().cpu() - gr).abs().max().item() <= 1e-5 * gr.abs().max().item()


@pytest.mark.skipif(not _cuda_op_available(), reason="needs a CUDA device and the CUDA build of flashdml._C")
@pytest.mark.parametrize("B,d,k", [(70, 16, 4), (600, 64, 40)])
def test_cuda_op_normalize_inside_matches_reference(B, d, k):
    """The CUDA op with raw rows and normalize=True against autograd through the normalising reference."""
    import flashdml as fd

    x, labels = _batch(B, d, 4, B + d)
    x = x * torch.linspace(0.3, 4.0, B)[:, None]
    xr = x.double().requires_grad_(True)
    ref = fd.reference.contextual_loss(xr, labels, k=k)
    (gr,) = torch.autograd.grad(ref * 0.7, xr)
    xc, lc = x.cuda(), labels.cuda()
    args = (k, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, True)
    out = ops.contextual_fwd(xc, lc, *args)
    dx = ops.contextual_bwd(torch.tensor(0.7, device="cuda"), xc, lc, *args, *out[2:])
    assert abs(out[0].item() - ref.item()) <= 1e-6 * abs(ref.item()) + 1e-9
    assert (dx.double().cpu() - gr).abs().max().item() <= 1e-5 * gr.abs().max().item()
