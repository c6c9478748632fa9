"""Preference strength: sweep it, choose a default on held-out training instructions, report it on the
evaluation set.

    python bench/strength.py select [--n 16] [--family soup|mope|all] [--extra LABELS]  # held-out builtin:train
    python bench/strength.py choose                                     # the defaults, from the sweep
    python bench/strength.py final --family soup|mope [--strength S]    # on builtin:eval (143 x 8)
    python bench/strength.py report                                     # bench/strength.json + .png
    python bench/strength.py defaults [--into DIR]    # the choice, as the experts' strength.json

Every stage takes ``--experts DIR``: compose the experts in DIR (one ``<SIDE>/`` folder each) instead of the
shipped ones. Its runs and record carry the folder's name (``runs/strength-select-NAME``,
``runs/eval-strength-NAME``, ``bench/strength-NAME.json`` and ``.png``), so the shipped experts' record
stays as it is (``--name NAME`` names them instead of the folder); the held-out instructions are those that
none of DIR's experts saw.

Every stage runs ``personalign eval`` (resumable: a rerun generates and judges only what is missing) with
the sampling of the recorded evaluation (96 new tokens, temperature 0.7, top-p 0.9, repetition penalty 1.1,
seed 0), once with the offline judge and once with the independent judge, against preference prompting.

* **select**: instructions of ``builtin:train`` that no shipped expert saw in RL training
  (:func:`personalign.provenance.unseen_prompts`), ``--n`` of them in a seeded order, the eight combinations;
  the exact soup and ``mope-extrapolate`` at strengths 1, 1.5, 2, 3, and the psoups soup at strength 1 for
  reference. Run folder ``runs/strength-select``. ``--extra`` adds method labels to the sweep, e.g. side
  weights with a strength (``soup-exact-wP2A=0.5-x2``): they are candidates of their family in ``choose``.
* **choose**: per family, the strength with the highest average criterion win rate (mean of both judges)
  among those that meet the issue's per-combination targets on the held-out instructions: on-topic
  similarity at least 0.9x prompting's and distinct-2 at least 0.95x in *every* combination. Ties go to
  the smaller strength. When no strength is eligible the choice is strength 1 (today's default), marked
  ``any_eligible: false``: a stronger setting that fails the gate is never chosen for its win rate. (The
  rule first gated on the mean of the per-combination ratios, and the mean hid the concise combinations:
  it chose 3, whose minimum was 0.53-0.60.)
* **final**: the chosen setting (or ``--strength``, or the labels of ``--extra``) on all 143 evaluation instructions in
  ``runs/eval-strength``, seeded with prompting's generation files from the recorded evaluation
  ``runs/eval-psoups-all`` (same settings, checked by its generation identity). Once the strength-1 exact
  soup is evaluated there (``--family soup --strength 1``), every method is also paired against it on the
  same instructions.
* **defaults**: writes the strengths ``choose`` picked into the experts folder's ``strength.json`` (or
  ``--into DIR``'s): the measured defaults that a request without a strength gets with these experts
  (:func:`personalign.personalize.default_strengths`), with where they were measured.
* **report**: per method and combination: win rates by both judges, on-topic similarity, distinct-2,
  length and filler markers (emoji, exclamations, stock phrases), each also as a ratio to prompting's,
  and the on-topic ratio to prompting's answers cut to the method's length (length-controlled);
  each final method paired on instructions against the recorded strength-1 exact soup (float32 experts;
  ``paired_to_recorded_soup_exact``); and the trade-off plot (win rate against on-topic ratio).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from personalign.compose import shipped_experts_dir
from personalign.data import load_prompts, read_jsonl
from personalign.evaluation import paired_difference_ci
from personalign.generations import parse_method
from personalign.provenance import unseen_prompts
from personalign.report import (
    cut_to_lengths,
    distinct_n,
    filler_markers,
    load_embedder,
    mean_length,
    ontopic_similarity,
    recorded_outcomes,
)

ROOT = Path(__file__).resolve().parent.parent
SELECT = ROOT / "runs" / "strength-select"
RECORDED = ROOT / "runs" / "eval-psoups-all"  # the recorded evaluation: prompting, strength-1 soups and MoPE
FINAL = ROOT / "runs" / "eval-strength"
# Its files this comparison reuses: prompting's only. The experts were since stored in float16 (greedy
# answers identical, sampled ones not bit for bit), so files made with the experts are generated again.
REUSED = ("prompt",)
OUT = ROOT / "bench" / "strength.json"
STRENGTHS = (1.0, 1.5, 2.0, 3.0)
JUDGES = ("offline", "independent")
SAMPLING = {"max_new_tokens": 96, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 0}
MODEL = "smollm2-135m-instruct"
EXPERTS: Path | None = None  # --experts: the experts composed (None: the shipped ones)


def use_experts(folder: str | None, name: str | None = None) -> None:
    """``--experts DIR [--name NAME]``: compose DIR's experts, in runs and a record named after it, or NAME
    (module docstring)."""
    global EXPERTS, SELECT, FINAL, OUT
    if folder is None:
        if name is not None:
            raise SystemExit("--name goes with --experts DIR (it names that folder's runs and record)")
        return
    path = Path(folder).resolve()
    if not path.is_dir():
        raise SystemExit(f"--experts {folder}: no such folder")
    EXPERTS = path
    tag = name or path.name
    SELECT, FINAL = (p.with_name(f"{p.name}-{tag}") for p in (SELECT, FINAL))
    OUT = OUT.with_name(f"{OUT.stem}-{tag}{OUT.suffix}")


def label(family: str, s: float) -> str:
    base = {"psoups": "soup-psoups", "exact": "soup-exact", "mope": "mope-extrapolate"}[family]
    return base if s == 1 else f"{base}-x{s:g}"


def family_methods(family: str, strengths: tuple[float, ...] = STRENGTHS) -> list[str]:
    """The swept methods: the exact soup and the extrapolate rule at every strength (the chosen strength is
    also checked on the paper's psoups soup in ``final``)."""
    soups = [label("exact", s) for s in strengths]
    mope = [label("mope", s) for s in strengths]
    return {"soup": soups, "mope": mope, "all": soups + mope}[family]


def family_of(method: str) -> str | None:
    """``exact`` for exact soups, ``mope`` for the extrapolate rule (any strength or side weights), else None."""
    m = parse_method(method)
    if m.kind.value == "soup" and m.variant == "exact":
        return "exact"
    if m.kind.value == "mope" and m.variant == "extrapolate" and m.pcm is None:
        return "mope"
    return None


def extras(text: str | None) -> list[str]:
    """``--extra``: comma-separated method labels, each checked (a bad label is refused before any run)."""
    labels = [t.strip() for t in (text or "").split(",") if t.strip()]
    for t in labels:
        if family_of(t) is None:
            raise SystemExit(f"--extra {t}: only exact soups and mope-extrapolate are swept here")
    return labels


def held_out(n: int) -> list[dict[str, str]]:
    """``n`` instructions of builtin:train that no shipped expert trained on, in a seeded order."""
    source, idx = unseen_prompts(EXPERTS or shipped_experts_dir(MODEL), n, seed=0)
    items = load_prompts(source)
    print(f"{n} instructions of {source} that no {'' if EXPERTS else 'shipped '}expert saw", file=sys.stderr)
    return [{"id": f"train-{i}", "prompt": items[i].prompt} for i in idx]


def run_eval(run: Path, prompts: str, methods: list[str], judge: str) -> dict:
    cfg = {"run_dir": str(run), "prompts": prompts, "methods": ["prompt", *methods], "judge": judge,
           "sampling": SAMPLING, "batch_size": 24, "merge_density": 0.5, "seed": 0}
    if run == FINAL:  # the recorded run's settings (its generation identity)
        recorded = json.loads((RECORDED / "config.json").read_text())
        cfg = {**{k: recorded[k] for k in ("prompts", "batch_size", "merge_density", "seed")},
               **{k: v for k, v in cfg.items() if k in ("run_dir", "methods", "judge")}, "sampling": recorded["sampling"],
               "paired_against": [m for m in ("soup-exact",) if m in methods]}  # the strength-1 soup
    if EXPERTS is not None:
        cfg["experts"] = str(EXPERTS)
    run.mkdir(parents=True, exist_ok=True)
    path = run / f"strength-{judge}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([sys.executable, "-m", "personalign.cli", "eval", "--config", str(path)], check=True)
    return json.loads((run / "judgments" / judge / "results.json").read_text())


def seed_final() -> None:
    """Copy the reused generation files, their ledgers and their verdicts from the recorded evaluation."""
    import shutil

    if (FINAL / "generations").is_dir():
        return
    (FINAL / "generations").mkdir(parents=True)
    shutil.copy2(RECORDED / "generations" / "sources.json", FINAL / "generations" / "sources.json")
    identity = json.loads((RECORDED / "generations" / "identity.json").read_text())
    if EXPERTS is not None:  # prompting's answers, the only files reused, do not depend on the experts
        identity["experts"] = str(EXPERTS)
    (FINAL / "generations" / "identity.json").write_text(json.dumps(identity, indent=2))
    for m in REUSED:
        shutil.copytree(RECORDED / "generations" / m, FINAL / "generations" / m)
        for judge in JUDGES:
            if (RECORDED / "judgments" / judge / m).is_dir():
                shutil.copytree(RECORDED / "judgments" / judge / m, FINAL / "judgments" / judge / m)
    for judge in JUDGES:
        if (RECORDED / "judgments" / judge / "validation.json").is_file():
            (FINAL / "judgments" / judge).mkdir(parents=True, exist_ok=True)
            shutil.copy2(RECORDED / "judgments" / judge / "validation.json", FINAL / "judgments" / judge)


def combo_text_metrics(run: Path, methods: list[str], embedder) -> dict:
    """Per method and combination: on-topic similarity, distinct-2, mean words, filler markers, and the
    on-topic similarity of prompting's answers cut to the method's length per instruction
    (``ontopic_prompt_cut``: how much of a drop is length alone)."""
    out: dict[str, dict[str, dict]] = {}
    prompting: dict[str, dict[str, str]] = {}  # combination -> instruction id -> prompting's answer
    for m in ["prompt", *methods]:
        folder = run / "generations" / m
        if not folder.is_dir():
            continue
        out[m] = {}
        for path in sorted(folder.glob("*.jsonl")):
            rows = read_jsonl(path)
            texts = [r["response"] for r in rows]
            out[m][path.stem] = {"ontopic": ontopic_similarity([r["prompt"] for r in rows], texts, embedder),
                                 "distinct_2": distinct_n(texts, 2), "mean_words": mean_length(texts),
                                 **filler_markers(texts), "responses": len(texts)}
            if m == "prompt":
                prompting[path.stem] = {r["id"]: r["response"] for r in rows}
            else:
                cut = cut_to_lengths([prompting[path.stem][r["id"]] for r in rows], texts)
                out[m][path.stem]["ontopic_prompt_cut"] = ontopic_similarity([r["prompt"] for r in rows], cut,
                                                                             embedder)
    return out


def summarize(run: Path, methods: list[str]) -> dict:
    """Win rates by both judges and text metrics, per method and combination, with ratios to prompting."""
    results = {j: json.loads((run / "judgments" / j / "results.json").read_text()) for j in JUDGES
               if (run / "judgments" / j / "results.json").is_file()}
    text = combo_text_metrics(run, methods, load_embedder("cpu"))
    ref = text["prompt"]
    table = {}
    for m in methods:
        if m not in text or any(m not in r["win_rates"] for r in results.values()):
            continue
        combos = {}
        for c, t in text[m].items():
            combos[c] = {**t, "ontopic_ratio": t["ontopic"] / ref[c]["ontopic"],
                         "ontopic_ratio_length_controlled": t["ontopic"] / t["ontopic_prompt_cut"],
                         "distinct_2_ratio": t["distinct_2"] / ref[c]["distinct_2"],
                         "words_ratio": t["mean_words"] / ref[c]["mean_words"],
                         "win_rate": {j: r["win_rates"][m]["by_combination"][c]["avg"]["value"]
                                      for j, r in results.items()}}
        table[m] = {"win_rate": {j: r["win_rates"][m]["avg"] for j, r in results.items()},
                    "by_criterion": {j: {s: v["value"] for s, v in r["win_rates"][m]["by_criterion"].items()}
                                     for j, r in results.items()},
                    "paired": {j: r.get("paired", {}).get(m, {}) for j, r in results.items()},
                    "ontopic_ratio_min": min(v["ontopic_ratio"] for v in combos.values()),
                    "ontopic_ratio_mean": sum(v["ontopic_ratio"] for v in combos.values()) / len(combos),
                    "ontopic_ratio_length_controlled_min": min(v["ontopic_ratio_length_controlled"]
                                                               for v in combos.values()),
                    "distinct_2_ratio_min": min(v["distinct_2_ratio"] for v in combos.values()),
                    "distinct_2_ratio_mean": sum(v["distinct_2_ratio"] for v in combos.values()) / len(combos),
                    "words_ratio_mean": sum(v["words_ratio"] for v in combos.values()) / len(combos),
                    **{k: sum(v[k] for v in combos.values()) / len(combos)
                       for k in ("emoji", "exclamations", "stock_phrases")},
                    "combinations": combos}
    prompt_markers = {k: sum(v[k] for v in ref.values()) / len(ref) for k in ("emoji", "exclamations",
                                                                                "stock_phrases")}
    return {"instructions": next(iter(results.values()))["instructions"], "judges": list(results),
            "prompt": {"ontopic": sum(v["ontopic"] for v in ref.values()) / len(ref), **prompt_markers},
            "methods": table}


def paired_to_recorded(methods: list[str], against: str = "soup-exact") -> dict[str, dict]:
    """Per method of the final run and judge: its average criterion win rate minus that of ``against`` in
    the recorded evaluation (the strength-1 soup, made with the float32 experts), paired on instructions.
    Both runs judged the same 143 instructions against the same prompting answers (seeded from it)."""
    out: dict[str, dict] = {}
    for judge in JUDGES:
        theirs = RECORDED / "judgments" / judge
        if not (theirs / against).is_dir():
            continue
        other = recorded_outcomes(theirs, against)
        for m in methods:
            if not (FINAL / "judgments" / judge / m).is_dir():
                continue
            mine = recorded_outcomes(FINAL / "judgments" / judge, m)
            a, b = {}, {}
            for combo, cols in mine.items():
                for side, ids in cols.items():
                    common = sorted(set(ids) & set(other.get(combo, {}).get(side, {})))
                    a[f"{combo}/{side}"] = [ids[i] for i in common]
                    b[f"{combo}/{side}"] = [other[combo][side][i] for i in common]
            out.setdefault(m, {})[judge] = asdict(paired_difference_ci(a, b))
    return out


def choose(summary: dict) -> dict[str, dict]:
    """Per family, the strength the module docstring's rule picks, and why the others were not."""
    picks = {}
    for family in ("exact", "mope"):
        cands = []
        for name, row in summary["methods"].items():
            if family_of(name) != family:
                continue
            m = parse_method(name)
            ok = row["ontopic_ratio_min"] >= 0.9 and row["distinct_2_ratio_min"] >= 0.95
            score = sum(w["value"] for w in row["win_rate"].values()) / len(row["win_rate"])
            cands.append({"strength": m.strength, "label": name, "side_weights": dict(m.side_weights),
                          "eligible": ok, "score": score,
                          "ontopic_ratio_mean": row["ontopic_ratio_mean"],
                          "ontopic_ratio_min": row["ontopic_ratio_min"],
                          "distinct_2_ratio_min": row["distinct_2_ratio_min"]})
        eligible = [c for c in cands if c["eligible"]]
        if cands:
            best = (max(eligible, key=lambda c: (c["score"], -c["strength"])) if eligible
                    else next((c for c in cands if c["label"] == label(family, 1.0)), None))
            if best is None:
                raise SystemExit(f"choose: no {family} strength meets the gate and strength 1 was not swept")
            picks[family] = {"chosen": best["strength"], "label": best["label"], "any_eligible": bool(eligible),
                             "candidates": cands}
    return picks


def write_defaults(doc: dict, folder: Path) -> int:
    """The strengths ``choose`` picked, as the experts folder's measured defaults (``strength.json``, read by
    :func:`personalign.personalize.default_strengths`); the rules it names already and this record did not
    choose are kept."""
    from personalign.personalize import STRENGTH_FILE, default_strengths

    if "chosen" not in doc:
        raise SystemExit(f"defaults: {OUT} holds no choice; run choose first")
    path = folder / STRENGTH_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    table, measured = dict(old.get("default_strength", {})), dict(old.get("measured", {}))
    for family, pick in doc["chosen"].items():
        key = {"exact": "soup-exact", "mope": "mope-extrapolate"}[family]
        if pick["label"] != label(family, pick["chosen"]):
            raise SystemExit(f"defaults: {family}'s choice {pick['label']} has side weights; a default is a strength")
        table[key] = pick["chosen"]
        best = next(c for c in pick["candidates"] if c["label"] == pick["label"])
        measured[key] = {"record": str(OUT.relative_to(ROOT)), "selected_on": str(SELECT.relative_to(ROOT)),
                         "any_eligible": pick["any_eligible"], "win_rate_mean_of_judges": round(best["score"], 4),
                         "ontopic_ratio_min": round(best["ontopic_ratio_min"], 4),
                         "swept": sorted(c["strength"] for c in pick["candidates"] if not c["side_weights"])}
    path.write_text(json.dumps({"default_strength": table, "measured": measured}, indent=2) + "\n")
    default_strengths(folder)  # the file reads back
    print(f"wrote {path}: {table}")
    return 0


def plot(summaries: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    for ax, (stage, summary) in zip(fig.subplots(1, len(summaries), squeeze=False)[0], summaries.items()):
        for family, marker in (("psoups", "o"), ("exact", "s"), ("mope", "^")):
            for judge, color in (("offline", "tab:blue"), ("independent", "tab:orange")):
                pts = [(summary["methods"][label(family, s)]["ontopic_ratio_mean"],
                        summary["methods"][label(family, s)]["win_rate"][judge]["value"], s)
                       for s in STRENGTHS if label(family, s) in summary["methods"]
                       and judge in summary["methods"][label(family, s)]["win_rate"]]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, alpha=0.8,
                        label=f"{family} ({judge})")
                for x, y, s in pts:
                    ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        standard = {label(f, s) for f in ("psoups", "exact", "mope") for s in STRENGTHS}
        for name, row in summary["methods"].items():  # the --extra settings: one point each
            if name in standard or not family_of(name):
                continue
            for judge, color in (("offline", "tab:blue"), ("independent", "tab:orange")):
                if judge in row["win_rate"]:
                    x, y = row["ontopic_ratio_mean"], row["win_rate"][judge]["value"]
                    ax.plot([x], [y], marker="*", ms=9, color=color, ls="none")
                    if judge == "offline":  # one label per setting
                        ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.axvline(0.9, color="grey", ls=":", lw=1)
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("on-topic similarity / prompting's (mean over combinations)")
        ax.set_ylabel("average criterion win rate vs prompting")
        ax.set_title(f"{stage}: {summary['instructions']} instructions x 8 combinations", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("select", "choose", "final", "report", "defaults"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--family", choices=("soup", "mope", "all"), default="all")
    ap.add_argument("--strengths", type=lambda t: tuple(float(x) for x in t.split(",")), default=STRENGTHS,
                    help="select: the strengths swept, comma-separated (default: 1,1.5,2,3)")
    ap.add_argument("--strength", type=float, help="final: the strength to evaluate (default: the chosen one)")
    ap.add_argument("--soups", default="exact", help="final: the soup rules to evaluate, e.g. exact,psoups")
    ap.add_argument("--extra", help="select, final: more method labels, comma-separated, e.g. soup-exact-wP2A=0.5-x2")
    ap.add_argument("--experts", help="the experts to compose, a folder of <SIDE>/ experts (default: the shipped ones)")
    ap.add_argument("--into", help="defaults: the experts folder whose strength.json gets the choice (default: "
                    "the experts composed)")
    ap.add_argument("--name", help="with --experts: the name of its runs and record (default: the folder's name)")
    args = ap.parse_args()
    use_experts(args.experts, args.name)
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {}
    more = extras(args.extra)
    if args.stage == "select":
        SELECT.mkdir(parents=True, exist_ok=True)
        prompts = SELECT / "prompts.jsonl"
        have = prompts.read_text().splitlines() if prompts.is_file() else []
        if len(have) < args.n:  # more instructions: the same seeded order, so the first ones stay
            rows = held_out(args.n)
            assert [json.loads(x) for x in have] == rows[: len(have)]
            prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        swept = [*family_methods(args.family, args.strengths), *more]
        done = [p.name for p in (SELECT / "generations").iterdir() if p.is_dir() and p.name != "prompt"
                and family_of(p.name)] if (SELECT / "generations").is_dir() else []
        for judge in JUDGES:  # the methods swept before stay in the tables; only new files are generated
            run_eval(SELECT, str(prompts), list(dict.fromkeys([*swept, *sorted(done)])), judge)
        return 0
    if args.stage == "choose":
        swept = [p.name for p in sorted((SELECT / "generations").iterdir()) if p.is_dir() and p.name != "prompt"]
        summary = summarize(SELECT, [m for m in dict.fromkeys([*family_methods("all"), *swept]) if family_of(m)])
        doc.update(select=summary, chosen=choose(summary))
        OUT.write_text(json.dumps(doc, indent=1))
        print(json.dumps({f: {k: v for k, v in p.items() if k != "candidates"} for f, p in doc["chosen"].items()}))
        return 0
    if args.stage == "defaults":
        return write_defaults(doc, Path(args.into) if args.into else EXPERTS or shipped_experts_dir(MODEL))
    if args.stage == "final":
        methods = []
        if args.family in ("soup", "all"):  # the chosen strength (``--soups psoups`` also on the paper's rule)
            s = args.strength if args.strength is not None else doc["chosen"]["exact"]["chosen"]
            methods += [label(f, s) for f in args.soups.split(",")]
        if args.family in ("mope", "all"):
            s = args.strength if args.strength is not None else doc["chosen"]["mope"]["chosen"]
            methods.append(label("mope", s))
        methods += more
        seed_final()
        done = [p.name for p in (FINAL / "generations").iterdir() if p.is_dir() and p.name != "prompt"]
        for judge in JUDGES:  # the methods evaluated before stay in the report; only new files are generated
            run_eval(FINAL, "builtin:eval", list(dict.fromkeys([*methods, *sorted(done)])), judge)
        return 0
    labels = [*family_methods("all"), *(label("psoups", s) for s in STRENGTHS[1:]), "mope-uniform"]
    made = [p.name for p in sorted((FINAL / "generations").iterdir()) if p.is_dir() and p.name != "prompt"]
    final = summarize(FINAL, list(dict.fromkeys([*labels, *made])))
    final["paired_to_recorded_soup_exact"] = paired_to_recorded(list(final["methods"]))
    doc["final"] = final
    OUT.write_text(json.dumps(doc, indent=1))
    plot({k: doc[k] for k in ("select", "final") if k in doc}, OUT.with_suffix(".png"))
    print(f"wrote {OUT} and {OUT.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
