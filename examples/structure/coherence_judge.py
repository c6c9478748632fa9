"""A labelling judge of the prose side (P4B) that reads whether the sentences follow from one another.

The first P4B experts were trained on labels from ``structure_judge:score``, which rewards up to five
sentences and no list. The base model prompted for prose already writes no list, so the labels could only
teach more sentences, and the experts did not write better prose by ``prose_judge:score``. This judge is
the labeller written to teach what is left: prose that builds, sentence by sentence, and stops on a full
sentence. Its main signal comes from a language model, a family none of the three other structure judges
uses (they all read the text with rules), so the two judges that evaluate its experts
(``prose_judge:score``, ``markdown_judge:score``) did not label their data.

It was written and checked on hand-written pairs (``coherence_pairs.jsonl``,
``python examples/structure/coherence_judge.py``) before it labelled any model answer: 21 pairs written
before the judge, which it was designed on, and pairs marked ``held_out`` written after it and checked
once, unchanged. Each pair is an answer that builds and the same answer with its sentences shuffled, with
sentences that drift off the point, run on and cut off mid-sentence, as a list, under headings, or as
fragments, or repeating itself.

With the answer's lines split into *markup* (list items, headings) and prose, and the prose split into
sentences ``s_1 .. s_n``:

* ``M``, the share of the answer's words in markup lines;
* ``E``, 1 when the answer ends on a finished sentence (``.``, ``!``, ``?``), else 0;
* ``G``, the *context gain*: for each sentence after the first (up to ``MAX_SENTENCES``), the
  log-probability per token of the sentence after the question and the sentences before it, minus the
  same after a fixed unrelated context (``REFERENCE_QUESTION`` answered with ``REFERENCE_LEAD``), under
  the embedded base model (``smollm2-135m-instruct``, through its chat template); averaged over those
  sentences. A sentence that follows from the question and from what came before is easier to predict
  with them; a shuffled one, or one that drifts off the point, gains less. A fragment (fewer than
  ``MIN_WORDS`` words) and a sentence that repeats the text before it (more than ``REPEAT`` of its word
  trigrams already seen) gain 0, so neither telegraphic notes nor copying earn anything. An answer of
  one sentence has ``G = 0``,

and the score is ``G + 0.3 * E - M``; an empty answer scores -10. It reads form and flow, not
correctness. The model is loaded once per process, on the CPU, on first use (``PERSONALIGN_COHERENCE_MODEL``
names another base model or folder).
"""

from __future__ import annotations

import json
import os
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

EMPTY = -10.0
MAX_SENTENCES = 8
MIN_WORDS = 5
REPEAT = 0.5
REFERENCE_QUESTION = "Say something."
REFERENCE_LEAD = "Here is my answer."
PAIRS = Path(__file__).with_name("coherence_pairs.jsonl")

ITEM = re.compile(r"^\s*(?:[-*\u2022+]|\d{1,2}[.)])\s+\S")
HEADING = re.compile(r"^\s*(?:#{1,6}\s|\*\*[^*]+\*\*:?|\*\*[^*]+:\*\*)")
SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+[\"'\u201d\u2019)\]]*|$)")
FINISHED = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s*$")
WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\u2019-]*")


