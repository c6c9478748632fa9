"""The server's "find my preference": answers under contrasting weights, a person's picks, the estimate.

A session starts from one question: the server answers it under candidate weight vectors (every
combination of the two sides of each dimension the offline judge measures, and neutral; by exact soups
when the server has an expert for every such side, whose answers differ more clearly than prompted ones,
else by preference prompting), scores every
answer per side with the offline judge, and describes each answer by one feature per dimension: side B's
score minus side A's, standardised over the session's answers. Each pick updates a
:class:`personalign.elicit.PreferenceEstimate` and the next pair is the one the estimate is least sure of.
Picks of a named profile are stored as they arrive (:class:`personalign.profiles.Profiles`).
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from personalign.elicit import Pick, PreferenceEstimate

__all__ = ["Session", "Sessions", "candidate_weights", "features"]


def candidate_weights(pairs: list[tuple[str, str]]) -> list[dict[str, float]]:
    """Every combination of one side per dimension (weight 1 each), and neutral (no preference)."""
    out: list[dict[str, float]] = [{s: 1.0 for s in combo} for combo in itertools.product(*pairs)]
    return out + [{}]


def features(question: str, answers: list[str], pairs: list[tuple[str, str]]) -> np.ndarray:
    """(N, D): per answer and dimension, the offline judge's side-B score minus its side-A score,
    standardised over the answers (a dimension on which they all agree gets zeros)."""
    from personalign.judges.offline import side_score

    raw = np.array([[side_score(b, question, text) - side_score(a, question, text) for a, b in pairs]
                    for text in answers])
    spread = raw.std(axis=0)
    return (raw - raw.mean(axis=0)) / np.where(spread > 1e-9, spread, 1.0)


@dataclass
class Session:
    question: str
    pairs: list[tuple[str, str]]  # the (side A, side B) of each slider the session estimates
    candidates: list[dict[str, float]]
    answers: list[str]
    feats: np.ndarray  # (N, D)
    profile: str | None = None
    method: str = "prompt"  # how the contrasting answers were made
    estimate: PreferenceEstimate = field(init=False)
    shown: set[tuple[int, int]] = field(default_factory=set)
    current: tuple[int, int] = (0, 1)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.estimate = PreferenceEstimate(len(self.pairs), sharpness=1.5)
        self.next_pair()

    def next_pair(self) -> None:
        n = len(self.answers)
        if len(self.shown) >= n * (n - 1) // 2:
            self.shown.clear()  # every pair seen: show them again
        self.current = self.estimate.choose(self.feats, exclude=self.shown)
        self.shown.add(self.current)
        if secrets.randbits(1):  # which answer is on the left says nothing
            self.current = (self.current[1], self.current[0])

    def pick(self, choice: str) -> Pick:
        i, j = self.current
        pick = Pick(tuple(self.feats[i]), tuple(self.feats[j]), choice)
        self.estimate.add(pick)
        return pick

    def doc(self, sid: str) -> dict[str, Any]:
        i, j = self.current
        sliders = self.estimate.sliders()
        prefs = {}
        for value, (a, b) in zip(sliders, self.pairs):
            if abs(value) >= 0.005:
                prefs[b if value > 0 else a] = round(abs(value), 2)
        return {
            "object": "elicitation", "session": sid, "question": self.question, "method": self.method,
            "a": {"text": self.answers[i], "weights": self.candidates[i]},
            "b": {"text": self.answers[j], "weights": self.candidates[j]},
            "estimate": {"picks": len(self.estimate.picks), "sides": [list(p) for p in self.pairs],
                         "sliders": [round(v, 3) for v in sliders],
                         "std": [round(float(s), 3) for s in self.estimate.std],
                         "preferences": ",".join(f"{s}={w:g}" for s, w in prefs.items())},
        }


class Sessions:
    """The running sessions, the least recently used dropped beyond ``limit``."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, session: Session) -> str:
        sid = secrets.token_urlsafe(12)
        with self._lock:
            self._sessions[sid] = session
            while len(self._sessions) > self.limit:
                self._sessions.popitem(last=False)
        return sid

    def get(self, sid: str) -> Session | None:
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                self._sessions.move_to_end(sid)
            return session
