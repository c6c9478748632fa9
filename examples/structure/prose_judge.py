"""A third judge of the prose side (P4B), for evaluation only: does the answer read as flowing prose?

``structure_judge:score`` labelled the structure experts' training pairs, and ``markdown_judge:score``
only separates answers by lists, so it ties any two answers without one. This judge reads what the side
asks for ("flowing prose paragraphs of full sentences, with no lists or headings") with rules neither of
them has: it splits the answer into full sentences, paragraphs and fragments, and asks whether the
sentences connect. It was written and checked on hand-written contrasting pairs
(``prose_pairs.jsonl``, ``python examples/structure/prose_judge.py``) before it read any model's answer:
35 pairs written before the judge, which it was designed on, and 15 written after it and checked once,
unchanged (``held_out``). Each pair is a prose answer and the same content as a list, under headings, one
sentence per line, as fragments, as unconnected short sentences, as emoji filler, or half a list.

A *unit* is a line of text (a line that continues in lower case joins the line before). List items,
headings (``#``, a bold label line, a short line ending in ``:``) and emoji are never prose. A *full
sentence* ends in ``.``, ``!`` or ``?``, starts with a capital letter or a digit and has at least four
words. With

* ``S`` the share of the answer's words that are in full sentences,
* ``P`` the share of those words in *paragraphs*: units holding at least 20 words of full sentences,
* ``F`` the flow: the mean of *cohesion* (the share of sentences after the first that open with a linking
  word in their first three words, or share a content word with the sentence before) and *length*
  (mean words per full sentence / 12, at most 1),

the score is ``S * (0.4 + 0.3 * P + 0.3 * F)``, in [0, 1]; an empty answer scores -10. Compare pairs with
a margin of 0.05 (``--set judge_options.margins.P4B=0.05``). Like the other structure judges it reads
form, not correctness; unlike them it cannot be gamed by more, shorter sentences (the labelling judge
counts up to five), nor satisfied by list-free fragments (the Markdown judge's blind spot).

    personalign eval --config examples/structure/eval-experts.yaml --judge prose_judge:score \\
        --set 'combinations=[P4B]' --set judge_options.margins.P4B=0.05
"""

from __future__ import annotations

import json
import re
import sys
from itertools import pairwise
from pathlib import Path

EMPTY = -10.0
PARAGRAPH_WORDS = 20
MARGIN = 0.05
PAIRS = Path(__file__).with_name("prose_pairs.jsonl")

ITEM = re.compile(r"^\s*(?:[-*\u2022+]|\d{1,2}[.)])\s+\S")
HEADING = re.compile(r"^\s*(?:#{1,6}\s|\*\*[^*]+\*\*:?\s*$|\*\*[^*]+:\*\*)")
WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\u2019-]*")
SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+[\"'\u201d\u2019)\]]*|$)")
LINKS = frozenset([
    "this", "that", "these", "those", "it", "its", "they", "them", "their", "there", "he", "she", "his",
    "her", "we", "our", "you", "your", "such", "so", "because", "therefore", "thus", "hence", "however",
    "but", "yet", "still", "instead", "also", "and", "or", "then", "next", "finally", "first", "second",
    "third", "another", "other", "both", "each", "either", "as", "while", "when", "if", "although", "though",
    "since", "even", "which", "for", "in", "besides", "moreover", "furthermore", "meanwhile", "otherwise",
    "similarly", "likewise", "once", "after", "before", "later",
])
STOP = frozenset([
    "about", "above", "after", "again", "against", "also", "among", "been", "before", "being", "below",
    "between", "could", "does", "doing", "down", "during", "each", "from", "further", "have", "having",
    "here", "into", "itself", "just", "more", "most", "much", "only", "other", "over", "same", "should",
    "some", "such", "than", "that", "their", "them", "then", "there", "these", "they", "this", "those",
    "through", "under", "until", "very", "what", "when", "where", "which", "while", "with", "would", "your",
    "will", "make", "makes", "made", "like", "many", "can",
])


def _units(text: str) -> list[tuple[str, str]]:
    """(kind, text) per unit: kind is ``list``, ``heading`` or ``text``."""
    units: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if ITEM.match(line):
            units.append(("list", line))
        elif HEADING.match(line) or (line.endswith(":") and len(WORD.findall(line)) < 6):
            units.append(("heading", line))
        elif units and units[-1][0] == "text" and line[0].islower() and not units[-1][1].rstrip().endswith(
                (".", "!", "?")):
            units[-1] = ("text", units[-1][1] + " " + line)
        else:
            units.append(("text", line))
    return units


