"""The reference contextual loss (docs/spec.md §2.5): hand-computed values, the STE gradient against the closed form."""
import inspect

import numpy as np
import pytest
import torch

from flashdml.reference import contextual_loss, contrastive_margin, similarity
from flashdml.reference.contextual import (
    _context_forward,
    contextual_context_grad_closed_form,
    contextual_loss_terms,
)

f64 = torch.float64

# unit vectors x0 = (1,0), x1 = (.8,.6), x2 = (0,1), x3 = (-.6,.8):
#   S01 = .8, S02 = 0, S03 = -.6, S12 = .6, S13 = 0, S23 = .8
#   D = 2 - 2S: D01 = .4, D02 = 2, D03 = 3.2, D12 = .8, D13 = 2, D23 = .4
HAND_X = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]], dtype=f64)


def _batch(B, d, n_classes, seed, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(B) % n_classes
    return torch.randn(B, d, generator=g, dtype=dtype), labels[torch.randperm(B, generator=g)]


def _forward(x, labels, k, eps, ste_slope=10.0):
    S = similarity(x)
    return _context_forward(S, labels[:, None] == labels[None, :], k, eps, ste_slope)


def test_hand_computed_small_eps():
    # k = 2, eps = .05: t_i = -D to the nearest other point (-.4 in every row), h_i = 0 (the query itself).
    #   N(0) = N(1) = {0, 1}, N(2) = N(3) = {2, 3} (the next point is >= .4 farther than the band);
    #   |N| = 2 and |N̄| = 2 everywhere, I = J = the block indicator, W = blocks of ones.
    #   P = R = identity (every other point has D > eps), so Z = W and js = the blocks {0,1}, {2,3}.
    labels = torch.tensor([0, 1, 0, 1])
    f = _forward(HAND_X, labels, k=2, eps=0.05)
    blocks = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=f64)
    assert torch.equal(f["N"], blocks) and torch.equal(f["P"], torch.eye(4, dtype=f64))
    torch.testing.assert_close(f["js"], blocks, rtol=0, atol=1e-15)
    # labels [0,1,0,1]: y = 1 on (0,2),(1,3) (+ mirrors) where js = 0, js = 1 on (0,1),(2,3) where y = 0: 8/16
    terms = contextual_loss_terms(HAND_X, labels, k=2, eps=0.05, pos_margin=0.75, neg_margin=0.5)
    assert terms["L_ctx"].item() == pytest.approx(0.5, abs=1e-14)
    # L_reg: mean S = (4 + 2·(.8 + 0 - .6 + .6 + 0 + .8)) / 16 = .45 -> (.45 - .25)^2 = .04
    assert terms["L_reg"].item() == pytest.approx(0.04, abs=1e-14)
    # L_con (m+ .75, m- .5): positive hinges .75 on (0,2), (1,3) and mirrors, the diagonal adds 0 -> .75;
    #   negative hinges (0,1) .3, (1,2) .1, (2,3) .3 and mirrors ((0,3) = -.6 is 0) -> .7/3
    assert terms["L_con"].item() == pytest.approx(0.75 + 0.7 / 3, abs=1e-14)
    total = contextual_loss(HAND_X, labels, k=2, eps=0.05, pos_margin=0.75, neg_margin=0.5)
    assert total.item() == pytest.approx(0.4 * 0.5 + 0.1 * 0.04 + 0.5 * (0.75 + 0.7 / 3), abs=1e-14)
    # labels [0,0,1,1] agree with the blocks: L_ctx = 0
    assert contextual_loss_terms(HAND_X, torch.tensor([0, 0, 1, 1]), k=2)["L_ctx"].item() == 0.0


def test_hand_computed_wide_eps_band_reciprocal_sets_and_query_expansion():
    # k = 2, eps = .5: u = -D + .5, t_i = -.4, h_i = 0
    #   N(0) = {0,1}, N(1) = {0,1,2} (u12 = -.3 >= -.4), N(2) = {1,2,3}, N(3) = {2,3}: |N| = [2,3,3,2] > k
    #   P(0) = P(1) = {0,1}, P(2) = P(3) = {2,3} -> R = blocks, |R| = 2
    #   W rows: [1, 3/4, 0, 0], [5/6, 1, 1/3, 0], [0, 1/3, 1, 5/6], [0, 0, 3/4, 1]
    #   Z0 = Z1 = [11/12, 7/8, 1/6, 0], Z2 = Z3 = [0, 1/6, 7/8, 11/12]
    #   js01 = js23 = 43/48, js02 = js13 = 1/12, js03 = 0, js12 = 1/6
    labels = torch.tensor([0, 0, 1, 1])
    f = _forward(HAND_X, labels, k=2, eps=0.5)
    assert f["a"].tolist() == [2, 3, 3, 2] and f["r"].tolist() == [2, 2, 2, 2]
    W = torch.tensor([[1, 3 / 4, 0, 0], [5 / 6, 1, 1 / 3, 0], [0, 1 / 3, 1, 5 / 6], [0, 0, 3 / 4, 1]], dtype=f64)
    torch.testing.assert_close(f["W"], W, rtol=0, atol=1e-15)
    js = torch.tensor([[11 / 12, 43 / 48, 1 / 12, 0], [43 / 48, 7 / 8, 1 / 6, 1 / 12],
                       [1 / 12, 1 / 6, 7 / 8, 43 / 48], [0, 1 / 12, 43 / 48, 11 / 12]], dtype=f64)
    torch.testing.assert_close(f["js"], js, rtol=0, atol=1e-15)
    # y01 = y23 = 1: sum_{i≠j} (y - js)^2 = 2·(2·(5/48)^2 + 2·(1/12)^2 + (1/6)^2) = 292/2304; / B² = 16
    assert f["L_ctx"].item() == pytest.approx(292 / 2304 / 16, abs=1e-15)


