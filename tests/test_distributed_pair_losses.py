"""SupCon, Multi-Similarity, Circle and Triplet-Margin with ``process_group=`` (docs/spec.md §5) on 2 and 3 gloo
ranks, uneven shards with an empty one: the value on every rank == the float64 reference on the concatenated
batch, local gradients == W × the reference gradient's slice, the same bits on a second run; a learnable
temperature; DDP's parameter gradient == one process's; the loss modules and the pml drop-ins with
``process_group``; the drop-ins inside pml's DistributedLossWrapper (both modes) == pml's originals there; and
mismatched calls raise on every rank. One spawn per world size: every case runs inside it."""
import io

import pytest
import torch

from distributed_ranks import run_ranks

D = 6
LAYOUTS = {2: ([4, 3], [5, 0]), 3: ([3, 0, 5], [2, 4, 1])}  # world -> (x shard sizes, y shard sizes)

# name -> (op, mode, kwargs); mode: self (labels), cross (y, ref_labels), pair (y, no labels),
# local (self, every class on one rank: the other ranks' block holds no positive)
CASES = {
    "supcon_self": ("supcon", "self", dict(temperature=0.1)),
    "supcon_cross": ("supcon", "cross", dict(temperature=0.2)),
    "supcon_pair": ("supcon", "pair", dict(temperature=0.1)),
    "supcon_local": ("supcon", "local", dict(temperature=0.1)),
    "ms_self": ("multi_similarity", "self", dict(alpha=2.0, beta=10.0, base=0.3)),
    "ms_cross": ("multi_similarity", "cross", dict(alpha=2.0, beta=50.0, base=0.5)),
    "ms_local": ("multi_similarity", "local", dict(alpha=3.0, beta=20.0, base=0.2)),
    "circle_self": ("circle", "self", dict(m=0.4, gamma=8.0)),
    "circle_cross": ("circle", "cross", dict(m=0.25, gamma=16.0)),
    "circle_pair": ("circle", "pair", dict(m=0.4, gamma=8.0)),
    "triplet_self": ("triplet_margin", "self", dict(margin=0.3)),
    "triplet_cross": ("triplet_margin", "cross", dict(margin=0.2)),
    "triplet_pair": ("triplet_margin", "pair", dict(margin=0.5)),
    "triplet_local": ("triplet_margin", "local", dict(margin=0.3)),
}
DTYPES = (torch.float64, torch.float32)  # float64: the streamed PyTorch path; fp32: the compiled kernels


def _data(world, mode, dtype=torch.float64):
    """The global batch: (x, y or None, labels or None, ref_labels or None) and the shard sizes of x and y."""
    sx, sy = LAYOUTS[world]
    g = torch.Generator().manual_seed(world)
    B = sum(sx)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (B,), generator=g)
    if mode in ("cross", "pair"):
        M = sum(sy) if mode == "cross" else B
        y = torch.randn(M, D, generator=g, dtype=torch.float64)
        if mode == "pair":
            return x.to(dtype), y.to(dtype), None, None, sx, sx
        return x.to(dtype), y.to(dtype), labels, torch.randint(0, 3, (M,), generator=g), sx, sy
    if mode == "local":
        labels = torch.cat([10 * r + torch.arange(n) // 2 for r, n in enumerate(sx)])
    return x.to(dtype), None, labels, None, sx, sx


def _cut(t, sizes, rank):
    off = sum(sizes[:rank])
    return None if t is None else t[off:off + sizes[rank]]


def _run_case(rank, world, name, dtype):
    import torch.distributed as dist

    import flashdml as fd

    op, mode, kw = CASES[name]
    x, y, labels, ref_labels, sx, sy = _data(world, mode, dtype)
    outs = []
    for _ in range(2):  # twice: the bits must not change
        xl = _cut(x, sx, rank).clone().requires_grad_()
        yl = None if y is None else _cut(y, sy, rank).clone().requires_grad_()
        loss = getattr(fd, op)(xl, _cut(labels, sx, rank), yl, _cut(ref_labels, sy, rank), **kw,
                               process_group=dist.group.WORLD)
        loss.backward()
        outs.append((loss.detach(), xl.grad, None if yl is None else yl.grad))
    same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]) if a is not None)
    return outs[0] + (same,)


