"""The collective building blocks of the global-batch ops, on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Every reduction here is *deterministic and identical on every rank*: partial results are all-gathered and
combined locally in rank order, never summed by the backend's ring (whose order depends on the algorithm it
picks). The vectors combined that way are O(B_global) scalars; the one O(B_global · d) exchange each way is the
row gather (forward) and the all-to-all of the column gradients (backward, the same bytes as a reduce-scatter).

Shards may have different sizes, 0 rows included: the gather pads every shard to the largest and cuts the
padding off again, so the collectives always see equal shapes.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import struct
import zlib
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Shards:
    """How the global batch is split: ``sizes[r]`` rows on rank ``r``, concatenated in rank order."""

    group: object  # a torch.distributed ProcessGroup
    rank: int
    world: int
    sizes: Tuple[int, ...]

    @property
    def offset(self) -> int:
        """The first global row of this rank's shard."""
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def offsets(self) -> Tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)


def check_process_group(process_group) -> None:
    """``process_group`` must be a ProcessGroup of an initialised ``torch.distributed``."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("flashdml: process_group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD), got {type(process_group).__name__}")


def shard_layout(n_local: int, device: torch.device, group) -> Shards:
    """Exchange the shard sizes (one small all-gather)."""
    check_process_group(group)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    mine = torch.tensor([n_local], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return Shards(group, rank, world, tuple(int(s.item()) for s in sizes))


def all_gather_rows(t: Tensor, shards: Shards) -> Tensor:
    """The concatenation of every rank's ``t`` (rows in rank order), without autograd. ``t`` is ``[n_local, ...]``."""
    t = t.contiguous()
    widest = max(shards.sizes)
    if widest == 0:
        return t.new_empty((0,) + tuple(t.shape[1:]))
    padded = t.new_zeros((widest,) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(shards.world)]
    dist.all_gather(parts, padded, group=shards.group)
    return torch.cat([p[:n] for p, n in zip(parts, shards.sizes)])


def sum_rows_to_owners(g: Tensor, shards: Shards) -> Tensor:
    """Backward of the gather: each rank holds a gradient ``[total, ...]`` for the whole global batch; return, for
    this rank's own rows, the sum over ranks (in rank order, so the bits are the same on every run). One
    all-to-all: the bytes of a reduce-scatter."""
    g = g.contiguous()
    tail = tuple(g.shape[1:])
    mine = shards.local
    received = g.new_empty((shards.world * mine,) + tail)
    dist.all_to_all_single(received, g, output_split_sizes=[mine] * shards.world,
                           input_split_sizes=list(shards.sizes), group=shards.group)
    out = g.new_zeros((mine,) + tail)
    for r in range(shards.world):  # rank order: deterministic
        out += received[r * mine:(r + 1) * mine]
    return out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, shards: Shards):
        ctx.shards = shards
        return all_gather_rows(t, shards)

    @staticmethod
    def backward(ctx, g: Tensor):
        return sum_rows_to_owners(g, ctx.shards), None


def gather_rows(t: Tensor, shards: Shards) -> Tensor:
    """All-gather with gradient: forward the global rows, backward each rank's rows get the sum over ranks of the
    gradients every rank computed for them."""
    return _GatherRows.apply(t, shards)


