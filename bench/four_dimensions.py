"""Composition over four dimensions: the 16-combination evaluation against the three-way one.

Reads what ``personalign eval --config examples/structure/eval.yaml`` left in its run folder, judged
twice: by the judges that labelled the experts' training data (the offline judge for the built-in sides,
``structure_judge:score`` for the new one) and by judges that labelled nothing (the independent judge,
``markdown_judge:score``). Per method and judge set: the average criterion win rate against preference
prompting, the new dimension's criteria, and each old criterion next to the three-way evaluation's
interval for the same method and judge (``--three-way``, the recorded eight-combination run; several
runs may be named, and each method takes its reference from the first one that holds its rule, judged by
the same judges), with whether it falls inside, and its paired difference on the same instructions at 95%
and at the family-wise level over the six old criteria (Bonferroni, ``FAMILYWISE``). A four-way method at a preference strength
(``soup-exact-x1.33333``) is set against the same rule at 3/4 of that strength in the three-way run,
where each expert carries the same weight: at strength 4/3 each of four experts carries a third, as each
of three does at strength 1, so the old experts are merged exactly as in the three-way soup and only the
new expert is added (and ``soup-exact-x4`` is set against ``soup-exact-x3``, the shipped default). With
``--previous``, another four-way run of the same combinations (the
same settings, other new experts) is compared method by method on the instructions both judged: this
run's win rate minus the previous run's, paired, on the average criterion and on each criterion.

A win rate is measured against a reference, and the four-way reference (preference prompting with four
sides in the prompt) is not the three-way one. ``reference_shift`` separates the two: per old criterion,
the offline judge's score for that side (``personalign.judges.offline.side_score``), averaged over the
answers of the combinations with that side on the instructions both runs hold, for preference prompting
and each method in both runs. Nothing is generated or judged here.

    python bench/four_dimensions.py [--four-way runs/eval-structure] [--three-way runs/eval-psoups-all ...]
        [--previous RUN] [--output bench/four_dimensions.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from personalign.data import read_jsonl
from personalign.evaluation import paired_difference_ci
from personalign.generations import parse_method
from personalign.personalize import strength_suffix
from personalign.report import recorded_outcomes

OLD = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
# Six old criteria, each tested at 95%, find a chance "measured" change in one of them a quarter of the
# time (bench/resample_floor.py measured one on a rerun that changed nothing); Bonferroni over the six
# keeps that chance at 5% for the whole family.
FAMILYWISE = 1 - 0.05 / len(OLD)
FAMILYWISE_RESAMPLES = 10000


def three_way_label(method: str) -> str:
    """The three-way method a four-way one is compared with: the same rule with each old expert at the same
    weight. A method without a strength or side weights is compared with the same rule; one at a strength
    ``s`` with the same rule at ``3s/4`` (4/3 -> 1, 4 -> 3). Side weights (``-w<dimension>=<weight>``) are
    normalised over the four sides before the strength scales them, so ``soup-exact-w4=0.5-x1.16667`` gives
    each old expert ``1.16667 / 3.5 = 1/3`` and is compared with ``soup-exact``; weights on old dimensions
    are kept in the three-way label. Weights keyed by side (``-wP4B=...``) weigh some combinations and not
    others, so they have no single three-way counterpart and are refused."""
    m = parse_method(method)
    if not m.side_weights and m.strength == 1:
        return method
    weights = {d: 1.0 for d in (1, 2, 3, 4)}
    for key, w in m.side_weights:
        if not key.isdigit() or int(key) not in weights:
            raise SystemExit(f"{method}: side weights keyed {key!r} have no three-way counterpart; key them "
                             "by dimension number 1-4")
        weights[int(key)] = w
    base = method.removesuffix(strength_suffix(m.strength)) if m.strength != 1 else method
    if m.side_weights:
        base = base[:base.rindex("-w")]
    old = {d: w for d, w in weights.items() if d != 4}
    strength = round(m.strength * sum(old.values()) / sum(weights.values()), 4)
    kept = "+".join(f"{d}={w:g}" for d, w in old.items() if w != 1)
    return base + (f"-w{kept}" if kept else "") + ("" if strength == 1 else strength_suffix(strength))


def judge_sets(run: Path) -> dict[str, dict]:
    """``labelled`` / ``independent`` -> the results of that judge set in ``run`` (``_folder``: where its
    judgments are)."""
    out = {}
    for folder in sorted((run / "judgments").iterdir()):
        res = folder / "results.json"
        if not res.is_file():
            continue
        doc = json.loads(res.read_text())
        kind = "independent" if folder.name.startswith("independent") else "labelled"
        if kind in out:
            raise SystemExit(f"{run} holds two {kind} judge sets ({out[kind]['judge']}, {doc['judge']}); "
                             "keep one of each")
        out[kind] = {**doc, "_folder": folder}
    return out


def same_instructions(four: dict, three: dict, side: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Columns for a paired difference on one old criterion, on the instructions both runs judged: each
    four-way combination with ``side`` (old sides + a new side) against the three-way combination of its
    old sides, which is repeated once per new side so that both tables have the same columns."""
    mine: dict[str, list[str]] = {}
    theirs: dict[str, list[str]] = {}
    for combo, cols in four.items():
        old = "+".join(s for s in combo.split("+") if s in OLD)
        if side not in cols or side not in three.get(old, {}):
            continue
        ids = sorted(set(cols[side]) & set(three[old][side]))
        mine[f"{combo}/{side}"] = [cols[side][i] for i in ids]
        theirs[f"{combo}/{side}"] = [three[old][side][i] for i in ids]
    return mine, theirs


