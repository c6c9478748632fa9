from __future__ import annotations

import pytest

from personalign.errors import PreferenceError
from personalign.preferences import (
    BUILTIN_SIDES,
    PSOUPS_SIDES,
    PreferenceSpace,
    default_space,
    load_space,
    parse_preference,
)

PROMPTS = {
    "P1A": "Generate a response that can be easily understood by an elementary school student.",
    "P1B": "Generate a response that only a PhD Student in that specific field could understand.",
    "P2A": "Generate a response that is concise and to the point, without being verbose.",
    "P2B": "Generate a response that is very informative, without missing any background information.",
    "P3A": "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
    "P3B": "Generate a response in an unfriendly manner.",
    "P3C": "Generate a response in a sassy manner.",
    "P3D": "Generate a response in a sarcastic manner.",
}


def test_builtin_prompts_are_the_benchmark_wording():
    assert {s.id: s.prompt for s in BUILTIN_SIDES} == PROMPTS
    space = default_space()
    assert space.sides["P1A"].criterion == (
        "Choose a response that can easily be understandable by an elementary school student."
    )
    assert space.sides["P2B"].criterion == (
        "Choose a response that is very informative without missing any background information."
    )
    assert space.sides["P3A"].criterion == (
        "Choose a response that is friendly, witty, funny and humorous, like a close friend."
    )


@pytest.mark.parametrize("spec", ["1A,2A,3A", "P1A+P2A+P3A", "elementary,concise,friendly", "p1a p2a p3a",
                                  "3A,1A,2A", "friendly+simple+brief"])
def test_equivalent_hard_forms(spec):
    p = parse_preference(spec)
    assert p.hard
    assert p.sides == ("P1A", "P2A", "P3A")
    assert p.spec() == "P1A,P2A,P3A"
    assert p.describe() == "elementary+concise+friendly"


def test_combination_prompt_joins_in_dimension_order_with_single_spaces():
    p = parse_preference("3B,2B,1B")
    assert p.prompt() == " ".join([PROMPTS["P1B"], PROMPTS["P2B"], PROMPTS["P3B"]])


def test_weighted_form():
    p = parse_preference("concise=0.7,informative=0.3,friendly=1")
    assert not p.hard
    assert p.weight_dict() == {"P2A": 0.7, "P2B": 0.3, "P3A": 1.0}
    # The prompt carries the dominant side of each dimension.
    assert p.prompt_sides() == ("P2A", "P3A")
    assert p.prompt() == f"{PROMPTS['P2A']} {PROMPTS['P3A']}"
    assert p.normalized() == pytest.approx({"P2A": 0.35, "P2B": 0.15, "P3A": 0.5})
    assert parse_preference(p.spec()).weight_dict() == p.weight_dict()


def test_weighted_negative_and_default_weight():
    p = parse_preference("unfriendly=-0.5,expert")
    assert p.weight_dict() == {"P1B": 1.0, "P3B": -0.5}
    assert p.prompt_sides() == ("P1B",)  # a negative weight is not asked for in the prompt
    assert set(p.criteria()) == {"P1B"}


@pytest.mark.parametrize(("spec", "weights"), [
    ("concise=+1", {"P2A": 1.0}), ("concise=1e+2", {"P2A": 100.0}), ("concise=2E-1", {"P2A": 0.2}),
    ("concise = 0.7, friendly= 1", {"P2A": 0.7, "P3A": 1.0}), ("concise=-1+friendly", {"P2A": -1.0, "P3A": 1.0}),
    ("P1A=1+P2A=2", {"P1A": 1.0, "P2A": 2.0}),
])
def test_signed_and_spaced_weights(spec, weights):
    assert parse_preference(spec).weight_dict() == weights