def _reference(world, name):
    import flashdml as fd

    op, mode, kw = CASES[name]
    x, y, labels, ref_labels, _, _ = _data(world, mode)
    x = x.clone().requires_grad_()
    y = None if y is None else y.clone().requires_grad_()
    loss = getattr(fd.reference, op)(x, labels, y, ref_labels, **kw)
    loss.backward()
    return loss.detach(), x.grad, None if y is None else y.grad


def _temperature_cases(rank, world):
    """SupCon with a learnable temperature: each rank's gradient is W × its share."""
    import torch.distributed as dist

    import flashdml as fd

    out = []
    for dtype in DTYPES:
        x, _, labels, _, sx, _ = _data(world, "self", dtype)
        t = torch.tensor(0.1, requires_grad=True)
        fd.supcon(_cut(x, sx, rank), _cut(labels, sx, rank), temperature=t, process_group=dist.group.WORLD).backward()
        out.append(t.grad)
    return out


def _ddp_case(rank, world):
    """A tiny nn.Linear in DistributedDataParallel: its averaged parameter gradient is the one-process one."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import flashdml as fd

    x, _, labels, _, sx, _ = _data(world, "self")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(D, 4).double())
    emb = model(_cut(x, sx, rank))
    lab = _cut(labels, sx, rank)
    pg = dist.group.WORLD
    loss = fd.multi_similarity(emb, lab, beta=10.0, process_group=pg) + fd.supcon(emb, lab, process_group=pg)
    loss.backward()
    return model.module.weight.grad.clone(), model.module.bias.grad.clone()


def _module_cases(rank, world):
    """The loss modules and the pml drop-ins with ``process_group=`` give the functional ops' values."""
    import torch.distributed as dist

    import flashdml as fd
    from flashdml.integrations import pml as fdp

    x, _, labels, _, sx, _ = _data(world, "self", torch.float32)
    x, labels = _cut(x, sx, rank), _cut(labels, sx, rank)
    pg = dist.group.WORLD
    wanted = [fd.supcon(x, labels, temperature=0.2, process_group=pg),
              fd.multi_similarity(x, labels, alpha=2.0, beta=10.0, base=0.3, process_group=pg),
              fd.circle(x, labels, m=0.3, gamma=8.0, process_group=pg),
              fd.triplet_margin(x, labels, margin=0.3, process_group=pg)]
    modules = [fd.losses.SupConLoss(0.2, process_group=pg)(x, labels),
               fd.losses.MultiSimilarityLoss(2.0, 10.0, 0.3, process_group=pg)(x, labels),
               fd.losses.CircleLoss(0.3, 8.0, process_group=pg)(x, labels),
               fd.losses.TripletMarginLoss(0.3, process_group=pg)(x, labels)]
    drop_ins = [fdp.SupConLoss(temperature=0.2, process_group=pg)(x, labels),
                fdp.MultiSimilarityLoss(2.0, 10.0, 0.3, process_group=pg)(x, labels),
                fdp.CircleLoss(m=0.3, gamma=8.0, process_group=pg)(x, labels),
                fdp.TripletMarginLoss(margin=0.3, process_group=pg)(x, labels)]
    return [bool(torch.equal(a, b)) and bool(torch.equal(a, c)) and bool(a != 0)
            for a, b, c in zip(wanted, modules, drop_ins)]


def _mismatch_cases(rank, world):
    """Every rank raises when one rank passes another temperature / alpha / m / margin / d; bad arguments raise
    the one-process error, before any collective (an empty shard included)."""
    import torch.distributed as dist

    import flashdml as fd

    x = torch.randn(2, D)
    labels = torch.tensor([0, 1])
    last = rank == world - 1
    pg = dist.group.WORLD
    variants = {
        "temperature": lambda: fd.supcon(x, labels, temperature=0.1 + 0.1 * last, process_group=pg),
        "alpha": lambda: fd.multi_similarity(x, labels, alpha=2.0 + last, process_group=pg),
        "m": lambda: fd.circle(x, labels, m=0.4 - 0.1 * last, process_group=pg),
        "margin": lambda: fd.triplet_margin(x, labels, margin=0.05 + 0.1 * last, process_group=pg),
        "d": lambda: fd.triplet_margin(torch.randn(2, D + last), labels, process_group=pg),
    }
    out = {}
    for key, call in variants.items():
        try:
            call()
            out[key] = None
        except RuntimeError as exc:
            out[key] = str(exc)
    bad = {"temperature": lambda **kw: fd.supcon(x, labels, temperature=-1.0, **kw),
           "beta": lambda **kw: fd.multi_similarity(x, labels, beta=0.0, **kw),
           "gamma": lambda **kw: fd.circle(x, labels, gamma="a", **kw),
           "labels": lambda **kw: fd.triplet_margin(x, labels[:1], **kw),
           "ref_labels": lambda **kw: fd.circle(x, labels, x, **kw)}
    out["errors"] = {}
    for key, call in bad.items():
        msgs = []
        for kw in ({}, {"process_group": pg}):
            try:
                call(**kw)
                msgs.append(None)
            except (TypeError, ValueError) as exc:
                msgs.append((type(exc).__name__, str(exc)))
        out["errors"][key] = msgs
    return out


