from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

from personalign.errors import PreferenceError
from personalign.judges import (
    SUPPORTED_SIDES,
    OfflineJudge,
    PairwiseJudge,
    UnsupportedSideError,
    flip_verdict,
    side_score,
)

PAIRS_FILE = Path(__file__).resolve().parents[1] / "assets" / "judge_pairs.jsonl"
MIN_ACCURACY = 0.9


def _load_pairs() -> dict[str, list[dict[str, str]]]:
    by_side: dict[str, list[dict[str, str]]] = defaultdict(list)
    with PAIRS_FILE.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                by_side[row["side"]].append(row)
    return dict(by_side)


PAIRS = _load_pairs()
ALL_PAIRS = [row for rows in PAIRS.values() for row in rows]


@pytest.fixture(scope="module")
def judge() -> OfflineJudge:
    return OfflineJudge()


def test_pair_set_covers_every_supported_side():
    assert set(PAIRS) == set(SUPPORTED_SIDES)
    for side, rows in PAIRS.items():
        assert len(rows) >= 18, side
        for row in rows:
            assert set(row) == {"side", "prompt", "intended", "other"}
            assert row["intended"].strip() and row["other"].strip() and row["intended"] != row["other"]


@pytest.mark.parametrize("side", SUPPORTED_SIDES)
def test_judge_picks_intended_in_both_orders(judge, side):
    rows = PAIRS[side]
    items_ab = [(r["prompt"], r["intended"], r["other"]) for r in rows]
    items_ba = [(r["prompt"], r["other"], r["intended"]) for r in rows]
    ab = judge.judge_many(items_ab, side)
    ba = judge.judge_many(items_ba, side)
    acc_ab = sum(v == "a" for v in ab) / len(rows)
    acc_ba = sum(v == "b" for v in ba) / len(rows)
    missed = [r["prompt"] for r, v in zip(rows, ab) if v != "a"]
    assert acc_ab >= MIN_ACCURACY, f"{side}: {acc_ab:.0%} with intended first; missed {missed}"
    assert acc_ba >= MIN_ACCURACY, f"{side}: {acc_ba:.0%} with intended second"


def test_swapping_responses_flips_the_verdict(judge):
    for row in ALL_PAIRS:
        forward = judge.judge(row["prompt"], row["intended"], row["other"], row["side"])
        backward = judge.judge(row["prompt"], row["other"], row["intended"], row["side"])
        assert backward == flip_verdict(forward), row["prompt"]


@pytest.mark.parametrize("side", SUPPORTED_SIDES)
def test_identical_responses_tie(judge, side):
    for row in PAIRS[side][:5] + [{"prompt": "Hi", "intended": ""}]:
        assert judge.judge(row["prompt"], row["intended"], row["intended"], side) == "tie"


def test_judge_many_matches_judge(judge):
    rows = PAIRS["P2B"]
    items = [(r["prompt"], r["other"], r["intended"]) for r in rows]
    assert judge.judge_many(items, "P2B") == [judge.judge(p, a, b, "P2B") for p, a, b in items]


def test_offline_judge_satisfies_the_protocol(judge):
    assert isinstance(judge, PairwiseJudge)
    assert judge.name == "offline"
    assert judge.supported_sides == SUPPORTED_SIDES


@pytest.mark.parametrize("side", ["P3C", "P3D", "sassy", "sarcastic"])
def test_unmeasurable_sides_raise(judge, side):
    with pytest.raises(UnsupportedSideError) as info:
        judge.judge("Why?", "Because.", "No idea.", side)
    message = str(info.value)
    assert info.value.side in ("P3C", "P3D") and info.value.side in message
    assert all(s in message for s in SUPPORTED_SIDES)
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedSideError):
        side_score(side, "Why?", "Because.")
    with pytest.raises(UnsupportedSideError):
        judge.judge_many([("Why?", "Because.", "No idea.")], side)
    with pytest.raises(UnsupportedSideError):
        OfflineJudge(margins={side: 0.1})


@pytest.mark.parametrize("side", ["P9Z", "P1C", "", "friendlyish"])
def test_unknown_sides_raise_a_clear_error(judge, side):
    with pytest.raises(PreferenceError, match="unknown side") as info:
        judge.judge("Why?", "Because.", "No idea.", side)
    assert not isinstance(info.value, UnsupportedSideError)
    assert isinstance(info.value, ValueError)
    assert repr(side) in str(info.value) and "P1A" in str(info.value)


def test_side_aliases_resolve_to_the_same_measure(judge):
    row = PAIRS["P1A"][0]
    expected = side_score("P1A", row["prompt"], row["intended"])
    for alias in ("1A", "p1a", "elementary", "Simple"):
        assert side_score(alias, row["prompt"], row["intended"]) == expected


@pytest.mark.parametrize("side", SUPPORTED_SIDES)
@pytest.mark.parametrize("empty", ["", "   \n\t", "...!?", "🙂🙂"])
def test_empty_responses_lose_to_any_real_reply_and_tie_each_other(judge, side, empty):
    row = PAIRS[side][0]
    for real in (row["intended"], row["other"], "Yes."):
        assert judge.judge(row["prompt"], real, empty, side) == "a"
        assert judge.judge(row["prompt"], empty, real, side) == "b"
    assert judge.judge(row["prompt"], empty, "", side) == "tie"
    assert math.isfinite(side_score(side, row["prompt"], empty))


