"""Every Triton gradient kernel computes each S tile once, whatever d is.

A gradient program owns a block of rows and one column split; for every S tile of its split it forms the weights
once and walks all of d in BLOCK_D chunks inside the program (``_tiles.accumulate_chunks``), instead of one
program (and one S GEMM) per chunk. Under the interpreter ``module.s_tile`` is replaced by a counting wrapper and
each op's backward is run with d = 3·BLOCK_D + 5 of the fp32 configuration (several chunks) and a ragged batch:
within one launch, every S tile (its row and column index vectors) must be computed exactly once. The chunked
result must also match the single-chunk path (BLOCK_D raised above d: the register accumulator) to fp32 rounding,
and nothing the kernels should write may stay poisoned (tests/conftest.py fills new outputs with NaN).

Interpreter only: the counting wrapper is a Python function called from the kernel body, which the compiler
cannot do.
"""
from __future__ import annotations

import collections
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="counts S tiles through the Triton interpreter")

from flashdml.triton_kernels import (  # noqa: E402
    _tiles, anchor_lse, batch_softmax, contextual, hinge_pair, triplet, xent)

B, M, SPLITS = 37, 45, 2  # ragged batch; 2 column splits so that some programs see several tiles


@pytest.fixture(autouse=True)
def poisoned(poison_triton_outputs):
    return poison_triton_outputs  # conftest.py


def _rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).float()


def _labels(n, seed, classes=6):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _chunked_d(configs):
    """3·BLOCK_D + 5 for the largest fp32 BLOCK_D of a module's gradient passes: several chunks in every pass."""
    return 3 * max(c["BLOCK_D"] for c in configs) + 5


# Each family: (module, its gradient-config table, fp32 gradient configs, run(d) -> gradients). run does the
# forward first and then calls ``backward()``, the part under the counter.
def _xent(d):
    x, y, lab, ref = _rows(B, d, 1), _rows(M, d, 2), _labels(B, 3), _labels(M, 4)
    t = torch.tensor(0.1)
    _, lse, coef = xent.fwd_impl(x, y, lab, ref, t, False, False, num_splits=SPLITS)
    return lambda: xent.bwd_impl(torch.tensor(0.7), x, y, lab, ref, t, False, False, lse, coef, num_splits=SPLITS)


def _batch_softmax(d):
    x, y, lab = _rows(B, d, 5), _rows(B, d, 6), _labels(B, 7)
    t = torch.tensor(0.1)
    _, row_lse, col_lse = batch_softmax.fwd_impl(x, y, lab, t, True, num_splits=SPLITS)
    return lambda: batch_softmax.bwd_impl(torch.tensor(0.7), x, y, lab, t, True, row_lse, col_lse,
                                          num_splits=SPLITS)


def _anchor_lse(d):
    x, y, lab, ref = _rows(B, d, 8), _rows(M, d, 9), _labels(B, 10), _labels(M, 11)
    t, params = torch.tensor(0.1), (0.0, 0.0, 0.0)
    _, stats = anchor_lse.fwd_impl(x, y, lab, ref, t, 0, *params, False, num_splits=SPLITS)
    return lambda: anchor_lse.bwd_impl(torch.tensor(0.7), x, y, lab, ref, t, 0, *params, False, stats,
                                       num_splits=SPLITS)


def _hinge_pair(d):
    x, y, lab, ref = _rows(B, d, 12), _rows(M, d, 13), _labels(B, 14), _labels(M, 15)
    args = (0.3, -0.05, 1.0, 0.5, False, False)  # every positive and most negatives are hard
    _, _, counts = hinge_pair.fwd_impl(x, y, lab, ref, *args, num_splits=SPLITS)
    assert (counts > 0).all()
    return lambda: hinge_pair.bwd_impl(torch.tensor(0.7), x, y, lab, ref, *args, counts, num_splits=SPLITS)


def _triplet(d):
    x, y, lab, ref = _rows(B, d, 16), _rows(M, d, 17), _labels(B, 18), _labels(M, 19)
    _, _, counts = triplet.fwd_impl(x, y, lab, ref, 0.5, False, num_splits=SPLITS)
    assert int(counts) > 0
    return lambda: triplet.bwd_impl(torch.tensor(0.7), x, y, lab, ref, 0.5, False, counts, num_splits=SPLITS)


def _contextual(d):
    x, lab = _rows(B, d, 20), _labels(B, 21)
    args = (4, 0.05, 0.4, 0.5, 0.1, 0.25, 0.75, 0.6, 10.0)
    out = contextual.fwd_impl(x, lab, *args)
    return lambda: contextual.bwd_impl(torch.tensor(0.7), x, lab, *args, *out[2:], num_splits=SPLITS)


