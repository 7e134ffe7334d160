"""``contextual_loss`` with ``process_group=`` (docs/spec.md §2.5, §5): each rank computes its own rows against the
gathered batch; only the O(B·k²) sparse stage runs on every rank, on the gathered neighbour lists.

The loss is ``context_weight·L_ctx + reg_weight·L_reg + contrastive_weight·L_con`` of the concatenated batch. Per
call, with ``F`` the (normalised) rows, ``B`` the global batch and ``lo:hi`` this rank's rows:

1. Forward pass over row chunks of ``F[lo:hi] Fᵀ`` (the dense part: local rows × global columns, one chunk of
   ``S`` alive at a time, no graph): per row the thresholds ``t_i`` / ``h_i`` (values only, the query included),
   the neighbour list ``N(i)`` with its flags (in ``P(i)``; clamped, ``C = 0``), with the fp32 neighbourhood test
   of the fused ops (``flashdml/contextual.h``: ``−D = C ? −fl(2 − 2s) : −0``, ``u = fl(−D + ε)``, ``u >= t_i``),
   and the margin-contrastive hinge sums and counts (fp32 margins and strict tests, as the fused op).
2. The lists of all ranks are gathered (row counts, then the packed ``column·4 + flags`` entries): every rank
   holds ``N(i)`` of the whole batch as CSR, identical bits on every rank.
3. Every rank runs the sparse stage ``flashdml::contextual_stage_loss`` on the gathered lists (``L_ctx``, the same
   float64 value everywhere; a collapsed batch raises on every rank). ``L_reg`` needs ``Σ_i F_i`` (the local sums,
   summed over ranks in rank order) and ``L_con`` the four global hinge numbers, exchanged in the same all-gather.
4. Backward: this rank's share of the gradient of the gathered rows, times ``W``; the column gradients travel to
   their owners through :func:`~flashdml.distributed._comm.gather_rows`. ``L_ctx``:
   ``flashdml::contextual_stage_grad`` (the closed-form straight-through gradient, O(B·k²·d), from the lists
   alone, no ``S`` recomputed) on every rank, of which this rank keeps its own rows; ``L_reg``: a constant vector on
   its own rows; ``L_con``: the hard pairs of its row chunks recomputed (``S`` chunk again), rows and columns.

The dense passes are this streamed PyTorch driver (the compiled ``contextual_fwd`` / ``_bwd`` take only a square
batch and recompute their own lists); float64 input runs the same driver in float64 (the reference's arithmetic:
``l2_normalize``, float64 thresholds and margins). Work per rank O(B_local·B·d + B·k²·d), memory
O(B·d + chunk·B + B·k²), nothing ``B × B``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._math import l2_normalize, nan_loss
from .._validation import check_bool, check_positive_int, check_real, check_unnormalized_rows
from . import _comm
from ._local import prepare_shard
from ._shard import row_chunk

# checked in the one-process op's order (the first bad argument names the same error)
_REALS = ("ste_slope", "context_weight", "contrastive_weight", "reg_weight", "reg_target", "pos_margin",
          "neg_margin")


def _unit_rows(x: Tensor, normalize: bool) -> Tensor:
    """The rows the fused op works on, differentiable: fp32 ``x / max(‖x‖, 1e-12)`` with the norm accumulated in
    double and the scale ``1 / max(float(‖x‖), 1e-12)`` formed in fp32 (as the CPU op's ``inv_row_norm``);
    float64 input the reference's ``l2_normalize``."""
    if x.dtype == torch.float64:
        return l2_normalize(x) if normalize else x
    x32 = x.float()
    if not normalize:
        return x32
    norm = x32.double().square().sum(dim=1).sqrt().float()
    return x32 * (1.0 / norm.clamp_min(1e-12))[:, None]


def similarity_chunk(rows: Tensor, cols: Tensor) -> Tensor:
    """One chunk of ``S``: this rank's rows × every column. The one place the dense passes form ``S`` (the tests
    count its rows)."""
    return rows @ cols.T


def _chunk_lists(s: Tensor, k: int, eps: Tensor):
    """Neighbour lists of one chunk: ``(counts [rows], columns [nnz] int64, flags [nnz] int64)``, columns ascending."""
    dr = 2.0 - 2.0 * s  # 2s is exact: one rounding, as flashdml/contextual.h
    inside = dr > 0
    neg_d = torch.where(inside, -dr, torch.full_like(dr, -0.0))
    u = neg_d + eps
    top = torch.topk(neg_d, k, dim=1).values
    in_n = u >= top[:, k - 1:k]
    in_p = u >= top[:, k // 2 - 1:k // 2]
    rows, cols = in_n.nonzero(as_tuple=True)
    flags = in_p[rows, cols].long() | ((~inside[rows, cols]).long() << 1)  # kCtxInP = 1, kCtxClamped = 2
    return in_n.sum(dim=1), cols, flags


def _hard_pairs(s: Tensor, same: Tensor, pm, nm):
    """Strict hinge tests of docs/spec.md §2.4 (the diagonal kept as a positive)."""
    return same & (s < pm), ~same & (s > nm)


class _Share(torch.autograd.Function):
    """Value: the global loss. Gradient to the gathered rows ``F``: ``W ×`` this rank's share (see the module)."""

    @staticmethod
    def forward(ctx, F: Tensor, lists, labels: Tensor, value: Tensor, con_w, reg_vec: Tensor, shards, ctx_scale):
        ctx.save_for_backward(F, labels, reg_vec, *lists)
        ctx.con_w, ctx.shards, ctx.ctx_scale = con_w, shards, ctx_scale
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        F, labels, reg_vec, ptr, col, flag = ctx.saved_tensors
        sh = ctx.shards
        lo, hi = sh.offset, sh.offset + sh.local
        g = F.new_zeros(F.shape, dtype=torch.float64)
        if ctx.ctx_scale != 0.0:  # L_ctx on every rank from the lists; this rank keeps its own rows
            full = torch.ops.flashdml.contextual_stage_grad(ptr, col, flag, labels, F)
            g[lo:hi] += ctx.ctx_scale * full[lo:hi]
        g[lo:hi] += reg_vec  # L_reg: the same vector on every row
        pm, nm, wp, wn = ctx.con_w
        if wp or wn:
            step = row_chunk(F.shape[0])
            for r0 in range(lo, hi, step):
                r1 = min(hi, r0 + step)
                s = similarity_chunk(F[r0:r1], F)
                hp, hn = _hard_pairs(s, labels[r0:r1, None] == labels[None, :], pm, nm)
                gs = (hn.to(F.dtype) * wn - hp.to(F.dtype) * wp)
                g[r0:r1] += (gs @ F).double()
                g += (gs.T @ F[r0:r1]).double()
        return (g * (float(sh.world) * grad.double())).to(F.dtype), None, None, None, None, None, None, None


def contextual_loss(x, labels, *, process_group, k, eps, normalize, **options):
    _, x, _, labels, _ = prepare_shard(x, None, labels, labels_required=True)
    k = check_positive_int(k, "k", minimum=2)
    eps = check_real(eps, "eps")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    opts = {name: check_real(options[name], name) for name in _REALS}
    check_bool(normalize, "normalize")
    _comm.check_process_group(process_group)
    # the fingerprint first: a rank that is not in this call makes the others raise here, not hang below
    _comm.check_same_call(process_group, "contextual_loss", d=x.shape[1], dtype=x.dtype, k=k, eps=eps,
                          normalize=normalize, **opts)
    sh = _comm.shard_layout(x.shape[0], x.device, process_group)
    B = sh.total
    if k > B:  # the one-process message, with the global batch: raised on every rank alike
        raise ValueError(f"k = {k} is larger than the batch size B = {B} (the contextual loss needs 2 <= k <= B)")
    wide = x.dtype == torch.float64
    F = _comm.gather_rows(_unit_rows(x, normalize), sh)
    lab = _comm.all_gather_rows(labels, sh)
    Fd = F.detach()
    if not normalize and not wide:  # fp32 overflow checks on the whole batch (global row numbers in the message)
        check_unnormalized_rows(Fd, opts["reg_weight"], opts["reg_target"], "contextual_loss")
    if not bool(torch.isfinite(Fd).all()):  # the non-finite rule, on the same gathered bits on every rank
        return nan_loss(x)
    if wide:
        eps_t, pm, nm = torch.tensor(eps, dtype=torch.float64), opts["pos_margin"], opts["neg_margin"]
    else:  # the fused op compares in fp32: ε and the margins rounded to fp32 once
        eps_t = torch.tensor(eps, dtype=torch.float32)
        pm, nm = (float(torch.tensor(opts[m], dtype=torch.float32)) for m in ("pos_margin", "neg_margin"))
    eps_t = eps_t.to(x.device)
    lo, hi = sh.offset, sh.offset + sh.local
    counts, cols, flags = [Fd.new_zeros(0, dtype=torch.int64)], [], []
    stats = torch.zeros(4, dtype=torch.float64, device=x.device)  # hinge sums (pos, neg), counts (pos, neg)
    with torch.no_grad():
        for r0 in range(lo, hi, row_chunk(B)):
            r1 = min(hi, r0 + row_chunk(B))
            s = similarity_chunk(Fd[r0:r1], Fd)
            n, c, f = _chunk_lists(s, k, eps_t)
            counts.append(n)
            cols.append(c)
            flags.append(f)
            hp, hn = _hard_pairs(s, lab[r0:r1, None] == lab[None, :], pm, nm)
            stats += torch.stack([(pm - s[hp].double()).sum(), (s[hn].double() - nm).sum(),
                                  hp.sum().double(), hn.sum().double()])
        packed = (torch.cat(cols) * 4 + torch.cat(flags)) if cols else Fd.new_zeros(0, dtype=torch.int64)
        colsum = Fd[lo:hi].double().sum(dim=0)
        # one ordered all-gather for the hinge numbers and Σ F_i; then the lists: row counts, sizes, entries
        summed = _comm.sum_over_ranks(torch.cat([stats, colsum]), sh)
        row_counts = _comm.all_gather_rows(torch.cat(counts), sh)
        packed = _comm.all_gather_rows(packed, _comm.shard_layout(packed.shape[0], x.device, process_group))
        ptr = torch.cat([row_counts.new_zeros(1), torch.cumsum(row_counts, 0)])
        col, flag = (packed >> 2).int(), (packed & 3).to(torch.uint8)
        l_ctx = float(torch.ops.flashdml.contextual_stage_loss(ptr, col, flag, lab))
    sp, sn, cp, cn = (float(v) for v in summed[:4])
    total = summed[4:]
    mean_s = float(total.square().sum()) / (float(B) * float(B))
    l_reg = (mean_s - opts["reg_target"]) ** 2
    l_con = (sp / cp if cp > 0 else 0.0) + (sn / cn if cn > 0 else 0.0)
    cw, conw, rw = opts["context_weight"], opts["contrastive_weight"], opts["reg_weight"]
    value = torch.tensor(cw * l_ctx + rw * l_reg + conw * l_con, dtype=Fd.dtype, device=x.device)
    reg_vec = (rw * 4.0 * (mean_s - opts["reg_target"]) / (float(B) * float(B))) * total  # dL_reg/dF_m, every m
    con_w = (pm, nm, conw / cp if cp > 0 else 0.0, conw / cn if cn > 0 else 0.0)
    return _Share.apply(F, (ptr, col, flag), lab, value, con_w, reg_vec, sh, cw * 2.0 * opts["ste_slope"])
