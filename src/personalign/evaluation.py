"""Evaluation math: judge agreement, win rates, bootstrap confidence intervals and Pareto metrics.

Pure functions, tested against hand-computed values. The paper's protocol (docs/methods.md, section 2, evaluation):
for each instruction and criterion a judge compares the method's response with a reference method's,
once in each presentation order. Vocabulary used throughout:

* a judge *verdict* is ``"a"``, ``"b"`` or ``"tie"``: which of the two shown responses is better;
* an *outcome* is ``"win"``, ``"loss"`` or ``"tie"`` from the evaluated method's side
  (:func:`outcome` converts a verdict, given where the method's response was shown);
* a *win rate* is the mean score of outcomes with win = 1, tie = 0.5, loss = 0.

Confidence intervals are percentile bootstraps over instructions (the unit that was sampled), seeded so a
report is reproducible.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from personalign.errors import ConfigError, DataError

__all__ = [
    "SCORES",
    "WinRate",
    "agreement",
    "combine_orders",
    "hypervolume_2d",
    "mean_difference_ci",
    "mean_win_rate_ci",
    "method_columns",
    "outcome",
    "pair_outcome",
    "paired_difference_ci",
    "paired_differences",
    "pareto_front",
    "score_method",
    "win_rate",
    "win_rate_ci",
]

Outcome = Literal["win", "loss", "tie"]
SCORES: dict[str, float] = {"win": 1.0, "tie": 0.5, "loss": 0.0}


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


# ---------------------------------------------------------------- outcomes and win rates


@dataclass(frozen=True)
class WinRate:
    """A win rate with its bootstrap interval: ``value`` is computed on all ``n`` instructions, ``low`` and
    ``high`` are the percentile bounds at ``confidence``."""

    value: float
    low: float
    high: float
    n: int
    confidence: float


def outcome(verdict: str, method_shown_as: str) -> Outcome:
    """The method's outcome from a judge verdict, given where its response was shown (``"a"`` or ``"b"``)."""
    if method_shown_as not in ("a", "b"):
        raise ConfigError(f"method_shown_as={method_shown_as!r} is invalid: use 'a' or 'b'")
    if verdict not in ("a", "b", "tie"):
        raise DataError(f"judge verdict {verdict!r} is invalid: a verdict is 'a', 'b' or 'tie'")
    if verdict == "tie":
        return "tie"
    return "win" if verdict == method_shown_as else "loss"


def combine_orders(first: str, second: str) -> Outcome:
    """One outcome for a pair judged in both presentation orders (each already an outcome for the method).

    Agreeing orders keep their outcome; any disagreement, including win + tie, is a tie: an answer that
    changes with the position is position bias, not a preference (as MT-Bench scores inconsistent pairs).
    """
    for o in (first, second):
        _check_outcome(o, "combine_orders")
    return first if first == second else "tie"  # type: ignore[return-value]


def win_rate(outcomes: Sequence[str]) -> float:
    """Mean score of the outcomes: win 1, tie 0.5, loss 0."""
    return float(_scores(outcomes, "win_rate").mean())