def test_neighbourhood_ties_and_fp32_arithmetic():
    # exact duplicates: the inclusive test puts every copy in N(i), so |N(i)| > k
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    f = _forward(x, labels, k=2, eps=0.0)
    # rows 0-2: -D = [0, 0, 0, -2, -2, -4], t = 0 -> the 3 copies; rows 3, 4: t = -2 -> all but the opposite
    # point (5); row 5: -D = [-4, -4, -4, -2, -2, 0], t = -2 -> {3, 4, 5}
    assert f["a"].tolist() == [3, 3, 3, 5, 5, 3]
    # The independent fp32 computation of docs/spec.md §2.5 step 3: u = fl(-D + eps), N = [u >= t], P = [u >= h]
    g = torch.Generator().manual_seed(3)
    xr = torch.randn(12, 3, generator=g)
    xr[5] = xr[2]  # a duplicate
    lab = torch.arange(12) % 3
    for k, eps in ((4, 0.05), (3, 0.3), (5, 0.0)):
        f = _forward(xr, lab, k=k, eps=eps)
        S = similarity(xr).numpy()
        D = np.maximum(np.float32(2) - np.float32(2) * S, np.float32(0))
        u = (-D + np.float32(eps)).astype(np.float32)
        srt = -np.sort(D, axis=1)
        t, h = srt[:, k - 1:k], srt[:, k // 2 - 1:k // 2]
        assert np.array_equal(f["N"].numpy(), (u >= t).astype(np.float32))
        assert np.array_equal(f["P"].numpy(), (u >= h).astype(np.float32))
        assert (f["a"] >= k).all() and torch.equal(f["js"], f["js"].T)


def test_row_with_band_ties_is_counted_exactly():
    # row 5 of the batch above: -D_5 = [-4, -4, -4, -2, -2, 0] -> k = 2: t = -2, both (0,±1) tie -> |N(5)| = 3
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    f = _forward(x, torch.tensor([0, 0, 0, 1, 1, 2]), k=2, eps=0.0)
    assert f["N"][5].tolist() == [0, 0, 0, 1, 1, 1]
    assert f["N"][0].tolist() == [1, 1, 1, 0, 0, 0]  # three copies at D = 0
    assert f["N"][3].tolist() == [1, 1, 1, 1, 0, 1]  # D = 2 to the copies and to x5 (t = -2), 4 to x4


# ---------------------------------------------------------------------------------------------- STE gradient
def _autograd_dS(x, labels, k, eps, ste_slope):
    S = similarity(x).detach().requires_grad_(True)
    f = _context_forward(S, labels[:, None] == labels[None, :], k, eps, ste_slope)
    (g,) = torch.autograd.grad(f["L_ctx"], S)
    return g


@pytest.mark.parametrize("dtype,tol", [(f64, 1e-8), (torch.float32, 1e-5)])
@pytest.mark.parametrize("k,eps,seed", [(4, 0.05, 0), (2, 0.0, 1), (3, 0.3, 2), (5, 0.04, 3), (8, 0.1, 4)])
def test_ste_gradient_matches_closed_form(dtype, tol, k, eps, seed):
    x, labels = _batch(16, 4, 4, seed, dtype=dtype)
    x[7] = x[3]  # exact duplicates: S >= 1 possible there, C = 0
    x[11] = x[3]
    g_auto = _autograd_dS(x, labels, k, eps, 10.0)
    g_closed = contextual_context_grad_closed_form(x, labels, k=k, eps=eps, ste_slope=10.0)
    scale = g_auto.abs().max().item()
    assert scale > 0
    assert (g_auto - g_closed).abs().max().item() <= tol * max(1.0, scale)


def test_ste_gradient_through_x_and_on_every_entry():
    x, labels = _batch(12, 5, 3, 5)
    x.requires_grad_(True)
    L = contextual_loss_terms(x, labels)["L_ctx"]
    (gx,) = torch.autograd.grad(L, x)
    G = contextual_context_grad_closed_form(x, labels)
    (gx_closed,) = torch.autograd.grad(similarity(x), x, G)
    torch.testing.assert_close(gx, gx_closed, rtol=1e-9, atol=1e-12)
    # the STE passes gradient on every entry (rank-one part), not only near the thresholds
    assert (G != 0).sum().item() > 0.8 * 12 * 12
    # the forward does not depend on ste_slope, the gradient is proportional to it
    a = contextual_loss_terms(x, labels, ste_slope=10.0)["L_ctx"]
    b = contextual_loss_terms(x, labels, ste_slope=20.0)["L_ctx"]
    assert a.item() == b.item()
    G20 = contextual_context_grad_closed_form(x, labels, ste_slope=20.0)
    torch.testing.assert_close(G20, 2 * G, rtol=1e-12, atol=0)
    torch.testing.assert_close(_autograd_dS(x.detach(), labels, 4, 0.05, 20.0), G20, rtol=1e-9, atol=1e-12)


def test_clamp_passes_no_gradient_where_distance_is_clamped():
    x, labels = _batch(8, 3, 2, 6)
    S = similarity(x).detach()
    S[0, 1] = S[1, 0] = 1.0 + 1e-9  # 2 - 2S < 0: clamped
    S.requires_grad_(True)
    f = _context_forward(S, labels[:, None] == labels[None, :], 4, 0.05, 10.0)
    (g,) = torch.autograd.grad(f["L_ctx"], S)
    assert g[0, 1].item() == 0.0 and g[1, 0].item() == 0.0 and (g != 0).sum() > 30


# ------------------------------------------------------------------------------------- smooth parts, totals
def test_gradcheck_smooth_parts():
    x, labels = _batch(8, 3, 2, 7)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: contextual_loss_terms(a, labels)["L_reg"], (x,))
    assert torch.autograd.gradcheck(
        lambda a: contextual_loss_terms(a, labels, pos_margin=0.6, neg_margin=0.0)["L_con"], (x,))
    assert torch.autograd.gradcheck(
        lambda a: contextual_loss(a, labels, context_weight=0.0, pos_margin=0.6, neg_margin=0.0), (x,))


