"""Retrieval and threshold-consistency metrics (SPEC section 3).

No streaming kernel yet: these run the reference (exact, materialises N×M) through dispatch.
"""
from __future__ import annotations

from .ops.unfused import through_dispatch

recall_at_k = through_dispatch("recall_at_k")
map_at_r = through_dispatch("map_at_r")
pr_auc = through_dispatch("pr_auc")
opis = through_dispatch("opis")
eps_opis = through_dispatch("eps_opis")
evaluate = through_dispatch("evaluate")
