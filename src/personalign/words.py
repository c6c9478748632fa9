"""Preferences in words: "I'm a surgeon between operations: short, technical, no jokes" -> side weights.

The text is cut into clauses (at punctuation and at "and", "but", "with", "without"); each clause is
matched against cue phrases of every side (the built-in sides' cues below; a user-defined side's name,
aliases and the content words of its prompt). A negation before a cue ("no", "not", "without", "avoid",
"don't", "less", "never", "nothing") counts it for the other side of its dimension: "no jokes" is blunt,
"no jargon" elementary, "not too long" concise. Each dimension takes the side with the larger count
(weight 1; a tie or no cue leaves it neutral). Sides pair up as opposites in declaration order. Clauses that match no side are kept, in order, as a
prompt: one request can then compose experts for the sides that have them and prompt for the rest.

It is a transparent lexical mapper, not a language model: its result is shown for confirmation, and its
accuracy is measured on descriptions written for that purpose (``tests/assets/prefs_in_words.jsonl``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from personalign.errors import PreferenceError
from personalign.preferences import PreferenceSpace, default_space

__all__ = ["CUES", "ReadPreference", "read_preference"]

# Cue phrases of the built-in sides (lower case; matched on word boundaries).
CUES: dict[str, tuple[str, ...]] = {
    "P1A": ("simple", "simply", "simpler", "easy", "easily", "basic", "basics", "beginner", "beginners", "kid",
            "kids", "child", "children", "eli5", "like i'm five", "like im five", "layman", "laymen",
            "plain language", "plain english", "plain words", "non-expert", "non expert", "newbie", "novice",
            "elementary", "school", "schoolchild", "student", "grandma", "grandmother", "everyday words",
            "easy to understand", "understandable", "accessible", "new to", "no background", "not an expert"),
    "P1B": ("technical", "technically", "expert", "experts", "advanced", "jargon", "specialist", "professional",
            "terminology", "phd", "researcher", "surgeon", "doctor", "physician", "engineer", "scientist",
            "academic", "rigorous", "rigor", "precise terms", "domain", "graduate", "scholarly", "nuanced",
            "sophisticated", "formulas", "equations", "mechanism", "mechanisms", "in technical terms"),
    "P2A": ("short", "shorter", "brief", "briefly", "concise", "concisely", "quick", "quickly", "succinct",
            "to the point", "tl;dr", "tldr", "one sentence", "one line", "few words", "terse", "in a hurry",
            "busy", "no time", "between operations", "no fluff", "no rambling", "keep it short", "summary",
            "summarise", "summarize", "gist", "bottom line", "compact", "minimal", "skimmable", "essentials"),
    "P2B": ("detailed", "detail", "details", "thorough", "thoroughly", "comprehensive", "in depth", "in-depth",
            "long", "longer", "elaborate", "everything", "examples", "example", "background", "context",
            "deep dive", "extensive", "exhaustive", "full picture", "explain fully", "step by step",
            "step-by-step", "informative", "learn", "lots of information", "complete", "all the", "why and how",
            "nuances", "the whole story"),
    "P3A": ("friendly", "warm", "warmly", "fun", "funny", "humor", "humour", "humorous", "joke", "jokes",
            "joking", "witty", "wit", "playful", "cheerful", "emoji", "emojis", "encouraging", "gentle", "kind",
            "kindly", "like a friend", "close friend", "buddy", "pal", "lighthearted", "light-hearted", "chatty",
            "upbeat", "enthusiastic", "smile", "laugh", "banter", "cozy", "cosy"),
    "P3B": ("blunt", "bluntly", "direct", "directly", "serious", "seriously", "no-nonsense", "no nonsense",
            "straight", "straightforward", "matter-of-fact", "matter of fact", "dry", "cold", "harsh",
            "rude", "unfriendly", "curt", "stern", "no pleasantries", "no small talk", "strictly business",
            "businesslike", "frank", "brutal", "brutally", "honest", "just the facts", "unsentimental",
            "impersonal", "no chit-chat", "no chitchat"),
}
_NEGATIONS = ("no", "not", "without", "avoid", "don't", "dont", "do not", "never", "less", "nothing", "skip",
              "spare me", "hate", "dislike", "none of", "zero", "stop")
_SPLIT = re.compile(r"[,;:.!?()\n]+|\s+(?:and|but|with|plus|also|then)\s+")
_STOP = {"a", "an", "the", "that", "is", "in", "to", "of", "and", "or", "for", "be", "it", "like", "as",
         "generate", "response", "can", "by", "written", "style", "which", "are", "on", "with"}


@dataclass(frozen=True)
class ReadPreference:
    """What a description says: side weights, the words that decided each side, and the rest as a prompt."""

    weights: dict[str, float]
    evidence: dict[str, list[str]] = field(default_factory=dict)
    rest: str = ""  # the clauses no side covers, to be appended as a prompt

    def spec(self) -> str:
        return ",".join(f"{s}={w:g}" for s, w in self.weights.items())


def _cues(space: PreferenceSpace) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for sid, side in space.sides.items():
        own = [side.name.lower(), *(a.lower() for a in side.aliases)]
        if sid in CUES:
            out[sid] = CUES[sid] + tuple(own)
        else:  # a user's side: its name, aliases and the content words of its prompt
            words = [w for w in re.findall(r"[a-z][a-z'-]+", side.prompt.lower()) if w not in _STOP and len(w) > 3]
            out[sid] = tuple(dict.fromkeys(own + words))
    return out


def _negated(clause: str, start: int) -> bool:
    before = clause[:start].split()[-3:]  # a negation within three words before the cue
    text = " ".join(before)
    return any(re.search(rf"(^|\s){re.escape(n)}($|\s)", text) for n in _NEGATIONS)


def read_preference(text: str, space: PreferenceSpace | None = None) -> ReadPreference:
    """Side weights (1 per dimension that the text leans on) and the uncovered rest; refuses text that
    maps to nothing at all."""
    if not isinstance(text, str) or not text.strip():
        raise PreferenceError("describe the answers you want in a sentence, e.g. 'short, technical, no jokes'")
    space = space or default_space()
    cues = _cues(space)
    other = {}  # a side's opposite: sides pair up in declaration order (A with B, C with D)
    for dim in space.dimensions.values():
        for a, b in zip(dim.sides[0::2], dim.sides[1::2]):
            other[a], other[b] = b, a
    counts: dict[str, float] = {}
    evidence: dict[str, list[str]] = {}
    rest = []
    lowered = re.sub(r"\btl;\s?dr\b", "tldr", text.lower())  # not a clause break
    for clause in (c.strip() for c in _SPLIT.split(lowered)):
        if not clause:
            continue
        hit = False
        taken: list[tuple[int, int]] = []
        # longest cues first, so "no small talk" wins over "small" and "to the point" over "point"
        for sid, phrase in sorted(((s, p) for s, ps in cues.items() for p in ps), key=lambda x: -len(x[1])):
            for m in re.finditer(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", clause):
                if any(a < m.end() and m.start() < b for a, b in taken):
                    continue
                taken.append((m.start(), m.end()))
                side = sid
                if _negated(clause, m.start()) and not phrase.startswith(("no ", "no-", "not ")) and sid in other:
                    side = other[sid]
                counts[side] = counts.get(side, 0) + 1
                evidence.setdefault(side, []).append(clause[max(0, m.start() - 8): m.end()].strip())
                hit = True
        if not hit:
            rest.append(clause)
    weights: dict[str, float] = {}
    for dim in space.dimensions.values():
        scored = sorted(((counts.get(s, 0), s) for s in dim.sides), reverse=True)
        if scored and scored[0][0] > 0 and (len(scored) == 1 or scored[0][0] > scored[1][0]):
            weights[scored[0][1]] = 1.0
    if not weights:
        raise PreferenceError(f"the description {text.strip()[:60]!r} names no side personalign knows; say how "
                              f"short, technical or friendly answers should be (sides: {space.valid_sides_text()})")
    return ReadPreference(weights, {s: evidence[s] for s in weights}, ". ".join(rest))


def merge_into(base: Mapping[str, float], read: ReadPreference) -> dict[str, float]:
    """``read``'s sides over ``base``'s, dimension by dimension (for refining a saved preference)."""
    return {**dict(base), **read.weights}
