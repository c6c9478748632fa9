"""The judge of the structure dimension (P4A bulleted, P4B prose): a scoring function, personalign's
``module:function`` contract (``personalign.judges.function``), usable by ``label``, ``judge``, ``eval``
and as the RL reward of ``train-expert``.

What it measures, and only that: the layout of the answer. A line is a *list item* when it starts with
a bullet (``-``, ``*``, ``•``, ``+``) or a number (``1.``, ``2)``) followed by text. With ``L`` the share
of non-empty lines that are list items and ``n`` the number of list items,

* bulleted (P4A): ``L + 0.1 * min(n, 5)`` - mostly list lines, and several of them;
* prose (P4B): ``-L - 0.1 * h + 0.1 * min(s, 5) / 5`` with ``h`` the markdown heading or bold-label
  lines and ``s`` the sentences outside list items - paragraphs of sentences, no list, no headings.

An empty answer scores lowest on both sides. Nothing here reads the content: a wrong answer in a tidy
list scores as well as a right one (the other dimensions' judges, and people, read content).
"""

from __future__ import annotations

import re

ITEM = re.compile(r"^\s*(?:[-*\u2022+]|\d{1,2}[.)])\s+\S")
HEADING = re.compile(r"^\s*(?:#{1,6}\s|\*\*[^*]+\*\*:?\s*$)")
SENTENCE = re.compile(r"[^.!?]+[.!?]")
EMPTY = -10.0


def layout(text: str) -> tuple[float, int, int, int]:
    """(share of list-item lines, list items, heading lines, sentences outside list items)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0, 0, 0, 0
    items = [line for line in lines if ITEM.match(line)]
    headings = sum(bool(HEADING.match(line)) for line in lines)
    prose = " ".join(line for line in lines if not ITEM.match(line) and not HEADING.match(line))
    return len(items) / len(lines), len(items), headings, len(SENTENCE.findall(prose))


def score(prompts: list[str], responses: list[str], side: str) -> list[float]:
    """One score per response for ``side`` (P4A or P4B): higher embodies the side more."""
    out = []
    for text in responses:
        share, items, headings, sentences = layout(text)
        if not text.strip():
            out.append(EMPTY)
        elif side == "P4A":
            out.append(share + 0.1 * min(items, 5))
        else:
            out.append(-share - 0.1 * headings + 0.1 * min(sentences, 5) / 5)
    return out


score.sides = ("P4A", "P4B")
