"""flashdml.distributed._comm on 3 gloo ranks with uneven shards (one empty): the row gather and its gradient,
the ordered reductions, and the call fingerprint."""
import datetime

import torch

from distributed_ranks import run_ranks

SIZES = [3, 0, 2]


def _comm_cases(rank, world):
    import torch.distributed as dist

    from flashdml.distributed import _comm as c

    torch.manual_seed(0)
    full = torch.randn(sum(SIZES), 4, dtype=torch.float64)
    off = sum(SIZES[:rank])
    x = full[off:off + SIZES[rank]].clone().requires_grad_()
    shards = c.shard_layout(x.shape[0], x.device, dist.group.WORLD)
    out = {"sizes": shards.sizes, "offset": shards.offset}
    gathered = c.gather_rows(x, shards)
    out["gathered"] = gathered.detach()
    # rank r weights the global rows by (r + 1): each row's gradient is the sum over ranks, (1 + 2 + 3) · w
    w = torch.arange(full.numel(), dtype=torch.float64).view_as(full)
    (gathered * w * (rank + 1)).sum().backward()
    out["grad"] = x.grad
    out["lse"] = c.logsumexp_over_ranks(torch.tensor([float(rank), float("-inf")]), shards)
    out["sum"] = c.sum_over_ranks(torch.tensor([0.1 * (rank + 1)], dtype=torch.float64), shards)
    # top-k merge: ties across ranks (value 0.5 on ranks 0 and 2) go to the lower key; rank 1 passes nothing
    cand = {0: ([0.5, 0.25], [7, 2]), 1: ([], []), 2: ([0.75, 0.5, 0.5], [40, 3, 9])}[rank]
    out["topk"] = c.topk_over_ranks(torch.tensor(cand[0]), torch.tensor(cand[1], dtype=torch.int64), 4, shards)
    out["topk_all"] = c.topk_over_ranks(torch.tensor(cand[0]), torch.tensor(cand[1], dtype=torch.int64), 9, shards)
    c.check_same_call(shards, "op", k=3, temperature=0.1, dtype=torch.float32)
    try:
        c.check_same_call(shards, "op", k=3 + (rank == 2), temperature=0.1)
        out["mismatch"] = None
    except RuntimeError as exc:
        out["mismatch"] = str(exc)
    if rank == 0:  # the other ranks never join: rank 0 must raise, not hang
        try:
            c.check_same_call(shards, "op", timeout=datetime.timedelta(seconds=2))
            out["alone"] = None
        except RuntimeError as exc:
            out["alone"] = str(exc)
    return out


def test_gather_reductions_and_fingerprints_on_three_uneven_ranks():
    res = run_ranks("test_distributed_comm:_comm_cases", 3, spoils_group=True)  # rank 0 alone in a collective
    torch.manual_seed(0)
    full = torch.randn(sum(SIZES), 4, dtype=torch.float64)
    w = torch.arange(full.numel(), dtype=torch.float64).view_as(full) * 6
    offs = [0, 3, 3]
    for rank, out in enumerate(res):
        assert out["sizes"] == tuple(SIZES) and out["offset"] == offs[rank]
        assert torch.equal(out["gathered"], full)
        assert torch.equal(out["grad"], w[offs[rank]:offs[rank] + SIZES[rank]])
        assert torch.allclose(out["lse"][0], torch.logsumexp(torch.arange(3.0), 0)) and out["lse"][1] == -float("inf")
        assert torch.equal(out["sum"], res[0]["sum"])  # identical bits on every rank
        assert "different arguments" in out["mismatch"]
        assert out["topk"][0].tolist() == [0.75, 0.5, 0.5, 0.5] and out["topk"][1].tolist() == [40, 3, 7, 9]
        assert out["topk_all"][1].tolist() == [40, 3, 7, 9, 2]  # fewer candidates than k: all of them
    assert "not every rank" in res[0]["alone"]
