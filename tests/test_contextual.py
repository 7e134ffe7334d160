"""Fused CPU contextual loss (docs/spec.md §2.5) against the reference: loss and straight-through gradient (autograd of the
reference in float64, poisoned outputs), the neighbour lists against the fp32 arithmetic of docs/spec.md §2.5 step 3 (exact
duplicates, ties at the threshold, the inclusive ε band), k from 2 to 16, ε = 0 and 0.05, B from 8 to 2048,
normalize=False, low precision inputs, errors and memory (B = 16384 without anything B×B)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flashdml as fd
from flashdml import _dispatch
from flashdml.ops import registry
from flashdml._debug import poison_outputs
from flashdml.ops import contextual as cx
from flashdml.reference.contextual import _context_forward
from flashdml.reference.similarity import _similarity_matrix
from flashdml._validation import prepare_batch


# fp32 kernel vs float64 reference on the same fp32 inputs (the brief's tolerances): the loss is a sum of exact
# rationals (L_ctx, from counts) plus fp32-accurate L_reg and L_con; the gradient is accumulated in double from
# the fp32 rows.
RTOL_LOSS, RTOL_GRAD = 1e-6, 1e-5


def _batch(B, d, per_class, seed, spread=0.7):
    """Clustered embeddings, ``per_class`` samples per class (the last class may be smaller), shuffled."""
    g = torch.Generator().manual_seed(seed)
    n_classes = (B + per_class - 1) // per_class
    labels = (torch.arange(B) // per_class)[torch.randperm(B, generator=g)]
    centres = torch.randn(n_classes, d, generator=g)
    x = centres[labels] + spread * torch.randn(B, d, generator=g)
    return x, labels


def _compare(x, labels, upstream=0.7, rtol_loss=RTOL_LOSS, rtol_grad=RTOL_GRAD, **kw):
    xr = x.detach().double().requires_grad_(True)
    ref = fd.reference.contextual_loss(xr, labels, **kw)
    (gr,) = torch.autograd.grad(ref * upstream, xr)
    xf = x.detach().clone().requires_grad_(True)
    with fd.backend("cpu"), poison_outputs():
        got = fd.contextual_loss(xf, labels, **kw)
        assert got.dtype == torch.float32 and got.dim() == 0
        (gf,) = torch.autograd.grad(got * upstream, xf)
    assert gf.dtype == x.dtype and torch.isfinite(gf).all()
    err = abs(got.item() - ref.item())
    assert err <= rtol_loss * abs(ref.item()) + 1e-9, f"loss {got.item()!r} vs reference {ref.item()!r}"
    scale = gr.abs().max().item()
    assert scale > 0
    gerr = (gf.double() - gr).abs().max().item()
    assert gerr <= rtol_grad * scale + 1e-12, f"grad max error {gerr:.3e} vs scale {scale:.3e}"
    return ref, gr


def _kernel_lists(x, labels, k, eps, normalize=True):
    """Dense N, P, C (bool [B, B]) from the kernel's neighbour lists."""
    loss, terms, ptr, nbr, flags, counts = torch.ops.flashdml.contextual_fwd(
        x.contiguous(), labels.long(), k, eps, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, normalize)
    B = x.shape[0]
    assert (flags < 4).all() and ptr[0] == 0 and ptr[-1] == nbr.numel()
    rows = torch.repeat_interleave(torch.arange(B), ptr[1:] - ptr[:-1])
    N = torch.zeros(B, B, dtype=torch.bool)
    P = torch.zeros(B, B, dtype=torch.bool)
    C0 = torch.zeros(B, B, dtype=torch.bool)
    N[rows, nbr.long()] = True
    P[rows, nbr.long()] = (flags & 1).bool()
    C0[rows, nbr.long()] = (flags & 2).bool()
    assert ((nbr[1:] > nbr[:-1]) | (rows[1:] != rows[:-1])).all(), "columns must ascend within a row"
    return N, P, C0, terms


def _reference_lists(x, labels, k, eps, normalize=True):
    """N, P, C = 0 from the reference in the input's own precision (fp32 arithmetic for fp32 inputs)."""
    batch = prepare_batch(x, None, labels, labels_required=True)
    S = _similarity_matrix(batch, normalize)
    f = _context_forward(S, labels[:, None] == labels[None, :], k, eps, 10.0)
    return f["N"].bool(), f["P"].bool(), ~f["C"], f


