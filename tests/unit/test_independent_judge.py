"""The independent evaluation judge: its contract, its validation on hand-written pairs, and that it
never labels training data."""

from __future__ import annotations

import pytest

from personalign.errors import ConfigError
from personalign.judges import JudgeConfig, OfflineJudge
from personalign.judges.base import UnsupportedSideError
from personalign.judges.independent import IndependentJudge, contrast_pairs, validate


@pytest.fixture(scope="module")
def judge() -> IndependentJudge:
    return IndependentJudge(device="cpu")


def test_contrast_pairs_cover_every_side_both_ways():
    pairs = contrast_pairs()
    by_side = {s: [p for p in pairs if p.side == s] for s in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")}
    assert {s: len(v) for s, v in by_side.items()} == {"P1A": 12, "P1B": 12, "P2A": 12, "P2B": 12,
                                                        "P3A": 36, "P3B": 36}
    # P1B's pairs are P1A's reversed: the validation checks both directions of each dimension.
    assert {(p.more, p.less) for p in by_side["P1B"]} == {(p.less, p.more) for p in by_side["P1A"]}


def test_validated_on_hand_written_pairs(judge):
    """At least 90% of the hand-written pairs right on every side, in both presentation orders."""
    checked = validate(judge)
    assert set(checked) == {"P1A", "P1B", "P2A", "P2B", "P3A", "P3B"}
    for side, v in checked.items():
        assert v["accuracy"] >= 0.9, (side, v)
        assert v["right"] + v["wrong"] + v["ties"] == v["judged"]


def test_validate_scores_a_judge_that_is_always_wrong_at_zero():
    class Contrary(OfflineJudge):
        def judge(self, prompt, a, b, side):  # noqa: ANN001, ANN201
            return "b" if super().judge(prompt, a, b, side) == "a" else "a"

    checked = validate(Contrary(margins={s: 0.0 for s in ("P2A",)}), sides=("P2A",))
    assert checked["P2A"]["accuracy"] == 0.0


def test_order_symmetric_and_consistent(judge):
    q = "How do plants make food?"
    short = "Plants make sugar from light."
    long = ("Plants make food by photosynthesis: chlorophyll in their leaves absorbs light, which splits water "
            "and powers the fixing of carbon dioxide from the air into glucose, releasing oxygen.")
    assert judge.judge(q, short, long, "P2A") == "a" and judge.judge(q, long, short, "P2A") == "b"
    assert judge.judge(q, long, short, "P2B") == "a" and judge.judge(q, short, long, "P2B") == "b"
    assert judge.judge(q, short, short, "P3A") == "tie"
    assert judge.judge_many([(q, short, long), (q, long, short)], "P2A") == ["a", "b"]


def test_families_that_disagree_give_a_tie(judge, monkeypatch):
    values = {("lexicon", "x"): 1.0, ("lexicon", "y"): 0.0, ("semantic", "x"): 0.0, ("semantic", "y"): 1.0}
    monkeypatch.setattr(judge, "signal", lambda family, side, text: values[(family, text)])
    assert judge.votes("P3A", "x", "y") == {"lexicon": "a", "semantic": "b"}
    assert judge.judge("q", "x", "y", "P3A") == "tie"
    values[("semantic", "y")] = 0.0  # one family votes, the other does not: the vote stands
    assert judge.judge("q", "x", "y", "P3A") == "a"


def test_empty_answer_is_below_any_reply(judge):
    assert judge.judge("q", "", "Sure, here it is.", "P2B") == "b"
    assert judge.judge("q", "🙂", "Sure, here it is.", "P1B") == "b"


def test_unmeasured_sides_are_refused(judge):
    with pytest.raises(UnsupportedSideError):
        judge.judge("q", "a", "b", "P3C")


def test_never_labels_training_data(tmp_path):
    from personalign.recipes.label import LabelConfig, main

    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text('{"prompt": "q", "response": "a", "side": "P1A"}\n')
    with pytest.raises(ConfigError, match="evaluation only"):
        main(LabelConfig(rollouts=str(rollouts), output=str(tmp_path / "p.jsonl"),
                         judges=(JudgeConfig(kind="independent"),)))


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "empath", None)  # import empath now raises ImportError
    with pytest.raises(ConfigError, match=r"the independent judge needs the 'independent' extra .*"
                                          r"pip install 'personalign\[independent\]'"):
        IndependentJudge(embedder=object())
