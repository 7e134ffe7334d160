"""The pml drop-ins inside pml's own DistributedLossWrapper (efficient=False and True) on 2 and 3 gloo ranks:
the same loss and the same gradient of the local embeddings as pml's originals in the same wrapper."""
import pytest
import torch

from distributed_ranks import run_ranks

ROWS = 5  # per rank: pml's wrapper all-gathers equal shapes


def _data(world):
    g = torch.Generator().manual_seed(10 + world)
    X = torch.randn(ROWS * world, 8, generator=g)
    labels = torch.randint(0, 3, (ROWS * world,), generator=g)
    return X, labels


def _pairs():
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning.distances import CosineSimilarity

    from flashdml.integrations import pml as fdp

    return {
        "ntxent": (lambda: fdp.NTXentLoss(temperature=0.1), lambda: pml.NTXentLoss(temperature=0.1)),
        "contrastive": (lambda: fdp.ContrastiveLoss(0.75, 0.6, distance=CosineSimilarity()),
                        lambda: pml.ContrastiveLoss(0.75, 0.6, distance=CosineSimilarity())),
        "tcm": (lambda: fdp.ThresholdConsistentMarginLoss(), lambda: pml.ThresholdConsistentMarginLoss()),
    }


def _xent_excluding_self_copy(x, labels, ref, ref_labels, temperature):
    """Cross-Example Softmax (one partition over the batch's negatives) over x × ref minus the pairs (i, i):
    pml's efficient wrapper puts the local rows first in ref. float64, dense."""
    z = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(ref, dim=1).T / temperature
    same = labels[:, None] == ref_labels[None, :]
    own = torch.zeros_like(same)
    own[torch.arange(x.shape[0]), torch.arange(x.shape[0])] = True
    lse = torch.logsumexp(z[~same], 0)
    return torch.nn.functional.softplus(lse - z[same & ~own]).mean()


def _reference_cases(rank, world, xl, ll):
    """float64 references of what the wrapper's two modes compute on this rank, gradients included."""
    from flashdml import reference as ref

    X, labels = _data(world)
    others = [r for r in range(world) if r != rank]
    out = {}
    for efficient in (False, True):
        for name in ("tcm", "xent"):
            x = xl.double().clone().requires_grad_()
            allx = torch.cat([x] + [X[r * ROWS:(r + 1) * ROWS].double() for r in others])
            alll = torch.cat([ll] + [labels[r * ROWS:(r + 1) * ROWS] for r in others])
            if name == "tcm":
                loss = ref.threshold_consistent_margin(x, ll, allx, alll) if efficient else \
                    ref.threshold_consistent_margin(allx, alll)
            else:
                loss = _xent_excluding_self_copy(x, ll, allx, alll, 0.1) if efficient else \
                    ref.cross_example_softmax(allx, labels=alll, temperature=0.1)
            loss = loss * world
            loss.backward()
            out[name, efficient, "reference"] = (loss.detach(), x.grad)
    return out


