"""The metric values from the state of one metrics pass (flashdml.metrics): the exact float64 re-ranking of the
kept top-k lists, recall@k / MAP@R from them, PR-AUC (value and bounds) from the fine pair histogram, and OPIS /
ε-OPIS from the per-class histograms. Accuracy statements: the flashdml.metrics docstring."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._math import l2_normalize
from .reference import metrics as _ref

PAIR_BINS = 1 << 16           # fine grid (csrc/include/flashdml/histogram.h)
REFINE_ELEMENTS = 1 << 22     # float64 elements gathered at once when re-ranking
NAN = float("nan")


# ----------------------------------------------------------------------------------------------- exact ranking
def float64_rows(t: Tensor) -> Tensor:
    return l2_normalize(t.detach().to(torch.float64))


def exact_relevance(batch, st: dict, need: Tensor) -> tuple:
    """Relevance of the first ``need`` ranks of each processed row (exact, float64 ranking of the reference).

    Returns ``(row_of, pos, rel)`` over the flattened kept lists, in exact rank order within each row.
    """
    rows, keep, idx, val = st["rows"], st["keep"], st["idx"].clone(), st["val"]
    R = rows.numel()
    C = batch.M - 1 if batch.self_mode else batch.M
    row_of = torch.repeat_interleave(torch.arange(R), keep)
    offsets = torch.zeros(R + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(keep, 0)
    E = idx.numel()
    if E == 0:
        return row_of, row_of.clone(), torch.zeros(0, dtype=torch.bool)
    pos = torch.arange(E) - offsets[row_of]
    query_label = batch.labels[rows]
    rel = batch.ref_labels[idx] == query_label[row_of]
    err = (batch.x.shape[1] + 16) * 2.0 ** -24
    # chains of fp32 values closer than 2 err (their float64 order is unknown)
    start = torch.ones(E, dtype=torch.bool)
    start[1:] = ((val[:-1].double() - val[1:].double()) > 2 * err) | (row_of[1:] != row_of[:-1])
    chain = torch.cumsum(start, 0) - 1
    n_chain = int(chain[-1]) + 1
    relf = rel.to(torch.int64)
    cmax = torch.zeros(n_chain, dtype=torch.int64).scatter_reduce(0, chain, relf, "amax", include_self=False)
    cmin = torch.ones(n_chain, dtype=torch.int64).scatter_reduce(0, chain, relf, "amin", include_self=False)
    cpos = torch.full((n_chain,), E, dtype=torch.int64).scatter_reduce(0, chain, pos, "amin", include_self=False)
    crow = row_of[start]
    matters = cpos < need[crow]
    at_end = torch.zeros(n_chain, dtype=torch.bool)
    last = offsets[1:][keep > 0] - 1
    at_end[chain[last]] = keep[keep > 0] < C
    flagged = torch.zeros(R, dtype=torch.bool)
    flagged[crow[matters & ((cmax != cmin) | at_end)]] = True
    if not bool(flagged.any()):
        return row_of, pos, rel

    # re-rank the flagged rows' kept lists in float64
    ent = torch.nonzero(flagged[row_of]).squeeze(1)
    d = batch.x.shape[1]
    chunk = max(1, REFINE_ELEMENTS // d)
    v64 = torch.empty(ent.numel(), dtype=torch.float64)
    qrows = rows[row_of[ent]]
    for a in range(0, ent.numel(), chunk):
        e = ent[a:a + chunk]
        q = float64_rows(batch.x[qrows[a:a + chunk]])
        r = float64_rows(batch.y[idx[e]])
        v64[a:a + chunk] = (q * r).sum(dim=1)
    # exact order: by row, then value descending, then reference index ascending (three stable sorts)
    o = torch.sort(idx[ent], stable=True).indices
    o = o[torch.sort(-v64[o], stable=True).indices]
    o = o[torch.sort(row_of[ent][o], stable=True).indices]
    idx[ent] = idx[ent][o]
    v64 = v64[o]
    # boundary: the need-th exact value must beat every reference left out (fp32 <= the last kept, + err)
    fr = torch.nonzero(flagged).squeeze(1)
    local_off = torch.zeros(fr.numel() + 1, dtype=torch.int64)
    local_off[1:] = torch.cumsum(keep[fr], 0)
    v_need = v64[local_off[:-1] + need[fr] - 1]
    v32_last = val[offsets[fr + 1] - 1].double()
    unsafe = fr[(keep[fr] < C) & ~(v_need > v32_last + err)]
    if unsafe.numel():
        yall = float64_rows(batch.y)
        for r in unsafe.tolist():
            s = float64_rows(batch.x[rows[r]:rows[r] + 1]) @ yall.T
            s = s.squeeze(0)
            if batch.self_mode:
                s[rows[r]] = -math.inf
            top = torch.sort(-s, stable=True).indices[:int(keep[r])]
            idx[offsets[r]:offsets[r + 1]] = top
    rel = batch.ref_labels[idx] == query_label[row_of]
    return row_of, pos, rel


# ----------------------------------------------------------------------------------------------- from the state
def retrieval(batch, st, R: Tensor, need: Tensor, ks) -> tuple:
    rows = st["rows"]
    Rr, needr = R[rows], need[rows]
    row_of, pos, rel = exact_relevance(batch, st, needr)
    valid = Rr > 0
    n_valid = int(valid.sum())
    recall = {}
    if ks:
        big = torch.iinfo(torch.int64).max
        first = torch.full((rows.numel(),), big, dtype=torch.int64).scatter_reduce(
            0, row_of[rel], pos[rel], "amin", include_self=True)
        for k in ks:
            recall[k] = float((first[valid] < k).double().mean()) if n_valid else NAN
    mapr = NAN
    if n_valid:
        hit = rel & (pos < Rr[row_of])
        cum = torch.cumsum(hit.to(torch.float64), 0)
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.float64)
        offsets[1:] = torch.zeros(rows.numel(), dtype=torch.float64).index_add_(0, row_of, hit.to(torch.float64))
        before = torch.cumsum(offsets, 0)[:-1]  # hits of the rows before, at each row start
        prec = (cum - before[row_of]) / (pos + 1).to(torch.float64)
        ap = torch.zeros(rows.numel(), dtype=torch.float64).index_add_(0, row_of, prec * hit.to(torch.float64))
        ap = ap[valid] / Rr[valid].to(torch.float64)
        mapr = float(ap.mean())
    return recall, mapr


def pr_steps(pairs: Tensor):
    pos, neg = pairs[0].flip(0).to(torch.float64), pairs[1].flip(0).to(torch.float64)  # high bins first
    P = float(pos.sum())
    tp, fp = torch.cumsum(pos, 0), torch.cumsum(neg, 0)
    return P, pos, neg, tp, fp


def pr_auc_value(pairs: Tensor) -> float:
    P, pos, neg, tp, fp = pr_steps(pairs)
    if P == 0:
        return NAN
    m = pos > 0
    return float((pos[m] / P * tp[m] / (tp[m] + fp[m])).sum())


def pr_auc_bounds(pairs: Tensor):
    P, pos, neg, tp, fp = pr_steps(pairs)
    if P == 0:
        return NAN, NAN
    m = pos > 0
    p, n, tp1, fp1 = pos[m], neg[m], tp[m], fp[m]
    tp0, fp0 = tp1 - p, fp1 - n
    # every positive of a bin has precision <= (TP0 + p) / (TP0 + FP0 + p) (upper) and the k-th one >=
    # (TP0 + k) / (TP0 + FP0 + n + k) (lower): sum_k (a + k)/(c + k) = p - (c - a)(psi(c + p + 1) - psi(c + 1))
    upper = float((p / P * tp1 / (tp0 + fp0 + p)).sum())
    c = tp0 + fp0 + n
    harm = torch.where(c > 1e6, torch.log1p(p / (c + 0.5)), torch.special.digamma(c + p + 1) - torch.special.digamma(c + 1))
    lower = float(((p - (fp0 + n) * harm) / P).sum())
    return lower, upper


def opis_state(batch, st, far_range, n_thresholds):
    """Snapped thresholds (bin-edge indices of the per-class grid) and per-class (TPR, TNR) ``[T, n]``."""
    classes, counts = torch.unique(batch.labels, return_counts=True)
    nu = st["neg_upper"]
    n_neg = int(nu.sum())
    eligible = counts >= 2
    if n_neg == 0 or not bool(eligible.any()):
        return None
    ge = torch.flip(torch.cumsum(torch.flip(nu, [0]), 0), [0])  # ge[b] = #negatives in bins >= b
    h = 2.0 / PAIR_BINS

    def threshold_at(f):
        k = min(max(_ref._ceil_count(f, n_neg), 1), n_neg)
        return -1.0 + (int((ge >= k).sum()) - 1) * h

    th = torch.linspace(threshold_at(far_range[1]), threshold_at(far_range[0]), n_thresholds, dtype=torch.float64)
    th = torch.sort(th).values
    ob = st["hist_pos"].shape[1]
    edge = torch.round((th + 1.0) * (ob / 2.0)).to(torch.int64).clamp_(0, ob)
    # counts below each edge: the bins below the lowest edge summed once, a cumsum over the edges' window only
    lo, hi = int(edge.min()), int(edge.max())

    def below(hist):
        base = hist[:, :lo].sum(1, keepdim=True)
        win = torch.cumsum(hist[:, lo:hi], 1)
        cum = torch.cat([base, base + win], 1)  # cum[:, e - lo] = #pairs in bins < e, lo <= e <= hi
        return cum[:, edge - lo][eligible]

    pos_ge = st["hist_pos"].sum(1, keepdim=True)[eligible] - below(st["hist_pos"])
    neg_below = below(st["hist_neg"])
    nc = counts[eligible].to(torch.float64)
    tpr = pos_ge.to(torch.float64) / (nc * (nc - 1) / 2)[:, None]
    tnr = neg_below.to(torch.float64) / (nc * (batch.B - nc))[:, None]
    return -1.0 + edge.to(torch.float64) * (2.0 / ob), tpr, tnr


def utilities(tpr, tnr, beta):
    b2 = beta * beta
    den = b2 * tpr + tnr
    return torch.where(den > 0, (1 + b2) * tpr * tnr / den.clamp_min(1e-300), torch.zeros_like(den))


def opis_values(U: Tensor, eps: float) -> tuple:
    value = float(((U - U.mean(dim=0, keepdim=True)) ** 2).mean(dim=1).mean())
    T = U.shape[0]
    m = min(max(_ref._ceil_count(eps, T), 1), T)
    mean_u = U.mean(dim=1)
    best = torch.sort(-mean_u, stable=True).indices[:m]
    worst = torch.sort(mean_u, stable=True).indices[:m]
    return value, float(((U[best].mean(dim=0) - U[worst].mean(dim=0)) ** 2).mean())
