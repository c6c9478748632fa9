"""The server's generation worker: one thread owns the model and groups waiting requests with
identical settings into one ``model.generate`` call (see :mod:`personalign.serve.app`)."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from collections import deque
from concurrent.futures import Future
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from personalign.errors import PersonalignError
from personalign.generation import Method, SamplingConfig, batch_seed, eos_token_ids
from personalign.kernels import fast_decode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    chat: bool  # chat answers are stripped like generate_texts'; raw completions are not
    method: Method
    future: Future = dataclasses.field(default_factory=Future)
    prompt_tokens: int = 0

    @property
    def rows(self) -> int:
        return len(self.texts) * self.n

    def key(self) -> object:
        # A seeded job is keyed by itself: it never shares a batch, so its text never depends on others.
        if self.seeded:
            return self
        return (self.method, self.sampling, self.stop)


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


def _generate_batch(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", jobs: list[_Job]) -> None:
    """Run compatible jobs as one ``model.generate`` call and resolve their futures.

    Mirrors :func:`personalign.generation.generate_texts` (same tokenisation, eos ids, seeding and
    decoding kwargs, so a seeded request equals ``generate_texts`` on its text), but keeps the token
    ids, which the response needs for ``usage`` and ``finish_reason``.
    """
    import torch

    ctx = getattr(model.config, "max_position_embeddings", None)
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
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    kwargs = first.sampling.generate_kwargs()
    if first.stop:  # stop each row as soon as it ends with a stop string (cut from the text below)
        kwargs.update(stop_strings=list(first.stop), tokenizer=tokenizer)
    tokenizer.padding_side = "left"
    rows = [text for job in ready for text in job.texts for _ in range(job.n)]
    enc = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=add_special)
    enc = enc.to(next(model.parameters()).device)
    seed = first.sampling.seed if first.seeded else secrets.randbits(62)
    torch.manual_seed(batch_seed(seed, 0))
    with torch.inference_mode(), fast_decode(model):
        out = model.generate(**enc, eos_token_id=eos, pad_token_id=pad_id, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:].tolist()  # (rows, T_new)
    ends = set(eos) | {pad_id}
    i = 0
    for job in ready:
        choices = [_finish(tokenizer, ids, ends, job) for ids in new[i : i + job.rows]]
        i += job.rows
        job.future.set_result(choices)


def _finish(tokenizer: "PreTrainedTokenizerBase", ids: list[int], ends: set[int], job: _Job) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one generated row."""
    end = next((k for k, t in enumerate(ids) if t in ends), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    cuts = [text.find(s) for s in job.stop if s in text]
    if cuts:  # the stop string itself is not returned, as in OpenAI's API
        text, reason, count = text[: min(cuts)], "stop", end
    elif end < len(ids):
        reason, count = "stop", end + 1  # the end-of-sequence token was generated
    else:
        reason, count = "length", len(ids)
    return (text.strip() if job.chat else text), reason, count


# -- request parsing ----------------------------------------------------------------------------
