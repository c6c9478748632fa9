"""The LLM judge over real HTTP on 127.0.0.1, through the official openai client.

Scripted FastAPI apps give controlled answers (always "A", the shorter response, 503s, slow replies,
400s) and count requests and the most requests in flight at once; one test serves the tiny llama
with personalign's own server.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from personalign.errors import DataError, PreferenceError
from personalign.judges.base import PairwiseJudge
from personalign.judges.llm import JudgeAPIError, LLMJudge, judge_messages, parse_answer
from personalign.preferences import PreferenceSpace, Side, default_space
from personalign.serve import create_app, running_server

PAIRS = [
    ("Explain rain.", "Water falls.", "Rain is water that falls from clouds when droplets grow too heavy."),
    ("List painters.", "Monet, Turner, Kahlo, Hokusai and many more, each with a long story.", "Monet."),
    ("Define a budget.", "A plan for money.", "A budget is a plan that tracks income and spending each month."),
]
SECTIONS = re.compile(r"### Response A\n(.*)\n\n### Response B\n(.*)\n\n### Criterion", re.DOTALL)

# (call number, user prompt) -> (HTTP status, answer text or error message)
Script = Callable[[int, str], tuple[int, str]]


def scripted_app(script: Script, delay: Callable[[int], float] = lambda n: 0.0) -> tuple[FastAPI, SimpleNamespace]:
    """A chat-completions endpoint that answers by ``script`` and records what it was asked."""
    app = FastAPI()
    state = SimpleNamespace(calls=0, in_flight=0, max_in_flight=0, prompts=[], bodies=[])

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        state.calls += 1
        n, prompt = state.calls, body["messages"][-1]["content"]
        state.prompts.append(prompt)
        state.bodies.append(body)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            await asyncio.sleep(delay(n))
        finally:
            state.in_flight -= 1
        status, text = script(n, prompt)
        if status != 200:
            error = {"message": text, "type": "invalid_request_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=status, headers={"retry-after": "0"})
        return {"id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}]}

    return app, state


def always(answer: str) -> Script:
    return lambda n, prompt: (200, answer)


def shorter_wins(n: int, prompt: str) -> tuple[int, str]:
    a, b = SECTIONS.search(prompt).groups()
    return 200, "A" if len(a) < len(b) else "B"


def make_judge(url: str, **kw) -> LLMJudge:
    kw.setdefault("backoff", 0.01)
    return LLMJudge(f"{url}/v1", "judge-model", **kw)


def test_a_judge_that_always_says_a_ties_every_pair():
    app, state = scripted_app(always("A"))
    with running_server(app) as url, make_judge(url) as judge:
        assert isinstance(judge, PairwiseJudge)
        assert judge.judge_many(PAIRS, "P2A") == ["tie"] * 3
        assert state.calls == 6 and judge.stats.requests == 6
        # Both orders were asked: each response is once Response A and once Response B.
        shown = sorted(SECTIONS.search(p).groups() for p in state.prompts)
        assert shown == sorted([(a, b) for _, a, b in PAIRS] + [(b, a) for _, a, b in PAIRS])
        assert {b["temperature"] for b in state.bodies} == {0.0}


def test_a_consistent_judge_gives_consistent_verdicts_in_input_order():
    app, _ = scripted_app(shorter_wins)
    with running_server(app) as url, make_judge(url) as judge:
        assert judge.judge_many(PAIRS, "concise") == ["a", "b", "a"]
        assert judge.judge(*PAIRS[1], side="P2A") == "b"  # from the cache
        assert judge.stats.unparseable == 0


def test_the_prompt_states_the_sides_criterion_including_users_own_dimensions():
    app, state = scripted_app(always("B"))
    formal = Side("P4A", "formal", "formality", "Generate a formal response.",
                  "Choose a response that is written in a formal register.")
    space = PreferenceSpace([*default_space().sides.values(), formal])
    with running_server(app) as url, make_judge(url, space=space) as judge:
        judge.judge_many(PAIRS[:1], "formal")
        judge.judge_many(PAIRS[:1], "1B")
    assert all("### Criterion\nChoose a response that is written in a formal register.\n" in p for p in state.prompts[:2])
    assert default_space().sides["P1B"].criterion in state.prompts[2]
    assert state.prompts[0].startswith("Compare the two responses") and "### Instruction\nExplain rain." in state.prompts[0]


@pytest.mark.parametrize("status", [503, 429, 500])
def test_retryable_errors_are_retried(status):
    app, state = scripted_app(lambda n, p: (status, "busy") if n <= 2 else shorter_wins(n, p))
    with running_server(app) as url, make_judge(url, concurrency=1) as judge:
        assert judge.judge_many(PAIRS[:1], "P2A") == ["a"]
        assert state.calls == 4
        assert (judge.stats.requests, judge.stats.retries) == (4, 2)


def test_retries_give_up_with_one_clear_line():
    # Only the first order fails, so the retry count cannot depend on thread timing.
    app, state = scripted_app(lambda n, p: (503, "overloaded\ntry later") if "A\nWater falls." in p else (200, "A"))
    with (
        running_server(app) as url,
        make_judge(url, concurrency=1, max_retries=2) as judge,
        pytest.raises(JudgeAPIError) as info,
    ):
        judge.judge(*PAIRS[0], side="P2A")
    message = str(info.value)
    assert "\n" not in message and "failed 3 times; last: HTTP 503: overloaded try later" in message
    assert judge.stats.retries == 2 and 3 <= state.calls <= 4


@pytest.mark.parametrize(
    ("status", "hint"),
    [(400, "HTTP 400): messages are malformed"), (401, "(set OPENAI_API_KEY to the endpoint's API key)"),
     (404, "(check the model name 'judge-model'")],
)
def test_other_4xx_errors_raise_at_once(status, hint):
    app, state = scripted_app(lambda n, p: (status, "messages are malformed"))
    with running_server(app) as url, make_judge(url, concurrency=1, backoff=30.0) as judge:
        start = time.monotonic()
        with pytest.raises(JudgeAPIError, match=re.escape(hint)) as info:
            judge.judge_many(PAIRS, "P2A")
        assert time.monotonic() - start < 5  # a retry would have slept 30 s
    assert "\n" not in str(info.value) and "rejected the request" in str(info.value)
    assert judge.stats.retries == 0 and state.calls <= 2


def test_a_timeout_is_retried_and_a_persistent_one_is_reported():
    app, _ = scripted_app(shorter_wins, delay=lambda n: 0.8 if n == 1 else 0.0)
    with running_server(app) as url, make_judge(url, concurrency=1, timeout=0.3) as judge:
        assert judge.judge(*PAIRS[0], side="P2A") == "a"
        assert judge.stats.retries == 1 and judge.stats.requests == 3
    slow, _ = scripted_app(shorter_wins, delay=lambda n: 0.5)
    with (
        running_server(slow) as url,
        make_judge(url, concurrency=1, timeout=0.2, max_retries=1) as judge,
        pytest.raises(JudgeAPIError, match=r"failed 2 times; last: timed out after 0.2 s"),
    ):
        judge.judge(*PAIRS[0], side="P2A")


def test_the_cache_makes_a_rerun_free(tmp_path):
    app, state = scripted_app(shorter_wins)
    cache = tmp_path / "judge-cache.jsonl"
    with running_server(app) as url:
        with make_judge(url, cache_path=cache) as judge:
            first = judge.judge_many(PAIRS, "P2A")
        assert state.calls == 6 and len(cache.read_text().splitlines()) == 6
        with make_judge(url, cache_path=cache) as again:
            assert again.judge_many(PAIRS, "P2A") == first
            assert (again.stats.requests, again.stats.cache_hits) == (0, 6)
        assert state.calls == 6
        # Another criterion, temperature or model is another question.
        with make_judge(url, cache_path=cache, temperature=0.5) as other:
            other.judge_many(PAIRS[:1], "P2A")
            other.judge_many(PAIRS[:1], "P2B")
        assert state.calls == 6 + 4
        # A line torn by an interruption is dropped (that question is asked again); garbage elsewhere is refused.
        with cache.open("a") as fh:
            fh.write('{"key": "abc", "ans')
        with make_judge(url, cache_path=cache) as resumed:
            assert resumed.judge_many(PAIRS, "P2A") == first and resumed.stats.requests == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{}\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: not a judge cache line"):
        LLMJudge("http://127.0.0.1:9/v1", "m", cache_path=bad)


def test_the_concurrency_limit_is_respected():
    app, state = scripted_app(shorter_wins, delay=lambda n: 0.15)
    pairs = [(f"Question {i}?", "short", "a much longer answer " * (i + 1)) for i in range(5)]
    with running_server(app) as url, make_judge(url, concurrency=2) as judge:
        assert judge.judge_many(pairs, "P2A") == ["a"] * 5
    assert state.calls == 10 and state.max_in_flight == 2


def test_unparseable_answers_count_as_ties(caplog):
    answers = {1: "I cannot decide.", 2: "A"}
    app, _ = scripted_app(lambda n, p: (200, answers.get(n, "B")))
    with running_server(app) as url, make_judge(url, concurrency=1) as judge:
        with caplog.at_level("WARNING", logger="personalign.judges.llm"):
            assert judge.judge_many(PAIRS[:1], "P2A") == ["tie"]
        assert judge.stats.unparseable == 1
        assert "no A/B answer" in caplog.text and "I cannot decide." in caplog.text


@pytest.mark.parametrize(
    ("text", "verdict"),
    [("A", "a"), (" B\n", "b"), ("**A**", "a"), ("Response B.", "b"), ("(A) is better", "a"), ("The answer: B", "b"),
     ("AB", None), ("a", None), ("", None), ("Both are fine.", None), ("BA", None)],
)
def test_parse_answer(text, verdict):
    assert parse_answer(text) == verdict


def test_bad_sides_and_settings_fail_before_any_request():
    app, state = scripted_app(always("A"))
    with running_server(app) as url, make_judge(url) as judge:
        with pytest.raises(PreferenceError, match="unknown preference side 'P9Z'"):
            judge.judge_many(PAIRS, "P9Z")
        assert judge.judge_many([], "P2A") == []
    assert state.calls == 0
    with pytest.raises(Exception, match="concurrency must be at least 1"):
        LLMJudge("http://127.0.0.1:9/v1", "m", concurrency=0)


def test_judge_messages_label_the_responses():
    system, user = judge_messages("Q?", "first", "second", "Choose a response that is concise.")
    assert system["role"] == "system" and user["role"] == "user"
    assert SECTIONS.search(user["content"]).groups() == ("first", "second")
    assert 'Answer with one letter: "A"' in user["content"]


def test_against_personalign_server_on_the_tiny_model(tiny, tmp_path):
    model, tok = tiny
    app = create_app(model, tok, "tiny")
    with running_server(app) as url, LLMJudge(f"{url}/v1", "tiny", cache_path=tmp_path / "c.jsonl") as judge:
        verdicts = judge.judge_many(PAIRS, "P2A")
        assert set(verdicts) <= {"a", "b", "tie"} and len(verdicts) == 3
        assert judge.stats.requests == 6
        rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
        assert len({r["key"] for r in rows}) == 6 and {r["model"] for r in rows} == {"tiny"}