def test_public_api_routes_to_the_fused_op():
    assert fd.contextual_loss is cx.contextual_loss
    assert "cpu" in registry.family_of("contextual_loss").backends
    assert _dispatch.resolve("contextual_loss", torch.device("cpu"), torch.float32) == "cpu"


# ------------------------------------------------------------------------------------------ vs the reference
CASES = [  # (B, d, per_class, k, eps, seed); B <= 256 runs the CPU op's one-tile (dense) path, larger B the sparse one
    (8, 5, 4, 2, 0.05, 0), (8, 3, 4, 4, 0.0, 1), (37, 16, 4, 4, 0.05, 2), (37, 129, 5, 2, 0.0, 3),
    (70, 3, 6, 8, 0.05, 4), (130, 33, 8, 16, 0.0, 5), (130, 64, 4, 4, 0.05, 6), (257, 20, 8, 8, 0.05, 7),
    (600, 64, 4, 16, 0.05, 8), (600, 129, 8, 2, 0.05, 9), (1030, 32, 4, 4, 0.0, 10),
]


@pytest.mark.parametrize("B,d,per_class,k,eps,seed", CASES)
def test_matches_reference(B, d, per_class, k, eps, seed):
    x, labels = _batch(B, d, per_class, seed)
    _compare(x, labels, k=k, eps=eps)


def test_matches_reference_b2048():
    x, labels = _batch(2048, 32, 4, 11)
    _compare(x, labels, k=4, eps=0.05)


def test_matches_reference_b2048_ragged_feature_chunks():
    """From B = 2048 the CPU backward applies part of the gradient in chunks of 128 feature columns: d = 129 leaves
    a last chunk of one column; exact duplicates put clamped entries off the diagonal."""
    x, labels = _batch(2048, 129, 6, 21)
    x[5::9] = x[4::9][: x[5::9].shape[0]]
    _compare(x, labels, k=8, eps=0.05)


@pytest.mark.parametrize("k,eps", [(4, 0.04), (8, 0.05)])
def test_224px_setting_and_other_weights(k, eps):
    x, labels = _batch(96, 24, k, 12)
    _compare(x, labels, k=k, eps=eps, context_weight=0.95, contrastive_weight=0.05, reg_weight=0.1,
             reg_target=0.3, pos_margin=0.7, neg_margin=0.2, ste_slope=3.0)


def test_single_terms():
    x, labels = _batch(64, 16, 4, 13)
    for w in (dict(context_weight=1.0, contrastive_weight=0.0, reg_weight=0.0),
              dict(context_weight=0.0, contrastive_weight=0.0, reg_weight=1.0),
              dict(context_weight=0.0, contrastive_weight=1.0, reg_weight=0.0)):
        _compare(x, labels, **w)
    # the terms the op reports are the reference's unweighted L_ctx, L_reg
    _, _, _, terms = _kernel_lists(x, labels, 4, 0.05)
    t = fd.reference.contextual.contextual_loss_terms(x.double(), labels)
    assert terms[0].item() == pytest.approx(t["L_ctx"].item(), rel=1e-6)
    assert terms[1].item() == pytest.approx(t["L_reg"].item(), rel=1e-5, abs=1e-9)
    assert terms[2].item() == pytest.approx(t["L_con"].item(), rel=1e-6)


def test_large_classes_dense_label_part():
    # two classes of B/2: the label part of G is dense (every same-label pair), handled by per-class sums
    x, labels = _batch(90, 8, 45, 14, spread=1.5)
    _compare(x, labels, k=4, eps=0.05)
    _compare(x, torch.zeros(90, dtype=torch.long), k=6, eps=0.0)  # one class


# --------------------------------------------------------------------------- neighbourhoods, ties, duplicates
def _exact_vectors():
    """Unit vectors whose similarities are exact in fp32 ({0, ±1/2, ±1}), with exact duplicates."""
    signs = torch.tensor([[1 - 2 * ((m >> b) & 1) for b in range(4)] for m in range(16)], dtype=torch.float32)
    basis = torch.cat([torch.eye(4), -torch.eye(4)])
    x = torch.cat([0.5 * signs, basis, 0.5 * signs[:5], basis[:3]])  # rows 24.. duplicate earlier rows
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    return x[perm]


