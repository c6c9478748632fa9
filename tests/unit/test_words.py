"""Preferences in words: descriptions map to the intended side per dimension (measured on the labelled
descriptions in tests/assets), negations flip a cue to the other side, what no side covers stays a prompt,
a user's own dimension is read from its declaration, and text naming nothing is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from personalign.errors import PreferenceError
from personalign.preferences import default_space
from personalign.words import read_preference

ASSET = Path(__file__).parents[1] / "assets" / "prefs_in_words.jsonl"


def test_at_least_85_percent_of_dimensions_right_on_the_labelled_descriptions():
    rows = [json.loads(line) for line in ASSET.read_text().splitlines() if line.strip()]
    assert len(rows) >= 40
    space = default_space()
    right = total = 0
    for row in rows:
        got = read_preference(row["text"]).weights
        for dim in ("expertise", "informativeness", "style"):
            side = next((s for s in space.dimensions[dim].sides if s in got), None)
            right += side == row[dim]
            total += 1
    assert right / total >= 0.85, right / total


@pytest.mark.parametrize(("text", "want"), [
    ("no jokes", {"P3B": 1.0}),
    ("no jargon", {"P1A": 1.0}),
    ("not too long", {"P2A": 1.0}),
    ("without the basics", {"P1B": 1.0}),
    ("funny", {"P3A": 1.0}),
])
def test_negation_flips_to_the_other_side(text, want):
    assert read_preference(text).weights == want


def test_the_uncovered_rest_is_kept_and_evidence_is_shown():
    read = read_preference("I'm a surgeon between operations: short, technical, no jokes. Cite a source.")
    assert read.weights == {"P1B": 1.0, "P2A": 1.0, "P3B": 1.0}
    assert read.rest == "cite a source" and "no jokes" in read.evidence["P3B"]
    assert read.spec() == "P1B=1,P2A=1,P3B=1"


def test_a_users_own_dimension_is_read_from_its_declaration(tmp_path):
    dims = tmp_path / "dims.yaml"
    dims.write_text("dimensions:\n  - name: structure\n    sides:\n"
                    "      - {name: bulleted, prompt: Generate a response as a bulleted list., criterion: c}\n"
                    "      - {name: prose, prompt: Generate a response in flowing prose paragraphs., criterion: c}\n")
    space = default_space().extended_from_yaml(dims)
    read = read_preference("short answers as a bulleted list please", space)
    side = space.resolve("bulleted")
    assert read.weights == {"P2A": 1.0, side: 1.0}
    assert read_preference("in prose paragraphs", space).weights == {space.resolve("prose"): 1.0}


@pytest.mark.parametrize("text", ["", "   ", "the weather in Paris"])
def test_text_that_maps_to_nothing_is_refused(text):
    with pytest.raises(PreferenceError, match="describe|names no side"):
        read_preference(text)
