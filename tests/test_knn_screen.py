"""The screened scan of the CPU knn kernel (csrc/cpu/knn_screen.h) against the reference and the tiled scan.

``torch.ops.flashdml._set_knn_strategy``: 0 automatic, 1 the tiled scan (at::mm tiles), 2 the screened scan
whenever it can run (an int16 GEMM bounds every S entry; only entries that can still enter a row's top k are
computed exactly, as sequential fp32 FMA dot products). ``_knn_last_path()`` says which scan the last call used.

* Integer-valued rows (normalize=False): every S entry is an exact integer in any summation order, so the screened
  scan must equal the float64 reference exactly, ties (many) broken towards the lower column. The shapes cross the
  screen's edges: rows not a multiple of its 6-row micro-tile or 256-row super-block, columns not a multiple of
  its 8-column groups, odd d (padded to even), d = 1, k = 1 and k = all candidates, duplicate columns, the
  diagonal excluded inside any column block, and rows of one repeated value (ties everywhere: the pending lists
  overflow and are evaluated exactly).
* Automatic mode must equal the tiled scan bit for bit (values and indices) on any input: it takes the screened
  scan only where a probe found at::mm's tiles equal to the sequential FMA.
"""
import pytest
import torch

import flashdml as fd
from flashdml._debug import poison_outputs
from helpers import clustered

pytestmark = pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")

OPS = torch.ops.flashdml
TOL = 2e-6


@pytest.fixture
def strategy():
    def set_(s):
        OPS._set_knn_strategy(s)
    yield set_
    OPS._set_knn_strategy(0)


def _knn(x, y, k, **kw):
    with fd.backend("cpu"), poison_outputs():
        v, i = fd.knn(x, y, k, **kw)
    return v, i, OPS._knn_last_path()


def _int_rows(n, d, seed, lo=-2, hi=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, d), generator=g).float()


def _bits(v):
    return v.contiguous().view(torch.int32)


# (B, M, d): B across the micro-tile (6) and super-block (256) edges, M across the 8-column groups and the
# 512-column blocks; d odd, 1, and over 128.
SHAPES = [(1, 9, 3), (7, 17, 1), (13, 600, 5), (263, 1033, 33), (300, 2047, 2), (517, 1500, 129)]


@pytest.mark.parametrize("B,M,d", SHAPES)
def test_screened_exact_ties_cross(strategy, B, M, d):
    x = _int_rows(B, d, B)
    y = torch.cat([x[: min(B, M // 3)], _int_rows(M - min(B, M // 3), d, 1000 + M)])  # duplicate columns
    strategy(2)
    for k in sorted({1, min(7, M), min(100, M), M}):
        got_v, got_i, path = _knn(x, y, k, normalize=False)
        assert path == 2
        want_v, want_i = fd.reference.knn(x.double(), y.double(), k, normalize=False)
        assert torch.equal(got_i, want_i), (B, M, d, k)
        assert torch.equal(got_v.double(), want_v), (B, M, d, k)


@pytest.mark.parametrize("B,d", [(9, 3), (530, 17), (1030, 8)])
def test_screened_exact_ties_self(strategy, B, d):
    x = _int_rows(B, d, 7 + B, lo=-1, hi=2)
    strategy(2)
    for exclude in (True, False):
        n_cand = B - (1 if exclude else 0)
        for k in sorted({1, min(5, n_cand), n_cand}):
            got_v, got_i, path = _knn(x, None, k, normalize=False, exclude_self=exclude)
            assert path == 2
            want_v, want_i = fd.reference.knn(x.double(), None, k, normalize=False, exclude_self=exclude)
            assert torch.equal(got_i, want_i), (B, d, k, exclude)
            assert torch.equal(got_v.double(), want_v), (B, d, k, exclude)


def test_screened_one_value_everywhere(strategy):
    """Every S entry equal: the screen passes everything, the pending lists overflow and are evaluated exactly;
    the lowest columns win."""
    x = torch.ones(40, 6)
    y = torch.ones(3000, 6)
    strategy(2)
    for k in (1, 10, 200):
        v, i, path = _knn(x, y, k, normalize=False)
        assert path == 2
        assert torch.equal(i, torch.arange(k).expand(40, k))
        assert torch.equal(v, torch.full((40, k), 6.0))


@pytest.mark.parametrize("k", [1, 10, 100])
def test_screened_random_normalized(strategy, k):
    x, _ = clustered(300, 33, 20, seed=1)
    y, _ = clustered(2100, 33, 20, seed=2)
    strategy(2)
    got_v, got_i, path = _knn(x, y, k)
    assert path == 2
    S = fd.reference.similarity(x.double(), y.double())
    want_v, _ = fd.reference.knn(x.double(), y.double(), k)
    torch.testing.assert_close(got_v.double(), want_v, rtol=0, atol=TOL)
    torch.testing.assert_close(S.gather(1, got_i), want_v, rtol=0, atol=TOL)
    assert all(len(set(r.tolist())) == k for r in got_i)
    # Values and indices differ from the tiled scan's at most by the summation order of the fp32 dot products.
    strategy(1)
    tv, ti, path = _knn(x, y, k)
    assert path == 1
    torch.testing.assert_close(got_v, tv, rtol=0, atol=TOL)


def test_screened_falls_back_when_s_could_overflow(strategy):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 8, generator=g) * 1e20
    y = torch.randn(700, 8, generator=g) * 1e20
    strategy(1)
    tv, ti, _ = _knn(x, y, 5, normalize=False)
    strategy(2)
    v, i, path = _knn(x, y, 5, normalize=False)
    assert path == 1
    assert torch.equal(i, ti) and torch.equal(_bits(v), _bits(tv))


def test_automatic_equals_tiled_bitwise(strategy):
    """Automatic mode (screened where the probe allows) returns exactly what the tiled scan returns."""
    g = torch.Generator().manual_seed(0)
    cases = [  # automatic mode screens when B >= 512, M >= 2048 and 128 k <= M
        (torch.randn(600, 128, generator=g), torch.randn(5000, 128, generator=g), 10, {}),
        (torch.randn(1030, 64, generator=g), torch.randn(2600, 64, generator=g), 20, {}),
        (torch.randn(777, 33, generator=g), torch.randn(3001, 33, generator=g), 7, {}),
        (torch.randn(2100, 16, generator=g), None, 3, {}),
        (torch.randn(2100, 128, generator=g), None, 16, {"exclude_self": False}),
        (torch.ones(520, 4), torch.ones(5000, 4), 30, {"normalize": False}),  # all ties: the tiles take over
    ]
    paths = []
    for x, y, k, kw in cases:
        strategy(1)
        tv, ti, _ = _knn(x, y, k, **kw)
        strategy(0)
        v, i, path = _knn(x, y, k, **kw)
        paths.append(path)
        assert torch.equal(i, ti), (x.shape, k, kw)
        assert torch.equal(_bits(v), _bits(tv)), (x.shape, k, kw)
    if 2 not in paths:
        pytest.skip("at::mm's tiles differ from the sequential FMA here: the screened scan never ran")


def test_set_knn_strategy_rejects_unknown():
    with pytest.raises(RuntimeError):
        OPS._set_knn_strategy(3)
