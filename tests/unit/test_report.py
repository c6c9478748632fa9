"""Text metrics on hand-written strings, and the markdown/PNG report of a hand-made results layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from personalign import report

PNG = b"\x89PNG\r\n\x1a\n"


def test_words_drop_punctuation_and_keep_apostrophes():
    assert report.words("Hello, world! It's  FINE... 42") == ["hello", "world", "it's", "fine", "42"]
    assert report.words("") == [] and report.words("!!! :-)") == []


def test_distinct_n_is_pooled_over_responses():
    texts = ["a b a b", "a c"]
    assert report.distinct_n(texts, 1) == pytest.approx(3 / 6)  # a b c over 6 words
    assert report.distinct_n(texts, 2) == pytest.approx(3 / 4)  # ab ba ab | ac
    assert report.distinct_n(["one"], 2) is None  # no bigram at all
    with pytest.raises(ValueError):
        report.distinct_n(texts, 0)


def test_distinct_n_by_groups_averages_per_group():
    # Pooled, the same two answers repeated score lower than once; per group they score the same.
    once = report.text_metrics(["a b", "c d"], groups=[["a b", "c d"]])
    twice = report.text_metrics(["a b", "c d"] * 2, groups=[["a b", "c d"], ["a b", "c d"]])
    assert once["distinct_1"] == twice["distinct_1"] == pytest.approx(1.0)
    assert report.text_metrics(["a b", "c d"] * 2)["distinct_1"] == pytest.approx(0.5)
    mixed = report.text_metrics(["a a", "b c"], groups=[["a a"], ["b c"]])
    assert mixed["distinct_1"] == pytest.approx((0.5 + 1.0) / 2)
    assert mixed["mean_words"] == pytest.approx(2.0)  # the other metrics stay pooled
    with pytest.raises(ValueError, match="groups hold 1 texts"):
        report.text_metrics(["a", "b"], groups=[["a"]])


def test_fluency_per_text_scores_each_answer_alone():
    per = report.fluency_per_text(["a b c a b c", "x y z w", "one", ""])
    assert per["distinct_2"].tolist() == pytest.approx([3 / 5, 1.0, 0.0, 0.0])  # ab bc ca ab bc | xy yz zw
    assert per["repetition_3"].tolist() == pytest.approx([1 / 4, 0.0, 0.0, 0.0])  # abc bca cab ABC
    # one looping answer among fluent ones: pooled distinct-2 barely moves, its own score falls
    loop = "go on " * 20
    fluent = [" ".join(f"w{i}x{j}" for j in range(20)) for i in range(9)]
    assert report.distinct_n([loop, *fluent], 2) > 0.8
    per = report.fluency_per_text([loop, *fluent])
    assert per["distinct_2"][0] < 0.1 and per["repetition_3"][0] > 0.9


def test_repetition_rate_counts_repeats_within_a_response_only():
    assert report.repetition_rate(["a b c a b c", "x y z"]) == pytest.approx(1 / 5)  # abc bca cab ABC | xyz
    assert report.repetition_rate(["a b c", "a b c"]) == 0.0  # the same answer twice is not a loop
    assert report.repetition_rate(["go go go go go"]) == pytest.approx(2 / 3)
    assert report.repetition_rate(["too short"]) is None
    # per text, for the RL score's repetition term: a text without a 3-gram repeats nothing
    assert report.repeated_trigram_shares(["a b c a b c", "too short", "go go go go go"]) == \
        pytest.approx([1 / 4, 0.0, 2 / 3])


def test_length_and_empty_share():
    m = report.text_metrics(["one two", "", "three"])
    assert m["responses"] == 3 and m["mean_words"] == pytest.approx(1.0)
    assert m["empty_share"] == pytest.approx(1 / 3)
    assert report.mean_length([]) is None
    assert report.text_metrics([])["empty_share"] is None


def test_cut_to_lengths_cuts_each_reference_to_its_responses_word_count():
    refs = ["one two three four", "a b c", "keep all of it"]
    assert report.cut_to_lengths(refs, ["x y", "", "p q r s t u"]) == ["one two", "a", "keep all of it"]
    with pytest.raises(ValueError, match="2 references for 1 responses"):
        report.cut_to_lengths(refs[:2], ["x"])


def test_cosine_similarities_rowwise_with_zero_rows():
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    y = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    assert report.cosine_similarities(x, y) == pytest.approx([1.0, -1.0, 0.0])
    with pytest.raises(ValueError):
        report.cosine_similarities(x, y[:2])



def test_ontopic_similarities_per_pair_and_their_mean():
    vecs = {"q1": [1.0, 0.0], "on": [2.0, 0.0], "q2": [0.0, 1.0], "off": [1.0, 0.0]}

    class Embedder:  # a fixed vector per text: the question and the answer on topic point the same way
        def encode(self, texts, **kw):
            return np.asarray([vecs[t] for t in texts])

    sims = report.ontopic_similarities(["q1", "q2"], ["on", "off"], Embedder())
    assert sims == pytest.approx([1.0, 0.0])
    assert report.ontopic_similarity(["q1", "q2"], ["on", "off"], Embedder()) == pytest.approx(0.5)


def _wr(v, lo, hi, n=4):
    return {"value": v, "low": lo, "high": hi, "n": n, "confidence": 0.95}


def _results():
    combos, criteria = ["P1A+P2A+P3A", "P1B+P2A+P3A"], ["P1A", "P1B", "P2A", "P3A"]

    def method(v):
        return {
            "avg": _wr(v, v - 0.1, v + 0.1),
            "by_criterion": {s: _wr(v, v - 0.2, v + 0.2) for s in criteria},
            "by_combination": {c: {"avg": _wr(v, 0, 1), "criteria": {}} for c in combos},
            "counts": {"win": 3, "tie": 2, "loss": 1},
        }

    text = {"distinct_1": 0.5, "distinct_2": 0.75, "repetition_3": 0.1, "mean_words": 12.0,
            "empty_share": 0.0, "emoji": 0.25, "exclamations": 1.5, "stock_phrases": 0.5, "ontopic": None,
            "responses": 8}
    return {
        "reference": "prompt", "judge": "offline", "instructions": 4, "confidence": 0.95,
        "combinations": combos, "criteria": criteria, "methods": ["soup-psoups", "vanilla"],
        "skipped": {"mope-logit": "no expert for side(s) P1B"},
        "notes": ["on-topic similarity not measured: x"],
        "win_rates": {"soup-psoups": method(0.625), "vanilla": method(0.25)},
        "text": {"prompt": text, "soup-psoups": text, "vanilla": text},
    }


def test_markdown_has_the_papers_layout():
    md = report.markdown_report(_results())
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| method | P1A+P2A+P3A"))
    assert header == "| method | P1A+P2A+P3A | P1B+P2A+P3A | avg [95% CI] |"
    assert "| soup-psoups | 62.5 | 62.5 | 62.5 [52.5, 72.5] |" in lines
    assert "| vanilla | 25.0 | 25.0 | 25.0 [15.0, 35.0] |" in lines
    assert "| method | P1A | P1B | P2A | P3A | avg |" in lines
    assert "| soup-psoups | 3 | 2 | 1 |" in lines
    text_rows = [line for line in lines if line.startswith("| prompt (reference)")]
    assert text_rows == ["| prompt (reference) | 0.500 | 0.750 | 0.100 | 12.0 | 0.00 | 0.25 | 1.50 | 0.50 | – |"]
    assert "skipped `mope-logit`: no expert for side(s) P1B" in md
    assert "judged in both orders" in md
    assert "Paired differences" not in md  # no paired results: no section


def test_markdown_paired_differences_against_the_listed_methods():
    results = _results()
    results["paired"] = {"soup-psoups": {"vanilla": _wr(0.375, 0.25, 0.5)},
                         "vanilla": {"soup-psoups": _wr(-0.0004, -0.5, 0.25)}}
    results["paired_against"] = ["soup-psoups", "mope-pcm"]  # one not evaluated: no column
    lines = report.markdown_report(results).splitlines()
    assert "| method | − soup-psoups [95% CI] |" in lines
    assert "| vanilla | +0.0 [-50.0, +25.0] |" in lines
    assert "| soup-psoups | – |" in lines


def test_write_report_writes_json_markdown_and_pngs(tmp_path):
    files = report.write_report(tmp_path / "out", _results())
    assert json.loads((tmp_path / "out" / "results.json").read_text())["reference"] == "prompt"
    assert (tmp_path / "out" / "results.md").read_text().startswith("# Evaluation")
    for key in ("plot_criterion", "plot_combination"):
        with open(files[key], "rb") as fh:
            assert fh.read(8) == PNG
    with pytest.raises(ValueError):
        report.plot_win_rates(_results(), tmp_path / "x.png", by="side")


def test_pareto_report(tmp_path):
    result = {
        "sides": ["P2A", "P2B"], "names": ["concise", "informative"], "fixed": [], "instructions": 2,
        "margin": 0.1, "reference_point": [-6.0, 1.0],
        "methods": {"soup-psoups": {"points": [{"weight": 0.0, "x": -5.0, "y": 3.0, "n": 2},
                                               {"weight": 1.0, "x": -3.0, "y": 2.0, "n": 2}],
                                    "front": [0, 1], "hypervolume": 5.0}},
    }
    files = report.write_pareto_report(tmp_path, result)
    md = (tmp_path / "pareto.md").read_text()
    assert "| soup-psoups | 5.0000 | 2 |" in md and "| 0 | -5.000 | 3.000 | yes |" in md
    with open(files["plot"], "rb") as fh:
        assert fh.read(8) == PNG


def test_filler_markers_count_emoji_exclamations_and_stock_phrases_per_response():
    texts = ["I\u2019m thrilled to help! \U0001F60A\U0001F680 Absolutely!", "Rain is water.", ""]
    assert report.filler_markers(texts) == {"emoji": 2 / 3, "exclamations": 2 / 3, "stock_phrases": 2 / 3}
    assert report.filler_markers([]) == {"emoji": None, "exclamations": None, "stock_phrases": None}
    assert report.text_metrics(["Wow! Great question!"])["stock_phrases"] == 2.0
