"""Evaluation math: judge agreement (and, with the evaluation harness, win rates, confidence
intervals and Pareto metrics). Pure functions, tested against hand-computed values."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

__all__ = ["agreement"]


def agreement(x: Sequence[str], y: Sequence[str]) -> dict[str, float]:
    """Raw agreement and Cohen's kappa between two judges' verdicts on the same pairs.

    Kappa corrects for agreement expected by chance from each judge's own verdict frequencies:
    ``(p_o - p_e) / (1 - p_e)``; it is 1.0 when both judges always give one and the same verdict.
    """
    if len(x) != len(y):
        raise ValueError(f"verdict lists differ in length: {len(x)} vs {len(y)}")
    n = len(x)
    if n == 0:
        return {"pairs": 0, "agreement": float("nan"), "kappa": float("nan")}
    p_o = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[k] * cy[k] for k in set(cx) | set(cy)) / (n * n)
    kappa = 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)
    return {"pairs": n, "agreement": p_o, "kappa": kappa}
