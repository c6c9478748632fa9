"""The LLM judge: criterion-wise pairwise verdicts from any OpenAI-compatible endpoint.

The prompt follows the paper's criterion-wise comparison: the instruction, two responses labelled
Response A and Response B, the single criterion of one side (its ``criterion`` text, so users'
own dimensions work too), and a one-letter answer. Two deliberate departures from the reference
code: it asked about five pairs per call, we ask about one (exact parsing and caching per pair), and
**every pair is asked in both orders**; when the two answers disagree after un-flipping, the verdict
is a tie. That cancels the position bias of small judges instead of letting it decide.

Answers are parsed as the first standalone ``A`` or ``B``; anything else is logged, counted in
``stats.unparseable`` and counts as a tie for that order. Every answer is cached (JSONL, one line per
request, appended as it arrives), keyed by the model name, the full messages and the sampling
settings, so a rerun, or a run resumed after an interruption, never asks the same question twice.

Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter (honouring
``Retry-After``); any other 4xx raises :class:`JudgeAPIError` at once: retrying a malformed request
or a wrong key only wastes time. Needs the ``api`` extra: ``pip install 'personalign[api]'``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalign.errors import ConfigError, DataError, PersonalignError
from personalign.judges.base import PairwiseJudge, Verdict, flip_verdict
from personalign.preferences import PreferenceSpace, default_space

__all__ = ["JudgeAPIError", "JudgeStats", "LLMJudge", "judge_messages", "parse_answer"]

log = logging.getLogger("personalign.judges.llm")
_INSTALL_HINT = "the LLM judge needs the 'api' extra: pip install 'personalign[api]'"

SYSTEM_PROMPT = (
    "You are a careful and impartial evaluator. You compare two responses to the same instruction on "
    "exactly one criterion and answer with a single letter."
)
# The first A or B that stands alone ("A", "**B**", "Response A", "(B)."), not one inside a word.
_ANSWER = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])")


class JudgeAPIError(PersonalignError, RuntimeError):
    """The judge endpoint refused a request, or kept failing after every retry."""


class _Abandoned(Exception):
    """A question given up because another one in the same call failed for good."""


@dataclass
class JudgeStats:
    """Counters over this judge's lifetime."""

    requests: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0  # questions answered from the cache
    retries: int = 0  # requests repeated after a retryable failure
    unparseable: int = 0  # answers with no standalone A or B (each counted as a tie for its order)


