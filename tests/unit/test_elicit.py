"""The preference estimator on synthetic people: it recovers hidden weights from their choices, and choosing
the most informative pair needs fewer picks than random pairs."""

from __future__ import annotations

import numpy as np
import pytest

from personalign.elicit import Pick, PreferenceEstimate, side_weights
from personalign.errors import ConfigError


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def simulate(seed: int, picks: int, active: bool, sharpness: float = 4.0) -> list[float]:
    """One synthetic person: hidden weights, 40 candidate answers with random per-dimension features, choices
    drawn from Bradley-Terry. The cosine of the estimate to the hidden weights after each pick."""
    rng = np.random.default_rng(seed)
    hidden = rng.uniform(-1, 1, 3)
    features = rng.normal(0, 1, (40, 3))
    est = PreferenceEstimate(3, sharpness=sharpness)
    shown: set[tuple[int, int]] = set()
    out = []
    for _ in range(picks):
        if active:
            i, j = est.choose(features, exclude=shown)
        else:
            i, j = sorted(rng.choice(40, 2, replace=False).tolist())
        shown.add((i, j))
        p = 1 / (1 + np.exp(-sharpness * hidden @ (features[i] - features[j])))
        est.add(Pick(tuple(features[i]), tuple(features[j]), "a" if rng.random() < p else "b"))
        out.append(cosine(est.mean, hidden))
    return out


def test_the_estimate_recovers_hidden_weights():
    final = [simulate(seed, 30, active=True)[-1] for seed in range(20)]
    assert np.median(final) > 0.9
    early = [simulate(seed, 1, active=True)[-1] for seed in range(20)]
    assert np.median(final) > np.median(early)


def test_choosing_informative_pairs_needs_fewer_picks_than_random_pairs():
    active = np.mean([simulate(seed, 10, active=True) for seed in range(40)], axis=0)
    random = np.mean([simulate(seed, 10, active=False) for seed in range(40)], axis=0)
    assert active[-1] > random[-1]
    # active selection reaches random's 10-pick quality in fewer picks
    assert int(np.argmax(active >= random[-1])) + 1 < 10


def test_uncertainty_shrinks_and_equal_picks_pull_towards_indifference():
    est = PreferenceEstimate(2)
    before = est.std.copy()
    for _ in range(5):
        est.add(Pick((1.0, 0.0), (0.0, 0.0), "a"))
    assert est.mean[0] > 0.5 and est.std[0] < before[0] and est.std[1] == pytest.approx(before[1])
    for _ in range(20):
        est.add(Pick((1.0, 0.0), (0.0, 0.0), "equal"))
    assert 0 < est.mean[0] < 0.5
    assert 0.5 < est.probability((1.0, 0.0), (0.0, 0.0)) < 0.7


def test_bad_picks_are_refused_and_sliders_map_to_side_weights():
    with pytest.raises(ConfigError, match="one of a, b, equal"):
        Pick((1.0,), (0.0,), "left")
    with pytest.raises(ConfigError, match="one length"):
        Pick((1.0,), (0.0, 1.0), "a")
    with pytest.raises(ConfigError, match="finite"):
        Pick((float("nan"),), (0.0,), "a")
    with pytest.raises(ConfigError, match="3 dimensions"):
        PreferenceEstimate(3).add(Pick((1.0,), (0.0,), "a"))
    dims = [("P1A", "P1B"), ("P2A", "P2B"), ("P3A", "P3B")]
    assert side_weights([-0.5, 0.0, 0.8], dims) == {"P1A": 0.5, "P3B": 0.8}
    with pytest.raises(ConfigError, match="2 sliders for 3"):
        side_weights([0.1, 0.2], dims)
