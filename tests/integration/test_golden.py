"""Every method's text on the embedded model, byte for byte as recorded (``scripts/record_golden.py``).

The recording was made before generation went through one entry point and one decode loop; each case is
regenerated here through the Python API (``personalign.generate`` on a model loaded once), and a few
through the ``generate`` command's recipe, and must give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import personalign
from personalign.generation import SamplingConfig

pytestmark = pytest.mark.integration

GOLDEN = json.loads((Path(__file__).parents[1] / "assets" / "golden_generations.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}
# Through the command's recipe too: one case of each kind of model the entry point builds.
VIA_RECIPE = ("prompt/sampled", "soup-dare/greedy", "mope-pcm/sampled")


@pytest.fixture(scope="module")
def embedded():
    return personalign.load_model()


@pytest.mark.parametrize("name", list(CASES))
def test_python_api_reproduces_the_recorded_text(embedded, name):
    case = CASES[name]
    model, tok = embedded
    options = {k: v for k, v in case["options"].items() if k not in ("method", "prefs") and v is not None}
    out = personalign.generate(model, tok, GOLDEN["instructions"], prefs=case["options"]["prefs"],
                               method=case["options"]["method"], sampling=SamplingConfig(**case["sampling"]),
                               batch_size=case["batch_size"], **options)
    assert out == case["responses"]


@pytest.mark.parametrize("name", VIA_RECIPE)
def test_generate_command_reproduces_the_recorded_text(name):
    from personalign.recipes import generate

    case = CASES[name]
    rows = generate.main(generate.GenerateConfig(instructions=tuple(GOLDEN["instructions"]),
                                                 batch_size=case["batch_size"], progress=False,
                                                 sampling=SamplingConfig(**case["sampling"]), **case["options"]))
    assert [r["response"] for r in rows] == case["responses"]


def test_the_recording_covers_every_method_and_rule():
    names = {n.split("/")[0] for n in CASES}
    assert {"vanilla", "prompt", "soup-psoups", "soup-exact", "soup-ties", "soup-dare", "soup-dare_ties",
            "mope-prob", "mope-logit", "mope-uniform", "mope-pcm"} <= names
    assert {n.split("/")[1] for n in CASES} == {"greedy", "sampled"}
    # The methods are told apart: composing experts changes the text.
    assert CASES["soup-psoups/greedy"]["responses"] != CASES["prompt/greedy"]["responses"]
    assert CASES["mope-pcm/greedy"]["responses"] != CASES["prompt/greedy"]["responses"]
