"""What the server's engine (:mod:`personalign.serve.engine`) shares with the app: the error a request
gets, and the bounded cache of merged personalized models.

Soups whose rule is not linear in the weights (psoups, ties, dare) and seeded requests run on a
personalized model from the entry point (:func:`personalign.personalize.personalize`): the base model
for vanilla and prompt, a merged copy otherwise, built in the worker on first use and kept in a
least-recently-used cache bounded by count (``max_models``) and by memory (``max_memory_mb``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

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


class Models:
    """The personalized models fixed batches generate with: built on first use from the base model, the
    ones that change weights kept in a least-recently-used cache of at most ``max_models`` models and
    ``max_memory_mb`` MiB of weights (at least one is kept, whatever its size). Worker thread only."""

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_models: int = 4,
                 max_memory_mb: float | None = None):
        self.base, self.tokenizer, self.max_models = base, tokenizer, max_models
        self.max_bytes = None if max_memory_mb is None else int(max_memory_mb * 2**20)
        self._cache: OrderedDict[object, PersonalizedModel] = OrderedDict()
        self.built = self.hits = 0
        self._bytes = sum(p.numel() * p.element_size() for p in base.parameters())  # a merged copy's size

    def _full(self) -> bool:
        if len(self._cache) >= self.max_models:
            return True
        return self.max_bytes is not None and (len(self._cache) + 1) * self._bytes > self.max_bytes

    def get(self, spec: Personalization) -> PersonalizedModel:
        from personalign.personalize import personalize

        if not spec.method.changes_weights:  # the base itself: nothing to build or keep
            return personalize(self.base, self.tokenizer, spec)
        key = spec.key()
        if key in self._cache:
            self._cache.move_to_end(key)
            self.hits += 1
            return self._cache[key]
        while self._cache and self._full():
            self._cache.popitem(last=False)
        model = personalize(self.base, self.tokenizer, spec)
        self.built += 1
        self._cache[key] = model
        return model

    @property
    def memory_mb(self) -> float:
        return len(self._cache) * self._bytes / 2**20

    def __len__(self) -> int:
        return len(self._cache)
