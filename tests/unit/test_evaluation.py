"""Win rates, bootstrap intervals and Pareto metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from personalign.errors import ConfigError, DataError
from personalign.evaluation import (
    combine_orders,
    hypervolume_2d,
    mean_difference_ci,
    mean_win_rate_ci,
    outcome,
    paired_difference_ci,
    pareto_front,
    win_rate,
    win_rate_ci,
)
from personalign.judges.base import flip_verdict

# ---------------------------------------------------------------- outcomes


@pytest.mark.parametrize(
    "verdict,shown_as,want",
    [("a", "a", "win"), ("b", "a", "loss"), ("tie", "a", "tie"), ("b", "b", "win"), ("a", "b", "loss")],
)
def test_outcome_from_verdict(verdict, shown_as, want):
    assert outcome(verdict, shown_as) == want


@pytest.mark.parametrize("verdict", ["a", "b", "tie"])
def test_position_consistent_judge_gives_same_outcome_in_both_orders(verdict):
    assert outcome(flip_verdict(verdict), "b") == outcome(verdict, "a")


def test_outcome_refusals():
    with pytest.raises(DataError, match="'A'"):
        outcome("A", "a")
    with pytest.raises(ConfigError, match="method_shown_as='first'"):
        outcome("a", "first")


@pytest.mark.parametrize(
    "first,second,want",
    [
        ("win", "win", "win"), ("loss", "loss", "loss"), ("tie", "tie", "tie"),
        ("win", "loss", "tie"), ("loss", "win", "tie"),
        ("win", "tie", "tie"), ("tie", "win", "tie"), ("loss", "tie", "tie"), ("tie", "loss", "tie"),
    ],
)
def test_combine_orders(first, second, want):
    assert combine_orders(first, second) == want


def test_combine_orders_refuses_raw_verdicts():
    with pytest.raises(DataError, match="convert it with outcome"):
        combine_orders("a", "win")


# ---------------------------------------------------------------- win rates


def test_win_rate_hand_computed():
    assert win_rate(["win", "loss", "tie", "win"]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert win_rate(["tie"] * 7) == 0.5
    assert win_rate(["loss", "loss"]) == 0.0


@pytest.mark.parametrize(
    "bad,words",
    [([], "no outcomes"), (["win", "b"], "convert it with outcome"), (["win", "draw"], "'draw'"),
     ("win", "give a list")],
)
def test_win_rate_refusals(bad, words):
    with pytest.raises(DataError, match=words):
        win_rate(bad)


def test_ci_degenerate_cases():
    ties = win_rate_ci(["tie"] * 10)
    assert (ties.value, ties.low, ties.high, ties.n, ties.confidence) == (0.5, 0.5, 0.5, 10, 0.95)
    one = win_rate_ci(["win"])
    assert (one.value, one.low, one.high) == (1.0, 1.0, 1.0)


def test_ci_two_instructions_hand_computed():
    # Resampled means of [1, 0] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the central 95% spans
    # both extremes, the central 40% (quantiles 0.3 and 0.7) only the middle value.
    wide = win_rate_ci(["win", "loss"], resamples=20000)
    assert (wide.value, wide.low, wide.high) == (0.5, 0.0, 1.0)
    narrow = win_rate_ci(["win", "loss"], confidence=0.4, resamples=20000)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_ci_is_seeded_and_contains_the_estimate():
    outcomes = ["win"] * 12 + ["loss"] * 5 + ["tie"] * 3
    a, b = win_rate_ci(outcomes, seed=3), win_rate_ci(outcomes, seed=3)
    assert a == b
    assert a.value == pytest.approx(13.5 / 20) and a.low < a.value < a.high
    wider = win_rate_ci(outcomes, confidence=0.99, seed=3)
    assert wider.low <= a.low and wider.high >= a.high


@pytest.mark.parametrize(
    "kwargs,words", [({"confidence": 1.0}, "confidence=1.0"), ({"resamples": 0}, "resamples=0")]
)
def test_ci_option_refusals(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        win_rate_ci(["win"], **kwargs)


def test_mean_win_rate_value_is_average_of_columns():
    table = {"P1A": ["win", "win", "tie"], "P2A": ["loss", "tie", "win"]}
    assert mean_win_rate_ci(table).value == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_mean_win_rate_resamples_instructions_jointly():
    # Every instruction is won on one criterion and lost on the other: the average is 0.5 in every
    # resample, though each column on its own is uncertain.
    table = {"P1A": ["win", "loss"] * 5, "P2A": ["loss", "win"] * 5}
    joint = mean_win_rate_ci(table)
    assert (joint.value, joint.low, joint.high, joint.n) == (0.5, 0.5, 0.5, 10)
    alone = win_rate_ci(table["P1A"])
    assert alone.high - alone.low > 0.3


def test_mean_win_rate_refusals():
    with pytest.raises(DataError, match="no columns"):
        mean_win_rate_ci({})
    with pytest.raises(DataError, match="different numbers of instructions"):
        mean_win_rate_ci({"P1A": ["win"], "P2A": ["win", "tie"]})
    with pytest.raises(DataError, match="column 'P2A' got no outcomes"):
        mean_win_rate_ci({"P1A": ["win"], "P2A": []})


def test_paired_difference_hand_computed():
    a = {"P1A": ["win", "win", "tie"], "P2A": ["loss", "tie", "win"]}
    b = {"P1A": ["tie", "win", "loss"], "P2A": ["loss", "loss", "win"]}
    # per instruction: a's row means 0.5, 0.75, 0.75; b's 0.25, 0.5, 0.5 -> differences 0.25 each
    d = paired_difference_ci(a, b)
    assert (d.value, d.low, d.high, d.n) == (0.25, 0.25, 0.25, 3)
    assert paired_difference_ci(b, a).value == -0.25


def test_paired_difference_is_narrower_than_separate_intervals():
    # The two methods share which instructions are easy: apart, each interval is wide; paired, every
    # instruction favours the first by 0.5 and the interval collapses onto that.
    easy_hard = ["win", "loss"] * 10
    a = {"P1A": easy_hard, "P2A": ["win", "tie"] * 10}
    b = {"P1A": easy_hard, "P2A": ["tie", "loss"] * 10}
    d = paired_difference_ci(a, b)
    assert (d.value, d.low, d.high) == (0.25, 0.25, 0.25)
    apart = mean_win_rate_ci(a)
    assert apart.high - apart.low > 0.2


def test_paired_difference_refusals():
    with pytest.raises(DataError, match=r"only one side has \['P2A'\]"):
        paired_difference_ci({"P1A": ["win"], "P2A": ["win"]}, {"P1A": ["win"]})
    with pytest.raises(DataError, match="different numbers of instructions"):
        paired_difference_ci({"P1A": ["win", "tie"]}, {"P1A": ["win"]})
    with pytest.raises(DataError, match="no columns"):
        paired_difference_ci({}, {})


def test_mean_difference_hand_computed():
    d = mean_difference_ci([0.5, 0.7, 0.9], [0.4, 0.6, 0.8])  # 0.1 on every instruction
    assert (round(d.value, 12), round(d.low, 12), round(d.high, 12), d.n) == (0.1, 0.1, 0.1, 3)
    spread = mean_difference_ci([1.0, 0.0] * 10, [0.5] * 20)  # +0.5 and -0.5: the mean 0, inside the interval
    assert spread.value == 0 and spread.low < 0 < spread.high
    assert mean_difference_ci([0.4, 0.6], [0.5, 0.7]).value == pytest.approx(-0.1)


def test_mean_difference_refusals():
    with pytest.raises(DataError, match="equal, non-empty lists"):
        mean_difference_ci([0.5, 0.6], [0.5])
    with pytest.raises(DataError, match="equal, non-empty lists"):
        mean_difference_ci([], [])
    with pytest.raises(DataError, match="not a finite number"):
        mean_difference_ci([0.5, float("nan")], [0.5, 0.5])


# ---------------------------------------------------------------- Pareto metrics


def test_pareto_front_hand_computed():
    points = [(1, 3), (2, 2), (3, 1), (1, 1), (2, 2), (0, 4), (3, 0.5), (1, 2)]
    # (1,1), (1,2) are dominated by (1,3)/(2,2); (3,0.5) by (3,1); both copies of (2,2) stay.
    assert pareto_front(points) == [5, 0, 1, 4, 2]
    assert pareto_front([(0.3, 0.3)]) == [0]


def test_hypervolume_hand_computed():
    staircase = [(1, 3), (2, 2), (3, 1)]
    assert hypervolume_2d(staircase, (0, 0)) == pytest.approx(3 + 2 + 1)
    assert hypervolume_2d(staircase + [(1, 1), (2.5, 0.5)], (0, 0)) == pytest.approx(6)
    assert hypervolume_2d([(2, 3)], (1, 1)) == pytest.approx(2)
    # (0.5, 5) is left of the reference and adds nothing; (3, 1) adds a 2 x 1 rectangle.
    assert hypervolume_2d([(3, 1), (0.5, 5)], (1, 0)) == pytest.approx(2)
    assert hypervolume_2d([(0, 0), (1, -1)], (1, 1)) == 0.0


def test_hypervolume_of_front_equals_hypervolume_of_all():
    points = [(0.2, 0.9), (0.5, 0.6), (0.4, 0.4), (0.8, 0.3), (0.8, 0.1), (0.6, 0.6)]
    front = [points[i] for i in pareto_front(points)]
    assert hypervolume_2d(front, (0, 0)) == pytest.approx(hypervolume_2d(points, (0, 0)))
    assert hypervolume_2d(points, (0, 0)) == pytest.approx(0.2 * 0.3 + 0.6 * 0.3 + 0.8 * 0.3)


@pytest.mark.parametrize(
    "points,reference,words",
    [
        ([], (0, 0), "no points"),
        ([(1, math.nan)], (0, 0), "finite"),
        ([(1, 2, 3)], (0, 0), "two numbers"),
        ([(1, 2)], (0, math.inf), "finite"),
    ],
)
def test_pareto_refusals(points, reference, words):
    with pytest.raises(DataError, match=words):
        hypervolume_2d(points, reference)
    if reference == (0, 0):
        with pytest.raises(DataError, match=words):
            pareto_front(points)