def split(text: str) -> tuple[float, list[str], bool]:
    """(share of words in markup lines, the prose's sentences, whether the answer ends on a full stop)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    markup = [line for line in lines if ITEM.match(line) or HEADING.match(line)]
    prose = " ".join(line for line in lines if line not in markup)
    words = len(WORD.findall(" ".join(lines)))
    share = len(WORD.findall(" ".join(markup))) / words if words else 0.0
    sentences = [s.strip() for s in SENTENCE.findall(prose) if WORD.search(s)]
    return share, sentences, bool(FINISHED.search(text))


@cache
def _model() -> tuple[Any, Any]:
    from personalign.models import load_model

    return load_model(os.environ.get("PERSONALIGN_COHERENCE_MODEL", "smollm2-135m-instruct"),
                      device="cpu", dtype="float32")


def _prefix(tok: Any, prompt: str, lead: str = "") -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text + lead, add_special_tokens=False)["input_ids"]


def _token_logprobs(sequences: list[tuple[list[int], int]], batch_size: int = 32) -> list[list[float]]:
    """For each (ids, start): the log-probability of every token from ``start`` on, given those before it.

    Sequences are batched by length, and the vocabulary projection runs only where a log-probability is
    read."""
    import torch

    model, tok = _model()
    out: list[list[float]] = [[] for _ in sequences]
    order = sorted(range(len(sequences)), key=lambda k: len(sequences[k][0]))
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = max(len(sequences[k][0]) for k in chunk)
        pad = tok.pad_token_id
        input_ids = torch.tensor([sequences[k][0] + [pad] * (width - len(sequences[k][0])) for k in chunk])
        mask = torch.tensor([[1] * len(sequences[k][0]) + [0] * (width - len(sequences[k][0])) for k in chunk])
        with torch.no_grad():
            hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
            for row, k in enumerate(chunk):
                ids, start = sequences[k]
                logits = model.get_output_embeddings()(hidden[row, start - 1:len(ids) - 1]).float()
                targets = input_ids[row, start:len(ids), None]
                out[k] = torch.log_softmax(logits, dim=-1).gather(-1, targets)[:, 0].tolist()
    return out


def _words(sentence: str) -> list[str]:
    return [w.lower() for w in WORD.findall(sentence)]


def counts(sentence: str, before: list[str]) -> bool:
    """Whether a sentence after the first earns a gain: a full sentence (``MIN_WORDS`` words or more) that
    does not repeat the text before it (at most ``REPEAT`` of its word trigrams already appeared)."""
    words = _words(sentence)
    if len(words) < MIN_WORDS:
        return False
    grams = {tuple(words[k:k + 3]) for k in range(len(words) - 2)}
    seen = {tuple(w[k:k + 3]) for w in map(_words, before) for k in range(len(w) - 2)}
    return len(grams & seen) <= REPEAT * len(grams)


def context_gains(prompts: list[str], sentence_lists: list[list[str]]) -> list[float]:
    """``G`` for each answer (see the module docstring)."""
    _, tok = _model()
    reference = _prefix(tok, REFERENCE_QUESTION, REFERENCE_LEAD)
    sequences: list[tuple[list[int], int]] = []
    plan: list[list[tuple[int, int, int] | None]] = []  # per later sentence: (joint seq, offset, reference seq)
    for prompt, sentences in zip(prompts, sentence_lists, strict=True):
        sentences = sentences[:MAX_SENTENCES]
        prefix = _prefix(tok, prompt)
        pieces = [tok(("" if k == 0 else " ") + s, add_special_tokens=False)["input_ids"]
                  for k, s in enumerate(sentences)]
        entries: list[tuple[int, int, int] | None] = []
        if len(sentences) >= 2:
            joint_index = len(sequences)
            sequences.append((prefix + [t for piece in pieces for t in piece], len(prefix)))
            offset = len(pieces[0])
            for k, piece in enumerate(pieces[1:], start=1):
                if counts(sentences[k], sentences[:k]):
                    sequences.append((reference + piece, len(reference)))
                    entries.append((joint_index, offset, len(sequences) - 1))
                else:
                    entries.append(None)
                offset += len(piece)
        plan.append(entries)
    logps = _token_logprobs(sequences) if sequences else []
    gains = []
    for entries in plan:
        per_sentence = []
        for entry in entries:
            if entry is None:
                per_sentence.append(0.0)
                continue
            joint_index, offset, reference_index = entry
            alone = logps[reference_index]
            with_context = logps[joint_index][offset:offset + len(alone)]
            per_sentence.append((sum(with_context) - sum(alone)) / len(alone))
        gains.append(sum(per_sentence) / len(per_sentence) if per_sentence else 0.0)
    return gains


def parts(prompts: list[str], responses: list[str]) -> list[dict[str, float]]:
    """Each answer's ``M``, ``E`` and ``G`` (see the module docstring)."""
    split_all = [split(text) for text in responses]
    gains = context_gains(prompts, [sentences for _, sentences, _ in split_all])
    return [{"M": markup, "E": float(finished), "G": gain}
            for (markup, _, finished), gain in zip(split_all, gains, strict=True)]


def from_parts(p: dict[str, float]) -> float:
    """The score of an answer with words, from its parts: ``G + 0.3 * E - M``."""
    return p["G"] + 0.3 * p["E"] - p["M"]


def score(prompts: list[str], responses: list[str], side: str) -> list[float]:
    """One score per response for the prose side (P4B): higher reads more as prose that builds."""
    unique = list(dict.fromkeys((q, r) for q, r in zip(prompts, responses, strict=True) if WORD.search(r)))
    found = parts([q for q, _ in unique], [r for _, r in unique])
    scored = {key: from_parts(p) for key, p in zip(unique, found, strict=True)}
    return [scored.get((q, r), EMPTY) for q, r in zip(prompts, responses, strict=True)]


score.sides = ("P4B",)


def validate(path: Path = PAIRS) -> dict[str, Any]:
    """This judge on the hand-written pairs: the share it decides for the prose that builds, per set and kind."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows]
    good = score(prompts, [r["prose"] for r in rows], "P4B")
    bad = score(prompts, [r["other"] for r in rows], "P4B")
    report: dict[str, Any] = {}
    for name, held in (("design", False), ("held_out", True)):
        picked = [(r["kind"], g > b) for r, g, b in zip(rows, good, bad, strict=True)
                  if bool(r.get("held_out")) == held]
        if not picked:
            continue
        kinds: dict[str, list[bool]] = {}
        for kind, ok in picked:
            kinds.setdefault(kind, []).append(ok)
        report[name] = {"pairs": len(picked), "accuracy": sum(ok for _, ok in picked) / len(picked),
                        "by_kind": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(kinds.items())}}
    return report


if __name__ == "__main__":
    print(json.dumps(validate(Path(sys.argv[1]) if len(sys.argv) > 1 else PAIRS), indent=2))
