"""The losses with ``process_group=`` (docs/spec.md §5) on 2 and 3 gloo ranks with uneven shards (one empty):
value on every rank == the float64 reference on the concatenated batch, local gradients == W × the reference
gradient's slice, the same bits on a second run, DDP's parameter gradient == one process's, and mismatched calls
raise on every rank. One spawn per world size: every case runs inside it."""
import datetime
import io

import pytest
import torch

from distributed_ranks import run_ranks

D = 6
# world -> (x shard sizes, y shard sizes for cross mode)
LAYOUTS = {2: ([4, 3], [5, 0]), 3: ([3, 0, 5], [2, 4, 1])}
TCM = dict(pos_margin=0.5, neg_margin=0.0)
CON = dict(pos_margin=0.75, neg_margin=0.0)

# name -> (op, mode, kwargs); mode: self (labels), cross (y, ref_labels), pair (y, no labels), square (batch softmax)
CASES = {
    "xe_self": ("cross_example_softmax", "self", dict(temperature=0.1)),
    "xe_cross": ("cross_example_softmax", "cross", dict(temperature=0.1)),
    "xe_pair": ("cross_example_softmax", "pair", dict(temperature=0.2, normalize=False)),
    "xe_top_k": ("cross_example_softmax", "self", dict(temperature=0.1, top_k=7)),
    "xe_top_k_cross": ("cross_example_softmax", "cross", dict(temperature=0.1, top_k=5)),
    "xe_spread": ("cross_example_softmax", "spread", dict(temperature=0.1)),
    "ntxent_self": ("ntxent", "self", dict(temperature=0.07)),
    "ntxent_spread": ("ntxent", "spread", dict(temperature=0.07)),
    "xe_local": ("cross_example_softmax", "local", dict(temperature=0.1)),
    "ntxent_local": ("ntxent", "local", dict(temperature=0.07)),
    "ntxent_cross": ("ntxent", "cross", dict(temperature=0.07)),
    "bs": ("batch_softmax", "square", dict(temperature=0.1)),
    "bs_sym": ("batch_softmax", "square", dict(temperature=0.1, symmetric=True)),
    "bs_sym_labels": ("batch_softmax", "square_labels", dict(temperature=0.1, symmetric=True)),
    "tcm_self": ("threshold_consistent_margin", "self", TCM),
    "tcm_cross": ("threshold_consistent_margin", "cross", TCM),
    "con_self": ("contrastive_margin", "self", CON),
    "con_cross": ("contrastive_margin", "cross", CON),
}
# also run in fp32, on the compiled kernels (blocks of the gathered columns; "spread": a rank's own rows hold no
# positive pair, so its own block takes the streamed path of the backward; "local": every class lives on one
# rank, so the other ranks' block holds no positive pair and gets the zero column)
FP32_CASES = ("xe_self", "xe_cross", "xe_pair", "xe_spread", "xe_local", "ntxent_self", "ntxent_cross",
              "ntxent_spread", "ntxent_local",
              "tcm_self", "tcm_cross", "con_self", "con_cross")


