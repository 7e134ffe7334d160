"""knn, hardest_negatives, metrics.evaluate and contextual_loss with process_group= on 2 and 3 gloo ranks
(uneven shards, one of them empty): values and indices equal the one-process op on the concatenated batch,
gradients equal the reference's slice (× W for the ops whose value is global), identical bits on a second call,
and mismatched calls raise on every rank."""
import pytest
import torch

import flashdml as fd
from flashdml import reference as ref
from distributed_ranks import run_ranks

LAYOUTS = {2: ([2, 5], [4, 3]), 3: ([4, 0, 3], [0, 5, 2])}  # rows of x, rows of y per rank
D = 8


def _data(world):
    sx, sy = LAYOUTS[world]
    g = torch.Generator().manual_seed(world)
    X = torch.randn(sum(sx), D, generator=g, dtype=torch.float64)
    Y = torch.randn(sum(sy), D, generator=g, dtype=torch.float64)
    lx = torch.randint(0, 3, (sum(sx),), generator=g)
    ly = torch.randint(0, 3, (sum(sy),), generator=g)
    wx = torch.randn(sum(sx), 4, generator=g, dtype=torch.float64)  # weights of the knn values per query row
    wk = torch.randn(6, generator=g, dtype=torch.float64)           # weights of the k selected pairs
    return X, Y, lx, ly, wx, wk


def _tied(world):
    """Rows drawn from four unit vectors whose cosines are exact in fp32: many exact ties across ranks."""
    sx, _ = LAYOUTS[world]
    basis = torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [.5, .5, .5, .5]])
    g = torch.Generator().manual_seed(100 + world)
    return basis[torch.randint(0, 4, (sum(sx),), generator=g)], torch.randint(0, 2, (sum(sx),), generator=g)


def _shard(t, sizes, rank):
    off = sum(sizes[:rank])
    return t[off:off + sizes[rank]]


def _leaf(t, dtype):
    return t.to(dtype).clone().requires_grad_()


