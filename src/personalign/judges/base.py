"""The pairwise judge interface, shared by the offline, LLM and human-label judges.

A judge compares two responses ``a`` and ``b`` to one prompt on *one* side's criterion (P1A
elementary, P2A concise, P3B unfriendly, ...) and answers ``"a"``, ``"b"`` or ``"tie"``. Ties are a
first-class answer: the reference code crashed on them (docs/methods.md, section 5).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol, runtime_checkable

from personalign.errors import DataError, PreferenceError

__all__ = ["PairwiseJudge", "RoutedJudge", "UnsupportedSideError", "Verdict", "flip_verdict"]

Verdict = Literal["a", "b", "tie"]


class UnsupportedSideError(PreferenceError):
    """A valid side that this judge cannot measure (e.g. sarcasm for the offline judge).

    A ``ValueError`` through :class:`PreferenceError`, so callers that validate sides catch both.
    """

    def __init__(self, side: str, judge: str, supported: Iterable[str]):
        self.side = side
        self.supported = tuple(supported)
        super().__init__(
            f"the {judge} judge cannot measure side {side!r}; it supports {', '.join(self.supported)}. "
            f"Use a judge that reads the side's criterion (the LLM or human-label judge) for {side}."
        )


@runtime_checkable
class PairwiseJudge(Protocol):
    """What every judge implements. Subclass it explicitly to inherit the default ``judge_many``."""

    name: str

    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        """Which of ``a`` and ``b`` better embodies ``side`` as an answer to ``prompt``."""
        ...

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        """Judge ``(prompt, a, b)`` triples on one side; judges with a batched backend override this."""
        return [self.judge(prompt, a, b, side) for prompt, a, b in items]


class RoutedJudge(PairwiseJudge):
    """``default`` for every side but those of ``by_side``, which go to their own judge (a user's dimension
    judged by its own function while the built-in sides keep theirs)."""

    def __init__(self, default: PairwiseJudge, by_side: dict[str, PairwiseJudge]) -> None:
        self.default, self.by_side = default, dict(by_side)
        self.name = "+".join([default.name, *(f"{s}:{j.name}" for s, j in sorted(self.by_side.items()))])

    def judges(self) -> list[PairwiseJudge]:
        return [self.default, *dict.fromkeys(self.by_side.values())]

    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        return self.by_side.get(side, self.default).judge(prompt, a, b, side)

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        return self.by_side.get(side, self.default).judge_many(items, side)

    def close(self) -> None:
        for j in self.judges():
            close = getattr(j, "close", None)
            if callable(close):
                close()


def flip_verdict(verdict: Verdict) -> Verdict:
    """The verdict for the same pair shown in the other order (evaluation shows both orders)."""
    return {"a": "b", "b": "a", "tie": "tie"}[verdict]  # type: ignore[return-value]


def pair_key(side: str, prompt: str, response: str, reference: str) -> str:
    """A verdict's cache key: the same side, instruction and responses give the same verdicts."""
    return hashlib.sha1(f"{side}\x1f{prompt}\x1f{response}\x1f{reference}".encode()).hexdigest()


def judge_both_orders(judge: PairwiseJudge, side: str,
                      triples: list[tuple[str, str, str]]) -> list[tuple[Verdict, Verdict]]:
    """For each (prompt, method's response, reference's response): the verdict with the method's
    response shown first, and the verdict with it shown second; one judge call for both orders."""
    n = len(triples)
    asked = [(p, m, r) for p, m, r in triples] + [(p, r, m) for p, m, r in triples]
    verdicts = list(judge.judge_many(asked, side))
    if len(verdicts) != 2 * n:
        raise DataError(f"judge {judge.name!r} answered {len(verdicts)} verdicts for {2 * n} pairs")
    return list(zip(verdicts[:n], verdicts[n:]))
