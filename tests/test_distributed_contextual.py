"""contextual_loss(process_group=) on 2 and 3 gloo ranks (uneven shards, one empty): the value is the one-process
loss of the concatenated batch on every rank (1e-6 relative; float64: the reference), the local rows receive
W × its gradient (1e-5), a second call gives the same bits, the dense work of a rank is its own rows × the global
columns (never the one-process op on the whole batch, never a B × B tensor), and bad calls raise on every rank."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashdml as fd
from distributed_ranks import run_ranks

LAYOUTS = {2: [5, 9], 3: [6, 0, 8]}  # rows per rank: uneven, and an empty shard at W = 3
D = 8


def _case_data(world):
    """name -> (X float64 [B, D], labels, dtype, options). Ties: exact duplicate rows across (and within) ranks;
    the "margins" case has hard positives and hard negatives in L_con and non-default weights."""
    B = sum(LAYOUTS[world])
    g = torch.Generator().manual_seed(10 + world)
    X = torch.randn(B, D, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 4, (B,), generator=g)
    T = X.clone()
    T[1::3] = T[0:B - 1:3][: T[1::3].shape[0]]  # every third row repeats its predecessor: exact ties in S
    T[B - 1] = T[0]  # and one duplicate between the first and the last rank
    # unit rows for normalize=False: four entries ±0.5, so S (and ‖F_i‖ = 1) is exact in any summation order; with
    # rounded unit rows S_ii = 1 ± 1 ulp, and the clamp C_ii = [S_ii < 1] (which carries gradient when the rows are
    # not normalised) would depend on the GEMM's blocking in either computation
    U = torch.zeros(B, D, dtype=torch.float64)
    for i in range(B):
        U[i, torch.randperm(D, generator=g)[:4]] = 0.5 * (2 * torch.randint(0, 2, (4,), generator=g) - 1).double()
    margins = dict(k=3, eps=0.1, context_weight=0.7, contrastive_weight=0.9, reg_weight=0.3, reg_target=0.1,
                   pos_margin=0.8, neg_margin=0.1, ste_slope=5.0)
    return {
        "fp32": (X, lab, torch.float32, dict(k=4)),
        "fp64": (X, lab, torch.float64, dict(k=4)),
        "ties32": (T, lab, torch.float32, dict(k=3)),
        "ties64": (T, lab, torch.float64, dict(k=3)),
        "unnorm32": (U, lab, torch.float32, dict(margins, normalize=False)),
        "unnorm64": (U, lab, torch.float64, dict(margins, normalize=False)),
        "margins32": (X, lab, torch.float32, margins),
        "half": (X, lab, torch.float16, dict(k=4)),  # computed in fp32, the gradient returned in fp16
    }


def _shard(t, world, rank):
    sizes = LAYOUTS[world]
    off = sum(sizes[:rank])
    return t[off:off + sizes[rank]]


class _Work(TorchDispatchMode):
    """Records every dispatched op with the shapes of its tensor inputs and outputs (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = list(args) + (list(out) if isinstance(out, (tuple, list)) else [out])
        self.calls.append((str(func), [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]))
        return out


# ------------------------------------------------------------------------------------------------ rank side
def _contextual_cases(rank, world):
    import torch.distributed as dist

    pg = dist.group.WORLD
    out = {}
    for name, (X, lab, dtype, opts) in _case_data(world).items():
        x = _shard(X, world, rank).to(dtype).clone().requires_grad_()
        loss = fd.contextual_loss(x, _shard(lab, world, rank), process_group=pg, **opts)
        loss.backward()
        out[name] = (loss.detach(), x.grad)
    # the same call again, under the op recorder: the same bits, and the work it dispatches
    X, lab, dtype, opts = _case_data(world)["fp32"]
    x = _shard(X, world, rank).to(dtype).clone().requires_grad_()
    with _Work() as work:
        loss = fd.contextual_loss(x, _shard(lab, world, rank), process_group=pg, **opts)
        loss.backward()
    out["again"] = (loss.detach(), x.grad)
    out["work"] = work.calls
    # the loss module takes the same keyword and gives the same bits
    module = fd.losses.ContextualLoss(**opts, process_group=pg)
    out["module"] = module(x.detach(), _shard(lab, world, rank)).detach()
    # errors, on every rank alike: k above the global batch, a collapsed batch, a mismatched k
    errors = {}
    xl, ll = _shard(X, world, rank).float(), _shard(lab, world, rank)
    calls = {"k_large": lambda: fd.contextual_loss(xl, ll, k=sum(LAYOUTS[world]) + 1, process_group=pg),
             "collapsed": lambda: fd.contextual_loss(torch.ones_like(xl), ll, k=2, process_group=pg),
             "mismatch": lambda: fd.contextual_loss(xl, ll, k=3 + (rank == world - 1), process_group=pg)}
    for key, call in calls.items():
        try:
            call()
            errors[key] = None
        except (ValueError, RuntimeError) as exc:
            errors[key] = f"{type(exc).__name__}: {exc}"
    out["errors"] = errors
    # a NaN on the last rank: NaN on every rank (with NaN gradients), as one process
    x = _shard(X, world, rank).float().clone()
    if rank == world - 1:
        x[0, 0] = float("nan")
    x.requires_grad_()
    loss = fd.contextual_loss(x, _shard(lab, world, rank), process_group=pg)
    loss.backward()
    out["nan"] = (loss.detach(), x.grad)
    return out


# ------------------------------------------------------------------------------------------------ test side
def _one_process(X, lab, dtype, opts):
    x = X.to(dtype).clone().requires_grad_()
    loss = fd.contextual_loss(x, lab, **opts)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("world", [2, 3])
def test_contextual_equals_one_process_with_local_work(world):
    res = run_ranks("test_distributed_contextual:_contextual_cases", world)
    sizes = LAYOUTS[world]
    B = sum(sizes)
    for name, (X, lab, dtype, opts) in _case_data(world).items():
        one, grad = _one_process(X, lab, dtype, opts)  # float64: the reference
        for rank, r in enumerate(res):
            loss, g = r[name]
            assert loss.dtype == one.dtype and torch.equal(loss, res[0][name][0]), name  # identical on every rank
            torch.testing.assert_close(loss, one, rtol=1e-6, atol=0, msg=name)
            assert g.dtype == dtype and g.shape == (sizes[rank], D)
            tol = dict(rtol=2e-3, atol=1e-5) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g, world * _shard(grad, world, rank), **tol, msg=name)
    for r in res:  # run to run: the same bits; the module is the function
        assert all(torch.equal(a, b) for a, b in zip(r["again"], r["fp32"]))
        assert torch.equal(r["module"], r["fp32"][0])
    # the dense work: S rows computed (mm outputs with B columns) = this rank's rows, once forward and once
    # backward; no one-process contextual kernel on the whole batch; no B × B tensor anywhere
    for rank, r in enumerate(res):
        names = [c[0] for c in r["work"]]
        assert not any("contextual_fwd" in n or "contextual_bwd" in n for n in names), names
        s_rows = sum(shapes[-1][0] for n, shapes in r["work"] if n.startswith("aten.mm") and shapes[-1][1:] == (B,))
        assert s_rows == 2 * sizes[rank], (s_rows, sizes[rank])
        assert not any(s == (B, B) for _, shapes in r["work"] for s in shapes)
        assert any("contextual_stage_loss" in n for n in names) and any("contextual_stage_grad" in n for n in names)
    for r in res:
        e = r["errors"]
        assert e["k_large"] == f"ValueError: k = {B + 1} is larger than the batch size B = {B} (the contextual " \
                               "loss needs 2 <= k <= B)"
        assert e["collapsed"] is not None and e["collapsed"].startswith("ValueError: contextual_loss: collapsed batch")
        assert e["mismatch"] is not None and "different arguments" in e["mismatch"]
        loss, g = r["nan"]
        assert torch.isnan(loss) and (g.numel() == 0 or torch.isnan(g).all())