def _full(sentence: str) -> bool:
    s = sentence.strip()
    first = next((c for c in s if c.isalnum()), "")
    return (bool(re.search(r"[.!?][\"'\u201d\u2019)\]]*$", s)) and (first.isupper() or first.isdigit())
            and len(WORD.findall(s)) >= 4)


def _content(sentence: str) -> set[str]:
    return {w.lower()[:5] for w in WORD.findall(sentence) if len(w) >= 4 and w.lower() not in STOP}


def _linked(before: str, after: str) -> bool:
    opening = [w.lower() for w in WORD.findall(after)[:3]]
    return any(w in LINKS for w in opening) or bool(_content(before) & _content(after))


def parts(text: str) -> dict[str, float]:
    """The measurements the score is made of: S, P, cohesion, length, and the word counts."""
    total = in_sentences = in_paragraphs = 0
    sentences: list[str] = []
    for kind, unit in _units(text):
        words = len(WORD.findall(unit))
        total += words
        if kind != "text":
            continue
        full = [s.strip() for s in SENTENCE.findall(unit) if _full(s)]
        n = sum(len(WORD.findall(s)) for s in full)
        in_sentences += n
        in_paragraphs += n if n >= PARAGRAPH_WORDS else 0
        sentences += full
    length = min(1.0, in_sentences / len(sentences) / 12) if sentences else 0.0
    pairs = list(pairwise(sentences))
    cohesion = sum(_linked(a, b) for a, b in pairs) / len(pairs) if pairs else length
    return {"S": in_sentences / total if total else 0.0, "P": in_paragraphs / in_sentences if in_sentences else 0.0,
            "cohesion": cohesion, "length": length, "words": total}


def from_parts(m: dict[str, float]) -> float:
    """The score of an answer with these :func:`parts`."""
    if m["words"] == 0:
        return EMPTY
    return m["S"] * (0.4 + 0.3 * m["P"] + 0.3 * (m["cohesion"] + m["length"]) / 2)


def score(prompts: list[str], responses: list[str], side: str) -> list[float]:
    """One score per response for P4B: higher reads more as flowing prose."""
    return [from_parts(parts(text)) for text in responses]


score.sides = ("P4B",)


def validate(path: str | Path = PAIRS,
             judges: dict[str, object] | None = None,
             margins: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Each judge on the hand-written pairs (a tie counts half; the scores do not depend on the order):
    accuracy overall, on the pairs written after the judge (``held_out``) and per kind of contrast, and
    the counts."""
    rows = [json.loads(line) for line in Path(path).read_text("utf-8").splitlines() if line.strip()]
    judges = judges or {"prose_judge": score}
    margins = {"prose_judge": MARGIN} if margins is None else margins  # a judge not named decides at 0
    out: dict[str, dict[str, float]] = {}
    for name, fn in judges.items():
        prose = fn([r["prompt"] for r in rows], [r["prose"] for r in rows], "P4B")
        other = fn([r["prompt"] for r in rows], [r["other"] for r in rows], "P4B")
        m = margins.get(name, 0.0)
        verdicts = ["right" if p - o > m else "wrong" if o - p > m else "tie" for p, o in zip(prose, other)]
        res: dict[str, float] = {}
        groups = {"all": rows, "held_out": [r for r in rows if r.get("held_out")]}
        groups.update({k: [r for r in rows if r["kind"] == k] for k in sorted({r["kind"] for r in rows})})
        for name_, group in groups.items():
            v = [x for x, r in zip(verdicts, rows) if any(r is g for g in group)]
            if v:
                res[name_] = (v.count("right") + 0.5 * v.count("tie")) / len(v)
        res.update(right=verdicts.count("right"), wrong=verdicts.count("wrong"), ties=verdicts.count("tie"))
        out[name] = res
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import markdown_judge
    import structure_judge

    table = validate(judges={"prose_judge": score, "structure_judge": structure_judge.score,
                             "markdown_judge": markdown_judge.score})
    print(json.dumps(table, indent=2))
