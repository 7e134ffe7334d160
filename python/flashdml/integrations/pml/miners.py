"""pml miners backed by flashdml (``flashdml.integrations.pml.miners``)."""
from __future__ import annotations

import torch
from pytorch_metric_learning.miners import BaseMiner as _BaseMiner
from pytorch_metric_learning.utils import common_functions as _c_f

import flashdml as _fd

__all__ = ["HardestNegativesMiner"]


class HardestNegativesMiner(_BaseMiner):
    """pml miner: all positive pairs plus the k hardest negative pairs of the **whole batch** (flashdml's
    ``hardest_negatives``, docs/spec.md §1.3 — Cross-Example Negative Mining's selection, without a B×B matrix).

    ``HardestNegativesMiner(k=None, normalize=True, **kwargs)``: ``k=None`` means k = batch size; a k above the
    batch's number of negative pairs keeps all of them. ``normalize`` chooses cosine (default) or dot-product
    similarity. Returns pml's pair tuple ``(a1, p, a2, n)`` (int64): ``(a1, p)`` every positive pair (self mode:
    without ``(i, i)``, as pml's ``get_all_pairs_indices``), ``(a2, n)`` the hardest negatives, most similar
    first (ties → lower flat index); the tuple is what a pml pair loss takes as its ``indices_tuple``.

    Args:
        k: number of hardest negatives (``None``: the batch size).
        normalize: cosine or dot product.
        **kwargs: pml's.

    Returns:
        Calling the miner (``miner(embeddings, labels, ref_emb=None, ref_labels=None)``) returns ``(a1, p, a2,
        n)``, four int64 index tensors: ``embeddings[a1]`` / ``ref[p]`` the positive pairs, ``embeddings[a2]`` /
        ``ref[n]`` the hardest negative pairs (``ref`` is ``ref_emb``, or ``embeddings`` in self mode).

    Raises:
        ValueError / TypeError: flashdml's input errors (bad shapes, non-integer labels, a NaN row).

    Example:
        >>> import torch
        >>> from pytorch_metric_learning import losses as pml_losses
        >>> from flashdml.integrations.pml import HardestNegativesMiner
        >>> emb, labels = torch.randn(16, 8), torch.arange(16) // 4
        >>> a1, p, a2, n = HardestNegativesMiner(k=10)(emb, labels)
        >>> len(a1), len(a2), a2.dtype                          # 16·3 positive pairs, the 10 hardest negatives
        (48, 10, torch.int64)
        >>> unit = torch.nn.functional.normalize(emb, dim=1)
        >>> sim = unit @ unit.T
        >>> torch.allclose(sim[a2, n], sim[labels[:, None] != labels].sort(descending=True).values[:10])
        True
        >>> loss = pml_losses.ContrastiveLoss()(emb, labels, (a1, p, a2, n))
    """

    def __init__(self, k=None, normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.k = k
        self.normalize = bool(normalize)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        from flashdml._validation import prepare_batch
        from flashdml.ops.selection import count_negatives, positive_pairs

        self_mode = ref_emb is embeddings and ref_labels is labels
        y, ref = (None, None) if self_mode else (ref_emb, _c_f.to_device(ref_labels, ref_emb))
        batch = prepare_batch(embeddings, y, labels, ref, pair_mode_default=False)
        a1, p = positive_pairs(batch.labels, batch.ref_labels, batch.self_mode)
        n_neg = count_negatives(batch.labels, batch.ref_labels)
        k = min(batch.B if self.k is None else int(self.k), n_neg)
        if k == 0:
            empty = torch.empty(0, dtype=torch.long, device=embeddings.device)
            return a1, p, empty, empty.clone()
        _, a2, n = _fd.hardest_negatives(embeddings, y, labels, ref, k, normalize=self.normalize)
        return a1, p, a2, n
