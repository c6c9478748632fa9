"""The LLM judge through the openai client against the real embedded model served on loopback."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from personalign.judges.llm import LLMJudge
from personalign.models import EMBEDDED_DEFAULT, load_model
from personalign.serve import create_app, running_server

pytestmark = pytest.mark.integration

PAIRS = [
    ("What is the capital of France?", "Paris.",
     ("The capital of France is Paris, a city on the Seine that has been the seat of French government for "
      "centuries and is known for its museums, cafes and the Eiffel Tower.")),
    ("How do I boil an egg?",
     ("Put the egg in a pot of cold water, bring it to a boil, then simmer it for about nine minutes, cool it "
      "under cold water, and peel it once it is cool enough to handle comfortably."),
     "Boil it for nine minutes."),
    ("Name a primary colour.", "Red.", "Red is one of the three primary colours."),
]


@pytest.fixture(scope="module")
def served():
    """The embedded model behind personalign's server, as run_server would serve it, on a free port."""
    model, tok = load_model(EMBEDDED_DEFAULT, device="cpu", dtype="float32")
    app = create_app(model, tok, EMBEDDED_DEFAULT)
    calls = {"chat": 0}

    @app.middleware("http")
    async def count(request, call_next):
        if request.url.path == "/v1/chat/completions":
            calls["chat"] += 1
        return await call_next(request)

    with running_server(app) as url:
        yield f"{url}/v1", calls


def test_llm_judge_on_the_embedded_model(served, tmp_path):
    base_url, calls = served
    cache = tmp_path / "judge.jsonl"
    with LLMJudge(base_url, EMBEDDED_DEFAULT, cache_path=cache) as judge:
        start = time.perf_counter()
        verdicts = judge.judge_many(PAIRS, "P2A")
        elapsed = time.perf_counter() - start
    assert len(verdicts) == 3 and set(verdicts) <= {"a", "b", "tie"}
    assert calls["chat"] == 6 and judge.stats.requests == 6 and judge.stats.retries == 0  # both orders
    print(f"\n3 pairs (6 requests) in {elapsed:.2f} s; verdicts {verdicts}; unparseable {judge.stats.unparseable}")

    with LLMJudge(base_url, EMBEDDED_DEFAULT, cache_path=cache) as again:
        assert again.judge_many(PAIRS, "P2A") == verdicts
    assert calls["chat"] == 6 and again.stats.requests == 0 and again.stats.cache_hits == 6