def familywise_ci(mine: dict[str, list[str]], theirs: dict[str, list[str]]) -> dict:
    """``paired_difference_ci`` at the family-wise level over the six old criteria (``FAMILYWISE``), with
    enough bootstrap draws for the tails of a 99.17% interval."""
    return asdict(paired_difference_ci(mine, theirs, confidence=FAMILYWISE, resamples=FAMILYWISE_RESAMPLES))


def paired_columns(mine_all: dict, prev_all: dict) -> dict[str, tuple[list[str], list[str]]]:
    """``combination/side`` -> (this run's outcomes, the other run's), on the instructions both judged, for
    every combination and criterion both hold (outcomes as :func:`recorded_outcomes` reads them)."""
    cols: dict[str, tuple[list[str], list[str]]] = {}
    for combo, by_side in mine_all.items():
        for side, outcomes in by_side.items():
            prev = prev_all.get(combo, {}).get(side)
            if prev is None:
                continue
            ids = sorted(set(outcomes) & set(prev))
            cols[f"{combo}/{side}"] = ([outcomes[i] for i in ids], [prev[i] for i in ids])
    return cols


def split(cols: dict[str, tuple[list[str], list[str]]]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """:func:`paired_columns`' pairs as the two tables ``paired_difference_ci`` takes."""
    return {k: a for k, (a, _) in cols.items()}, {k: b for k, (_, b) in cols.items()}


def against_previous(mine_all: dict, prev_all: dict) -> dict[str, dict]:
    """This run's outcomes minus a previous four-way run's, paired by instruction: ``avg`` over every
    criterion both judged, then each criterion alone."""
    cols = paired_columns(mine_all, prev_all)
    out = {"avg": asdict(paired_difference_ci(*split(cols)))} if cols else {}
    for side in sorted({k.rsplit("/", 1)[1] for k in cols}):
        out[side] = asdict(paired_difference_ci(*split({k: v for k, v in cols.items() if k.endswith("/" + side)})))
    return out


def mean_side_scores(run: Path, method: str, ids: set[str]) -> dict[str, float]:
    """Old side -> the offline judge's score for it, averaged over ``method``'s answers in ``run`` of the
    combinations with that side, on the instructions ``ids``."""
    from personalign.judges.offline import side_score

    scores: dict[str, list[float]] = {}
    for path in sorted((run / "generations" / method).glob("*.jsonl")):
        for row in read_jsonl(path):
            if row["id"] not in ids:
                continue
            for side in path.stem.split("+"):
                if side in OLD:
                    scores.setdefault(side, []).append(side_score(side, row["prompt"], row["response"]))
    return {side: sum(v) / len(v) for side, v in sorted(scores.items())}


def reference_shift(four_run: Path, three_runs: list[Path], methods: list[str]) -> dict[str, dict]:
    """Per four-way method (and preference prompting): its mean side scores and those of its three-way
    rule (:func:`three_way_label`) in the first three-way run that holds it, on the instructions the four-way run and the
    first three-way run generated for (each run's method scored once, however many four-way methods
    share its three-way rule)."""

    def ids_of(run: Path) -> set[str]:
        return {row["id"] for path in (run / "generations" / "prompt").glob("*.jsonl") for row in read_jsonl(path)}

    ids = ids_of(four_run) & ids_of(three_runs[0])
    scored: dict[tuple[Path, str], dict[str, float]] = {}

    def scores(run: Path, method: str) -> dict[str, float]:
        if (run, method) not in scored:
            scored[run, method] = mean_side_scores(run, method, ids)
        return scored[run, method]

    out = {}
    for method in ["prompt", *methods]:
        label3 = three_way_label(method)
        holding = [run for run in three_runs if (run / "generations" / label3).is_dir()]
        if not (four_run / "generations" / method).is_dir() or not holding:
            continue
        out[method] = {"four_way": scores(four_run, method), "three_way": scores(holding[0], label3),
                       "three_way_method": label3, "three_way_run": str(holding[0]), "instructions": len(ids)}
    return out


def pct(w: dict) -> str:
    return f"{100 * w['value']:.1f} [{100 * w['low']:.1f}, {100 * w['high']:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--four-way", default="runs/eval-structure")
    ap.add_argument("--three-way", nargs="+", default=["runs/eval-psoups-all"],
                    help="three-way runs; each method's reference comes from the first that holds its rule")
    ap.add_argument("--previous", default=None, help="another four-way run to compare with, paired")
    ap.add_argument("--output", default="bench/four_dimensions.json")
    args = ap.parse_args()
    four = judge_sets(Path(args.four_way))
    threes = [judge_sets(Path(r)) for r in args.three_way]
    for r, sets in zip(args.three_way[1:], threes[1:]):
        for kind, res in sets.items():
            if kind in threes[0] and res["judge"] != threes[0][kind]["judge"]:
                raise SystemExit(f"{r} was judged by {res['judge']}, {args.three_way[0]} by "
                                 f"{threes[0][kind]['judge']}: the three-way references need the same judges")
    missing = {"labelled", "independent"} - set(four)
    if missing:
        raise SystemExit(f"{args.four_way} has no {', '.join(sorted(missing))} judge set yet; run both evals")
    previous = judge_sets(Path(args.previous)) if args.previous else {}
    for kind, res in previous.items():
        if kind in four and res["judge"] != four[kind]["judge"]:
            raise SystemExit(f"{args.previous} was judged by {res['judge']}, {args.four_way} by "
                             f"{four[kind]['judge']}: a paired difference needs the same judges")
    doc: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": "python " + " ".join(sys.argv), "four_way": args.four_way, "three_way": args.three_way,
                 "judges": {k: v["judge"] for k, v in four.items()},
                 "three_way_judges": {k: v["judge"] for k, v in threes[0].items()}, "previous": args.previous,
                 "methods": {}}
    for kind, res in four.items():
        for method, w in res["win_rates"].items():
            row = doc["methods"].setdefault(method, {})
            new = {s: c for s, c in w["by_criterion"].items() if s not in OLD}
            old = {}
            label3 = three_way_label(method)
            # the first three-way run whose judge set of this kind holds the rule (else the first run)
            held = [t[kind] for t in threes if label3 in t.get(kind, {}).get("win_rates", {})]
            ref3 = held[0] if held else threes[0].get(kind)
            mine_all = recorded_outcomes(res["_folder"], method)
            theirs_all = (recorded_outcomes(ref3["_folder"], label3)  # the three-way run may lack this rule
                          if ref3 is not None and (ref3["_folder"] / label3).is_dir() else {})
            for s in OLD:
                if s not in w["by_criterion"]:
                    continue
                three_w = (ref3 or {}).get("win_rates", {}).get(label3, {}).get("by_criterion", {}).get(s)
                mine, theirs = same_instructions(mine_all, theirs_all, s)
                old[s] = {"four_way": w["by_criterion"][s], "three_way": three_w,
                          "inside": None if three_w is None else
                          three_w["low"] <= w["by_criterion"][s]["value"] <= three_w["high"],
                          # outside because it beats the three-way interval: not a broken criterion
                          "above": None if three_w is None else w["by_criterion"][s]["value"] > three_w["high"],
                          # four-way minus three-way on the same instructions and old sides, paired
                          "paired_same_instructions": asdict(paired_difference_ci(mine, theirs)) if mine else None,
                          # the same at the family-wise level over the six old criteria (Bonferroni): an
                          # interval below 0 here is a drop that six tests at 95% would not find by chance
                          "paired_familywise": familywise_ci(mine, theirs) if mine else None}
            row[kind] = {"instructions": res["instructions"], "avg": w["avg"], "new": new, "old": old,
                         "three_way_method": label3,
                         "three_way_run": None if ref3 is None else str(ref3["_folder"].parent.parent),
                         "three_way_avg": (ref3 or {}).get("win_rates", {}).get(label3, {}).get("avg")}
            prev = previous.get(kind)
            if prev is not None and (prev["_folder"] / method).is_dir():
                row[kind]["against_previous"] = against_previous(mine_all, recorded_outcomes(prev["_folder"], method))
    doc["reference_shift"] = reference_shift(Path(args.four_way), [Path(r) for r in args.three_way],
                                             list(doc["methods"]))
    Path(args.output).write_text(json.dumps(doc, indent=2))

    for kind in ("labelled", "independent"):
        print(f"\n### {kind}: {doc['judges'][kind]}\n")
        print("| method | average criterion | " + " | ".join(s for s in ("P4A", "P4B")) + " | old criteria inside "
              "the three-way interval |\n|---|---|---|---|---|")
        for method, row in doc["methods"].items():
            r = row.get(kind)
            if r is None:
                continue
            inside = [s for s, o in r["old"].items() if o["inside"]]
            checked = [s for s, o in r["old"].items() if o["inside"] is not None]
            outside = ", ".join(f"{s} {100 * o['four_way']['value']:.1f} vs [{100 * o['three_way']['low']:.1f}, "
                                f"{100 * o['three_way']['high']:.1f}]" + (" above" if o["above"] else "")
                                for s, o in r["old"].items() if o["inside"] is False)
            note = f"{len(inside)} of {len(checked)}" + (f" (outside: {outside})" if outside else "") \
                if checked else "no three-way result"
            print(f"| {method} | {pct(r['avg'])} | " + " | ".join(pct(r["new"][s]) if s in r["new"] else "—"
                                                              for s in ("P4A", "P4B")) + f" | {note} |")
        print(f"\n{kind}: each old criterion, four-way minus three-way (same rule, each expert at the same "
              "weight) on the same instructions, paired (points)\n")
        print("| method | " + " | ".join(OLD) + " |\n|---|" + "---|" * len(OLD))
        for method, row in doc["methods"].items():
            r = row.get(kind)
            if r is None or all(o["paired_same_instructions"] is None for o in r["old"].values()):
                continue
            cells = []
            for s in OLD:
                d = r["old"].get(s, {}).get("paired_same_instructions")
                cells.append("—" if d is None else
                             f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
            print(f"| {method} | " + " | ".join(cells) + " |")
        print(f"\n{kind}: the same at the family-wise level ({100 * FAMILYWISE:.2f}% per criterion, Bonferroni over "
              "the six old criteria); a drop is an interval below 0\n")
        print("| method | " + " | ".join(OLD) + " | drops |\n|---|" + "---|" * (len(OLD) + 1))
        for method, row in doc["methods"].items():
            r = row.get(kind)
            if r is None or all(o.get("paired_familywise") is None for o in r["old"].values()):
                continue
            cells, drops = [], []
            for s in OLD:
                d = r["old"].get(s, {}).get("paired_familywise")
                cells.append("—" if d is None else
                             f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
                if d is not None and d["high"] < 0:
                    drops.append(s)
            print(f"| {method} | " + " | ".join(cells) + f" | {', '.join(drops) or 'none'} |")
        rows = {m: row[kind]["against_previous"] for m, row in doc["methods"].items()
                if kind in row and row[kind].get("against_previous")}
        if rows:
            names = ["avg"] + sorted({s for r in rows.values() for s in r} - {"avg"})
            print(f"\n{kind}: this run minus {args.previous}, same method, same instructions, paired (points)\n")
            print("| method | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
            for method, r in rows.items():
                print(f"| {method} | " + " | ".join(
                    "—" if s not in r else f"{100 * r[s]['value']:+.1f} [{100 * r[s]['low']:+.1f}, "
                    f"{100 * r[s]['high']:+.1f}]" for s in names) + " |")
    shift = doc["reference_shift"]
    if "prompt" in shift:
        print("\nthe offline judge's side score, mean per answer (three-way -> four-way); the margin is the "
              "method's minus preference prompting's\n")
        print("| method | " + " | ".join(OLD) + " |\n|---|" + "---|" * len(OLD))
        ref = shift["prompt"]
        for method, r in shift.items():
            cells = []
            for s in OLD:
                if s not in r["four_way"] or s not in r["three_way"]:
                    cells.append("—")
                elif method == "prompt":
                    cells.append(f"{r['three_way'][s]:+.3f} -> {r['four_way'][s]:+.3f}")
                else:
                    cells.append(f"margin {r['three_way'][s] - ref['three_way'][s]:+.3f} -> "
                                 f"{r['four_way'][s] - ref['four_way'][s]:+.3f}")
            print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