def _data(world, mode, dtype=torch.float64):
    """The global batch: (x, y or None, labels or None, ref_labels or None) and the shard sizes of x and y."""
    sx, sy = LAYOUTS[world]
    g = torch.Generator().manual_seed(world)
    B = sum(sx)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (B,), generator=g)  # 3 classes spread over every rank
    if mode in ("cross", "pair"):
        M = sum(sy) if mode == "cross" else B
        y = torch.randn(M, D, generator=g, dtype=torch.float64)
        if mode == "pair":
            return x.to(dtype), y.to(dtype), None, None, sx, sx
        return x.to(dtype), y.to(dtype), labels, torch.randint(0, 3, (M,), generator=g), sx, sy
    if mode.startswith("square"):
        y = (x + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64))
        return x.to(dtype), y.to(dtype), (labels if mode == "square_labels" else None), None, sx, sx
    if mode == "spread":  # class i % ceil(B/2): every class has its two rows far apart, on different ranks
        labels = torch.arange(B) % ((B + 1) // 2)
    if mode == "local":  # two rows per class, every class on one rank
        labels = torch.cat([10 * r + torch.arange(n) // 2 for r, n in enumerate(sx)])
    return x.to(dtype), None, labels, None, sx, sx


def _cut(t, sizes, rank):
    off = sum(sizes[:rank])
    return None if t is None else t[off:off + sizes[rank]]


def _call(fn, op, mode, x, y, labels, ref_labels, kw, **extra):
    if op == "batch_softmax":
        return fn(x, y, labels, **kw, **extra)
    if op == "cross_example_softmax":
        return fn(x, y, labels, ref_labels, **kw, **extra)
    return fn(x, labels, y, ref_labels, **kw, **extra)


def _run_case(rank, world, name, dtype=torch.float64):
    import torch.distributed as dist

    import flashdml as fd

    op, mode, kw = CASES[name]
    x, y, labels, ref_labels, sx, sy = _data(world, mode, dtype)
    outs = []
    for _ in range(2):  # twice: the bits must not change
        xl = _cut(x, sx, rank).clone().requires_grad_()
        yl = None if y is None else _cut(y, sy, rank).clone().requires_grad_()
        loss = _call(getattr(fd, op), op, mode, xl, yl, _cut(labels, sx, rank),
                     _cut(ref_labels, sy, rank), kw, process_group=dist.group.WORLD)
        loss.backward()
        outs.append((loss.detach(), xl.grad, None if yl is None else yl.grad))
    same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]) if a is not None)
    return outs[0] + (same,)


def _reference(world, name, dtype=torch.float64):
    import flashdml as fd

    op, mode, kw = CASES[name]
    x, y, labels, ref_labels, _, _ = _data(world, mode)
    x = x.clone().requires_grad_()
    y = None if y is None else y.clone().requires_grad_()
    loss = _call(getattr(fd.reference, op), op, mode, x, y, labels, ref_labels, kw)
    loss.backward()
    return loss.detach(), x.grad, None if y is None else y.grad


def _ddp_case(rank, world):
    """A tiny nn.Linear in DistributedDataParallel: its averaged parameter gradient is the one-process one."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import flashdml as fd

    x, _, labels, _, sx, _ = _data(world, "self")
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(D, 4).double())
    loss = fd.cross_example_softmax(model(_cut(x, sx, rank)), labels=_cut(labels, sx, rank), temperature=0.1,
                                    process_group=dist.group.WORLD)
    loss.backward()
    return model.module.weight.grad.clone(), model.module.bias.grad.clone()


def _module_cases(rank, world):
    """The loss modules with ``process_group=`` give the functional ops' values (the same bits)."""
    import torch.distributed as dist

    import flashdml as fd

    x, _, labels, _, sx, _ = _data(world, "self", torch.float32)
    x, labels = _cut(x, sx, rank), _cut(labels, sx, rank)
    y = x.flip(0)
    pg = dist.group.WORLD
    pairs = [
        (fd.losses.NTXentLoss(0.1, process_group=pg)(x, labels), fd.ntxent(x, labels, temperature=0.1,
                                                                            process_group=pg)),
        (fd.losses.CrossExampleSoftmaxLoss(0.1, top_k=3, process_group=pg)(x, labels),
         fd.cross_example_softmax(x, labels=labels, temperature=0.1, top_k=3, process_group=pg)),
        (fd.losses.BatchSoftmaxLoss(0.1, symmetric=True, process_group=pg)(x, ref_emb=y),
         fd.batch_softmax(x, y, temperature=0.1, symmetric=True, process_group=pg)),
        (fd.losses.ThresholdConsistentMarginLoss(0.5, 0.0, process_group=pg)(x, labels),
         fd.threshold_consistent_margin(x, labels, pos_margin=0.5, neg_margin=0.0, process_group=pg)),
        (fd.losses.ContrastiveMarginLoss(0.75, 0.0, process_group=pg)(x, labels),
         fd.contrastive_margin(x, labels, pos_margin=0.75, neg_margin=0.0, process_group=pg)),
    ]
    return [bool(torch.equal(a, b)) and bool(a != 0) for a, b in pairs]


