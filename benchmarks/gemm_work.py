"""GEMM-work model of the Triton kernels: the tensor-core FLOPs every launch performs, against the algorithm's minimum.

``python -m benchmarks --op gemm_work`` (or ``python -m benchmarks.gemm_work [--B N] [--d 64,128,...]``) prints, for
every Triton op in the fp32 and bf16 tile configurations, the forward and backward FLOPs of its ``tl.dot`` products
divided by the minimum below, and how many times each backward pass computes S. Nothing runs on a GPU and no kernel
runs at all: the op's launchers run on CPU tensors under ``_launch_log.record_launches(dry=True)``, which records
every launch (grid and arguments) without running it, and :func:`launch_work` turns each recorded launch into FLOPs
by the kernel's loop structure. tests/test_gemm_work.py checks that model launch by launch against the dots the
Triton interpreter executes at small ragged shapes, and the ratios against the minimum.

**What is counted.** Each ``tl.dot`` as executed: 2·M·N·K for its tile shape, padded tile sizes and masked-out
rows / columns / d-chunks included (the hardware multiplies them), summed over the program grid and the kernel's
loops. ``s`` is the FLOPs of S tiles (``_tiles.s_tile`` and the inline K loops), ``grad`` the gradient products
``W·y`` / ``Wᵀ·x``. Element-wise work, selection, atomics and the torch glue are not counted.

**Minimum** (per op, B rows of x, M of y, d columns; one S GEMM = 2·B·M·d FLOPs):

* forward: one S GEMM, times the passes the algorithm needs before it can finish (``FWD_PASSES``):
  symmetric batch softmax 2 (the column LSE needs every row: in one pass it would need per-row-block column
  partials, O(B·M / BLOCK_M) memory); contextual loss 2 (the neighbour band of row i is known only once its k-th
  neighbour is, so the list pass follows the threshold pass); hardest negatives 5 (three radix-histogram passes,
  a count pass, a collect pass: selecting among B·M values without storing them); XE / NT-Xent 1 plus the positive
  pairs (2·|P|·d: softplus(LSE − z_p) needs the finished LSE, so the positives are visited in a second pass, only
  the positives).
* backward: per gradient side one S recompute and one gradient GEMM (2·B·M·d each), two sides (dx, dy) for every
  Triton loss — in self mode too, as none of them derives dy from dx (W is symmetric for the hinge-pair losses and
  XE's global partition, so they could; the CUDA XE op does, and its column counts one side). The gradient GEMM counts ``GRAD_TERMS`` products where the numerics
  need them: 16-bit rows of the hinge-pair and anchor-LSE losses multiply a 16-bit head and tail of W
  (``_tiles.weights_dot``), those of the contextual and triplet losses a TF32 head and tail (``split_tf32_dot``),
  docs/gpu.md's precision table. Why one S per side: a program owns a block of rows and reduces over the other
  side in registers; the transposed contribution of the same S tile goes to rows that other programs own, so
  producing both from one S tile needs float atomics (a run-dependent summation order: not deterministic) or a
  partial buffer per row block (O(B·M·d / BLOCK_M) memory, B×B-like) or W itself (B×M). The table also gives the
  ratio against the absolute minimum, one S recompute for the whole backward plus the single-term gradient GEMMs.

**Approximate launches** (dry mode reads zeros back from the kernels): the contextual loss's list-overflow rerun
(an extra ``_ctx_list_kernel`` launch over the overflowing rows on real data) never happens and its sparse stage
(C++, no Triton launch) is replaced by zeros; the hardest-negatives passes run over a zero histogram (same launches).
The two CUDA columns are analytic (``cuda_backward``: the backward grids of csrc/cuda, no launch recorded; the
minimum there counts one product per gradient GEMM, as the CUDA kernels make one). The column-split count comes
from a CPU device (1 split); the FLOPs do not depend on it (splits are whole column blocks), only the grid does.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import types
from typing import Callable, NamedTuple

import torch


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


class Work(NamedTuple):
    s: int = 0       # FLOPs of S tiles
    grad: int = 0    # FLOPs of gradient products

    def __add__(self, other):
        return Work(self.s + other.s, self.grad + other.grad)

    @property
    def total(self) -> int:
        return self.s + self.grad


# ----------------------------------------------------------------------------------------------- per-kernel model
def _s_tile(rows: int, cols: int, D: int, BK: int) -> int:
    """FLOPs of one S tile: the K loop runs cdiv(D, BLOCK_K) dots of [rows, BK] x [BK, cols]."""
    return cdiv(D, BK) * 2 * rows * cols * BK


def _split_tiles(n_other: int, per: int, bn: int, n_splits: int) -> int:
    """Column tiles one row program visits over all splits: split s covers [s·per, min(s·per + per, n_other))."""
    return sum(cdiv(max(0, min(s * per + per, n_other) - s * per), bn) for s in range(n_splits))


def _is16(t) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _stream(p: dict, grid: tuple, n_other: int, terms: int = 0) -> Work:
    """A row-block x column-split kernel: grid (row blocks, [d-chunks,] splits); each program streams the column
    tiles of its split, an S tile each and, with ``terms`` > 0, ``terms`` gradient products of [BLOCK_M, BLOCK_N] x
    [BLOCK_N, BLOCK_D] per d-chunk it owns: one when the grid has a d-chunk axis, all cdiv(D, BLOCK_D) of them when
    the program loops over the chunks itself (the restructured backward: a 2-D grid)."""
    bm, bn, D = p["BLOCK_M"], p["BLOCK_N"], p["D"]
    programs = math.prod(grid[:-1])
    tiles = _split_tiles(n_other, p["cols_per_split"], bn, grid[-1])
    s = programs * tiles * _s_tile(bm, bn, D, p["BLOCK_K"])
    if not terms:
        return Work(s, 0)
    chunks = 1 if len(grid) == 3 else cdiv(D, p["BLOCK_D"])
    return Work(s, programs * tiles * chunks * terms * 2 * bm * bn * p["BLOCK_D"])


def _other(p: dict) -> int:
    """Rows on the streamed side of a dx / dy gradient kernel (programs own x rows for dx, y rows for dy)."""
    return p["B"] if p.get("DY") else p["M"]


def _pos_stats(p: dict, grid: tuple) -> Work:
    """XE / NT-Xent positive pass: row block r of label-sorted x rows streams the sorted y columns
    [min lo, max hi) of its rows, cut into n_splits chunks of whole BLOCK_N tiles (data-dependent: read lo / hi)."""
    bm, bn, B, ns = p["BLOCK_M"], p["BLOCK_N"], p["B"], p["n_splits"]
    lo, hi = p["lo_ptr"].tolist(), p["hi_ptr"].tolist()
    tiles = 0
    for pid_m in range(grid[0]):
        r = range(pid_m * bm, min(pid_m * bm + bm, B))
        c_lo = min((lo[i] for i in r), default=2147483647)
        c_hi = max([hi[i] for i in r] + [0])
        chunk = cdiv(cdiv(max(c_hi - c_lo, 0), ns), bn) * bn
        for pid_s in range(grid[1]):
            n_lo = c_lo + pid_s * chunk
            tiles += cdiv(max(min(n_lo + chunk, c_hi) - n_lo, 0), bn)
    return Work(tiles * _s_tile(bm, bn, p["D"], p["BLOCK_K"]), 0)


# kernel name -> f(params, grid) -> Work. Kernels without a tl.dot map to None.
KERNELS: dict[str, Callable | None] = {
    # batch softmax
    "_lse_partial_kernel": lambda p, g: _stream(p, g, p["B"]),
    "_grad_partial_kernel": lambda p, g: _stream(p, g, p["B"], terms=1),
    "_lse_finalize_kernel": None,
    "_grad_finalize_kernel": None,
    # XE / NT-Xent
    "_neg_lse_kernel": lambda p, g: _stream(p, g, p["M"]),
    "_pos_stats_kernel": _pos_stats,
    "_xent_grad_kernel": lambda p, g: _stream(p, g, _other(p), terms=1),
    "_lse_merge_kernel": None,
    "_xent_finalize_kernel": None,
    # anchor-LSE (SupCon, Multi-Similarity, Circle): weights_dot = head + tail for 16-bit rows
    "_fwd_partial_kernel": lambda p, g: _stream(p, g, p["M"]),
    "_grad_kernel": lambda p, g: _stream(p, g, _other(p), terms=2 if _is16(p["x_ptr"]) else 1),
    "_row_merge_kernel": None,
    "_finalize_kernel": None,
    # hinge pairs (TCM, contrastive margin)
    "_hinge_stats_kernel": lambda p, g: _stream(p, g, p["M"]),
    "_hinge_grad_kernel": lambda p, g: _stream(p, g, _other(p), terms=2 if _is16(p["x_ptr"]) else 1),
    "hinge_finalize_kernel": None,
    # contextual loss: split-TF32 gradient products for 16-bit rows (GPREC "tf32")
    "_ctx_stats_kernel": lambda p, g: _stream(p, g, p["B"]),
    "_ctx_list_kernel": lambda p, g: Work(g[0] * cdiv(p["B"], p["BLOCK_N"])
                                          * _s_tile(p["BLOCK_M"], p["BLOCK_N"], p["D"], p["BLOCK_K"]), 0),
    "_ctx_grad_kernel": lambda p, g: _stream(p, g, p["B"], terms=2 if p["GPREC"] == "tf32" else 1),
    # triplet margin: split-TF32 gradient products for 16-bit rows (PRECISION "tf32")
    "_triplet_stats_kernel": lambda p, g: _stream(p, g, p["M"]),
    "_triplet_grad_kernel": lambda p, g: _stream(p, g, _other(p), terms=2 if p["PRECISION"] == "tf32" else 1),
    # selection and metrics
    "_knn_partial_kernel": lambda p, g: _stream(p, g, p["M"]),
    "_hneg_pass_kernel": lambda p, g: _stream(p, g, p["M"]),
    "knn_merge_kernel": None,
    "_metrics_pass_kernel": lambda p, g: _stream(p, g, p["M"]),
}


def launch_work(launch) -> Work:
    """FLOPs of one recorded launch (``_launch_log.Launch``); an unknown kernel is an error, so a new kernel
    cannot be left out of the model silently."""
    if launch.kernel not in KERNELS:
        raise KeyError(f"gemm_work: no FLOP model for kernel {launch.kernel}")
    f = KERNELS[launch.kernel]
    return Work() if f is None else f(launch.params, launch.grid)


# ------------------------------------------------------------------------------------------------------- the ops
T = 0.1
MARGINS = dict(pos_margin=0.75, neg_margin=0.6)


def _stage_stub():
    """Zeros in place of the contextual loss's C++ sparse stage (dry mode has no neighbour lists to give it)."""
    def grad_parts(ptr, col, flag, key, F):
        n = F.shape[0]
        z = torch.zeros(n, dtype=torch.float64)
        return torch.zeros_like(F), z, z, torch.zeros(n, 1, dtype=torch.int64), torch.zeros(n, 1, dtype=torch.float64)
    return types.SimpleNamespace(contextual_stage_loss=lambda *a: torch.zeros((), dtype=torch.float64),
                                 contextual_stage_grad_parts=grad_parts)


