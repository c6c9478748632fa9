"""Does adding a dimension break the old ones? The four-way answers against the three-way answers, head to head.

`bench/four_dimensions.py` compares win rates against preference prompting, and the four-way reference
(prompting with four sides in the prompt) is not the three-way one. This script takes the reference out:
for each old side and each four-way combination that holds it, a method's four-way answer is judged
against the same method's three-way answer to the same instruction (the combination without its
dimension-4 side), on that old side's criterion, both orders (a disagreement is a tie). 50% means the
old criterion is followed as well with the new dimension as without it; an interval below 50% is a
measured loss. Preference prompting's four-way answers against its three-way ones, judged the same way,
show how much the reference itself moved; each method's shift minus prompting's, paired by instruction and
combination, is what the method itself adds (an interval below 0: the method loses more than the prompt
alone explains), also at the family-wise level over the six old criteria (``four_dimensions.FAMILYWISE``).
A pair may name different methods: ``--pair soup-exact-x1.33333 prompt`` judges the four-way soup against
three-way prompting's answers, the unchanged reference the three-way win rates were measured against.

Both runs must hold the same instructions, generated with the same sampling (``eval``'s run folders do).
Verdicts are written to ``--run-dir`` as they come (one JSONL file per judge, pair of methods and
combination), keyed as ``eval`` keys its verdicts (side, instruction and both answers), so a rerun judges
only what is missing and an answer generated again is judged again. Every column is read on the
instructions all of its columns share, so outcomes are paired by instruction id, never by position.

    python bench/four_vs_three.py --four-way runs/eval-structure-143 --three-way runs/eval-psoups-all runs/eval-strength \
        --pair soup-exact-x1.33333 soup-exact --pair prompt prompt --judge offline --judge independent \
        --run-dir runs/four-vs-three --output bench/four_vs_three.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from four_dimensions import FAMILYWISE, familywise_ci
from tqdm import tqdm

from personalign.data import JsonlWriter, read_jsonl
from personalign.evaluation import combine_orders, mean_win_rate_ci, outcome, paired_difference_ci
from personalign.judges import JudgeConfig, build_judge
from personalign.judges.base import judge_both_orders, pair_key

OLD = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
NEW_DIMENSION = "P4"


def answers(run: Path, method: str, combo: str) -> dict[str, dict]:
    """``id`` -> the recorded row of ``method`` for ``combo`` in ``run``."""
    path = run / "generations" / method / f"{combo}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no answers of {method} for {combo}; generate them with personalign eval")
    return {r["id"]: r for r in read_jsonl(path)}


def four_way_combos(run: Path, method: str) -> list[str]:
    combos = sorted(p.stem for p in (run / "generations" / method).glob("*.jsonl"))
    four = [c for c in combos if len(c.split("+")) == 4 and c.split("+")[3].startswith(NEW_DIMENSION)]
    if not four:
        raise SystemExit(f"{run}: no four-way answers of {method}")
    return four


def judge_pairs(judge, kind: str, run_dir: Path, four: Path, three: Path, m4: str, m3: str,
                combo4: str) -> dict[str, dict[str, str]]:
    """``side`` -> ``id`` -> the four-way answer's outcome against the three-way one, for ``combo4``'s old
    sides; verdicts already in ``run_dir`` are read, the rest judged and appended."""
    combo3 = "+".join(combo4.split("+")[:3])
    a4, a3 = answers(four, m4, combo4), answers(three, m3, combo3)
    ids = sorted(set(a4) & set(a3))
    for i in ids:
        if a4[i]["prompt"] != a3[i]["prompt"]:
            raise SystemExit(f"{combo4} / {combo3}: instruction {i} differs between the two runs")
    path = run_dir / kind / f"{m4} vs {m3}" / f"{combo4}.jsonl"
    done = {r["key"]: r["outcome"] for r in read_jsonl(path)} if path.is_file() else {}
    out: dict[str, dict[str, str]] = {}
    with JsonlWriter(path) as w:
        for side in combo3.split("+"):
            keys = {i: pair_key(side, a4[i]["prompt"], a4[i]["response"], a3[i]["response"]) for i in ids}
            todo = [i for i in ids if keys[i] not in done]
            if todo:
                verdicts = judge_both_orders(judge, side, [(a4[i]["prompt"], a4[i]["response"], a3[i]["response"])
                                                           for i in todo])
                rows = []
                for i, (first, second) in zip(todo, verdicts):
                    done[keys[i]] = combine_orders(outcome(first, "a"), outcome(second, "b"))
                    rows.append({"key": keys[i], "id": i, "side": side, "outcome": done[keys[i]],
                                 "four_way_first": first, "four_way_second": second})
                w.write_many(rows)
            out[side] = {i: done[keys[i]] for i in ids}
    return out


def aligned(columns: dict[str, dict[str, str]], ids: set[str] | None = None) -> dict[str, list[str]]:
    """Outcome columns as lists aligned by instruction id, on the ids every column (and ``ids``) holds."""
    common = set.intersection(*(set(c) for c in columns.values()), *([ids] if ids is not None else []))
    if not common:
        raise SystemExit("the columns share no instruction")
    return {name: [c[i] for i in sorted(common)] for name, c in columns.items()}


def flat(by_side: dict[str, dict[str, dict[str, str]]]) -> dict[str, dict[str, str]]:
    """``combination/side`` -> outcomes by instruction id: every column of a method, for its average."""
    return {f"{c}/{s}": col for s, cols in by_side.items() for c, col in cols.items()}


def row_cells(row: dict, fmt: str) -> str:
    return " | ".join(fmt.format(100 * row[s]["value"], 100 * row[s]["low"], 100 * row[s]["high"])
                      if s in row else "—" for s in ("avg", *OLD))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--four-way", required=True)
    ap.add_argument("--three-way", nargs="+", required=True,
                    help="three-way runs; each method's answers come from the first that holds them")
    ap.add_argument("--pair", action="append", nargs=2, required=True, metavar=("FOUR", "THREE"),
                    help="a four-way method label and the three-way one it is set against")
    ap.add_argument("--judge", action="append", required=True, choices=["offline", "independent"])
    ap.add_argument("--run-dir", default="runs/four-vs-three")
    ap.add_argument("--output", default="bench/four_vs_three.json")
    args = ap.parse_args()
    four, run_dir = Path(args.four_way), Path(args.run_dir)
    threes = [Path(r) for r in args.three_way]
    pairs = [tuple(p) for p in args.pair]
    doc: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": "python " + " ".join(sys.argv), "four_way": str(four), "three_way": {},
                 "results": {}}
    columns: dict[tuple[str, str, str], dict[str, dict[str, dict[str, str]]]] = {}
    for kind in args.judge:
        judge = build_judge(JudgeConfig(kind=kind))
        for m4, m3 in pairs:
            combos = four_way_combos(four, m4)
            held = [r for r in threes if (r / "generations" / m3).is_dir()]
            if not held:
                raise SystemExit(f"no three-way run of {', '.join(map(str, threes))} holds answers of {m3}")
            three = held[0]
            doc["three_way"][m3] = str(three)
            by_side: dict[str, dict[str, dict[str, str]]] = {}
            for combo4 in tqdm(combos, desc=f"{kind} {m4} vs {m3}", unit="combination"):
                for side, outs in judge_pairs(judge, kind, run_dir, four, three, m4, m3, combo4).items():
                    by_side.setdefault(side, {})[combo4] = outs
            columns[(kind, m4, m3)] = by_side
            row = {}
            for side in OLD:
                if side not in by_side:
                    continue
                cols = aligned(by_side[side])
                counts = {o: sum(c.count(o) for c in cols.values()) for o in ("win", "tie", "loss")}
                row[side] = {**asdict(mean_win_rate_ci(cols)), **counts}
            row["avg"] = asdict(mean_win_rate_ci(aligned(flat(by_side))))
            doc["results"].setdefault(kind, {})[f"{m4} vs {m3}"] = row
    # each method's shift minus prompting's, on the same instructions and combinations
    for (kind, m4, m3), by_side in columns.items():
        ref = columns.get((kind, "prompt", "prompt"))
        if ref is None or (m4, m3) == ("prompt", "prompt"):
            continue
        mine_all, ref_all = flat(by_side), flat(ref)
        shared = set.intersection(*(set(c) for c in (*mine_all.values(), *ref_all.values())))
        sides = {s: (aligned(by_side[s], shared), aligned(ref[s], shared)) for s in OLD if s in by_side and s in ref}
        diff = {s: asdict(paired_difference_ci(a, b)) for s, (a, b) in sides.items()}
        diff["avg"] = asdict(paired_difference_ci(aligned(mine_all, shared), aligned(ref_all, shared)))
        doc["results"][kind][f"{m4} vs {m3}"]["minus_prompt"] = diff
        # the six old criteria tested together (Bonferroni, as bench/four_dimensions.py does)
        doc["results"][kind][f"{m4} vs {m3}"]["minus_prompt_familywise"] = {
            s: familywise_ci(a, b) for s, (a, b) in sides.items()}
    Path(args.output).write_text(json.dumps(doc, indent=2))
    print("\nfour-way answers against three-way answers of the same method, on each old criterion "
          "(win rate %, ties half)\n")
    print("| judge | four-way vs three-way | avg | " + " | ".join(OLD) + " |\n|---|---|" + "---|" * (len(OLD) + 1))
    for kind, rows in doc["results"].items():
        for name, row in rows.items():
            print(f"| {kind} | {name} | " + row_cells(row, "{:.1f} [{:.1f}, {:.1f}]") + " |")
    print("\nthe same, minus preference prompting's four-way against three-way, paired (points)\n")
    print("| judge | method | avg | " + " | ".join(OLD) + " |\n|---|---|" + "---|" * (len(OLD) + 1))
    for kind, rows in doc["results"].items():
        for name, row in rows.items():
            if "minus_prompt" in row:
                print(f"| {kind} | {name} | " + row_cells(row["minus_prompt"], "{:+.1f} [{:+.1f}, {:+.1f}]") + " |")
    print(f"\nthe same at the family-wise level ({100 * FAMILYWISE:.2f}% per criterion, Bonferroni over the six "
          "old criteria): criteria whose interval lies below 0\n")
    print("| judge | method | drops |\n|---|---|---|")
    for kind, rows in doc["results"].items():
        for name, row in rows.items():
            if "minus_prompt_familywise" in row:
                drops = [f"{s} {100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                         for s, d in row["minus_prompt_familywise"].items() if d["high"] < 0]
                print(f"| {kind} | {name} | {', '.join(drops) or 'none'} |")


if __name__ == "__main__":
    main()