# ------------------------------------------------------------------------------------------------ rank side
def _selection_cases(rank, world):
    import torch.distributed as dist

    pg = dist.group.WORLD
    sx, sy = LAYOUTS[world]
    X, Y, lx, ly, wx, wk = _data(world)
    xl, yl, lxl, lyl = _shard(X, sx, rank), _shard(Y, sy, rank), _shard(lx, sx, rank), _shard(ly, sy, rank)
    wxl = _shard(wx, sx, rank)
    out = {}
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype)[-2:]
        # knn, self mode (the gallery is x itself), k = 3: each rank weighs its own rows
        x = _leaf(xl, dtype)
        v, i = fd.knn(x, k=3, process_group=pg)
        (v * wxl[:, :3].to(v.dtype)).sum().backward()
        out[f"knn_self_{tag}"] = (v.detach(), i, x.grad)
        # knn, cross mode: local queries, sharded gallery
        x, y = _leaf(xl, dtype), _leaf(yl, dtype)
        v, i = fd.knn(x, y, k=4, process_group=pg)
        (v * wxl.to(v.dtype)).sum().backward()
        out[f"knn_cross_{tag}"] = (v.detach(), i, x.grad, y.grad)
        # hardest negatives, self mode with labels
        x = _leaf(xl, dtype)
        v, r, c = fd.hardest_negatives(x, labels=lxl, k=6, process_group=pg)
        (v * wk.to(v.dtype)).sum().backward()
        out[f"hn_self_{tag}"] = (v.detach(), r, c, x.grad)
        # hardest negatives, cross mode with labels, and pair mode (no labels, k = B)
        x, y = _leaf(xl, dtype), _leaf(yl, dtype)
        v, r, c = fd.hardest_negatives(x, y, lxl, lyl, k=5, process_group=pg)
        (v * wk[:5].to(v.dtype)).sum().backward()
        out[f"hn_cross_{tag}"] = (v.detach(), r, c, x.grad, y.grad)
        x, y = _leaf(xl, dtype), _leaf(yl, dtype)
        v, r, c = fd.hardest_negatives(x, y, process_group=pg)
        out[f"hn_pair_{tag}"] = (v.detach(), r, c)
    # exact ties across ranks: the one-process tie order (lower flat index / lower column first)
    T, lt = _tied(world)
    tl, ltl = _shard(T, sx, rank), _shard(lt, sx, rank)
    out["hn_ties"] = fd.hardest_negatives(tl, labels=ltl, k=9, process_group=pg)
    out["knn_ties"] = fd.knn(tl, k=4, process_group=pg)
    # a second identical call: the same bits (values and gradients)
    x = _leaf(xl, torch.float32)
    v, r, c = fd.hardest_negatives(x, labels=lxl, k=6, process_group=pg)
    (v * wk.float()).sum().backward()
    out["hn_self_again"] = (v.detach(), r, c, x.grad)
    # contextual loss of the concatenated batch (k = 3 <= B_global, more than some shards hold)
    for dtype in (torch.float32, torch.float64):
        x = _leaf(xl, dtype)
        loss = fd.contextual_loss(x, lxl, k=3, process_group=pg)
        loss.backward()
        out[f"ctx_{str(dtype)[-2:]}"] = (loss.detach(), x.grad)
    # metrics over the concatenated set, self mode (all metrics) and against a sharded gallery
    out["eval_self"] = fd.metrics.evaluate(xl.float(), lxl, ks=(1, 2), process_group=pg)
    out["eval_cross"] = fd.metrics.evaluate(xl.float(), lxl, ("recall_at_k", "map_at_r", "pr_auc"), ks=(1, 3),
                                            y=yl.float(), ref_labels=lyl, process_group=pg)
    # mismatched calls: k, d and dtype differ on the last rank
    last = rank == world - 1
    errors = []
    for kw in ({"k": 3 + last}, {"d": D - last}, {"dtype": torch.float64 if last else torch.float32}):
        x = xl[:, :kw.get("d", D)].to(kw.get("dtype", torch.float32))
        try:
            fd.knn(x, k=kw.get("k", 3), process_group=pg)
            errors.append(None)
        except RuntimeError as exc:
            errors.append(str(exc))
    try:
        fd.hardest_negatives(xl.float(), labels=lxl, k=4 + last, process_group=pg)
        errors.append(None)
    except RuntimeError as exc:
        errors.append(str(exc))
    try:
        fd.metrics.evaluate(xl.float(), lxl, ks=(1, 2 + last), process_group=pg)
        errors.append(None)
    except RuntimeError as exc:
        errors.append(str(exc))
    out["errors"] = errors
    # an argument error is the one-process error, raised before any collective (so on this rank only)
    try:
        fd.knn(xl.float(), k=0, process_group=pg)
    except ValueError as exc:
        out["k0"] = str(exc)
    return out


