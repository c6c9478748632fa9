"""Composition over four dimensions: the 16-combination evaluation against the three-way one.

Reads what ``personalign eval --config examples/structure/eval.yaml`` left in its run folder, judged
twice: by the judges that labelled the experts' training data (the offline judge for the built-in sides,
``structure_judge:score`` for the new one) and by judges that labelled nothing (the independent judge,
``markdown_judge:score``). Per method and judge set: the average criterion win rate against preference
prompting, the new dimension's criteria, and each old criterion next to the three-way evaluation's
interval for the same method and judge (``--three-way``, the recorded eight-combination run), with
whether it falls inside. Nothing is generated or judged here.

    python bench/four_dimensions.py [--four-way runs/eval-structure] [--three-way runs/eval-psoups-all]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

OLD = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")


def judge_sets(run: Path) -> dict[str, dict]:
    """``labelled`` / ``independent`` -> the results of that judge set in ``run``."""
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
        out[kind] = doc
    return out


def pct(w: dict) -> str:
    return f"{100 * w['value']:.1f} [{100 * w['low']:.1f}, {100 * w['high']:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--four-way", default="runs/eval-structure")
    ap.add_argument("--three-way", default="runs/eval-psoups-all")
    ap.add_argument("--output", default="bench/four_dimensions.json")
    args = ap.parse_args()
    four, three = judge_sets(Path(args.four_way)), judge_sets(Path(args.three_way))
    missing = {"labelled", "independent"} - set(four)
    if missing:
        raise SystemExit(f"{args.four_way} has no {', '.join(sorted(missing))} judge set yet; run both evals")
    doc: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": "python " + " ".join(sys.argv), "four_way": args.four_way, "three_way": args.three_way,
                 "judges": {k: v["judge"] for k, v in four.items()},
                 "three_way_judges": {k: v["judge"] for k, v in three.items()}, "methods": {}}
    for kind, res in four.items():
        ref3 = three.get(kind) if kind == "independent" else three.get("labelled")
        for method, w in res["win_rates"].items():
            row = doc["methods"].setdefault(method, {})
            new = {s: c for s, c in w["by_criterion"].items() if s not in OLD}
            old = {}
            for s in OLD:
                if s not in w["by_criterion"]:
                    continue
                three_w = (ref3 or {}).get("win_rates", {}).get(method, {}).get("by_criterion", {}).get(s)
                old[s] = {"four_way": w["by_criterion"][s], "three_way": three_w,
                          "inside": None if three_w is None else
                          three_w["low"] <= w["by_criterion"][s]["value"] <= three_w["high"]}
            row[kind] = {"instructions": res["instructions"], "avg": w["avg"], "new": new, "old": old,
                         "three_way_avg": (ref3 or {}).get("win_rates", {}).get(method, {}).get("avg")}
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
                                f"{100 * o['three_way']['high']:.1f}]" for s, o in r["old"].items()
                                if o["inside"] is False)
            note = f"{len(inside)} of {len(checked)}" + (f" (outside: {outside})" if outside else "") \
                if checked else "no three-way result"
            print(f"| {method} | {pct(r['avg'])} | " + " | ".join(pct(r["new"][s]) if s in r["new"] else "—"
                                                              for s in ("P4A", "P4B")) + f" | {note} |")


if __name__ == "__main__":
    main()