def gather_each(t: Tensor, shards: Shards) -> Tensor:
    """``[world, *t.shape]``: every rank's equally shaped ``t``, in rank order (no autograd)."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(shards.world)]
    dist.all_gather(parts, t, group=shards.group)
    return torch.stack(parts)


def sum_over_ranks(t: Tensor, shards: Shards) -> Tensor:
    """The sum over ranks of an equally shaped ``t``, added in rank order: identical bits on every rank and run."""
    parts = gather_each(t, shards)
    out = parts[0].clone()
    for r in range(1, shards.world):
        out += parts[r]
    return out


def max_over_ranks(t: Tensor, shards: Shards) -> Tensor:
    return gather_each(t, shards).amax(dim=0)


def logsumexp_over_ranks(lse: Tensor, shards: Shards) -> Tensor:
    """Combine per-rank log-sum-exps of disjoint sets into the LSE of their union (elementwise; ``-inf`` marks an
    empty set, and an all-empty entry stays ``-inf``)."""
    parts = gather_each(lse, shards)
    top = parts.amax(dim=0)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    acc = torch.zeros_like(top)
    for r in range(shards.world):
        acc += torch.exp(parts[r] - safe)
    return torch.where(torch.isfinite(top), safe + torch.log(acc), top)


def topk_over_ranks(values: Tensor, keys: Tensor, k: int, shards: Shards) -> Tuple[Tensor, Tensor]:
    """The global top-``k`` of per-rank candidate lists: ``(values, keys)``, each ``[min(k, candidates)]``,
    identical on every rank.

    Each rank passes up to ``k`` candidates: ``values`` (floating, finite) and ``keys`` (int64, unique over all
    ranks, e.g. a global flat index ``row · M + col``). The order is the one-process tie rule: value descending,
    equal values → lower key first. One all-gather of ``k`` values and ``k`` keys per rank (padded with
    ``-inf`` / the largest int64, which always sort last and are cut off)."""
    if values.shape != keys.shape or values.dim() != 1:
        raise ValueError("topk_over_ranks: values and keys must be 1-D of the same length")
    n = values.shape[0]
    if n > k:
        raise ValueError(f"topk_over_ranks: a rank passed {n} candidates, more than k = {k}")
    pad_v = values.new_full((k,), float("-inf"))
    pad_k = torch.full((k,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=keys.device)
    pad_v[:n] = values
    pad_k[:n] = keys
    counts = gather_each(torch.tensor([n], dtype=torch.int64, device=keys.device), shards).reshape(-1)
    all_v = gather_each(pad_v, shards).reshape(-1)
    all_k = gather_each(pad_k, shards).reshape(-1)
    real = min(k, int(counts.sum()))
    by_key = torch.sort(all_k, stable=True).indices  # keys ascending, then values descending (stable)
    order = by_key[torch.sort(all_v[by_key], descending=True, stable=True).indices][:real]
    return all_v[order], all_k[order]


# ------------------------------------------------------------------------------------------- call fingerprints
_FINGERPRINT_WORDS = 16
_MAGIC = 7.0e15 + 1234.0  # marks a fingerprint row (exactly representable in float64)
FINGERPRINT_TIMEOUT = datetime.timedelta(seconds=60)


def _word(value) -> float:
    """One float64 word per argument: numbers as themselves, everything else by a CRC of its text."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if isinstance(value, torch.dtype):
        value = str(value)
    return float(zlib.crc32(repr(value).encode()))


def check_same_call(shards_or_group, op: str, *, timeout: Optional[datetime.timedelta] = None, **params) -> None:
    """Raise on every rank unless every rank called ``op`` with the same ``params`` (``k``, temperature, ``d``,
    dtype, ...). One all-gather of 16 float64 words; a rank that never joins (e.g. called without
    ``process_group``) makes the others raise after ``timeout`` instead of hanging."""
    group = shards_or_group.group if isinstance(shards_or_group, Shards) else shards_or_group
    names = sorted(params)
    words = [_MAGIC, _word(op)] + [_word(n) for n in names] + [_word(params[n]) for n in names]
    if len(words) > _FINGERPRINT_WORDS:  # fold the tail into one CRC
        tail = struct.pack(f"{len(words) - _FINGERPRINT_WORDS + 1}d", *words[_FINGERPRINT_WORDS - 1:])
        words = words[:_FINGERPRINT_WORDS - 1] + [float(zlib.crc32(tail))]
    words += [0.0] * (_FINGERPRINT_WORDS - len(words))
    device = _collective_device(group)
    mine = torch.tensor(words, dtype=torch.float64, device=device)
    world = dist.get_world_size(group)
    parts = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(parts, mine, group=group, async_op=True)
    try:
        work.wait(timeout or FINGERPRINT_TIMEOUT)
    except RuntimeError as exc:
        raise RuntimeError(
            f"flashdml.{op}: not every rank of the process group joined the call within "
            f"{(timeout or FINGERPRINT_TIMEOUT).total_seconds():.0f} s — every rank must call {op} with "
            "process_group= at the same point (one rank passing process_group while another does not hangs "
            f"otherwise): {exc}") from exc
    table = torch.stack(parts)
    if not bool((table == mine).all()):
        bad = [r for r in range(world) if not bool((table[r] == mine).all())]
        raise RuntimeError(
            f"flashdml.{op}: the ranks of the process group called it with different arguments "
            f"(this rank {dist.get_rank(group)} differs from rank(s) {bad} in one of {names} "
            "or the op itself); every rank must pass the same options, d and dtype")


def _collective_device(group) -> torch.device:
    """NCCL only moves CUDA tensors; every other backend here takes CPU tensors."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