def _wrapper_cases(rank, world):
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    X, labels = _data(world)
    xl, ll = X[rank * ROWS:(rank + 1) * ROWS], labels[rank * ROWS:(rank + 1) * ROWS]
    out = {}
    for name, makers in _pairs().items():
        for efficient in (False, True):
            for which, make in zip(("flashdml", "pml"), makers):
                x = xl.clone().requires_grad_()
                try:
                    loss = DistributedLossWrapper(make(), efficient=efficient)(x, ll)
                    loss.backward()
                    out[name, efficient, which] = (loss.detach(), x.grad)
                except Exception as exc:  # noqa: BLE001 - compared with the original's behaviour
                    out[name, efficient, which] = f"{type(exc).__name__}: {exc}"
    from flashdml.integrations.pml import CrossExampleSoftmaxLoss

    for efficient in (False, True):
        x = xl.clone().requires_grad_()
        loss = DistributedLossWrapper(CrossExampleSoftmaxLoss(temperature=0.1), efficient=efficient)(x, ll)
        loss.backward()
        out["xent", efficient, "flashdml"] = (loss.detach(), x.grad)
    out.update(_reference_cases(rank, world, xl, ll))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_drop_ins_equal_the_originals_inside_distributed_loss_wrapper(world):
    res = run_ranks("test_distributed_pml:_wrapper_cases", world)
    for rank, out in enumerate(res):
        for name in ("ntxent", "contrastive", "tcm", "xent"):
            for efficient in (False, True):
                ours = out[name, efficient, "flashdml"]
                assert not isinstance(ours, str), (name, efficient, ours)
                if name == "tcm" and efficient:  # pml's own TCM indexes the queries with reference indices
                    assert "IndexError" in out[name, efficient, "pml"]
                if (name, efficient) in (("tcm", True), ("xent", False), ("xent", True)):
                    theirs = out[name, efficient, "reference"]
                    if name == "tcm":  # and where pml runs, the float64 reference agrees with it
                        pml_loss = out[name, False, "pml"][0]
                        torch.testing.assert_close(out[name, False, "reference"][0].float(), pml_loss)
                else:
                    theirs = out[name, efficient, "pml"]
                    assert not isinstance(theirs, str), (name, efficient, theirs)
                torch.testing.assert_close(ours[0].double(), theirs[0].double(), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(ours[1].double(), theirs[1].double(), rtol=1e-5, atol=1e-6)


SHARDS = {2: [6, 0], 3: [3, 0, 4]}


def _drop_ins(group):
    from pytorch_metric_learning.distances import CosineSimilarity

    from flashdml.integrations import pml as fdp

    return {
        "ntxent": fdp.NTXentLoss(temperature=0.1, process_group=group),
        "contrastive": fdp.ContrastiveLoss(0.75, 0.6, distance=CosineSimilarity(), process_group=group),
        "tcm": fdp.ThresholdConsistentMarginLoss(process_group=group),
        "xent": fdp.CrossExampleSoftmaxLoss(temperature=0.1, process_group=group),
    }


def _process_group_cases(rank, world):
    import torch.distributed as dist

    sizes = SHARDS[world]
    X, labels = _data(world)
    off = sum(sizes[:rank])
    xl, ll = X[off:off + sizes[rank]], labels[off:off + sizes[rank]]
    out = {}
    for name, loss_fn in _drop_ins(dist.group.WORLD).items():
        x = xl.clone().requires_grad_()
        loss = loss_fn(x, ll)
        loss.backward()
        out[name] = (loss.detach(), x.grad)
    try:  # a miner's tuple cannot run on the global batch: refused before any collective
        _drop_ins(dist.group.WORLD)["ntxent"](xl, ll, indices_tuple=(ll[:0], ll[:0], ll[:0], ll[:0]))
        out["tuple"] = None
    except ValueError as exc:
        out["tuple"] = str(exc)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_drop_ins_with_process_group_give_the_global_batch_loss(world):
    import inspect

    import flashdml as fd

    missing = [f.__name__ for f in (fd.ntxent, fd.contrastive_margin, fd.threshold_consistent_margin,
                                    fd.cross_example_softmax)
               if "process_group" not in inspect.signature(f).parameters]
    if missing:
        pytest.skip(f"the functional losses {missing} do not take process_group on this branch yet")
    res = run_ranks("test_distributed_pml:_process_group_cases", world)
    sizes = SHARDS[world]
    X, labels = _data(world)
    X = X[:sum(sizes)]
    labels = labels[:sum(sizes)]
    for name, loss_fn in _drop_ins(None).items():
        x = X.clone().requires_grad_()
        one = loss_fn(x, labels)
        one.backward()
        for rank, out in enumerate(res):
            off = sum(sizes[:rank])
            torch.testing.assert_close(out[name][0], one.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(out[name][1], world * x.grad[off:off + sizes[rank]], rtol=1e-5, atol=1e-6)
            assert "process_group" in out["tuple"]