def judge_messages(instruction: str, response_a: str, response_b: str, criterion: str) -> list[dict[str, str]]:
    """The chat messages asking which response better meets ``criterion``."""
    user = (
        "Compare the two responses to the instruction below on one criterion only.\n\n"
        f"### Instruction\n{instruction}\n\n"
        f"### Response A\n{response_a}\n\n"
        f"### Response B\n{response_b}\n\n"
        f"### Criterion\n{criterion}\n\n"
        "Judge only this criterion and ignore every other quality of the responses. "
        'Answer with one letter: "A" if Response A meets the criterion better, "B" if Response B does.'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_answer(text: str) -> Verdict | None:
    """``"a"`` or ``"b"`` from the first standalone A/B in the answer; ``None`` if there is none."""
    match = _ANSWER.search(text or "")
    return match.group(1).lower() if match else None  # type: ignore[return-value]


class _Cache:
    """Answers by question key, in a JSONL file appended to (and fsynced) as each answer arrives."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path is None:
            return
        from personalign.data import check_writable

        # A cache that cannot be appended to would lose the answers it was meant to keep: refuse it now.
        check_writable(self.path, "judge cache", error=ConfigError)
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a line torn by an interruption: that question is asked again
            data = data[: data.rfind(b"\n") + 1]
            with self.path.open("r+b") as fh:
                fh.truncate(len(data))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"judge cache {self.path} is not UTF-8 text (a binary file?); use another cache "
                            "path") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line)
                self._answers[row["key"]] = row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{self.path}:{lineno}: not a judge cache line; use another cache_path") from None

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._answers.get(key)

    def put(self, key: str, answer: str, model: str) -> None:
        with self._lock:
            self._answers[key] = answer
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "model": model, "answer": answer}, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


class LLMJudge(PairwiseJudge):
    """Pairwise judge behind an OpenAI-compatible chat endpoint (OpenAI, vLLM, ``personalign serve``).

    ``base_url`` includes the API prefix, e.g. ``http://127.0.0.1:8000/v1``. The key is read from the
    environment variable ``api_key_env``; local servers need none (a placeholder is sent).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        max_retries: int = 4,
        timeout: float = 60.0,
        cache_path: str | Path | None = None,
        temperature: float = 0.0,
        max_tokens: int = 4,
        backoff: float = 1.0,
        space: PreferenceSpace | None = None,
    ):
        try:
            import openai
        except ImportError:
            raise PersonalignError(_INSTALL_HINT) from None
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        if max_retries < 0:
            raise ConfigError(f"max_retries must be at least 0, got {max_retries}")
        if not timeout > 0 or backoff < 0:
            raise ConfigError(f"timeout must be positive and backoff not negative, got {timeout} and {backoff}")
        if not 0 <= temperature <= 2:
            raise ConfigError(f"temperature must be in [0, 2], got {temperature}")
        if max_tokens < 1:  # a few tokens, so "Response A" or "**A**" still fits
            raise ConfigError(f"max_tokens must be at least 1, got {max_tokens}")
        self.name = f"llm:{model}"
        self.base_url, self.model, self.api_key_env = base_url, model, api_key_env
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.temperature, self.max_tokens, self.timeout = temperature, max_tokens, timeout
        self.space = space or default_space()
        self.stats = JudgeStats()
        self._openai = openai
        # The client's own retries are off: ours count, back off with jitter and tell 4xx apart.
        self._client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                     timeout=timeout, max_retries=0)
        self._cache = _Cache(cache_path)
        self._slots = threading.BoundedSemaphore(concurrency)  # in flight, across all callers
        self._lock = threading.Lock()

    # -- the PairwiseJudge interface ----------------------------------------------------------------
    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        return self.judge_many([(prompt, a, b)], side)[0]

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        """Verdicts in input order; the uncached questions are asked concurrently."""
        criterion = self.space.sides[self.space.resolve(side)].criterion  # unknown side: fail before asking
        questions = [(judge_messages(p, a, b, criterion), judge_messages(p, b, a, criterion)) for p, a, b in items]
        keys = [(self._key(fwd), self._key(rev)) for fwd, rev in questions]
        answers: dict[str, str] = {}
        missing: dict[str, list[dict[str, str]]] = {}
        for pair_keys, pair in zip(keys, questions):
            for key, messages in zip(pair_keys, pair):
                cached = self._cache.get(key)
                if cached is not None:
                    answers[key] = cached
                    self._count("cache_hits")
                else:
                    missing.setdefault(key, messages)  # a question repeated in one call is asked once
        answers.update(self._ask_all(missing))
        verdicts: list[Verdict] = []
        for k_fwd, k_rev in keys:
            first = self._verdict(answers[k_fwd])
            second = flip_verdict(self._verdict(answers[k_rev]))  # A/B were swapped for this one
            verdicts.append(first if first == second else "tie")
        return verdicts

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LLMJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------
    def _key(self, messages: list[dict[str, str]]) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _count(self, field: str, by: int = 1) -> None:
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + by)

    def _verdict(self, answer: str) -> Verdict:
        parsed = parse_answer(answer)
        if parsed is None:
            self._count("unparseable")
            log.warning("judge %s gave no A/B answer (counted as a tie): %.80r", self.model, answer)
            return "tie"
        return parsed

    def _ask_all(self, questions: dict[str, list[dict[str, str]]]) -> dict[str, str]:
        if not questions:
            return {}
        stop = threading.Event()  # set on the first hard failure: the other questions stop retrying
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(questions)), thread_name_prefix="judge")
        try:
            futures = {key: pool.submit(self._ask, key, messages, stop) for key, messages in questions.items()}
            done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
            if any(isinstance(f.exception(), _Abandoned) for f in done):  # the failure that stopped them
                done, _ = wait(futures.values())  # is in another future; once stopped, all end at once
            errors = [f.exception() for f in done if f.exception() is not None]
            errors = [e for e in errors if not isinstance(e, _Abandoned)] or errors
            if errors:  # answers already received stay cached, so a rerun resumes from here
                raise errors[0]  # type: ignore[misc]
            return {key: future.result() for key, future in futures.items()}
        finally:  # on any early exit (an error, Ctrl-C) the questions still queued or backing off stop
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _ask(self, key: str, messages: list[dict[str, str]], stop: threading.Event) -> str:
        """One question, with retries; the answer is cached before it is returned. A hard failure stops
        the other questions before this worker takes the next one (not only once the caller sees it)."""
        try:
            return self._ask_with_retries(key, messages, stop)
        except JudgeAPIError:
            stop.set()
            raise

    def _ask_with_retries(self, key: str, messages: list[dict[str, str]], stop: threading.Event) -> str:
        openai = self._openai
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                with self._slots:
                    if stop.is_set():
                        raise _Abandoned
                    self._count("requests")
                    response = self._client.chat.completions.create(
                        model=self.model, messages=messages,  # type: ignore[arg-type]
                        temperature=self.temperature, max_tokens=self.max_tokens,
                    )
                answer = (response.choices[0].message.content or "") if response.choices else ""
                self._cache.put(key, answer, self.model)
                return answer
            except openai.APIStatusError as exc:
                if exc.status_code != 429 and exc.status_code < 500:
                    raise JudgeAPIError(self._rejected(exc)) from None
                error = f"HTTP {exc.status_code}: {_error_text(exc)}"
                retry_after = _retry_after(exc)
            except openai.APITimeoutError:
                error = f"timed out after {self.timeout} s"
            except openai.APIConnectionError as exc:
                error = f"connection failed ({_first_line(exc.__cause__ or exc)})"
            except openai.APIError as exc:  # e.g. a response that is not a chat completion
                raise JudgeAPIError(f"the judge endpoint {self.base_url} answered badly: {_first_line(exc)}") from None
            if stop.is_set():
                raise _Abandoned
            if attempt == self.max_retries:
                break
            self._count("retries")
            delay = min(30.0, self.backoff * 2**attempt) + random.uniform(0, self.backoff)
            stop.wait(min(60.0, max(delay, retry_after or 0.0)))  # backing off holds no slot
        raise JudgeAPIError(f"the judge endpoint {self.base_url} failed {self.max_retries + 1} times; last: {error}")

    def _rejected(self, exc: Any) -> str:
        hint = {401: f" (set {self.api_key_env} to the endpoint's API key)",
                404: f" (check the model name {self.model!r} and base_url {self.base_url!r})"}.get(exc.status_code, "")
        return f"the judge endpoint {self.base_url} rejected the request (HTTP {exc.status_code}): {_error_text(exc)}{hint}"


def _error_text(exc: Any) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return _first_line(body["message"])
    if isinstance(body, dict) and isinstance(body.get("detail"), str):  # plain FastAPI/Starlette errors
        return _first_line(body["detail"])
    return _first_line(body if body else exc.message)


def _retry_after(exc: Any) -> float | None:
    try:
        return float(exc.response.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def _first_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 300 else text[:297] + "..."
