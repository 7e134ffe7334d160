"""The pure-PyTorch reference ("the oracle") for every op of docs/spec.md §1-3.

Materialises S and every B×B intermediate, computes in float64 for float64 input (float32 otherwise), and is
written to be read next to docs/spec.md. Every fused backend is tested against these functions; they have the same
signatures as the public ops (``flashdml.similarity`` etc.).
"""
from .anchor_lse import circle, multi_similarity, supcon
from .contextual import contextual_loss
from .losses import (
    batch_softmax,
    contrastive_margin,
    cross_example_softmax,
    ntxent,
    threshold_consistent_margin,
)
from .metrics import eps_opis, evaluate, map_at_r, opis, pr_auc, recall_at_k
from .similarity import hardest_negatives, knn, similarity
from .triplet import triplet_margin

__all__ = [
    "similarity", "knn", "hardest_negatives",
    "batch_softmax", "ntxent", "cross_example_softmax",
    "threshold_consistent_margin", "contrastive_margin", "contextual_loss",
    "supcon", "multi_similarity", "circle",
    "triplet_margin",
    "recall_at_k", "map_at_r", "pr_auc", "opis", "eps_opis", "evaluate",
]
