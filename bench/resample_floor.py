"""How often a method that changed nothing lands inside its own earlier intervals: the noise floor of a
"stay within the intervals" target.

Two evaluations of the same methods, experts, instructions and judges that differ only in the sampling
seed (``--first`` and ``--again``). Nothing changed between them, so every difference is sampling
noise. Per judge set (``labelled``: the judges that labelled the experts' data; ``independent``: those
that labelled nothing), method and criterion:

* whether the second run's win rate falls inside the first run's 95% interval, the check that
  "the old criteria stay within the three-way intervals" applies to a four-way run;
* the chance of that under no change, from the two intervals' widths: if each estimate is normal with
  standard error ``se = half-width / 1.96``, the difference has standard error ``sqrt(se1^2 + se2^2)``
  and lands inside ``+-1.96 se1`` with probability ``2 Phi(1.96 se1 / sqrt(se1^2 + se2^2)) - 1``
  (0.83 for equal widths), and all criteria inside with the product of those;
* the second run minus the first, paired on instructions (``paired_difference_ci``), whose interval
  contains 0 unless something changed, 95% of the time per criterion, and the same at the family-wise
  level over the criteria (``four_dimensions.FAMILYWISE``, Bonferroni), which holds 0 for all six 95%
  of the time.

With ``--four-dimensions``, the same chance for the four-way results that ``bench/four_dimensions.py``
recorded: each old criterion's four-way estimate against its three-way interval, as if the four-way
method followed the old criteria exactly as the three-way one did.

Nothing is generated or judged here: both runs are read as ``personalign eval`` left them.

    python bench/resample_floor.py --first runs/eval-psoups-all --again runs/eval-psoups-seed1 \
        [--method soup-exact] [--four-dimensions bench/four_dimensions_143.json ...]
        [--output bench/resample_floor.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from four_dimensions import FAMILYWISE, familywise_ci, judge_sets, paired_columns, pct, split

from personalign.evaluation import paired_difference_ci
from personalign.report import recorded_outcomes


def inside_probability(first: dict, again: dict) -> float:
    """The chance that ``again``'s estimate lands inside ``first``'s 95% interval when nothing changed,
    both estimates normal with the standard errors their interval widths imply."""
    se1 = (first["high"] - first["low"]) / (2 * 1.96)
    se2 = (again["high"] - again["low"]) / (2 * 1.96)
    if se1 <= 0:
        return 0.0
    z = 1.96 * se1 / math.sqrt(se1 ** 2 + se2 ** 2)
    return math.erf(z / math.sqrt(2))  # 2 Phi(z) - 1


def paired(cols: dict[str, tuple[list[str], list[str]]], side: str | None, familywise: bool = False) -> dict | None:
    """The second run minus the first on :func:`paired_columns`' pairs, over every criterion or only
    ``side``, at 95% or at the family-wise level."""
    keep = {k: v for k, v in cols.items() if side is None or k.endswith("/" + side)}
    if not keep:
        return None
    return familywise_ci(*split(keep)) if familywise else asdict(paired_difference_ci(*split(keep)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--first", required=True, help="an evaluation run")
    ap.add_argument("--again", required=True, help="the same evaluation at another sampling seed")
    ap.add_argument("--method", action="append", help="methods to compare (default: every method both hold)")
    ap.add_argument("--four-dimensions", nargs="*", default=[],
                    help="bench/four_dimensions*.json files: the same chance for their four-way methods' old criteria "
                         "against the three-way intervals")
    ap.add_argument("--output", default="bench/resample_floor.json")
    args = ap.parse_args()
    first, again = judge_sets(Path(args.first)), judge_sets(Path(args.again))
    identities = []
    for run in (Path(args.first), Path(args.again)):
        path = run / "generations" / "identity.json"
        if not path.is_file():
            raise SystemExit(f"{run}: no generations/identity.json; is it an evaluation run?")
        identities.append(json.loads(path.read_text()))
    id1, id2 = identities
    differ = sorted(k for k in set(id1) | set(id2) if k not in ("experts", "sampling") and id1.get(k) != id2.get(k))
    s1, s2 = dict(id1.get("sampling", {})), dict(id2.get("sampling", {}))
    differ += [f"sampling.{k}" for k in sorted(set(s1) | set(s2)) if k != "seed" and s1.get(k) != s2.get(k)]
    if differ:
        raise SystemExit(f"the two runs differ in {', '.join(differ)}, not only in the sampling seed")
    doc: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
                 "first": args.first, "again": args.again, "seeds": [s1.get("seed"), s2.get("seed")],
                 "judges": {}, "methods": {}}
    for kind in ("labelled", "independent"):
        if kind not in first or kind not in again:
            continue
        if first[kind]["judge"] != again[kind]["judge"]:
            raise SystemExit(f"{kind}: {args.first} was judged by {first[kind]['judge']}, {args.again} by "
                             f"{again[kind]['judge']}")
        doc["judges"][kind] = first[kind]["judge"]
        methods = args.method or sorted(set(first[kind]["win_rates"]) & set(again[kind]["win_rates"]))
        for method in methods:
            w1, w2 = first[kind]["win_rates"].get(method), again[kind]["win_rates"].get(method)
            if w1 is None or w2 is None:
                raise SystemExit(f"{method}: not judged by {kind} in both runs")
            cols = paired_columns(recorded_outcomes(again[kind]["_folder"], method),
                                  recorded_outcomes(first[kind]["_folder"], method))
            rows = {}
            for side in sorted(w1["by_criterion"]):
                a, b = w1["by_criterion"][side], w2["by_criterion"][side]
                rows[side] = {"first": a, "again": b, "inside": a["low"] <= b["value"] <= a["high"],
                              "p_inside_if_unchanged": inside_probability(a, b),
                              "paired_again_minus_first": paired(cols, side),
                              "paired_familywise": paired(cols, side, familywise=True)}
            p_all = math.prod(r["p_inside_if_unchanged"] for r in rows.values())
            doc["methods"].setdefault(method, {})[kind] = {
                "avg": {"first": w1["avg"], "again": w2["avg"], "inside": w1["avg"]["low"] <= w2["avg"]["value"]
                        <= w1["avg"]["high"], "paired_again_minus_first": paired(cols, None)},
                "criteria": rows, "inside": sum(r["inside"] for r in rows.values()),
                "p_all_inside_if_unchanged": p_all}
    doc["four_way_chance"] = {}
    for path in args.four_dimensions:
        recorded = json.loads(Path(path).read_text())
        for method, by_kind in recorded["methods"].items():
            for kind, r in by_kind.items():
                ps = [inside_probability(o["three_way"], o["four_way"]) for o in r["old"].values() if o["three_way"]]
                if ps:
                    doc["four_way_chance"].setdefault(path, {}).setdefault(method, {})[kind] = {
                        "p_all_inside_if_unchanged": math.prod(ps), "p_inside_each": ps,
                        "inside": sum(bool(o["inside"]) for o in r["old"].values() if o["three_way"])}
    Path(args.output).write_text(json.dumps(doc, indent=2))

    print(f"{args.again} (seed {doc['seeds'][1]}) against {args.first} (seed {doc['seeds'][0]})")
    for method, by_kind in doc["methods"].items():
        for kind, r in by_kind.items():
            print(f"\n### {method}, {kind}: {doc['judges'][kind]}\n")
            print("| criterion | first | again | inside first's interval | P(inside) if unchanged | "
                  f"again - first, paired (points) | the same, family-wise ({100 * FAMILYWISE:.2f}%) |"
                  "\n|---|---|---|---|---:|---|---|")

            def ci(d: dict | None) -> str:
                return "—" if d is None else f"{100 * d['value']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"

            for side, c in [("avg", r["avg"]), *r["criteria"].items()]:
                p = f"{c['p_inside_if_unchanged']:.2f}" if "p_inside_if_unchanged" in c else ""
                print(f"| {side} | {pct(c['first'])} | {pct(c['again'])} | {'yes' if c['inside'] else 'no'} | {p} | "
                      f"{ci(c['paired_again_minus_first'])} | {ci(c.get('paired_familywise'))} |")
            print(f"\n{r['inside']} of {len(r['criteria'])} criteria inside; chance all are, if nothing changed: "
                  f"{r['p_all_inside_if_unchanged']:.2f}")
    for path, methods in doc["four_way_chance"].items():
        print(f"\n{path}: old criteria inside the three-way interval, and the chance all six are if the "
              "four-way method followed them exactly as the three-way one\n")
        print("| method | judge set | inside | P(each inside) | P(all inside) |\n|---|---|---:|---|---:|")
        for method, by_kind in methods.items():
            for kind, r in by_kind.items():
                each = " ".join(f"{p:.2f}" for p in r["p_inside_each"])
                print(f"| {method} | {kind} | {r['inside']} of {len(r['p_inside_each'])} | {each} | "
                      f"{r['p_all_inside_if_unchanged']:.2f} |")


if __name__ == "__main__":
    main()