FAMILIES = {
    "xent": (xent, xent.BWD_CONFIGS, _xent),
    "batch_softmax": (batch_softmax, batch_softmax.BWD_CONFIGS, _batch_softmax),
    "anchor_lse": (anchor_lse, anchor_lse.BWD_CONFIGS, _anchor_lse),
    "hinge_pair": (hinge_pair, hinge_pair.BWD_CONFIGS, _hinge_pair),
    "triplet": (triplet, triplet.BWD_CONFIGS, _triplet),
    "contextual": (contextual, contextual.GRAD_CONFIGS, _contextual),
}
GRAD_KERNELS = {"xent": "_xent_grad_kernel", "batch_softmax": "_grad_partial_kernel", "anchor_lse": "_grad_kernel",
                "hinge_pair": "_hinge_grad_kernel", "triplet": "_triplet_grad_kernel",
                "contextual": "_ctx_grad_kernel"}


def _fp32_configs(table):
    c = table[torch.float32]
    return list(c) if isinstance(c, tuple) else [c]


def _count_s_tiles(module, monkeypatch, backward):
    """Run ``backward()`` with ``module.s_tile`` counting: {(launch number, kernel, a rows, b rows): count}."""
    counts = collections.Counter()
    launch = {"n": 0, "kernel": None}
    original_launch = module.wrap_triton

    class CountingLaunch:
        def __init__(self, kernel):
            self.inner = original_launch(kernel)
            self.name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        def __getitem__(self, grid):
            run = self.inner[grid]

            def go(*args, **kwargs):
                launch["n"] += 1
                launch["kernel"] = self.name
                return run(*args, **kwargs)
            return go

    def counting_s_tile(a_ptr, b_ptr, a_idx, b_idx, *rest):
        key = (launch["n"], launch["kernel"], tuple(a_idx.handle.data.tolist()), tuple(b_idx.handle.data.tolist()))
        counts[key] += 1
        return _tiles.s_tile(a_ptr, b_ptr, a_idx, b_idx, *rest)

    with monkeypatch.context() as mp:
        mp.setattr(module, "wrap_triton", CountingLaunch)
        mp.setattr(module, "s_tile", counting_s_tile)
        out = backward()
    return counts, out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_s_tile_computed_once(family, monkeypatch):
    module, table, make = FAMILIES[family]
    d = _chunked_d(_fp32_configs(table))
    assert -(-d // 16) * 16 > 2 * max(c["BLOCK_D"] for c in _fp32_configs(table))  # several chunks in every pass
    counts, _ = _count_s_tiles(module, monkeypatch, make(d))
    grad_tiles = {k: n for k, n in counts.items() if k[1] == GRAD_KERNELS[family]}
    launches = {k[0] for k in grad_tiles}
    assert len(launches) == 2, f"{family}: expected the dx and the dy gradient launch, saw {sorted(launches)}"
    repeated = {k[:2]: n for k, n in grad_tiles.items() if n != 1}
    assert not repeated, f"{family}: S tiles computed more than once per launch: {repeated}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_matches_one_chunk(family, monkeypatch):
    module, table, make = FAMILIES[family]
    d = _chunked_d(_fp32_configs(table))
    backward = make(d)
    chunked = backward()
    wide = {k: (tuple(dict(c, BLOCK_D=512) for c in v) if isinstance(v, tuple) else dict(v, BLOCK_D=512))
            for k, v in table.items()}
    monkeypatch.setattr(module, "GRAD_CONFIGS" if family == "contextual" else "BWD_CONFIGS", wide)
    one = backward()
    chunked = chunked if isinstance(chunked, tuple) else (chunked,)
    one = one if isinstance(one, tuple) else (one,)
    for a, b in zip(chunked, one):
        assert not torch.isnan(a).any(), f"{family}: NaN in the chunked result (an unwritten partial row?)"
        assert a.abs().max() > 0, family
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_launches_have_specs(family, monkeypatch):
    """The chunked gradient launches (ONE_CHUNK=False, the narrower chunk width of ``_tiles.chunk_config``) match
    AOT specs, so tests/test_triton_aot.py compiles and resource-checks what they run."""
    from test_triton_xent import assert_launches_have_specs, recorded_launches

    module, table, make = FAMILIES[family]
    launches = recorded_launches(module, monkeypatch, make(_chunked_d(_fp32_configs(table))))
    grads = [launch for launch in launches if launch[0].fn.__name__ == GRAD_KERNELS[family]]
    assert len(grads) == 2 and all(kwargs["ONE_CHUNK"] is False for _, _, kwargs in grads)
    assert_launches_have_specs(grads)