def win_rate_ci(
    outcomes: Sequence[str], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> WinRate:
    """Win rate with a percentile-bootstrap interval, resampling instructions (one outcome each)."""
    scores = _scores(outcomes, "win_rate_ci")
    low, high = _bootstrap(scores, confidence, resamples, seed)
    return WinRate(float(scores.mean()), low, high, len(scores), confidence)


def mean_win_rate_ci(
    table: Mapping[str, Sequence[str]], *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> WinRate:
    """The average of several win rates (criteria, combinations) with an interval for the average.

    ``table`` maps a column name (e.g. ``"1A,2A,3A/P1A"``) to outcomes aligned by instruction: position
    ``i`` of every column is instruction ``i``. Instructions are resampled jointly, all columns at once,
    so the interval reflects that columns judged on the same instructions move together; separate
    per-column intervals cannot be averaged into a correct one. With equal-length columns the average of
    column win rates is the mean over instructions of each instruction's row mean, which is what is
    bootstrapped.
    """
    rows = _row_means(table, "mean_win_rate_ci")
    low, high = _bootstrap(rows, confidence, resamples, seed)
    return WinRate(float(rows.mean()), low, high, len(rows), confidence)


def paired_difference_ci(
    table: Mapping[str, Sequence[str]], other: Mapping[str, Sequence[str]], *, confidence: float = 0.95,
    resamples: int = 2000, seed: int = 0,
) -> WinRate:
    """Average win rate of ``table`` minus that of ``other``, judged on the same instructions.

    Both map the same column names to outcomes aligned by instruction (as in :func:`mean_win_rate_ci`).
    The difference is taken per instruction before resampling, so what both methods share (an easy
    instruction, a hard criterion) cancels: the interval is much narrower than the difference of two
    separate intervals, and it is the one that says whether one method beats the other. ``value`` lies
    in [-1, 1]; an interval above 0 is a measured improvement.
    """
    missing = sorted(set(table) ^ set(other))
    if missing:
        raise DataError(
            f"paired_difference_ci needs the same columns on both sides; only one side has {missing}"
        )
    mine = _row_means(table, "paired_difference_ci")
    theirs = _row_means({name: other[name] for name in table}, "paired_difference_ci")
    if len(mine) != len(theirs):
        raise DataError(f"the two sides cover different numbers of instructions ({len(mine)} and "
                        f"{len(theirs)}): a paired difference needs both judged on the same instructions")
    rows = mine - theirs
    low, high = _bootstrap(rows, confidence, resamples, seed)
    return WinRate(float(rows.mean()), low, high, len(rows), confidence)


def mean_difference_ci(
    mine: Sequence[float], theirs: Sequence[float], *, confidence: float = 0.95, resamples: int = 2000,
    seed: int = 0,
) -> WinRate:
    """Mean of ``mine - theirs`` for a real-valued measure of two methods on the same instructions (one
    value each, aligned by instruction; e.g. on-topic similarity), with a percentile-bootstrap interval
    over instructions. An interval that contains 0 measures no difference."""
    a, b = np.asarray(mine, dtype=float), np.asarray(theirs, dtype=float)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise DataError(f"mean_difference_ci needs two equal, non-empty lists aligned by instruction; "
                        f"got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("mean_difference_ci got a value that is not a finite number")
    rows = a - b
    low, high = _bootstrap(rows, confidence, resamples, seed)
    return WinRate(float(rows.mean()), low, high, len(rows), confidence)


def _row_means(table: Mapping[str, Sequence[str]], where: str) -> np.ndarray:
    """Each instruction's mean score over the columns (outcomes aligned by instruction): (n,)."""
    if not table:
        raise DataError(f"{where} got no columns: give at least one criterion's outcomes")
    columns = {name: _scores(col, f"column {name!r}") for name, col in table.items()}
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(
            f"columns cover different numbers of instructions {lengths}: every column needs one outcome per "
            "instruction, in the same instruction order"
        )
    return np.stack(list(columns.values()), axis=1).mean(axis=1)


def _check_outcome(o: object, where: str) -> None:
    if o in SCORES:
        return
    if o in ("a", "b"):
        raise DataError(
            f"{where} got the judge verdict {o!r}, not an outcome: convert it with outcome(verdict, "
            "method_shown_as) first"
        )
    raise DataError(f"{where} got {o!r}: an outcome is 'win', 'loss' or 'tie'")


def _scores(outcomes: Sequence[str], where: str) -> np.ndarray:
    if isinstance(outcomes, str):
        raise DataError(f"{where} got the string {outcomes!r}: give a list of outcomes, e.g. ['win', 'tie']")
    if len(outcomes) == 0:
        raise DataError(f"{where} got no outcomes: a win rate needs at least one judged pair")
    for o in outcomes:
        _check_outcome(o, where)
    return np.array([SCORES[o] for o in outcomes], dtype=np.float64)


def _bootstrap(values: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the mean of ``values`` (one per instruction)."""
    if not (0 < confidence < 1):
        raise ConfigError(f"confidence={confidence!r} is invalid: it must be in (0, 1), e.g. 0.95")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ConfigError(f"resamples={resamples!r} is invalid: it must be a positive integer, e.g. 2000")
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(resamples)
    chunk = max(1, 2**20 // n)  # bound the (chunk, n) index matrix to about 8 MB
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------- Pareto metrics (maximise both axes)


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (>= on both axes, > on one), sorted by x.

    Duplicated front points are all kept: neither dominates the other.
    """
    pts = _points(points, "pareto_front")
    front = [
        i for i, (x, y) in enumerate(pts)
        if not any(u >= x and v >= y and (u > x or v > y) for u, v in pts)
    ]
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1], i))


def hypervolume_2d(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Area dominated by ``points`` and dominating ``reference`` (maximise both axes).

    Points not strictly better than the reference on both axes add nothing. Sweeping the points by x
    from right to left, each one adds the strip between the highest y seen so far and its own y.
    """
    pts = _points(points, "hypervolume_2d")
    [(rx, ry)] = _points([reference], "hypervolume_2d reference")
    area, top = 0.0, ry
    for x, y in sorted(pts, key=lambda p: (-p[0], -p[1])):
        if x > rx and y > top:
            area += (x - rx) * (y - top)
            top = y
    return area


def _points(points: Sequence[Sequence[float]], where: str) -> list[tuple[float, float]]:
    if len(points) == 0:
        raise DataError(f"{where} got no points: evaluate at least one method first")
    out = []
    for i, p in enumerate(points):
        try:
            x, y = (float(v) for v in p)
        except (TypeError, ValueError):
            raise DataError(f"{where}: point {i} is {p!r}; every point is two numbers (x, y)") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise DataError(f"{where}: point {i} is {p!r}; coordinates must be finite numbers")
        out.append((x, y))
    return out


# -- scoring evaluated methods ---------------------------------------------------------------------


def pair_outcome(method_first: str, method_second: str) -> Outcome:
    """The method's outcome from its two verdicts (shown as ``a``, then as ``b``)."""
    return combine_orders(outcome(method_first, "a"), outcome(method_second, "b"))



def method_columns(outcomes: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """``outcomes[combination][side]`` as flat ``"combination/side"`` columns, aligned by instruction."""
    return {f"{c}/{s}": o for c, cols in outcomes.items() for s, o in cols.items()}


def score_method(outcomes: dict[str, dict[str, list[str]]], *, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Win rates of one method from ``outcomes[combination][side]`` (aligned by instruction).

    ``by_combination[c]["avg"]`` averages c's criteria, ``by_criterion[s]`` averages side s over the
    combinations that include it, and ``avg`` averages every (combination, criterion) column; each
    average is bootstrapped jointly over instructions (:func:`mean_win_rate_ci`).
    """
    kw = {"confidence": confidence, "resamples": resamples, "seed": seed}
    by_combination = {
        c: {"avg": asdict(mean_win_rate_ci(cols, **kw)), "criteria": {s: asdict(win_rate_ci(o, **kw))
                                                                     for s, o in cols.items()}}
        for c, cols in outcomes.items()
    }
    sides = list(dict.fromkeys(s for cols in outcomes.values() for s in cols))
    by_criterion = {
        s: asdict(mean_win_rate_ci({c: cols[s] for c, cols in outcomes.items() if s in cols}, **kw))
        for s in sides
    }
    every = method_columns(outcomes)
    counts = Counter(o for col in every.values() for o in col)
    return {"avg": asdict(mean_win_rate_ci(every, **kw)), "by_criterion": by_criterion,
            "by_combination": by_combination, "counts": {k: counts.get(k, 0) for k in ("win", "tie", "loss")}}


def paired_differences(outcomes: dict[str, dict[str, dict[str, list[str]]]], *, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """``[m][other]``: m's average win rate minus other's, paired on instructions, for every pair."""
    columns = {m: method_columns(by_combo) for m, by_combo in outcomes.items()}
    kw = {"confidence": confidence, "resamples": resamples, "seed": seed}
    return {m: {o: asdict(paired_difference_ci(columns[m], columns[o], **kw)) for o in outcomes if o != m}
            for m in outcomes}