@pytest.mark.parametrize("k,eps", [(2, 0.0), (3, 0.0), (4, 0.0), (4, 0.05), (5, 0.5), (8, 1.0), (2, 1.0)])
def test_exact_ties_neighbour_lists_and_loss(k, eps):
    x = _exact_vectors()
    labels = torch.arange(x.shape[0]) % 5
    for normalize in (True, False):
        N, P, C0, _ = _kernel_lists(x, labels, k, eps, normalize)
        Nr, Pr, C0r, f = _reference_lists(x, labels, k, eps, normalize)
        assert torch.equal(N, Nr) and torch.equal(P, Pr) and torch.equal(C0, C0r)
        assert (N.sum(1) > k).any(), "the case must have ties / band members beyond k"
        assert C0.sum() > x.shape[0], "exact duplicates must be clamped (C = 0) too"
    _compare(x, labels, k=k, eps=eps)
    _compare(x, labels, k=k, eps=eps, normalize=False)


@pytest.mark.parametrize("B", [200, 300])  # the one-tile path (B <= 256) and the streaming pass
@pytest.mark.parametrize("k,eps,seed", [(4, 0.05, 0), (2, 0.0, 1), (8, 0.1, 2), (16, 0.05, 3)])
def test_neighbour_lists_equal_fp32_reference(B, k, eps, seed):
    x, labels = _batch(B, 24, 4, 20 + seed)
    x[7] = x[3]  # exact duplicates
    x[150] = x[3]
    N, P, C0, _ = _kernel_lists(x, labels, k, eps)
    Nr, Pr, C0r, _ = _reference_lists(x, labels, k, eps)
    assert torch.equal(N, Nr) and torch.equal(P, Pr)
    assert (N.sum(1) >= k).all()
    # C = 0 off the diagonal only between the duplicates (where the fp32 similarity may reach 1)
    off = C0 & ~torch.eye(B, dtype=torch.bool)
    dup = torch.zeros(B, B, dtype=torch.bool)
    dup[[3, 7, 150], :] = True
    assert not (off & ~(dup & dup.T)).any()


def test_duplicates_random_band():
    x, labels = _batch(120, 16, 4, 30)
    x[10] = x[11] = x[12] = x[40]
    _compare(x, labels, k=4, eps=0.05)
    _compare(x, labels, k=2, eps=0.05)


def test_wide_band_large_neighbourhoods():
    # ε = 1.5: |N(i)| >> k on every row (the candidate lists are compacted, nothing is lost)
    x, labels = _batch(200, 6, 4, 31)
    N, _, _, _ = _kernel_lists(x, labels, 4, 1.5)
    Nr, _, _, _ = _reference_lists(x, labels, 4, 1.5)
    assert torch.equal(N, Nr) and N.sum(1).min() > 20
    _compare(x, labels, k=4, eps=1.5)


def test_large_k_up_to_b():
    x, labels = _batch(40, 8, 4, 32)
    for k in (20, 39):
        N, _, _, _ = _kernel_lists(x, labels, k, 0.0)
        Nr, _, _, _ = _reference_lists(x, labels, k, 0.0)
        assert torch.equal(N, Nr)
        _compare(x, labels, k=k, eps=0.0)


# ------------------------------------------------------------------------------- dense path for B > 256
# Wide ε-bands (duplicates) make the sparse stage cost ~B·|N|²: the CPU op then holds Z and the closed-form gradient
# as B×B doubles (contextual_one_tile.h, ctx::use_dense). _set_contextual_dense forces a path: 0 auto, 1 sparse,
# 2 dense (B <= 16384).
@pytest.fixture
def dense_mode():
    def set_mode(m):
        torch.ops.flashdml._set_contextual_dense(m)
    yield set_mode
    torch.ops.flashdml._set_contextual_dense(0)


def _dense_path(x, labels, k, eps):
    _, _, ptr, nbr, flags, _ = torch.ops.flashdml.contextual_fwd(
        x.contiguous(), labels.long(), k, eps, 1.0, 1.0, 1.0, 0.0, 0.75, 0.6, 1.0, True)
    return torch.ops.flashdml._contextual_dense_path(ptr, nbr, flags)