def _zero_cases(rank, world):
    """Every row its own class (no positive pair in the global batch): 0 and a zero gradient on every rank,
    the float64 and the fp32 path, as in one process."""
    import torch.distributed as dist

    import flashdml as fd

    out = []
    for dtype in DTYPES:
        x, _, _, _, sx, _ = _data(world, "self", dtype)
        lab = torch.arange(sum(sx))
        for op in (fd.supcon, fd.circle, fd.triplet_margin):
            xl = _cut(x, sx, rank).clone().requires_grad_()
            loss = op(xl, _cut(lab, sx, rank), process_group=dist.group.WORLD)
            loss.backward()
            out.append((float(loss), float(xl.grad.abs().sum()), float(op(x, lab))))
    return out


def _nan_cases(rank, world):
    """A NaN in the last rank's shard: the loss is NaN on every rank, with NaN gradients (the library's rule)."""
    import torch.distributed as dist

    import flashdml as fd

    out = []
    for dtype in DTYPES:
        x, _, labels, _, sx, _ = _data(world, "self", dtype)
        x[-1, 0] = float("nan")
        for op in (fd.supcon, fd.multi_similarity, fd.circle, fd.triplet_margin):
            xl = _cut(x, sx, rank).clone().requires_grad_()
            loss = op(xl, _cut(labels, sx, rank), process_group=dist.group.WORLD)
            loss.backward()
            out.append(bool(loss.isnan()) and bool(xl.grad.isnan().all()))
    return out


WRAPPER_ROWS = 5  # per rank: pml's wrapper all-gathers equal shapes


def _wrapper_cases(rank, world):
    """The four drop-ins and pml's originals inside pml's DistributedLossWrapper (both modes)."""
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from flashdml.integrations import pml as fdp

    g = torch.Generator().manual_seed(20 + world)
    X = torch.randn(WRAPPER_ROWS * world, 8, generator=g)
    labels = torch.randint(0, 3, (WRAPPER_ROWS * world,), generator=g)
    xl = X[rank * WRAPPER_ROWS:(rank + 1) * WRAPPER_ROWS]
    ll = labels[rank * WRAPPER_ROWS:(rank + 1) * WRAPPER_ROWS]
    makers = {"supcon": (lambda: fdp.SupConLoss(temperature=0.2), lambda: pml.SupConLoss(temperature=0.2)),
              "ms": (lambda: fdp.MultiSimilarityLoss(2.0, 10.0, 0.3), lambda: pml.MultiSimilarityLoss(2.0, 10.0, 0.3)),
              "circle": (lambda: fdp.CircleLoss(m=0.3, gamma=8.0), lambda: pml.CircleLoss(m=0.3, gamma=8.0)),
              "triplet": (lambda: fdp.TripletMarginLoss(margin=0.3), lambda: pml.TripletMarginLoss(margin=0.3))}
    out = {}
    for name, pair in makers.items():
        for efficient in (False, True):
            for which, make in zip(("flashdml", "pml"), pair):
                x = xl.clone().requires_grad_()
                try:
                    loss = DistributedLossWrapper(make(), efficient=efficient)(x, ll)
                    loss.backward()
                    out[name, efficient, which] = (loss.detach(), x.grad)
                except Exception as exc:  # noqa: BLE001 - compared with the original's behaviour
                    out[name, efficient, which] = f"{type(exc).__name__}: {exc}"
    return out


