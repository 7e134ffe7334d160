"""Loss modules: thin ``torch.nn.Module`` wrappers over the functional API, same arguments."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .ops import contextual as _contextual  # noqa: F401
from .ops import hinge_pair as _hinge_pair, unfused as _unfused, xent as _xent  # noqa: F401


def _temperature_parameter(temperature, learnable: bool):
    if learnable:
        return nn.Parameter(torch.tensor(float(temperature), dtype=torch.float32))
    return temperature


class BatchSoftmaxLoss(nn.Module):
    """``fd.batch_softmax`` as a module. ``learnable_temperature=True`` makes the temperature a parameter."""

    def __init__(self, temperature: float = 0.05, symmetric: bool = False, normalize: bool = True,
                 learnable_temperature: bool = False):
        super().__init__()
        self.temperature = _temperature_parameter(temperature, learnable_temperature)
        self.symmetric = symmetric
        self.normalize = normalize

    def forward(self, x: Tensor, y: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        from .ops.batch_softmax import batch_softmax

        return batch_softmax(x, y, labels, temperature=self.temperature, symmetric=self.symmetric,
                             normalize=self.normalize)


class NTXentLoss(nn.Module):
    """``fd.ntxent`` as a module."""

    def __init__(self, temperature: float = 0.07, normalize: bool = True, learnable_temperature: bool = False):
        super().__init__()
        self.temperature = _temperature_parameter(temperature, learnable_temperature)
        self.normalize = normalize

    def forward(self, x: Tensor, labels: Tensor, y: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None):
        return ops.xent.ntxent(x, labels, y, ref_labels, temperature=self.temperature, normalize=self.normalize)


class CrossExampleSoftmaxLoss(nn.Module):
    """``fd.cross_example_softmax`` as a module (``top_k`` enables Cross-Example Negative Mining)."""

    def __init__(self, temperature: float = 0.05, top_k: Optional[int] = None, normalize: bool = True,
                 learnable_temperature: bool = False):
        super().__init__()
        self.temperature = _temperature_parameter(temperature, learnable_temperature)
        self.top_k = top_k
        self.normalize = normalize

    def forward(self, x: Tensor, y: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        return ops.xent.cross_example_softmax(x, y, labels, ref_labels, temperature=self.temperature,
                                                 top_k=self.top_k, normalize=self.normalize)


class ThresholdConsistentMarginLoss(nn.Module):
    """``fd.threshold_consistent_margin`` as a module."""

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.5, pos_weight: float = 1.0,
                 neg_weight: float = 1.0):
        super().__init__()
        self.kwargs = dict(pos_margin=pos_margin, neg_margin=neg_margin, pos_weight=pos_weight, neg_weight=neg_weight)

    def forward(self, x: Tensor, labels: Tensor, y: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None):
        return ops.hinge_pair.threshold_consistent_margin(x, labels, y, ref_labels, **self.kwargs)


class ContrastiveMarginLoss(nn.Module):
    """``fd.contrastive_margin`` as a module."""

    def __init__(self, pos_margin: float = 0.75, neg_margin: float = 0.6):
        super().__init__()
        self.kwargs = dict(pos_margin=pos_margin, neg_margin=neg_margin)

    def forward(self, x: Tensor, labels: Tensor, y: Optional[Tensor] = None, ref_labels: Optional[Tensor] = None):
        return ops.hinge_pair.contrastive_margin(x, labels, y, ref_labels, **self.kwargs)


class ContextualLoss(nn.Module):
    """``fd.contextual_loss`` as a module (see its docstring for the paper's two settings)."""

    def __init__(self, k: int = 4, eps: float = 0.05, context_weight: float = 0.4, contrastive_weight: float = 0.5,
                 reg_weight: float = 0.1, reg_target: float = 0.25, pos_margin: float = 0.75, neg_margin: float = 0.6,
                 ste_slope: float = 10.0, normalize: bool = True):
        super().__init__()
        self.kwargs = dict(k=k, eps=eps, context_weight=context_weight, contrastive_weight=contrastive_weight,
                           reg_weight=reg_weight, reg_target=reg_target, pos_margin=pos_margin,
                           neg_margin=neg_margin, ste_slope=ste_slope, normalize=normalize)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        return ops.contextual.contextual_loss(x, labels, **self.kwargs)