def test_terms_and_total():
    x, labels = _batch(10, 4, 3, 8)
    t = contextual_loss_terms(x, labels, k=3, eps=0.04, reg_target=0.3, pos_margin=0.7, neg_margin=0.2)
    F = x / x.norm(dim=1, keepdim=True)
    assert t["L_reg"].item() == pytest.approx(((F.sum(0).norm() ** 2 / 100 - 0.3) ** 2).item(), abs=1e-14)
    assert t["L_con"].item() == contrastive_margin(x, labels, pos_margin=0.7, neg_margin=0.2).item()
    total = contextual_loss(x, labels, k=3, eps=0.04, context_weight=0.95, contrastive_weight=0.05,
                            reg_weight=0.1, reg_target=0.3, pos_margin=0.7, neg_margin=0.2)
    expected = 0.95 * t["L_ctx"] + 0.1 * t["L_reg"] + 0.05 * t["L_con"]
    assert total.item() == pytest.approx(expected.item(), abs=1e-15)
    assert t["L_ctx"].item() > 0
    # fp32 agrees with float64 (no neighbourhood flips on this batch)
    t32 = contextual_loss_terms(x.float(), labels, k=3, eps=0.04, reg_target=0.3, pos_margin=0.7, neg_margin=0.2)
    for name in t:
        assert t32[name].dtype == torch.float32 and t[name].dtype == f64
        assert t32[name].item() == pytest.approx(t[name].item(), abs=1e-6)
    # normalize=False uses the rows as given (the same when they are already unit)
    torch.testing.assert_close(contextual_loss(F, labels, normalize=False), contextual_loss(x, labels))


def test_defaults_are_the_papers_256px_setting():
    p = inspect.signature(contextual_loss).parameters
    want = dict(k=4, eps=0.05, context_weight=0.4, contrastive_weight=0.5, reg_weight=0.1, reg_target=0.25,
                pos_margin=0.75, neg_margin=0.6, ste_slope=10.0, normalize=True)
    assert {n: p[n].default for n in want} == want
    assert "224" in contextual_loss.__doc__ and "lam = 0.05, eps = 0.04" in contextual_loss.__doc__


def test_errors():
    x, labels = _batch(6, 3, 2, 9)
    with pytest.raises(ValueError, match="collapsed"):
        contextual_loss(torch.ones(5, 3), torch.tensor([0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match="k"):
        contextual_loss(x, labels, k=1)
    with pytest.raises(ValueError, match="k = 7"):
        contextual_loss(x, labels, k=7)
    with pytest.raises(TypeError, match="k"):
        contextual_loss(x, labels, k=2.0)
    with pytest.raises(ValueError, match="eps"):
        contextual_loss(x, labels, eps=-0.1)
    with pytest.raises(ValueError, match="labels is required"):
        contextual_loss(x, None)
    with pytest.raises(ValueError, match="labels has 5 entries"):
        contextual_loss(x, labels[:5])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        contextual_loss(x, labels.float())
    with pytest.raises(ValueError, match="x must be a 2-D"):
        contextual_loss(x[0], labels)
    with pytest.raises(ValueError, match="x is empty"):
        contextual_loss(x[:0], labels[:0])
    with pytest.raises(TypeError, match="context_weight"):
        contextual_loss(x, labels, context_weight="1")
    with pytest.raises(ValueError, match="collapsed"):
        contextual_context_grad_closed_form(torch.ones(5, 3), torch.tensor([0, 0, 1, 1, 2]))
