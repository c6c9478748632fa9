"""Finding a person's preference from their own choices between two answers (the math, in one place).

A person's preference is a vector ``theta`` with one coordinate per dimension, from -1 (side A) through 0
(neutral) to +1 (side B), the playground's sliders. Each answer has a feature per dimension, how much
more it shows side B than side A (for example the difference of the two sides' reward-model scores).
The person prefers answer ``a`` to ``b`` with the Bradley-Terry probability

    P(a > b) = sigmoid(sharpness * theta . (f(a) - f(b)))

and calls them equal with the likelihood sigmoid(d)^(1/2) sigmoid(-d)^(1/2) (half a win each way).
:class:`PreferenceEstimate` keeps a Gaussian prior at neutral and the Laplace approximation of the
posterior (the MAP by Newton's method on every pick so far, and the inverse Hessian as its covariance);
:meth:`PreferenceEstimate.choose` picks the next pair of candidate answers where the outcome is most
informative: the variance of the utility difference times the outcome's Bernoulli variance under the
predictive probability (MacKay's probit approximation).
Shapes: D dimensions, N candidate answers, P picks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from personalign.errors import ConfigError

__all__ = ["CHOICES", "Pick", "PreferenceEstimate", "side_weights"]

CHOICES = ("a", "b", "equal")


@dataclass(frozen=True)
class Pick:
    """One choice: the features (D,) of the two answers shown and what the person said."""

    a: tuple[float, ...]
    b: tuple[float, ...]
    choice: str  # "a", "b" or "equal"

    def __post_init__(self) -> None:
        if self.choice not in CHOICES:
            raise ConfigError(f"a pick's choice must be one of {', '.join(CHOICES)}, got {self.choice!r}")
        if len(self.a) != len(self.b) or not self.a:
            raise ConfigError(f"a pick needs two feature vectors of one length, got {len(self.a)} and {len(self.b)}")
        if not all(math.isfinite(v) for v in (*self.a, *self.b)):
            raise ConfigError("a pick's features must be finite numbers")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class PreferenceEstimate:
    """The posterior over ``theta`` after some picks (see the module docstring)."""

    def __init__(self, dims: int, prior_scale: float = 1.0, sharpness: float = 1.0) -> None:
        if dims < 1:
            raise ConfigError(f"dims must be at least 1, got {dims}")
        if prior_scale <= 0 or sharpness <= 0:
            raise ConfigError("prior_scale and sharpness must be positive")
        self.dims, self.prior_scale, self.sharpness = dims, prior_scale, sharpness
        self.picks: list[Pick] = []
        self.mean = np.zeros(dims)
        self.cov = np.eye(dims) * prior_scale**2

    def add(self, pick: Pick) -> None:
        if len(pick.a) != self.dims:
            raise ConfigError(f"a pick with {len(pick.a)} features for an estimate over {self.dims} dimensions")
        self.picks.append(pick)
        self._fit()

    def _fit(self, iterations: int = 50) -> None:
        """MAP by Newton's method (the log-posterior is concave), and the inverse Hessian at it."""
        x = np.array([np.subtract(p.a, p.b) for p in self.picks]) * self.sharpness  # (P, D)
        # Each pick as weighted wins: a wins 1, b wins 0, equal 1/2 each way.
        y = np.array([{"a": 1.0, "b": 0.0, "equal": 0.5}[p.choice] for p in self.picks])  # (P,)
        precision = np.eye(self.dims) / self.prior_scale**2
        theta = self.mean.copy()
        for _ in range(iterations):
            p = _sigmoid(x @ theta)
            grad = x.T @ (y - p) - precision @ theta
            hess = (x * (p * (1 - p))[:, None]).T @ x + precision
            step = np.linalg.solve(hess, grad)
            theta = theta + step
            if np.abs(step).max() < 1e-9:
                break
        p = _sigmoid(x @ theta)
        hess = (x * (p * (1 - p))[:, None]).T @ x + precision
        self.mean, self.cov = theta, np.linalg.inv(hess)

    @property
    def std(self) -> np.ndarray:
        """(D,) posterior standard deviation of each slider."""
        return np.sqrt(np.diag(self.cov))

    def sliders(self) -> list[float]:
        """The estimate as slider positions in [-1, 1]."""
        return [float(v) for v in np.clip(self.mean, -1, 1)]

    def probability(self, a: Sequence[float], b: Sequence[float]) -> float:
        """Predictive probability that ``a`` is preferred to ``b``, the uncertainty integrated out."""
        x = np.subtract(a, b) * self.sharpness
        mu, var = float(x @ self.mean), float(x @ self.cov @ x)
        return float(_sigmoid(np.array(mu / math.sqrt(1 + math.pi * var / 8))))

    def choose(self, features: Sequence[Sequence[float]], exclude: set[tuple[int, int]] | None = None) -> tuple[int, int]:
        """The pair of candidates (i < j) whose outcome the estimate is least sure of, among (N, D) features."""
        f = np.asarray(features, dtype=float)
        if f.ndim != 2 or f.shape[1] != self.dims or f.shape[0] < 2:
            raise ConfigError(f"need at least two candidates with {self.dims} features each, got shape {f.shape}")
        i, j = np.triu_indices(f.shape[0], k=1)
        x = (f[i] - f[j]) * self.sharpness  # (pairs, D)
        mu = x @ self.mean
        var = np.einsum("pd,de,pe->p", x, self.cov, x)
        p = _sigmoid(mu / np.sqrt(1 + math.pi * var / 8))
        score = var * p * (1 - p)
        if exclude:
            for k, pair in enumerate(zip(i.tolist(), j.tolist())):
                if pair in exclude:
                    score[k] = -np.inf
        best = int(np.argmax(score))
        return int(i[best]), int(j[best])


def side_weights(sliders: Sequence[float], dimensions: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Slider positions (-1 side A .. +1 side B) as side weights: the side a slider leans to, weighted by
    how far it leans; a slider at neutral names no side."""
    if len(sliders) != len(dimensions):
        raise ConfigError(f"{len(sliders)} sliders for {len(dimensions)} dimensions")
    out = {}
    for value, (side_a, side_b) in zip(sliders, dimensions):
        if value < 0:
            out[side_a] = round(-float(value), 3)
        elif value > 0:
            out[side_b] = round(float(value), 3)
    return {s: w for s, w in out.items() if w > 0}