def _duplicate_clusters(B, d):
    x = torch.cat([torch.ones(B // 2, d), -torch.ones(B - B // 2, d)])
    return x, torch.arange(B) // 4


@pytest.mark.parametrize("B,d,per_class,seed", [(300, 16, 7, 40), (1030, 32, 4, 41)])
@pytest.mark.parametrize("k", [4, 8])
def test_forced_dense_path_matches_reference(dense_mode, B, d, per_class, k, seed):
    x, labels = _batch(B, d, per_class, seed)  # ragged: the last class is smaller
    x[5] = x[17] = x[100] = x[250]  # exact duplicates (C = 0 entries off the diagonal)
    x[30] = x[31]
    dense_mode(2)
    assert _dense_path(x, labels, k, 0.05)
    _compare(x, labels, k=k, eps=0.05)
    dense_mode(1)
    assert not _dense_path(x, labels, k, 0.05)


def _cluster_lists(B, cluster):
    """Synthetic neighbour lists (CSR, flags) of B rows in clusters of `cluster` identical rows: every row's ε-band
    is its whole cluster (itself excluded), the first half of it in P."""
    rows = torch.arange(B)
    members = (rows // cluster * cluster)[:, None] + torch.arange(cluster)[None, :]
    keep = (members < B) & (members != rows[:, None])
    counts = keep.sum(1)
    rank = keep.cumsum(1) - 1
    in_p = (rank < (counts // 2)[:, None])[keep]
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return ptr, members[keep].to(torch.int32), in_p.to(torch.uint8)


@pytest.mark.parametrize("B", [4160, 16384])
def test_auto_switch_covers_batches_above_4096(dense_mode, B):
    # Two clusters of B/2 duplicates: the sparse stage would cost ~B·(B/2)² — far slower than the dense reference —
    # so the dense path must be chosen up to its cap of 16384 rows (issue: the cliff above B = 4096).
    ptr, nbr, flag = _cluster_lists(B, B // 2) if B <= 4160 else _cluster_lists(B, 256)
    if B <= 4160:
        assert torch.ops.flashdml._contextual_dense_path(ptr, nbr, flag)
    else:  # clusters of 256 at B = 16384: Σ work ~ B·256²·2 < B³/128, the sparse stage stays
        assert not torch.ops.flashdml._contextual_dense_path(ptr, nbr, flag)
    dense_mode(2)
    assert torch.ops.flashdml._contextual_dense_path(ptr, nbr, flag)


def test_dense_path_cap_is_16384_rows(dense_mode):
    ptr, nbr, flag = _cluster_lists(16385, 4)
    dense_mode(2)  # even when forced, above the cap the sparse stage runs (memory: 28·B² bytes at most)
    assert not torch.ops.flashdml._contextual_dense_path(ptr, nbr, flag)


def test_auto_switch_picks_dense_on_duplicate_clusters(dense_mode):
    x, labels = _duplicate_clusters(300, 8)
    assert _dense_path(x, labels, 4, 0.05)
    x, labels = _batch(300, 6, 4, 42)  # ε = 1.5: wide bands on every row
    N, _, _, _ = _kernel_lists(x, labels, 4, 1.5)
    assert N.sum(1).min() > 20
    assert _dense_path(x, labels, 4, 1.5)
    _compare(x, labels, k=4, eps=1.5)
    for B, d, k, eps, seed in [(1030, 32, 4, 0.0, 10), (600, 64, 16, 0.05, 8)]:  # the normal case: sparse stage
        xr, lr = _batch(B, d, 4, seed)
        assert not _dense_path(xr, lr, k, eps)
    dense_mode(1)
    assert not _dense_path(x, labels, 4, 1.5)
    _compare(x, labels, k=4, eps=1.5)


def test_duplicate_clusters_b2048_takes_the_dense_path():
    """Two clusters of identical rows, B = 2048, d = 32: every ε-band holds 1024 rows (sparse stage ~B·1024²)."""
    x, labels = _duplicate_clusters(2048, 32)
    assert _dense_path(x, labels, 4, 0.05)
    x.requires_grad_(True)
    with fd.backend("cpu"):
        loss = fd.contextual_loss(x, labels)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------- other inputs
def test_normalize_false():
    x, labels = _batch(100, 12, 4, 40)
    F = 0.999 * x / x.norm(dim=1, keepdim=True)  # S_ii < 1: C_ii = 1 in both precisions
    _compare(F, labels, k=4, eps=0.05, normalize=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    x, labels = _batch(64, 16, 4, 41)
    xl = x.to(dtype)
    ref = fd.reference.contextual_loss(xl.double(), labels)
    xf = xl.clone().requires_grad_(True)
    with fd.backend("cpu"):
        got = fd.contextual_loss(xf, labels)
        got.backward()
    assert got.dtype == torch.float32 and xf.grad.dtype == dtype
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_float64_runs_the_reference_and_module():
    x, labels = _batch(20, 4, 4, 42)
    xd = x.double()
    with fd.backend("cpu"):
        assert fd.contextual_loss(xd, labels).dtype == torch.float64
        mod = fd.losses.ContextualLoss(k=3, eps=0.04)
        got = mod(x, labels)
    assert got.item() == pytest.approx(fd.reference.contextual_loss(xd, labels, k=3, eps=0.04).item(), rel=1e-6)


def test_upstream_gradient_and_ste_slope_scale():
    x, labels = _batch(50, 8, 5, 43)
    _compare(x, labels, upstream=-2.5, context_weight=1.0, contrastive_weight=0.0, reg_weight=0.0, ste_slope=20.0)


def test_errors():
    x, labels = _batch(6, 3, 2, 9)
    with fd.backend("cpu"):
        with pytest.raises(ValueError, match="collapsed"):
            fd.contextual_loss(torch.ones(5, 3), torch.tensor([0, 0, 1, 1, 2]))
        with pytest.raises(ValueError, match="collapsed"):  # k small, but every point is inside the ε band
            fd.contextual_loss(torch.randn(6, 3) * 1e-3 + 1.0, torch.arange(6) % 2, k=2, eps=0.5)
        with pytest.raises(ValueError, match="k"):
            fd.contextual_loss(x, labels, k=1)
        with pytest.raises(ValueError, match="k = 7"):
            fd.contextual_loss(x, labels, k=7)
        with pytest.raises(ValueError, match="eps"):
            fd.contextual_loss(x, labels, eps=-0.1)
        with pytest.raises(ValueError, match="labels is required"):
            fd.contextual_loss(x, None)
        with pytest.raises(TypeError, match="contrastive_weight"):
            fd.contextual_loss(x, labels, contrastive_weight="1")


# ------------------------------------------------------------------------------------------------ memory
def test_memory_b16384_without_bxb():
    """B = 16384, d = 64 forward + backward: B×B fp32 alone would be 1 GiB; the peak RSS rise must stay far below."""
    code = textwrap.dedent("""
        import resource, torch, flashdml as fd
        torch.manual_seed(0)
        B, d = 16384, 64
        labels = torch.arange(B) // 4
        x = (torch.randn(B // 4, d)[labels] + 0.7 * torch.randn(B, d)).requires_grad_(True)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with fd.backend("cpu"):
            loss = fd.contextual_loss(x, labels)
            loss.backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
        print("RISE_MIB", (peak - base) / 1024, "LOSS", loss.item())
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rise = float(out.stdout.split("RISE_MIB")[1].split()[0])
    assert rise < 256, f"peak RSS rose by {rise:.0f} MiB (B×B fp32 = 1024 MiB)"


def test_opcheck_registration():
    """Schema, fake kernel (data-dependent neighbour-list length) and autograd registration of the fused op."""
    x = torch.randn(16, 5, requires_grad=True)
    labels = torch.arange(16) // 4
    args = (x, labels, 4, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0, True)
    res = torch.library.opcheck(torch.ops.flashdml.contextual_fwd, args,
                                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}


def test_benchmark_declares_the_target_shapes():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from benchmarks import OPS, harness

    assert "contextual_loss" in OPS
    op = harness.load_op("contextual_loss")
    assert {(s["B"], s["d"]) for s in op.shapes["targets"]} == {(128, 512), (1024, 512), (4096, 512), (16384, 512),
                                                               (2048, 32)}
    assert [s["B"] for s in op.shapes["targets"] if s.get("input") == "duplicate_clusters"] == [2048]
    names = {p.name for p in op.providers}
    assert {"reference", "flashdml-cpu", "torch.compile(reference)"} <= names
    ref = op.provider("reference")
    assert ref.mem_bytes({"B": 16384, "d": 512}) > 12 * harness.GiB > ref.mem_bytes({"B": 4096, "d": 512})