TEMPERATURE_CASES = (("xe_self", torch.float32), ("ntxent_spread", torch.float32), ("xe_top_k", torch.float64),
                     ("bs_sym_labels", torch.float64))


def _temperature_cases(rank, world):
    """A learnable temperature: each rank's gradient is W × its share; their mean is the reference's."""
    import torch.distributed as dist

    import flashdml as fd

    out = []
    for name, dtype in TEMPERATURE_CASES:
        op, mode, kw = CASES[name]
        x, y, labels, ref_labels, sx, sy = _data(world, mode, dtype)
        t = torch.tensor(kw["temperature"], requires_grad=True)
        kw = {**kw, "temperature": t}
        _call(getattr(fd, op), op, mode, _cut(x, sx, rank), _cut(y, sy, rank), _cut(labels, sx, rank),
              _cut(ref_labels, sy, rank), kw, process_group=dist.group.WORLD).backward()
        out.append(t.grad)
    return out


def _mismatch_cases(rank, world):
    """Every rank raises when one rank passes another temperature / top_k / d / dtype; the last case leaves
    rank 0 alone in the call (the others call without process_group): it raises instead of hanging."""
    import torch.distributed as dist

    import flashdml as fd
    from flashdml.distributed import _comm

    x = torch.randn(2, D)
    labels = torch.tensor([0, 1])
    last = rank == world - 1
    variants = {
        "temperature": lambda: fd.ntxent(x, labels, temperature=0.1 + 0.1 * last, process_group=dist.group.WORLD),
        "top_k": lambda: fd.cross_example_softmax(x, labels=labels, top_k=1 + last, process_group=dist.group.WORLD),
        "d": lambda: fd.contrastive_margin(torch.randn(2, D + last), labels, process_group=dist.group.WORLD),
        "dtype": lambda: fd.threshold_consistent_margin(x.double() if last else x, labels,
                                                        process_group=dist.group.WORLD),
    }
    out = {}
    for key, call in variants.items():
        try:
            call()
            out[key] = None
        except RuntimeError as exc:
            out[key] = str(exc)
    # bad arguments raise what they raise in one process, before any collective (an empty shard included)
    bad = {"labels": lambda **kw: fd.ntxent(x, labels[:1], **kw),
           "temperature": lambda **kw: fd.cross_example_softmax(x, labels=labels, temperature=-1.0, **kw),
           "top_k": lambda **kw: fd.cross_example_softmax(x, labels=labels, top_k=0, **kw),
           "margin": lambda **kw: fd.contrastive_margin(x, labels, pos_margin="a", **kw),
           "square": lambda **kw: fd.batch_softmax(x, x[:1], **kw),
           "empty dtype": lambda **kw: fd.threshold_consistent_margin(torch.zeros(0, D, dtype=torch.int64),
                                                                      labels[:0], **kw)}
    out["errors"] = {}
    for key, call in bad.items():
        msgs = []
        for kw in ({}, {"process_group": dist.group.WORLD}):
            try:
                call(**kw)
                msgs.append(None)
            except (TypeError, ValueError) as exc:
                msgs.append((type(exc).__name__, str(exc)))
        out["errors"][key] = msgs
    _comm.FINGERPRINT_TIMEOUT = datetime.timedelta(seconds=2)
    try:
        if rank == 0:
            fd.ntxent(x, labels, process_group=dist.group.WORLD)
        else:
            fd.ntxent(x, labels)
        out["alone"] = None
    except RuntimeError as exc:
        out["alone"] = str(exc)
    return out


def _all_cases(rank, world):
    res = {name: _run_case(rank, world, name) for name in CASES}
    res.update({name + "_fp32": _run_case(rank, world, name, torch.float32) for name in FP32_CASES})
    res["ddp"] = _ddp_case(rank, world)
    res["modules"] = _module_cases(rank, world)
    res["temperature"] = _temperature_cases(rank, world)
    res["mismatch"] = _mismatch_cases(rank, world)
    buf = io.BytesIO()  # plain bytes: tensors sent through the queue would be shared memory of an exited process
    torch.save(res, buf)
    return buf.getvalue()


