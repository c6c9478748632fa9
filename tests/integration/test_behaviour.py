"""Behaviour on the embedded model: for prompting, the soup and MoPE, each preference is visibly followed.

Each dimension is flipped with the other two held fixed, on the same held-out instructions, greedy, and
measured by signals outside the offline judge that labelled the experts' training data (words; the
readability package's reading grade; the independent judge's warmth signals). A method that ignored the
preference would answer both sides alike and fail every margin here.
"""

from __future__ import annotations

import statistics

import pytest

from personalign.data import load_builtin
from personalign.generation import SamplingConfig
from personalign.models import EMBEDDED_DEFAULT, load_model
from personalign.personalize import MethodOptions, personalize, resolve

pytestmark = pytest.mark.integration

QUESTIONS = 6
SAMPLING = SamplingConfig(max_new_tokens=80, temperature=0.0, repetition_penalty=1.1)
# soup-exact: the exact soup at the strength measured for the shipped experts (their strength.json: 3)
METHODS = {"prompt": MethodOptions(method="prompt"), "soup": MethodOptions(method="soup"),
           "soup-exact": MethodOptions(method="soup", merge="exact"), "mope": MethodOptions(method="mope", pcm="shipped")}
# (dimension, the side expected to score lower, the side expected to score higher, the other two sides).
# The sides held fixed are where the evaluation's own answers (runs/eval-psoups-all, 40 instructions)
# show each dimension most plainly for prompting: with a friendly prompt the 135M model barely moves
# its reading level when prompted (grade 4.2 -> 5.1 beside informative, 3.8 -> 5.2 beside concise),
# beside informative and unfriendly it does (4.7 -> 7.7); warmth moves most beside elementary and
# concise. The test asks whether each method follows the preference, not where prompting is weakest.
FLIPS = {"informativeness": ("P2A", "P2B", "P1A,P3A"), "expertise": ("P1A", "P1B", "P2B,P3B"),
         "style": ("P3B", "P3A", "P1A,P2A")}


@pytest.fixture(scope="module")
def model():
    return load_model(EMBEDDED_DEFAULT)


@pytest.fixture(scope="module")
def judge():
    from personalign.judges.independent import IndependentJudge

    return IndependentJudge(device="cpu")


@pytest.fixture(scope="module")
def questions():
    return [item.prompt for item in load_builtin("eval")[:QUESTIONS]]


def answers(model, method: str, prefs: str, questions: list[str]) -> list[str]:
    spec = resolve(prefs, METHODS[method], model=EMBEDDED_DEFAULT)
    return personalize(*model, spec).generate(questions, SAMPLING, batch_size=len(questions))


def flipped(model, method: str, dimension: str, questions: list[str]) -> tuple[list[str], list[str]]:
    low, high, rest = FLIPS[dimension]
    return (answers(model, method, f"{low},{rest}", questions), answers(model, method, f"{high},{rest}", questions))


@pytest.mark.parametrize("method", list(METHODS))
def test_concise_answers_are_shorter(model, questions, method):
    concise, informative = flipped(model, method, "informativeness", questions)
    short = statistics.mean(len(a.split()) for a in concise)
    long = statistics.mean(len(a.split()) for a in informative)
    assert long >= 1.3 * short, (method, short, long, concise, informative)


@pytest.mark.parametrize("method", list(METHODS))
def test_elementary_answers_read_at_a_lower_grade(model, questions, method):
    from personalign.judges.independent import _reading_grade

    elementary, expert = flipped(model, method, "expertise", questions)
    low = statistics.mean(_reading_grade(a) for a in elementary)
    high = statistics.mean(_reading_grade(a) for a in expert)
    assert high >= low + 1.0, (method, low, high, elementary, expert)


@pytest.fixture(scope="module")
def style_questions():
    # Twice as many for style: beside elementary and concise the elementary expert's own register is warm,
    # so the composed answers of both style sides are; on the 143 evaluation instructions the strength-3
    # exact soup's friendly answer is the warmer one for 123 of 143 (prompting: 101), while on the first
    # six greedy answers alone it was not.
    return [item.prompt for item in load_builtin("eval")[: 2 * QUESTIONS]]


@pytest.mark.parametrize("method", list(METHODS))
def test_friendly_answers_are_warmer(model, judge, style_questions, method):
    questions = style_questions
    unfriendly, friendly = flipped(model, method, "style", questions)

    def warmth(text: str) -> float:  # both of the independent judge's families, on the friendly side
        return judge.signal("semantic", "P3A", text) + judge.signal("lexicon", "P3A", text)

    cold = statistics.mean(warmth(a) for a in unfriendly)
    warm = statistics.mean(warmth(a) for a in friendly)
    assert warm >= cold + 0.03, (method, cold, warm, unfriendly, friendly)
    ahead = sum(warmth(f) > warmth(u) for f, u in zip(friendly, unfriendly))
    assert ahead >= len(questions) // 2, (method, ahead)  # at least half; an ignored preference gives 0
