"""Building blocks shared by the Triton kernel modules: the S-tile GEMM loop (a ``@triton.jit`` helper that the
kernels inline), the launcher utilities (column-split planning, 16-column padding, power-of-two prescales, the
in-op row normalisation of ``normalize=True``) and the kernels that several modules launch.

Modules whose name starts with "_" are skipped by the AOT coverage scan, which is why kernel-specific jit helpers
live here and not next to the kernels. A kernel defined here (``hinge_finalize_kernel``) is compiled through the
AOT_SPECS of the module that owns its launches (hinge_pair.py); tests/test_triton_aot.py checks that every
``*_kernel`` of this module is covered by some spec.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .._math import normalized_rows, normalized_rows_backward
from . import _launch_log

LOG2E = 1.4426950408889634
FP16_TARGET = 2.0**14  # the largest |W| entry is scaled to <= 2^14 before an fp16 tensor-core product
HINGE_FINAL_BLOCK = 1024  # the single-program reduction of the hinge partials (hinge_finalize_kernel)


@triton.jit
def s_tile(a_ptr, b_ptr, a_idx, b_idx, a_ok, b_ok, D,
           PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile ``a[a_idx] · b[b_idx]ᵀ`` of shape [BLOCK_A, BLOCK_B]; rows are D long (row indices may be gathered).

    The K loop runs k = 0, BLOCK_K, ... in order with one fp32 accumulator, so the value of one element depends
    only on its two rows, the dtype, BLOCK_K and PRECISION: kernels that recompute S with the same settings (the
    forward and backward of a loss, in either tile position) see the same fp32 value on the GPU.
    """
    a_rows = a_ptr + a_idx.to(tl.int64)[:, None] * D
    b_rows = b_ptr + b_idx.to(tl.int64)[:, None] * D
    offs_k = tl.arange(0, BLOCK_K)
    s = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        a = tl.load(a_rows + kk[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_rows + kk[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.dot(a, tl.trans(b), s, input_precision=PRECISION)
    return s


@triton.jit
def weights_dot(w, b, acc, PRECISION: tl.constexpr):
    """``acc + w · b`` for an fp32 weight tile ``w`` and rows ``b`` (fp32, fp16 or bf16), on tensor cores for 16-bit
    rows without the weights' rounding bias.

    A tensor core multiplies operands of one dtype, so 16-bit rows need 16-bit weights; rounding ``w`` once would
    scale every product of a constant weight (the hinge gradients' ∓λ/count) by the same factor, up to 2^-8 (bf16)
    or 2^-11 (fp16). Here ``w`` is split into a 16-bit head and the 16-bit rounding of its remainder, and both are
    multiplied: the weight is then kept to u² (2^-16 bf16, 2^-22 fp16) at the cost of a second product. fp32 rows
    take one dot with ``PRECISION`` (``"ieee"``: exact fp32 products).
    """
    if b.dtype == tl.float32:
        acc = tl.dot(w, b, acc, input_precision=PRECISION)
    else:
        head = w.to(b.dtype)
        tail = (w - head.to(tl.float32)).to(b.dtype)
        acc = tl.dot(head, b, acc, input_precision=PRECISION)
        acc = tl.dot(tail, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def split_tf32_dot(w, b, acc, PRECISION: tl.constexpr):
    """``acc + w · b`` for fp32 tiles whose ``b`` is exact in TF32 (rows upcast from fp16 / bf16). ``"tf32"``: ``w``
    is split into its TF32 head (the low 13 mantissa bits cleared) and the remainder, both multiplied on tensor
    cores, so ``w`` is kept to ~2^-21 instead of being rounded to 2^-11; ``"ieee"``: one exact fp32 dot."""
    if PRECISION == "tf32":
        head = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        acc = tl.dot(head, b, acc, input_precision="tf32")
        acc = tl.dot(w - head, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(w, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def chunk_dot(w, b, acc, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + w · b`` with a gradient kernel's dot variant: DOT 0 a plain ``tl.dot`` of ``w`` cast to the rows'
    dtype, 1 ``weights_dot`` (16-bit head and tail of ``w``), 2 ``split_tf32_dot`` (rows upcast to fp32)."""
    if DOT == 0:
        acc = tl.dot(w.to(b.dtype), b, acc, input_precision=PRECISION)
    elif DOT == 1:
        acc = weights_dot(w, b, acc, PRECISION)
    else:
        acc = split_tf32_dot(w, b.to(tl.float32), acc, PRECISION)
    return acc


@triton.jit
def row_chunk(ptr, rows, ok, c0, D, BLOCK_D: tl.constexpr):
    """(pointers, mask) of the columns [c0, c0 + BLOCK_D) of the D-long rows ``rows`` (int64) where ``ok``."""
    cols = c0 + tl.arange(0, BLOCK_D)
    return ptr + rows[:, None] * D + cols[None, :], ok[:, None] & (cols < D)[None, :]


@triton.jit
def accumulate_chunks(w, b_ptr, b_rows, b_ok, out_ptr, out_rows, out_ok, D, not_first,
                      DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[out_rows, :] += w · b[b_rows, :]`` over all of d, BLOCK_D columns at a time, for one weight tile ``w``
    (already oriented [own rows, other rows]; the dy passes hand in ``tl.trans(w)``). ``out`` holds a program's
    fp32 partial rows, which no other program touches; on the program's first tile (``not_first`` false) the
    previous value is taken as 0 instead of loaded, so the buffer needs no clearing. Each element gets its tile
    terms added in tile order, as a register accumulator would, so the sums are the same.

    This is how a gradient kernel computes each S tile (and its weights) once whatever d is: the caller loops
    over its tiles and hands every weight tile here. Row indices are int64.
    """
    for c0 in range(0, D, BLOCK_D):
        b_at, b_mask = row_chunk(b_ptr, b_rows, b_ok, c0, D, BLOCK_D)
        b = tl.load(b_at, mask=b_mask, other=0.0)
        at, mask = row_chunk(out_ptr, out_rows, out_ok, c0, D, BLOCK_D)
        acc = tl.load(at, mask=mask & not_first, other=0.0)
        acc = chunk_dot(w, b, acc, DOT, PRECISION)
        tl.store(at, acc, mask=mask)
    # The next tile reloads these elements, and in the layout of that load an element may belong to another
    # thread of the program than the one that stored it (the dot's accumulator layout differs from the load's):
    # a block barrier orders every store of this tile before any load of the next.
    tl.debug_barrier()


@triton.jit
def distance_tile(s, sq_a, sq_b):
    """The L2 distance tile ``sqrt(max(|a|² + |b|² − 2 s, 0))`` from an S tile (rows a, columns b) and the rows'
    squared norms, with the correctly rounded square root (``sqrt_rn``, as the CPU kernels' IEEE sqrt): one helper,
    so the triplet forward and both backward passes evaluate the same expression."""
    return tl.sqrt_rn(tl.maximum((sq_a[:, None] + sq_b[None, :]) - 2.0 * s, 0.0))


@triton.jit
def sp_sig(t):
    """(softplus(t), sigmoid(t)) for t in [-inf, inf), without overflow (one exp2 shared by both).

    softplus = max(t, 0) + log1p(e), e = exp(-|t|); log1p by Goldberg's trick (exact to a few ulp, also for
    e below the fp32 epsilon). t = -inf gives (0, 0).
    """
    e = tl.math.exp2(-tl.abs(t) * 1.4426950408889634)
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    sp = tl.maximum(t, 0.0) + log1p
    sig = tl.where(t >= 0, 1.0, e) / u
    return sp, sig


@triton.jit
def anchor_logit(s, pos, p0, p1, p2, KIND: tl.constexpr):
    """(logit f(s), df/ds) of the pairs of an S tile for the anchor-LSE losses (anchor_lse.py), the Triton mirror of
    csrc/include/flashdml/anchor_lse.h, the positive formula where ``pos`` and the negative one elsewhere. KIND 0
    SupCon (p0 = 1/τ; the slope is taken with respect to z = s/τ, so it is 1), 1 Multi-Similarity (p0 = α,
    p1 = β, p2 = base; the slopes ±1 carry the 1/α, 1/β), 2 Circle (p0 = m, p1 = γ; the self-paced weights count
    as constants)."""
    if KIND == 0:
        f = s * p0
        g = tl.full(s.shape, 1.0, tl.float32)
    elif KIND == 1:
        g = tl.where(pos, -1.0, 1.0)
        f = tl.where(pos, -p0, p1) * (s - p2)
    else:
        g = tl.where(pos, -p1 * tl.maximum(1.0 + p0 - s, 0.0), p1 * tl.maximum(s + p0, 0.0))
        f = g * (s - tl.where(pos, 1.0 - p0, p0))
    return f, g


@triton.jit
def online_lse_pair(mp, lp, mn, ln, v, pos, neg):
    """One tile step of two per-row online log-sum-exps (running max m, Σ exp(v − m) l) of ``v``: over the
    entries where ``pos`` and over those where ``neg`` (disjoint masks). One exp2 per tile entry serves both (each
    entry is shifted by the max of its own set), which halves the SFU work of a kernel that needs both LSEs."""
    vp = tl.where(pos, v, float("-inf"))
    vn = tl.where(neg, v, float("-inf"))
    mp_new = tl.maximum(mp, tl.max(vp, 1))
    mn_new = tl.maximum(mn, tl.max(vn, 1))
    rp = tl.where(mp_new == float("-inf"), 0.0, mp_new) * 1.4426950408889634
    rn = tl.where(mn_new == float("-inf"), 0.0, mn_new) * 1.4426950408889634
    e = tl.math.exp2(tl.where(pos, vp, vn) * 1.4426950408889634 - tl.where(pos, rp[:, None], rn[:, None]))
    lp = lp * tl.math.exp2(mp * 1.4426950408889634 - rp) + tl.sum(tl.where(pos, e, 0.0), 1)
    ln = ln * tl.math.exp2(mn * 1.4426950408889634 - rn) + tl.sum(tl.where(neg, e, 0.0), 1)
    return mp_new, lp, mn_new, ln


@triton.jit
def hard_pairs(s, lab_i, lab_j, i_idx, j_idx, i_ok, j_ok, pos_margin, neg_margin, drop_diagonal, strict):
    """(hard positive, hard negative) masks of an S tile with rows i (x) and columns j (y) for the hinge-pair
    losses (hinge_pair.py): labels equal / different, (i, i) dropped when drop_diagonal, s <= m+ / s >= m−
    (strict: < / >). NaN fails every comparison."""
    ok = i_ok[:, None] & j_ok[None, :] & ((i_idx[:, None] != j_idx[None, :]) | (drop_diagonal == 0))
    same = lab_i[:, None] == lab_j[None, :]
    hp = ok & same & ((s < pos_margin) | ((s == pos_margin) & (strict == 0)))
    hn = ok & (~same) & ((s > neg_margin) | ((s == neg_margin) & (strict == 0)))
    return hp, hn


@triton.jit
def hinge_finalize_kernel(psum_ptr, pcnt_ptr, loss_ptr, sums_ptr, counts_ptr, n_prog, pos_weight, neg_weight,
                          BLOCK: tl.constexpr):
    """One program: fixed-order reduction of the hinge partials (psum fp64 [2, n_prog]: positive / negative hinge
    sums, pcnt int64 [2, n_prog]: their counts) into sums [2] fp32, counts [2] int64 and
    loss = w+·sums[0]/counts[0] + w−·sums[1]/counts[1] (a term is 0 when its count is 0), formed in fp64 and
    rounded once. Launched by hinge_pair.py and contextual.py (one program, ``BLOCK=HINGE_FINAL_BLOCK``)."""
    aps = tl.zeros([BLOCK], tl.float64)
    ans = tl.zeros([BLOCK], tl.float64)
    apc = tl.zeros([BLOCK], tl.int64)
    anc = tl.zeros([BLOCK], tl.int64)
    for start in range(0, n_prog, BLOCK):
        r = start + tl.arange(0, BLOCK)
        ok = r < n_prog
        aps += tl.load(psum_ptr + r, mask=ok, other=0.0)
        ans += tl.load(psum_ptr + n_prog + r, mask=ok, other=0.0)
        apc += tl.load(pcnt_ptr + r, mask=ok, other=0)
        anc += tl.load(pcnt_ptr + n_prog + r, mask=ok, other=0)
    ps = tl.sum(aps, 0)
    ns = tl.sum(ans, 0)
    pc = tl.sum(apc, 0)
    nc = tl.sum(anc, 0)
    pos = tl.where(pc > 0, tl.full([], pos_weight, tl.float64) * (ps / tl.maximum(pc, 1).to(tl.float64)), 0.0)
    neg = tl.where(nc > 0, tl.full([], neg_weight, tl.float64) * (ns / tl.maximum(nc, 1).to(tl.float64)), 0.0)
    tl.store(loss_ptr, (pos + neg).to(tl.float32))
    tl.store(sums_ptr, ps.to(tl.float32))
    tl.store(sums_ptr + 1, ns.to(tl.float32))
    tl.store(counts_ptr, pc)
    tl.store(counts_ptr + 1, nc)


def launch_device(args) -> Optional[torch.device]:
    """The device of the first tensor among a launch's arguments (every kernel's first argument is a tensor)."""
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    return None


class wrap_triton:  # noqa: N801 -- a drop-in for torch.library.wrap_triton, same call syntax
    """``torch.library.wrap_triton(kernel)`` whose eager launches run on the device of their tensors.

    Triton launches on the *current* CUDA device and its current stream, not on the device of the pointers it
    is given, so ``wrap_triton(k)[grid](x_on_cuda1, ...)`` with device 0 current would run on the wrong device
    and stream. Every launcher of this package imports this class instead of torch's function, so each launch
    goes through one ``torch.cuda.device(...)`` guard here (tests/test_triton_schemas.py checks both). Under
    ``torch.compile`` / export tracing and for fake or non-CUDA tensors there is nothing to guard and the
    launch is torch's unchanged (Inductor places the device guards of the code it generates itself).
    Inside ``_launch_log.record_launches()`` each launch is also recorded (and in its dry mode not run).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._wrapped = torch.library.wrap_triton(kernel)

    def __getitem__(self, grid):
        run = self._wrapped[grid]

        def launch(*args, **kwargs):
            if _launch_log.record(self.kernel, grid, args, kwargs):
                return None
            device = launch_device(args)
            if device is None or device.type != "cuda" or torch.compiler.is_compiling() \
                    or any(is_fake(a) for a in args if isinstance(a, Tensor)):
                return run(*args, **kwargs)
            with torch.cuda.device(device):
                return run(*args, **kwargs)
        return launch


def tf32_opted_in() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls on CUDA, read now, with PyTorch's own rule.

    ``torch.backends.cuda.matmul.fp32_precision`` is the setting cuBLAS obeys: it is "tf32" after
    ``torch.backends.cuda.matmul.allow_tf32 = True`` or ``torch.set_float32_matmul_precision("high" / "medium")``
    (the legacy setters write it too), after ``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or when it is
    "none" and inherits the generic ``torch.backends.fp32_precision = "tf32"``; an explicit "ieee" there wins over a
    generic "tf32". Torch versions without that attribute: the legacy ``get_float32_matmul_precision()``.
    """
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except (AttributeError, RuntimeError):
        return torch.get_float32_matmul_precision() != "highest"


def precision(dtype: torch.dtype, exact: bool = False) -> str:
    """``input_precision`` of the S-tile ``tl.dot`` for rows of ``dtype``, read at launch time.

    fp16 / bf16: "tf32" (the setting is ignored for 16-bit operands: tensor cores, fp32 accumulation). fp32:
    "ieee" — exact fp32 products and sums on FMA units, the default — unless the user opted into TF32 for fp32
    matmuls (:func:`tf32_opted_in`); then "tf32" (operands rounded to TF32, 2^-11, on tensor cores) like
    ``torch.matmul``. ``exact=True``: always "ieee" for fp32, for callers whose error bounds assume fp32 products
    (the metrics pass). Every launcher calls this at launch, so a forward and its backward each read the setting
    then: flipping it between them makes the backward recompute S in the other precision, as a matmul's backward
    would use the setting in force when it runs.
    """
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if not exact and tf32_opted_in() else "ieee"


TF32_KEY = "TF32"  # a config entry's overrides for fp32 launches under the TF32 opt-in (precision_config)


def precision_config(cfg: dict, dtype: torch.dtype, prec: str) -> dict:
    """The tile configuration of a launch with rows of ``dtype`` whose S tiles use ``input_precision=prec``.

    An fp32 entry of a kernel's config table is tuned for the exact FMA dot ("ieee"). Where that shape does not
    suit the tensor-core dot that "tf32" selects (on sm_90 a wgmma tile needs 64 rows in every ``tl.dot``, and
    some shapes spill or use stack there), the entry carries a ``"TF32"`` dict of overrides, applied here for
    fp32 with prec "tf32". Every other launch gets its entry as it is (16-bit rows also pass "tf32", but their
    entries have no overrides and are never changed). This is the one place that decides the TF32 tiles: the
    launchers call it through :func:`launch_config` and the AOT specs (``_specs(tf32=True)`` of each kernel
    module) call it with "tf32", so every TF32 launch has a compiled and resource-checked spec.
    """
    if dtype != torch.float32 or prec != "tf32" or TF32_KEY not in cfg:
        return cfg
    base = {k: v for k, v in cfg.items() if k != TF32_KEY}
    return dict(base, **cfg[TF32_KEY])


def launch_config(cfg: dict, dtype: torch.dtype, exact: bool = False) -> tuple[dict, str]:
    """``(tile config, PRECISION)`` of a launch now: :func:`precision` read once, and the config for it
    (:func:`precision_config`). A launcher passes the returned precision as the kernel's ``PRECISION``."""
    prec = precision(dtype, exact)
    return precision_config(cfg, dtype, prec), prec


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(device: torch.device, row_programs: int, col_blocks: int, requested: Optional[int]) -> tuple[int, int]:
    """(n_splits, column blocks per split): enough programs for ~2 waves on the GPU, never an empty split."""
    if requested is None:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 1
        requested = triton.cdiv(2 * sms, max(row_programs, 1))
    col_blocks = max(col_blocks, 1)
    per = triton.cdiv(col_blocks, max(1, min(requested, col_blocks)))
    return triton.cdiv(col_blocks, per), per


def pad16(t: Tensor) -> Tensor:
    """Zero columns up to a multiple of 16: the GEMM kernels then always see a 16-divisible row stride, so every
    load is vectorised (an unaligned d makes them scalar and the kernels spill). O(rows·d) copy, only when needed."""
    pad = (-t.shape[1]) % 16
    return t if pad == 0 else torch.nn.functional.pad(t, (0, pad))


def launch(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def chunk_config(cfg: dict, one_chunk: bool) -> dict:
    """The tile configuration of a gradient launch (the launchers ask :func:`grad_config`, which uses this): ``cfg``
    itself when d fits one BLOCK_D chunk (ONE_CHUNK, the register accumulator), else ``cfg`` with BLOCK_D = its
    ``CHUNK_D`` (default: BLOCK_D halved, at least 16, the narrowest tl.dot) and num_warps = its ``CHUNK_WARPS`` if
    given. The chunked loop holds the weight tile across the chunks and reads and writes each chunk of the partial
    rows through a [BLOCK_M, BLOCK_D] tile of 64-bit pointers: at the one-chunk width that spilled 12–48 bytes on
    sm_80 / sm_90 (tests/test_triton_aot.py), and some fp32 / triplet passes need a quarter."""
    if one_chunk:
        return cfg
    return dict(cfg, BLOCK_D=cfg.get("CHUNK_D", max(16, cfg["BLOCK_D"] // 2)),
                num_warps=cfg.get("CHUNK_WARPS", cfg["num_warps"]))


# The narrower widths a one-chunk gradient tile takes when d leaves part of the configured BLOCK_D unused
# (grad_config). Each width below a config's BLOCK_D is one more compiled variant of that config (grad_variants,
# checked by tests/test_triton_aot.py), so the list stays short: 64 is the width the common d = 64 needs, and a
# 128-column tile at d = 64 multiplies as many zero columns as real ones. Narrower widths (32, 16: tl.dot's
# smallest) would serve d <= 32 at the cost of a variant per config each.
NARROW_D = (64,)


def grad_config(cfg: dict, d: int) -> tuple[dict, bool]:
    """(tile configuration, ONE_CHUNK) of a gradient launch whose rows are ``d`` columns wide (16-padded), from
    the kernel's configured ``cfg``: every gradient launcher asks this one function.

    d > BLOCK_D: the chunked loop (:func:`chunk_config`). Otherwise one chunk, BLOCK_D narrowed to the smallest
    of :data:`NARROW_D` that still holds d when that is below the configured width: the gradient product's
    N side is BLOCK_D whatever d is, so the narrower tile skips the zero columns beyond d. The S tile, its K
    loop and the weights do not depend on BLOCK_D, so the gradient is the same up to how the dot groups its
    sums (tests/test_gemm_work.py checks that every launch this returns has its AOT spec)."""
    if d > cfg["BLOCK_D"]:
        return chunk_config(cfg, False), False
    fits = [w for w in NARROW_D if d <= w < cfg["BLOCK_D"]]
    return (narrow_config(cfg, min(fits)) if fits else cfg), True


def narrow_config(cfg: dict, width: int) -> dict:
    """``cfg`` as a one-chunk tile ``width`` columns wide, with its ``NARROW_STAGES`` if given (a config whose
    narrowed variant compiles better with another pipeline depth)."""
    return dict(cfg, BLOCK_D=width, num_stages=cfg.get("NARROW_STAGES", cfg["num_stages"]))


def grad_variants(cfg: dict) -> list[tuple[str, bool, dict]]:
    """Every (name suffix, ONE_CHUNK, tile configuration) that :func:`grad_config` can return for ``cfg``, for
    the AOT specs: the chunked loop (suffix ""), one chunk at the configured width ("_1chunk") and one chunk at
    each narrower width of :data:`NARROW_D` ("_1chunk_d64", ...)."""
    out = [("", False, chunk_config(cfg, False)), ("_1chunk", True, cfg)]
    out += [(f"_1chunk_d{w}", True, narrow_config(cfg, w)) for w in sorted(NARROW_D, reverse=True)
            if w < cfg["BLOCK_D"]]
    return out


def pow2_prescale(bound: Tensor) -> Tensor:
    """0-dim fp32 power of two ``p`` with ``p · bound <= 2^14`` (1 when bound is 0), computed on the device.

    Gradient kernels multiply their weight matrix W (|W| <= bound) by p before casting it to fp16/bf16 for the
    tensor-core product and divide it out (exactly: a power of two) in the finalize. This keeps the largest entry
    near 2^14 (fp16 max 65504) whatever the batch size, so entries down to ~2^-24 of it stay normal in fp16;
    a constant prescale would lose every entry of order 1/|P| once |P| > 2^28. Harmless for fp32 / bf16.
    """
    bound = bound.to(torch.float64)
    exp = torch.floor(torch.log2(FP16_TARGET / torch.where(bound > 0, bound, 1.0))).clamp(-100.0, 100.0)
    return torch.where(bound > 0, torch.exp2(exp), 1.0).to(torch.float32)


def label_index(labels: Tensor, ref_labels: Tensor, self_mode: bool, sorted_rows: bool):
    """Label bookkeeping on the device (sort + searchsorted, O((B + M) log M), no host synchronisation).

    Returns ``(key_x, key_y, npos, plan)``: int32 class keys (equal keys <=> equal int64 labels; a query label that
    does not occur in ref_labels gets -1, which matches nothing), the number of positive pairs |P| as int64 [1]
    (self mode: minus the pairs (i, i)), and with ``sorted_rows`` the positive-pass plan ``(px, py, lo, hi)``: the
    x and y row orders sorted by label (stable) and, for each sorted x row, the range [lo, hi) of sorted y rows
    carrying its label.
    """
    if sorted_rows:
        py = torch.argsort(ref_labels, stable=True)
        sorted_ref = ref_labels[py]
    else:
        sorted_ref = torch.sort(ref_labels).values
    lo = torch.searchsorted(sorted_ref, labels, side="left")
    hi = torch.searchsorted(sorted_ref, labels, side="right")
    key_x = torch.where(hi > lo, lo, -1).to(torch.int32)
    key_y = torch.searchsorted(sorted_ref, ref_labels, side="left").to(torch.int32)
    npos = (hi - lo).sum()
    if self_mode:
        npos = npos - (labels == ref_labels).sum()
    plan = None
    if sorted_rows:
        px = torch.argsort(labels, stable=True)
        plan = (px, py, lo[px], hi[px])
    return key_x, key_y, npos.reshape(1), plan


def check_pair_inputs(x: Tensor, y: Tensor, labels: Tensor, ref_labels: Tensor, dtypes) -> None:
    """The launch-side checks of the labelled pair kernels (XE / NT-Xent, hinge pairs): x [B, d] and y [M, d]
    contiguous, non-empty, one dtype in ``dtypes``; labels int64 [B], ref_labels int64 [M]."""
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: "x and y must be 2-D [B, d] / [M, d]")
    torch._check(x.shape[1] == y.shape[1], lambda: f"x and y need the same d, got {x.shape} vs {y.shape}")
    torch._check(x.shape[0] >= 1 and y.shape[0] >= 1 and x.shape[1] >= 1, lambda: "empty input")
    torch._check(x.dtype == y.dtype and x.dtype in dtypes, lambda: f"unsupported dtypes {x.dtype}, {y.dtype}")
    torch._check(x.is_contiguous() and y.is_contiguous(), lambda: "x and y must be contiguous")
    torch._check(labels.shape == (x.shape[0],) and labels.dtype == torch.int64, lambda: "labels: int64 [B]")
    torch._check(ref_labels.shape == (y.shape[0],) and ref_labels.dtype == torch.int64,
                 lambda: "ref_labels: int64 [M]")


def pad16_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """pad16 of x and y, padding once when y is x (self mode)."""
    xp = pad16(x)
    return xp, (xp if y is x else pad16(y))


def normalized_inputs(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(x̂, ŷ)`` for an op called with ``normalize=True``: rows divided by ``max(‖row‖, 1e-12)`` in fp32 and cast
    back to the input dtype (``flashdml._math.normalized_rows``, the same as the C++ ops). Self mode (``y is x``)
    normalises once and returns the same tensor twice, so ``pad16_pair`` still pads once."""
    xh = normalized_rows(x)[0]
    return xh, (xh if y is x else normalized_rows(y)[0])


def raw_row_grads(dx: Tensor, dy: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients ``dx, dy`` the kernels produced with respect to ``x̂, ŷ`` mapped back to the raw rows ``x, y``
    (``flashdml._math.normalized_rows_backward``). In self mode (y is x) each slot is mapped on its own: the map
    is linear in the gradient, so autograd's sum of the two slots is the gradient of the raw rows."""
    return normalized_rows_backward(dx, x), normalized_rows_backward(dy, y)
