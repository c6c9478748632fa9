"""Human labels imported from a file, behind the same interface as the other judges.

Each line holds ``prompt``, ``side`` and either ``a``, ``b`` and ``verdict`` (``a``, ``b`` or ``tie``)
or ``chosen`` and ``rejected``. A pair asked in the other order gets the flipped verdict; a pair
with no label is an error that names it (a silent default would poison the labels).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from personalign.data import read_jsonl
from personalign.errors import DataError
from personalign.judges.base import PairwiseJudge, Verdict, flip_verdict
from personalign.preferences import PreferenceSpace, default_space

__all__ = ["HumanLabelJudge"]

_VERDICTS = ("a", "b", "tie")


def _key(side: str, prompt: str, a: str, b: str) -> str:
    return hashlib.sha1("\x1f".join((side, prompt.strip(), a.strip(), b.strip())).encode()).hexdigest()


class HumanLabelJudge(PairwiseJudge):
    name = "human"

    def __init__(self, path: str | Path, space: PreferenceSpace | None = None):
        space = space or default_space()
        rows = read_jsonl(path)
        if not rows:
            raise DataError(f"human label file {path} is empty")
        self.labels: dict[str, Verdict] = {}
        for i, row in enumerate(rows):
            where = f"{path}: line {i + 1}"
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("side"), str):
                raise DataError(f"{where} needs string fields prompt and side")
            side = space.resolve(row["side"])
            if "chosen" in row or "rejected" in row:
                a, b, verdict = row.get("chosen"), row.get("rejected"), "a"
            else:
                a, b, verdict = row.get("a"), row.get("b"), row.get("verdict")
            if not isinstance(a, str) or not isinstance(b, str):
                raise DataError(f"{where} needs a and b (or chosen and rejected) as strings")
            if verdict not in _VERDICTS:
                raise DataError(f"{where}: verdict must be one of a, b, tie; got {verdict!r}")
            self.labels[_key(side, row["prompt"], a, b)] = verdict  # type: ignore[assignment]
        self.space = space

    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        sid = self.space.resolve(side)
        found = self.labels.get(_key(sid, prompt, a, b))
        if found is not None:
            return found
        flipped = self.labels.get(_key(sid, prompt, b, a))
        if flipped is not None:
            return flip_verdict(flipped)
        raise DataError(f"no human label for side {sid} on the pair for prompt {prompt[:60]!r}")

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        return [self.judge(p, a, b, side) for p, a, b in items]

    def has_label(self, prompt: str, a: str, b: str, side: str) -> bool:
        """Whether the pair is labelled, in either order."""
        sid = self.space.resolve(side)
        return _key(sid, prompt, a, b) in self.labels or _key(sid, prompt, b, a) in self.labels