def _check(world, results):
    sx_all = LAYOUTS[world]
    for name in list(CASES) + [n + "_fp32" for n in FP32_CASES]:
        case = name[:-5] if name.endswith("_fp32") else name
        tol = dict(rtol=1e-6, atol=1e-9) if case == name else dict(rtol=1e-5, atol=1e-6)
        op, mode, _ = CASES[case]
        ref_loss, ref_dx, ref_dy = _reference(world, case)
        sx = sx_all[0]
        sy = sx_all[1] if mode == "cross" else sx
        assert ref_loss.abs() > 1e-3, name  # a loss that could be wrong
        for rank, res in enumerate(results):
            loss, dx, dy, same = res[name]
            assert same, f"{name}: rank {rank} changed bits between two runs"
            assert torch.equal(loss, results[0][name][0]), f"{name}: the value differs between ranks"
            torch.testing.assert_close(loss.double(), ref_loss, **tol, msg=f"{name} rank {rank} value")
            gtol = dict(rtol=1e-5, atol=1e-8) if case == name else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dx.double(), world * _cut(ref_dx, sx, rank), **gtol,
                                       msg=f"{name} rank {rank} dx")
            if ref_dy is not None and dy is not None:
                torch.testing.assert_close(dy.double(), world * _cut(ref_dy, sy, rank), **gtol,
                                           msg=f"{name} rank {rank} dy")


def _check_ddp(world, results):
    import flashdml as fd

    x, _, labels, _, _, _ = _data(world, "self")
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 4).double()
    fd.reference.cross_example_softmax(model(x), labels=labels, temperature=0.1).backward()
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["ddp"][0], model.weight.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(res["ddp"][1], model.bias.grad, rtol=1e-6, atol=1e-9)


def _check_temperature(world, results):
    import flashdml as fd

    for i, (name, dtype) in enumerate(TEMPERATURE_CASES):
        op, mode, kw = CASES[name]
        x, y, labels, ref_labels, _, _ = _data(world, mode)
        t = torch.tensor(kw["temperature"], dtype=torch.float64, requires_grad=True)
        _call(getattr(fd.reference, op), op, mode, x, y, labels, ref_labels, {**kw, "temperature": t}).backward()
        mean = sum(res["temperature"][i].double() for res in results) / world
        tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        assert t.grad.abs() > 1e-3, name
        torch.testing.assert_close(mean, t.grad, **tol, msg=f"{name} dtemperature")


def _check_mismatch(results):
    for rank, res in enumerate(results):
        for key in ("temperature", "top_k", "d", "dtype"):
            assert res["mismatch"][key] is not None and "different arguments" in res["mismatch"][key], (rank, key)
    for rank, res in enumerate(results):
        for key, (alone, grouped) in res["mismatch"]["errors"].items():
            assert grouped is not None and alone is not None, (rank, key)
            # the empty shard is refused in one process ("empty") but checked for its dtype with process_group
            assert grouped == alone or key == "empty dtype", (rank, key, alone, grouped)
        assert res["mismatch"]["errors"]["empty dtype"][1][0] == "TypeError"
    assert "not every rank" in results[0]["mismatch"]["alone"]
    assert all(res["mismatch"]["alone"] is None for res in results[1:])


@pytest.mark.parametrize("world", [2, 3])
def test_losses_over_ranks_equal_the_one_process_loss(world):
    # spoils_group: the mismatch cases leave rank 0 alone in a collective
    results = [torch.load(io.BytesIO(r)) for r in run_ranks("test_distributed_losses:_all_cases", world,
                                                            timeout=150, spoils_group=True)]
    _check(world, results)
    _check_ddp(world, results)
    assert all(all(res["modules"]) for res in results), [res["modules"] for res in results]
    _check_temperature(world, results)
    _check_mismatch(results)