def _all_cases(rank, world):
    res = {(name, dtype): _run_case(rank, world, name, dtype) for name in CASES for dtype in DTYPES}
    res["temperature"] = _temperature_cases(rank, world)
    res["ddp"] = _ddp_case(rank, world)
    res["modules"] = _module_cases(rank, world)
    res["mismatch"] = _mismatch_cases(rank, world)
    res["wrapper"] = _wrapper_cases(rank, world)
    res["zero"] = _zero_cases(rank, world)
    res["nan"] = _nan_cases(rank, world)
    buf = io.BytesIO()  # plain bytes: tensors sent through the queue would be shared memory of an exited process
    torch.save(res, buf)
    return buf.getvalue()


def _check_cases(world, results):
    sx_all, sy_all = LAYOUTS[world]
    for name in CASES:
        op, mode, _ = CASES[name]
        ref_loss, ref_dx, ref_dy = _reference(world, name)
        sy = sy_all if mode == "cross" else sx_all
        assert ref_loss.abs() > 1e-3, name  # a loss that could be wrong
        for dtype in DTYPES:
            tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
            gtol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
            for rank, res in enumerate(results):
                loss, dx, dy, same = res[name, dtype]
                what = f"{name} {dtype} rank {rank}"
                assert same, f"{what}: changed bits between two runs"
                assert loss.dtype == dtype, what
                assert torch.equal(loss, results[0][name, dtype][0]), f"{what}: the value differs between ranks"
                torch.testing.assert_close(loss.double(), ref_loss, **tol, msg=f"{what} value")
                torch.testing.assert_close(dx.double(), world * _cut(ref_dx, sx_all, rank), **gtol,
                                           msg=f"{what} dx")
                if ref_dy is not None:
                    torch.testing.assert_close(dy.double(), world * _cut(ref_dy, sy, rank), **gtol,
                                               msg=f"{what} dy")


def _check_temperature(world, results):
    import flashdml as fd

    x, _, labels, _, _, _ = _data(world, "self")
    t = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    fd.reference.supcon(x, labels, temperature=t).backward()
    assert t.grad.abs() > 1e-3
    for i, dtype in enumerate(DTYPES):
        mean = sum(res["temperature"][i].double() for res in results) / world
        tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mean, t.grad, **tol, msg=f"dtemperature {dtype}")


def _check_ddp(world, results):
    import flashdml as fd

    x, _, labels, _, _, _ = _data(world, "self")
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    emb = model(x)
    (fd.reference.multi_similarity(emb, labels, beta=10.0) + fd.reference.supcon(emb, labels)).backward()
    for res in results:
        torch.testing.assert_close(res["ddp"][0], model.weight.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(res["ddp"][1], model.bias.grad, rtol=1e-6, atol=1e-9)


def _check_mismatch(results):
    for rank, res in enumerate(results):
        for key in ("temperature", "alpha", "m", "margin", "d"):
            msg = res["mismatch"][key]
            assert msg is not None and "different arguments" in msg, (rank, key, msg)
        for key, (alone, grouped) in res["mismatch"]["errors"].items():
            assert alone is not None and grouped == alone, (rank, key, alone, grouped)


def _check_wrapper(results):
    for rank, res in enumerate(results):
        for name in ("supcon", "ms", "circle", "triplet"):
            for efficient in (False, True):
                ours, theirs = res["wrapper"][name, efficient, "flashdml"], res["wrapper"][name, efficient, "pml"]
                assert not isinstance(ours, str), (name, efficient, ours)
                assert not isinstance(theirs, str), (name, efficient, theirs)
                assert theirs[0] != 0, (name, efficient)
                torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6, msg=f"{name} {efficient}")
                torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-6, msg=f"{name} {efficient}")


@pytest.mark.parametrize("world", [2, 3])
def test_pair_losses_over_ranks_equal_the_one_process_loss(world):
    results = [torch.load(io.BytesIO(r)) for r in run_ranks("test_distributed_pair_losses:_all_cases", world,
                                                            timeout=150)]
    _check_cases(world, results)
    _check_temperature(world, results)
    _check_ddp(world, results)
    assert all(all(res["modules"]) for res in results), [res["modules"] for res in results]
    _check_mismatch(results)
    _check_wrapper(results)
    assert all(v == (0.0, 0.0, 0.0) for res in results for v in res["zero"]), [res["zero"] for res in results]
    assert all(all(res["nan"]) for res in results), [res["nan"] for res in results]
