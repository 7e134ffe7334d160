"""``metrics.evaluate`` with ``process_group=`` (docs/spec.md §5).

The embeddings and labels are all-gathered once (no gradient: metrics are values), then each rank runs the
fused metrics pass on its own query rows only against the whole gallery (the pass takes any subset of query
rows; in self mode the query's own column is still the one excluded). The ranks' pass states are merged into
exactly the one-process state — the kept top-k lists and values all-gathered and put back in the one-process row
order, the pair and per-class OPIS histograms summed (int64 counts: exact, any order) — and every rank runs the
host bookkeeping on it, so the metrics are the one-process values, identical on every rank. That bookkeeping
(the float64 re-ranking of the kept lists, PR-AUC and OPIS from the histograms) runs on every rank: O(N·k) per
rank, small next to the pass. The "reference" backend gathers and runs the reference on every rank.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _dispatch
from .. import metrics as _metrics
from .. import reference as _reference
from . import _comm
from ._local import prepare_shard


@dataclasses.dataclass
class _Ranks:
    own: Tensor
    shards: _comm.Shards

    def _gather(self, t: Tensor) -> Tensor:
        dev = _comm._collective_device(self.shards.group)
        lay = _comm.shard_layout(t.shape[0], dev, self.shards.group)
        return _comm.all_gather_rows(t.to(dev), lay).cpu()

    def _sum(self, t: Tensor) -> Tensor:
        dev = _comm._collective_device(self.shards.group)
        t = t.to(dev).contiguous()
        dist.all_reduce(t, group=self.shards.group)  # int64 counts: exact whatever the order
        return t.cpu()

    def combine(self, st: dict, labels) -> dict:
        """Merge the ranks' states; ``labels`` (global, host) when the one-process order is by class."""
        rows, keep = self._gather(st["rows"]), self._gather(st["keep"])
        idx, val = self._gather(st["idx"]), self._gather(st["val"])
        n = rows.numel()
        target = torch.argsort(labels, stable=True) if labels is not None else torch.arange(n)
        pos = torch.empty(n, dtype=torch.int64)
        pos[target] = torch.arange(n)
        perm = torch.argsort(pos[rows])
        start = torch.cumsum(keep, 0) - keep
        new_keep = keep[perm]
        new_start = torch.cumsum(new_keep, 0) - new_keep
        src = torch.repeat_interleave(start[perm] - new_start, new_keep) + torch.arange(idx.numel())
        out = dict(st, rows=rows[perm], keep=new_keep, idx=idx[src], val=val[src])
        if st["pairs"] is not None:
            out["pairs"] = self._sum(st["pairs"])
        if "hist_pos" in st:
            out.update(hist_pos=self._sum(st["hist_pos"]), hist_neg=self._sum(st["hist_neg"]),
                       neg_upper=out["pairs"][1])
        return out


def evaluate(x, labels, metrics, ks, y, ref_labels, progress, group, opts) -> dict:
    batch, x, y, labels, ref_labels = prepare_shard(x, y, labels, ref_labels, labels_required=True)
    for name, t in (("x", x), ("y", y)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    xs = _comm.shard_layout(x.shape[0], x.device, group)
    ys = xs if y is None else _comm.shard_layout(y.shape[0], x.device, group)
    _comm.check_same_call(xs, "evaluate", metrics=metrics, ks=ks, d=x.shape[1], dtype=x.dtype,
                          self_mode=y is None, options=sorted(opts.items()))
    X, L = _comm.all_gather_rows(x.detach(), xs), _comm.all_gather_rows(labels, xs)
    Y = None if y is None else _comm.all_gather_rows(y.detach(), ys)
    RL = None if y is None else _comm.all_gather_rows(ref_labels, ys)
    name = _dispatch.resolve("evaluate", x.device)
    if name == "reference":
        return _reference.evaluate(X, L, metrics=metrics, ks=ks, y=Y, ref_labels=RL, **opts)
    own = torch.arange(xs.offset, xs.offset + x.shape[0])
    return _metrics._fused_evaluate(X, L, metrics, ks, Y, RL, progress, opts, backend=name,
                                    ranks=_Ranks(own, xs))