ODD_RESPONSES = [
    "Yes.",
    "ok",
    "42",
    (
        "## Steps\n\n1. **Preheat** the oven to 200 °C.\n2. Mix the *dry* ingredients.\n"
        "- Bake for `25` minutes.\n"
    ),
    "```python\nfor i in range(3):\n    print(i)\n```\nThat prints 0, 1 and 2.",
    "Café, naïve, façade — ünïcödé « quotes » and 中文 text, plus emoji 🎉🔥 and a link [here](http://x.y).",
    "the the the the the " * 200,
    "A" * 5000,
    "no punctuation at all just words going on and on " * 40,
    "I'm sorry, but I can't help with that.",
    # Shapes seen in SmolLM2-135M samples: emoji runs and hashtags, one-line fragments, cut-off text.
    (
        "👦🌍Oh no way am I going to help you! 😠😥 #ComputerScienceCoding @Huddle Please! "
        "💬🎉📖🔴 👍💪❤️✨🙆‍♂‍♭👌##"
    ),
    (
        "My little buddy!\nSammy!\nYour big brother!\nAhhaha, wow, how can I help you?\n"
        "Awesome, right?!\nPizza!!"
    ),
    "1. **Decimalization**: This refers to converting units of me",
]


@pytest.mark.parametrize("side", SUPPORTED_SIDES)
def test_scores_are_finite_on_odd_inputs(side):
    for response in ODD_RESPONSES:
        assert math.isfinite(side_score(side, "Tell me something.", response)), response[:40]


def test_scores_are_deterministic(judge):
    for side in SUPPORTED_SIDES:
        row = PAIRS[side][1]
        first = [side_score(side, row["prompt"], r) for r in (row["intended"], row["other"], *ODD_RESPONSES)]
        second = [side_score(side, row["prompt"], r) for r in (row["intended"], row["other"], *ODD_RESPONSES)]
        assert first == second
        assert judge.score_response(side, row["prompt"], row["intended"]) == first[0]


def test_repetition_is_not_information():
    row = PAIRS["P2B"][0]
    once = row["intended"]
    thrice = " ".join([once] * 3)
    assert side_score("P2B", row["prompt"], thrice) <= side_score("P2B", row["prompt"], once)
    assert side_score("P2A", row["prompt"], thrice) < side_score("P2A", row["prompt"], once)


def test_concise_does_not_reward_empty_or_evasive_answers(judge):
    prompt = "What is the capital of France?"
    answer = "The capital of France is Paris."
    # Below 8 words length stops paying, so a bare word does not beat a complete short answer.
    assert judge.judge(prompt, answer, "Paris.", "P2A") in ("a", "tie")
    assert judge.judge(prompt, answer, "I'm not sure.", "P2A") == "a"
    assert judge.judge(prompt, answer, "", "P2A") == "a"


def test_margins_control_ties():
    row = PAIRS["P3A"][0]
    wide = OfflineJudge(margins={"P3A": 1e9})
    assert wide.judge(row["prompt"], row["intended"], row["other"], "P3A") == "tie"
    assert wide.margins["P1A"] == OfflineJudge().margins["P1A"]
    with pytest.raises(PreferenceError, match="margin"):
        OfflineJudge(margins={"P1A": -1.0})
    with pytest.raises(PreferenceError, match="margin"):
        OfflineJudge(margins={"P1A": float("nan")})


def test_judge_config_margins_reach_the_offline_judge():
    from personalign.errors import ConfigError
    from personalign.judges import JudgeConfig, build_judge

    row = PAIRS["P3A"][0]
    judge = build_judge(JudgeConfig(margins={"3A": 1e9}))
    assert judge.margins["P3A"] == 1e9 and judge.margins["P3B"] == OfflineJudge().margins["P3B"]
    assert judge.judge(row["prompt"], row["intended"], row["other"], "P3A") == "tie"
    with pytest.raises(ConfigError, match="offline and function judges only"):
        JudgeConfig(kind="llm", base_url="http://127.0.0.1:1/v1", model="m", margins={"P3A": 1.0})


def test_appended_preference_prompt_does_not_count_as_the_question():
    from personalign.preferences import default_space

    question = "What is the capital of France?"
    with_pref = f"{question} {default_space().sides['P2A'].prompt}"
    for response in ("The capital of France is Paris.", "Concise and to the point: Paris."):
        assert side_score("P2A", with_pref, response) == side_score("P2A", question, response)


def test_question_coverage_is_the_share_of_the_question_named():
    from personalign.judges.offline import question_coverage
    from personalign.preferences import BUILTIN_SIDES

    q = "Explain how green plants make sugar from sunlight."  # content: explain, green, plant, sugar, sunlight
    prompted = q + " " + BUILTIN_SIDES[2].prompt  # the appended preference prompt is not the question
    got = question_coverage([q, q, q, prompted, "How?"],
                            ["Plants use sunlight to make sugar.", "I love my dog!", "", "Green plants, sugar.",
                             "Yes."])
    # plant(s), sunlight, sugar of five; nothing; nothing; green, plant, sugar; a question with no content word
    assert got == pytest.approx([3 / 5, 0.0, 0.0, 3 / 5, 0.0])
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        question_coverage([q, q], ["x"])
