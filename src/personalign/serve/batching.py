"""The server's generation worker: one thread owns the models and runs waiting requests that share a
personalized model and settings as one batch (see :mod:`personalign.serve.app`).

Every request's model comes from the entry point (:func:`personalign.personalize.personalize`): the
base model for vanilla and prompt, and for expert, soup and mope a personalized copy, built in the worker
on first use and kept in a small least-recently-used cache (``max_models``).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from personalign.errors import PersonalignError
from personalign.generation import SamplingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from personalign.personalize import Personalization, PersonalizedModel

log = logging.getLogger("personalign.serve")


class ApiError(Exception):
    """A request the server refuses, rendered as an OpenAI error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(" ".join(message.split()))  # one line, whatever the source
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}

@dataclasses.dataclass(eq=False)
class _Job:
    """One request's generation: ``n`` choices for each input text, all with the same settings."""

    texts: list[str]
    n: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    seeded: bool
    chat: bool  # chat answers are stripped like generate's; raw completions are not
    spec: Personalization
    future: Future = dataclasses.field(default_factory=Future)
    prompt_tokens: int = 0

    @property
    def rows(self) -> int:
        return len(self.texts) * self.n

    def key(self) -> object:
        # A seeded job is keyed by itself: it never shares a batch, so its text never depends on others.
        if self.seeded:
            return self
        return (self.spec.key(), self.sampling, self.stop)


class _Batcher:
    """A queue served by one worker thread that runs compatible waiting jobs as one batch.

    It never waits to fill a batch: jobs arriving while a batch runs form the next one, so a lone
    request pays no extra latency. The oldest job is always in the next batch (no starvation).
    """

    def __init__(self, run: Callable[[list[_Job]], None], max_batch: int):
        self._run, self._max = run, max_batch
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = self.jobs = 0

    def submit(self, job: _Job) -> Future:
        with self._cond:
            if self._closed:
                raise ApiError("the server is shutting down", status=503)
            if self._thread is None:  # started on first use, so a TestClient without lifespan works
                self._thread = threading.Thread(target=self._loop, name="personalign-generate", daemon=True)
                self._thread.start()
            self._pending.append(job)
            self._cond.notify()
        return job.future

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            batch, rows, rest = [first], first.rows, deque()
            for job in self._pending:
                if job.key() == first.key() and rows + job.rows <= self._max:
                    batch.append(job)
                    rows += job.rows
                else:
                    rest.append(job)
            self._pending = rest
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches += 1
            self.jobs += len(live)
            try:
                self._run(live)
            except Exception as exc:  # a failed batch fails its requests, never the worker
                log.exception("generation failed")
                error = exc if isinstance(exc, PersonalignError) else ApiError(
                    f"generation failed: {type(exc).__name__}: {exc}", status=500)
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(error)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


class Models:
    """The personalized models the worker generates with: built on first use from the base model, the
    ones that change weights kept in a least-recently-used cache of ``max_models``. Worker thread only."""

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_models: int = 4):
        self.base, self.tokenizer, self.max_models = base, tokenizer, max_models
        self._cache: OrderedDict[object, PersonalizedModel] = OrderedDict()
        self.built = 0

    def get(self, spec: Personalization) -> PersonalizedModel:
        from personalign.personalize import personalize

        if not spec.method.changes_weights:  # the base itself: nothing to build or keep
            return personalize(self.base, self.tokenizer, spec)
        key = spec.key()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        while len(self._cache) >= self.max_models:
            self._cache.popitem(last=False)
        model = personalize(self.base, self.tokenizer, spec)
        self.built += 1
        self._cache[key] = model
        return model

    def __len__(self) -> int:
        return len(self._cache)


def generate_batch(models: Models, jobs: list[_Job]) -> None:
    """Run compatible jobs (one personalized model, one set of settings) as one batch and resolve their
    futures with ``(text, finish_reason, completion tokens)`` per choice."""
    tokenizer = models.tokenizer
    ctx = getattr(models.base.config, "max_position_embeddings", None)
    add_special = not getattr(tokenizer, "chat_template", None)
    ready: list[_Job] = []
    for job in jobs:  # tokenised here, in the worker: fast tokenizers are not safe across threads
        lengths = [len(ids) for ids in tokenizer(job.texts, add_special_tokens=add_special)["input_ids"]]
        job.prompt_tokens = sum(lengths)
        if ctx and max(lengths) + job.sampling.max_new_tokens > ctx:
            job.future.set_exception(ApiError(
                f"the prompt has {max(lengths)} tokens; with max_tokens {job.sampling.max_new_tokens} that "
                f"exceeds the model's context of {ctx} tokens; shorten the prompt or lower max_tokens",
                param="max_tokens"))
        else:
            ready.append(job)
    if not ready:
        return
    first = ready[0]
    model = models.get(first.spec)
    rows = [text for job in ready for text in job.texts for _ in range(job.n)]
    seed = first.sampling.seed if first.seeded else secrets.randbits(62)
    done = model.complete(rows, first.sampling, seed=seed, stop=first.stop)
    i = 0
    for job in ready:
        job.future.set_result([(c.text.strip() if job.chat else c.text, c.finish_reason, c.tokens)
                               for c in done[i: i + job.rows]])
        i += job.rows


def new_batcher(models: Models, max_batch: int) -> _Batcher:
    return _Batcher(lambda jobs: generate_batch(models, jobs), max_batch)