def _run_op(name: str, x, y, labels, g):
    """Generator: runs the forward, yields, runs the backward (so the caller can switch logs in between)."""
    from flashdml.triton_kernels import anchor_lse, batch_softmax, contextual, hinge_pair, metrics, selection
    from flashdml.triton_kernels import triplet, xent

    t = torch.tensor(T)
    if name in ("batch_softmax", "batch_softmax_sym"):
        sym = name == "batch_softmax_sym"
        _, row, col = batch_softmax.fwd_impl(x, y, None, t, sym)
        yield
        batch_softmax.bwd_impl(g, x, y, None, t, sym, row, col)
    elif name in ("cross_example_softmax", "ntxent"):
        glob = name == "cross_example_softmax"
        _, lse, coef = xent.fwd_impl(x, x, labels, labels, t, glob, True)
        yield
        xent.bwd_impl(g, x, x, labels, labels, t, glob, True, lse, coef)
    elif name == "supcon":
        _, stats = anchor_lse.fwd_impl(x, x, labels, labels, t, 0, 0.0, 0.0, 0.0, True)
        yield
        anchor_lse.bwd_impl(g, x, x, labels, labels, t, 0, 0.0, 0.0, 0.0, True, stats)
    elif name == "threshold_consistent_margin":
        args = (MARGINS["pos_margin"], MARGINS["neg_margin"], 1.0, 1.0, True, False)
        counts = hinge_pair.fwd_impl(x, x, labels, labels, *args)[2]
        yield
        hinge_pair.bwd_impl(g, x, x, labels, labels, *args, counts)
    elif name == "contextual_loss":
        sc = (4, 0.05, 1.0, 1.0, 1.0, 0.0, MARGINS["pos_margin"], MARGINS["neg_margin"], 1.0)
        out = contextual.fwd_impl(x, labels, *sc)
        yield
        contextual.bwd_impl(g, x, labels, *sc, *out[2:])
    elif name == "triplet_margin":
        counts = triplet.fwd_impl(x, x, labels, labels, 0.1, True)[2]
        yield
        triplet.bwd_impl(g, x, x, labels, labels, 0.1, True, counts)
    elif name == "knn":
        selection.knn_impl(x, x, 10, True)
        yield
    elif name == "hardest_negatives":
        selection.hardest_negatives_impl(x, x, labels, labels, x.shape[0], True)
        yield
    elif name == "metrics":
        B = x.shape[0]
        metrics.metrics_pass_impl(x, x, labels, labels, torch.arange(B), torch.full((B,), 10), True, True, 0)
        yield
    else:
        raise KeyError(name)


