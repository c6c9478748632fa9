"""A judge for sides a user defines: their own Python function, ``module:function``, scores responses.

The contract (the same function serves as a judge and, through ``--reward module:function``, as an RL
reward)::

    def score(prompts: list[str], responses: list[str], side: str) -> list[float]:
        '''One number per response: higher when the response embodies ``side`` more.'''

    score.sides = ("P4A", "P4B")   # optional: the sides it measures; others are refused up front

A pair ``(a, b)`` is decided by the score difference: ``a`` when ``score(a) - score(b) > margin``, ``b``
when it is below ``-margin``, else a tie (``margins`` per side, default 0: only equal scores tie). The
function is called once per side and batch with every response of the batch; it must return a finite
number per response (checked on every call). A function that names its sides may also take the side
ids as a user's dimensions file declares them. Importing the module runs its code: name only modules
you trust.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from personalign.errors import ConfigError, DataError
from personalign.judges.base import PairwiseJudge, UnsupportedSideError, Verdict

__all__ = ["FunctionJudge", "function_sides", "takes_side"]


def function_sides(fn: Callable[..., Any]) -> tuple[str, ...] | None:
    """The sides a scoring function declares (its ``sides`` attribute), or None when it declares none."""
    sides = getattr(fn, "sides", None)
    if sides is None:
        return None
    if isinstance(sides, str) or not all(isinstance(s, str) for s in sides):
        raise ConfigError(f"{getattr(fn, '__name__', fn)!r}.sides must be a list of side ids such as "
                          f"['P4A', 'P4B'], got {sides!r}")
    return tuple(sides)


def takes_side(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes a third argument or a ``side`` keyword (a judge's contract, not only a reward's)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.name == "side" for p in params) or len(positional) >= 3 or \
        any(p.kind is p.VAR_POSITIONAL for p in params)


class FunctionJudge(PairwiseJudge):
    """Pairwise verdicts from a user's scoring function (see the module docstring)."""

    def __init__(self, target: str, margins: Mapping[str, float] | None = None) -> None:
        from personalign.rewards import import_callable

        self.target = target
        self.fn = import_callable(target, "judge")
        if not takes_side(self.fn):
            raise ConfigError(f"judge {target!r} must take (prompts, responses, side) -> one float per response; "
                              "a function of (prompts, responses) alone can be a reward, not a judge of several "
                              "sides")
        self.sides = function_sides(self.fn)
        self.margins = dict(margins or {})
        for side, m in self.margins.items():
            if not isinstance(m, (int, float)) or isinstance(m, bool) or not math.isfinite(m) or m < 0:
                raise ConfigError(f"margin for {side} must be a number >= 0, got {m!r}")
        self.name = target

    def check_side(self, side: str) -> None:
        if self.sides is not None and side not in self.sides:
            raise UnsupportedSideError(side, f"function {self.target}", self.sides)

    def score(self, prompts: Sequence[str], responses: Sequence[str], side: str) -> list[float]:
        """The function's scores, checked: one finite number per response."""
        self.check_side(side)
        out = self.fn(list(prompts), list(responses), side)
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise DataError(f"judge {self.target} returned {type(out).__name__}, not one number per response") \
                from None
        if len(values) != len(responses):
            raise DataError(f"judge {self.target} returned {len(values)} scores for {len(responses)} responses")
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise DataError(f"judge {self.target} returned {bad[0]} for side {side}; every score must be finite")
        return values

    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        return self.judge_many([(prompt, a, b)], side)[0]

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        if not items:
            return []
        prompts = [p for p, _, _ in items] * 2
        scores = self.score(prompts, [a for _, a, _ in items] + [b for _, _, b in items], side)
        n, margin = len(items), self.margins.get(side, 0.0)
        out: list[Verdict] = []
        for sa, sb in zip(scores[:n], scores[n:]):
            d = sa - sb
            out.append("a" if d > margin else "b" if d < -margin else "tie")
        return out
