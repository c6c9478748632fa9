"""A second judge of the structure dimension (P4A bulleted, P4B prose), for evaluation only.

``structure_judge:score`` labelled the training pairs of the structure experts, so it cannot be the only
judge of them. This one reads the answer differently: it parses it as CommonMark (``markdown-it-py``,
installed with ``rich``) and weighs *words*, where the labelling judge counts *lines* matched by its own
patterns. Their rules differ where they should be able to disagree: a Markdown list item may run over
several lines and needs a blank line or a list marker before it, a "\u2022" line is not a list, headings
are Markdown headings only, and prose credit goes to words in paragraphs, not to counted sentences.

With ``W`` the share of the answer's words inside list items and ``n`` the number of list items,

* bulleted (P4A): ``W + 0.05 * min(n, 4)``;
* prose (P4B): ``1 - W - 0.25 * [any heading]``.

An empty answer scores lowest on both sides. Like the labelling judge it reads layout only.

    personalign eval ... --set side_judges.P4A=markdown_judge:score --set side_judges.P4B=markdown_judge:score
"""

from __future__ import annotations

from markdown_it import MarkdownIt

EMPTY = -10.0
_MD = MarkdownIt("commonmark")


def words_in_lists(text: str) -> tuple[int, int, int, int]:
    """(words in list items, words in all, list items, headings) of ``text`` read as CommonMark."""
    inside = total = items = headings = 0
    depth = 0
    for tok in _MD.parse(text):
        if tok.type == "list_item_open":
            depth += 1
            items += 1
        elif tok.type == "list_item_close":
            depth -= 1
        elif tok.type == "heading_open":
            headings += 1
        elif tok.type in ("inline", "code_block", "fence"):
            n = len(tok.content.split())
            total += n
            inside += n if depth > 0 else 0
    return inside, total, items, headings


def score(prompts: list[str], responses: list[str], side: str) -> list[float]:
    """One score per response for ``side`` (P4A or P4B): higher embodies the side more."""
    out = []
    for text in responses:
        inside, total, items, headings = words_in_lists(text)
        if total == 0:
            out.append(EMPTY)
            continue
        share = inside / total
        out.append(share + 0.05 * min(items, 4) if side == "P4A" else 1.0 - share - 0.25 * (headings > 0))
    return out


score.sides = ("P4A", "P4B")