# op -> (forward S passes, gradient sides); XE / NT-Xent add their positive pairs (POSITIVE_PASS)
OPS = {
    "batch_softmax": (1, 2),
    "batch_softmax_sym": (2, 2),
    "cross_example_softmax": (1, 2),
    "ntxent": (1, 2),
    "supcon": (1, 2),
    "threshold_consistent_margin": (1, 2),
    "contextual_loss": (2, 2),
    "triplet_margin": (1, 2),
    "knn": (1, 0),
    "hardest_negatives": (5, 0),
    "metrics": (1, 0),
}
LABEL = {"batch_softmax": "batch_softmax (pair)", "batch_softmax_sym": "batch_softmax symmetric (pair)",
         "supcon": "supcon / multi_similarity / circle", "threshold_consistent_margin": "tcm / contrastive_margin"}
POSITIVE_PASS = ("cross_example_softmax", "ntxent")


def grad_terms(name: str, dtype: torch.dtype) -> int:
    """Products per gradient GEMM that the op's numerics need (docs/gpu.md): two for 16-bit rows where W is split
    into a head and a tail, else one."""
    split = name in ("supcon", "threshold_consistent_margin", "contextual_loss", "triplet_margin")
    return 2 if split and dtype != torch.float32 else 1


def inputs(name: str, B: int, d: int, dtype: torch.dtype, seed: int = 0):
    """(x, y, labels): normalised rows (pair mode for batch softmax: y its own rows), labels arange(B) // 4."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, d, generator=gen), dim=1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(B, d, generator=gen), dim=1).to(dtype) \
        if name.startswith("batch_softmax") else x
    return x.contiguous(), y.contiguous(), torch.arange(B) // 4


def record(name: str, x, y, labels, dry: bool = True):
    """(forward launches, backward launches) of one op."""
    from flashdml.triton_kernels import _launch_log, contextual

    g = torch.tensor(1.0)
    with contextlib.ExitStack() as stack:
        if dry and name == "contextual_loss":
            saved = contextual._stage_ops
            contextual._stage_ops = _stage_stub
            stack.callback(setattr, contextual, "_stage_ops", saved)
        run = _run_op(name, x, y, labels, g)
        with _launch_log.record_launches(dry=dry) as fwd:
            next(run)
        with _launch_log.record_launches(dry=dry) as bwd:
            next(run, None)
    return fwd.launches, bwd.launches


def positive_pairs(labels) -> int:
    counts = torch.unique(labels, return_counts=True)[1].to(torch.int64)
    return int((counts * counts).sum()) - labels.numel()


GRAD_KERNELS = ("_grad_partial_kernel", "_xent_grad_kernel", "_grad_kernel", "_hinge_grad_kernel", "_ctx_grad_kernel",
                "_triplet_grad_kernel")


def restructured(launch):
    """The launch as the restructured backward makes it: a gradient kernel's d-chunk grid axis removed (each
    program loops over the chunks of d inside, computing each S tile once), tiles unchanged. A prediction for the
    "after" column; launches already in that form are returned as they are."""
    if launch.kernel in GRAD_KERNELS and len(launch.grid) == 3:
        return launch.__class__(launch.kernel, (launch.grid[0], launch.grid[2]), launch.params)
    return launch


# ------------------------------------------------------------------------------ CUDA backward (analytic, no launches)
# csrc/cuda: bs_grad_kernel (batch softmax) and pair_grad_kernel (XE / NT-Xent, anchor-LSE, hinge pairs, triplet),
# grid (cdiv(n_own, kBM), 1, splits); each block streams its split's 64-row tiles of the other side, one S tile per
# tile (K loop in kBK slices) and, for each kDV chunk of d looped inside the block, one G·B product of
# [64 x 64] x [64 x kDV]; when d fits in kDVNarrow columns (64: only narrower than kDV for fp16 / bf16), one
# product of [64 x 64] x [64 x kDVNarrow] instead (gb_plan in tile_gemm.cuh). tests/test_gemm_work.py checks
# these constants and the grid against the sources.
# CUDA_D_CHUNKS_IN_GRID = True models the earlier kernels (grid (.., cdiv(d, kDV), ..): S recomputed per chunk),
# which the "before" table used.
CUDA_TILE = 64
CUDA_KDV = {torch.float32: 64, torch.bfloat16: 128, torch.float16: 128}
CUDA_KDV_NARROW = {torch.float32: 64, torch.bfloat16: 64, torch.float16: 64}
CUDA_BK = {torch.float32: 16, torch.bfloat16: 32, torch.float16: 32}
CUDA_D_CHUNKS_IN_GRID = False
# op -> gradient passes the CUDA op launches (XE with the global partition in self mode copies dy from dx: its W
# is symmetric); None: not modelled (the contextual loss's CUDA backward runs the hinge kernels plus ATen ops).
CUDA_SIDES = {"batch_softmax": 2, "batch_softmax_sym": 2, "cross_example_softmax": 1, "ntxent": 2, "supcon": 2,
              "threshold_consistent_margin": 2, "contextual_loss": None, "triplet_margin": 2}


def cuda_backward(name: str, B: int, M: int, d: int, dtype: torch.dtype):
    """(backward FLOPs, S computations per pass) of the CUDA op, or None where not modelled."""
    sides = CUDA_SIDES.get(name)
    if not sides:
        return None
    kdv, bk, t = CUDA_KDV[dtype], CUDA_BK[dtype], CUDA_TILE
    if name == "triplet_margin":  # rows augmented with the squared-norm columns: [x̂, 1, 0..] / [ŷ, 0, 1..]
        vw = 4 if dtype == torch.float32 else 8
        d = cdiv(d + 2, vw) * vw
    if d <= CUDA_KDV_NARROW[dtype]:  # the host's choice is made on the launched d (triplet: the augmented rows)
        kdv = CUDA_KDV_NARROW[dtype]
    flops, per_pass = 0, []
    for n_own, n_other in ((B, M), (M, B))[:sides]:
        nrb, ntiles, nch = cdiv(n_own, t), cdiv(n_other, t), cdiv(d, kdv)
        s_blocks = nrb * (nch if CUDA_D_CHUNKS_IN_GRID else 1) * ntiles
        flops += s_blocks * 2 * t * t * cdiv(d, bk) * bk + nrb * nch * ntiles * 2 * t * t * kdv
        per_pass.append(nch if CUDA_D_CHUNKS_IN_GRID else 1)
    return flops, per_pass


def cuda_ratio(name: str, B: int, M: int, d: int, dtype: torch.dtype):
    """(CUDA backward FLOPs / its minimum — one S and one single-term gradient product per pass —, S per pass),
    or None where not modelled."""
    cuda = cuda_backward(name, B, M, d, dtype)
    if not cuda:
        return None
    return cuda[0] / (len(cuda[1]) * 2 * (2 * B * M * d)), cuda[1]


class Row(NamedTuple):
    op: str
    dtype: str
    d: int
    fwd: float            # forward FLOPs / documented minimum
    bwd: float | None     # backward FLOPs / documented minimum
    bwd_abs: float | None  # backward FLOPs / (one S + single-term gradient GEMMs)
    s_per_pass: str       # S recomputes per backward pass (dx + dy)
    bwd_after: float | None  # backward / minimum predicted for the restructured kernels (same tiles)
    cuda_bwd: float | None = None  # CUDA backward / its minimum (one product per gradient GEMM, its sides)
    cuda_s: str = ""               # S per CUDA backward pass


def measure(name: str, B: int, d: int, dtype: torch.dtype) -> Row:
    x, y, labels = inputs(name, B, d, dtype)
    fwd, bwd = record(name, x, y, labels)
    M = y.shape[0]
    S = 2 * B * M * d
    passes, sides = OPS[name]
    fwd_min = passes * S + (2 * positive_pairs(labels) * d if name in POSITIVE_PASS else 0)
    fwd_work = sum((launch_work(launch) for launch in fwd), Work())
    ratio_b = ratio_abs = after = None
    per_pass = ""
    if sides:
        works = [launch_work(launch) for launch in bwd]
        total = sum(works, Work()).total
        bwd_min = sides * (S + grad_terms(name, dtype) * S)
        ratio_b, ratio_abs = total / bwd_min, total / (S + sides * S)
        after = sum((launch_work(restructured(launch)) for launch in bwd), Work()).total / bwd_min
        per_pass = " + ".join(f"{w.s / (2 * B * M * launch.params['D']):g}"
                              for w, launch in zip(works, bwd) if w.s)
    cuda = cuda_ratio(name, B, M, d, dtype)
    c_ratio = c_s = None
    if cuda:
        c_ratio, c_s = cuda[0], " + ".join(str(n) for n in cuda[1])
    return Row(LABEL.get(name, name), str(dtype).replace("torch.", ""), d, fwd_work.total / fwd_min, ratio_b,
               ratio_abs, per_pass, after, c_ratio, c_s or "")


def table(B: int = 4096, ds=(64, 128, 256, 512, 1024), dtypes=(torch.float32, torch.bfloat16), ops=None) -> str:
    lines = ["| op | dtype | d | fwd / min | bwd / min | bwd / abs. min | S per bwd pass (dx + dy) | "
             "bwd / min, restructured (predicted) | CUDA bwd / min | CUDA S per bwd pass |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ops or OPS:
        for dtype in dtypes:
            for d in ds:
                r = measure(name, B, d, dtype)
                f = (lambda v: "—" if v is None else f"{v:.2f}")
                lines.append(f"| {r.op} | {r.dtype} | {r.d} | {r.fwd:.2f} | {f(r.bwd)} | {f(r.bwd_abs)} | "
                             f"{r.s_per_pass or '—'} | {f(r.bwd_after)} | {f(r.cuda_bwd)} | {r.cuda_s or '—'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gemm_work", description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=4096)
    ap.add_argument("--d", default="64,128,256,512,1024")
    ap.add_argument("--op", action="append", choices=tuple(OPS), help="only these ops (default: all)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"GEMM work of the Triton kernels, B = M = {args.B} (self mode; batch softmax: pair mode), "
          "labels arange(B) // 4; FLOPs of the tl.dot products as launched / the documented minimum "
          "(benchmarks/gemm_work.py)\n")
    print(table(args.B, tuple(int(v) for v in args.d.split(",")), ops=args.op))
    return 0


if __name__ == "__main__":
    sys.exit(main())
