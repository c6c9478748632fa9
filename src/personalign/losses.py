"""Loss functions, each pure and tested against hand-computed values. Recipes call these; no recipe
re-derives a formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "pairwise_accuracy"]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` over pairs (the reward-model loss).

    ``logsigmoid`` keeps it finite for large margins of either sign.
    """
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(chosen.shape)} vs {tuple(rejected.shape)}")
    return -F.logsigmoid(chosen - rejected).mean()


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs where the chosen response scores strictly higher (ties count half)."""
    diff = chosen - rejected
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())