# ------------------------------------------------------------------------------------------------ test side
def _ref_grad(fn, *inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    fn(*leaves).backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("world", [2, 3])
def test_selection_equals_one_process_on_the_concatenated_batch(world):
    res = run_ranks("test_distributed_selection:_selection_cases", world)
    sx, sy = LAYOUTS[world]
    X, Y, lx, ly, wx, wk = _data(world)
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype)[-2:]
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        # knn self: one-process values/indices; the gradient is the reference's slice (no W factor)
        rv, ri = ref.knn(X, k=3)
        one_v, one_i = fd.knn(X.to(dtype), k=3)
        (gx,) = _ref_grad(lambda a: (ref.knn(a, k=3)[0] * wx[:, :3]).sum(), X)
        got = [r[f"knn_self_{tag}"] for r in res]
        assert torch.equal(torch.cat([g[1] for g in got]), ri) and torch.equal(torch.cat([g[1] for g in got]), one_i)
        torch.testing.assert_close(torch.cat([g[0] for g in got]).double(), rv, **tol)
        torch.testing.assert_close(torch.cat([g[2] for g in got]).double(), gx, **tol)
        # knn cross
        rv, ri = ref.knn(X, Y, k=4)
        gx, gy = _ref_grad(lambda a, b: (ref.knn(a, b, k=4)[0] * wx).sum(), X, Y)
        got = [r[f"knn_cross_{tag}"] for r in res]
        assert torch.equal(torch.cat([g[1] for g in got]), ri)
        torch.testing.assert_close(torch.cat([g[0] for g in got]).double(), rv, **tol)
        torch.testing.assert_close(torch.cat([g[2] for g in got]).double(), gx, **tol)
        torch.testing.assert_close(torch.cat([g[3] for g in got]).double(), gy, **tol)
        # hardest negatives: identical on every rank; gradient W × the reference slice
        rv, rr, rc = ref.hardest_negatives(X, labels=lx, k=6)
        (gx,) = _ref_grad(lambda a: (ref.hardest_negatives(a, labels=lx, k=6)[0] * wk).sum(), X)
        for rank, r in enumerate(res):
            v, rows, cols, grad = r[f"hn_self_{tag}"]
            assert torch.equal(v, res[0][f"hn_self_{tag}"][0]) and torch.equal(rows, rr) and torch.equal(cols, rc)
            torch.testing.assert_close(v.double(), rv, **tol)
            torch.testing.assert_close(grad.double(), world * _shard(gx, sx, rank), **tol)
        if dtype == torch.float32:
            one = fd.hardest_negatives(X.float(), labels=lx, k=6)
            assert torch.equal(res[0]["hn_self_32"][0], one[0])  # the kernel's own fp32 entries
        rv, rr, rc = ref.hardest_negatives(X, Y, lx, ly, k=5)
        gx, gy = _ref_grad(lambda a, b: (ref.hardest_negatives(a, b, lx, ly, k=5)[0] * wk[:5]).sum(), X, Y)
        for rank, r in enumerate(res):
            v, rows, cols, dx, dy = r[f"hn_cross_{tag}"]
            assert torch.equal(rows, rr) and torch.equal(cols, rc)
            torch.testing.assert_close(v.double(), rv, **tol)
            torch.testing.assert_close(dx.double(), world * _shard(gx, sx, rank), **tol)
            torch.testing.assert_close(dy.double(), world * _shard(gy, sy, rank), **tol)
        rv, rr, rc = ref.hardest_negatives(X, Y)
        for r in res:
            v, rows, cols = r[f"hn_pair_{tag}"]
            assert v.shape == (sum(sx),) and torch.equal(rows, rr) and torch.equal(cols, rc)
            torch.testing.assert_close(v.double(), rv, **tol)
    # contextual: the one-process loss (1e-6 relative: each rank sums its own rows' terms) and W × its gradient;
    # float64 = the reference; identical bits on every rank (tests/test_distributed_contextual.py has the rest)
    for dtype in (torch.float32, torch.float64):
        (g,) = _ref_grad(lambda a: fd.contextual_loss(a, lx, k=3), X.to(dtype))
        one = fd.contextual_loss(X.to(dtype), lx, k=3)
        for rank, r in enumerate(res):
            loss, grad = r[f"ctx_{str(dtype)[-2:]}"]
            assert torch.equal(loss, res[0][f"ctx_{str(dtype)[-2:]}"][0])
            torch.testing.assert_close(loss, one, rtol=1e-6, atol=0)
            torch.testing.assert_close(grad, world * _shard(g, sx, rank), rtol=1e-5, atol=1e-7)
    T, lt = _tied(world)
    one_hn, one_knn = fd.hardest_negatives(T, labels=lt, k=9), fd.knn(T, k=4)
    assert torch.equal(one_hn[1], ref.hardest_negatives(T.double(), labels=lt, k=9)[1])
    for rank, r in enumerate(res):
        assert all(torch.equal(a, b) for a, b in zip(r["hn_ties"], one_hn))
    assert torch.equal(torch.cat([r["knn_ties"][1] for r in res]), one_knn[1])
    assert torch.equal(torch.cat([r["knn_ties"][0] for r in res]), one_knn[0])
    # metrics: the one-process values on the concatenated set, to the bit, on every rank
    one_self = fd.metrics.evaluate(X.float(), lx, ks=(1, 2))
    one_cross = fd.metrics.evaluate(X.float(), lx, ("recall_at_k", "map_at_r", "pr_auc"), ks=(1, 3),
                                    y=Y.float(), ref_labels=ly)
    assert len(one_self) == 6 and len(one_cross) == 4 and one_self["opis"] == one_self["opis"]
    for r in res:
        assert r["eval_self"] == pytest.approx(one_self, nan_ok=True, rel=0, abs=0)
        assert r["eval_cross"] == pytest.approx(one_cross, nan_ok=True, rel=0, abs=0)
    for r in res:
        for a, b in zip(r["hn_self_again"], r["hn_self_32"]):
            assert torch.equal(a, b)
        assert all(e is not None and "different arguments" in e for e in r["errors"]), r["errors"]
        assert "k" in r["k0"]