def test_mapping_input():
    p = parse_preference({"concise": 0.5, "P3A": 2})
    assert p.weight_dict() == {"P2A": 0.5, "P3A": 2.0}


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("1A,2C", "unknown preference side '2C'"),
        ("clever", "valid sides: P1A (elementary)"),
        ("1A,1B", "both sides of 'expertise'"),
        ("concise=abc", "malformed weight 'concise=abc'"),
        ("concise=", "malformed weight"),
        ("concise=nan", "must be finite"),
        ("concise=inf", "must be finite"),
        ("", "empty preference"),
        ("   ", "empty preference"),
        ("1A,elementary", "appears twice"),
        ("concise=1_0", "malformed weight 'concise=1_0'"),
        ("=1", "malformed weight '=1': a side goes before '='"),
        (["1A", "2A"], "a preference is a string such as '1A,2A,3A' or a mapping of side -> weight, not list"),
        (5, "not int"),
    ],
)
def test_errors_name_the_problem(spec, fragment):
    with pytest.raises(PreferenceError) as err:
        parse_preference(spec)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_side_lists_valid_ones():
    with pytest.raises(PreferenceError) as err:
        parse_preference("4A")
    for sid in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B", "P3C", "P3D"):
        assert sid in str(err.value)


def test_all_zero_weights_cannot_be_normalized():
    with pytest.raises(PreferenceError, match="all weights zero"):
        parse_preference("concise=0")
    with pytest.raises(PreferenceError, match="all weights zero"):
        parse_preference({"concise": 0.0, "friendly": -0.0})


def test_eight_benchmark_combinations():
    combos = default_space().combinations()
    assert len(combos) == 8
    assert combos[0].spec() == "P1A,P2A,P3A"
    assert combos[-1].spec() == "P1B,P2B,P3B"
    assert all(set(c.sides) <= set(PSOUPS_SIDES) for c in combos)
    with_extra = default_space().combinations(sides=[*PSOUPS_SIDES, "P3C"])
    assert len(with_extra) == 12


USER_YAML = """
dimensions:
  - name: formality
    sides:
      - name: formal
        prompt: Generate a response in a formal register.
        criterion: Choose a response that is written in a formal register.
      - name: casual
        prompt: Generate a response in a casual register.
        criterion: Choose a response that is written in a casual register.
        aliases: [informal]
"""


def test_user_dimensions(tmp_path):
    f = tmp_path / "dims.yaml"
    f.write_text(USER_YAML)
    space = load_space(f)
    assert space.sides["P4A"].name == "formal"
    assert space.sides["P4B"].dimension == "formality"
    p = space.parse("1A,informal")
    assert p.sides == ("P1A", "P4B")
    assert p.prompt().endswith("Generate a response in a casual register.")
    assert len(space.combinations()) == 16
    # The default space is not modified.
    with pytest.raises(PreferenceError):
        default_space().parse("formal")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("dimensions: 3", "expected a mapping with one key 'dimensions'"),
        ("dimension: []", "expected a mapping"),
        ("dimensions:\n  - name: tone\n    sides: []", "at least two sides"),
        ("dimensions:\n  - name: tone\n    colour: red\n    sides: []", "unknown key(s) ['colour']"),
        ("dimensions:\n  - name: style\n    sides: []", "already exists"),
        (
            "dimensions:\n  - name: tone\n    sides:\n      - {name: warm, prompt: p}\n      - {name: cold, prompt: q, criterion: c}",
            "criterion is required",
        ),
        (
            "dimensions:\n  - name: tone\n    sides:\n      - {name: concise, prompt: p, criterion: c}\n      - {name: cold, prompt: q, criterion: c}",
            "side name 'concise' of P4A is already used by P2A; choose another name",
        ),
        (
            ("dimensions:\n  - name: tone\n    sides:\n      - {name: formal, aliases: [concise], prompt: p, criterion: c}\n"
             "      - {name: cold, prompt: q, criterion: c}"),
            "side alias 'concise' of P4A is already used by P2A; choose another alias",
        ),
        ("dimensions: [", "not valid YAML"),
    ],
)
def test_user_dimension_errors(tmp_path, text, fragment):
    f = tmp_path / "dims.yaml"
    f.write_text(text)
    with pytest.raises(PreferenceError) as err:
        load_space(f)
    assert fragment in str(err.value)


def test_missing_dimensions_file(tmp_path):
    with pytest.raises(PreferenceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_space_rejects_duplicate_ids():
    with pytest.raises(PreferenceError, match="defined twice"):
        PreferenceSpace([BUILTIN_SIDES[0], BUILTIN_SIDES[0]])
