"""How often two judges give the same outcome to the same evaluation pairs, per side.

    python bench/judge_agreement.py runs/eval-psoups-all --judges offline independent [--json bench/judge_agreement.json]

Reads ``<run>/judgments/<judge>/<method>/<combination>.jsonl`` of both judges (each verdict keyed by side,
instruction and both answers), turns each pair's two verdicts (both presentation orders) into the
method's outcome (win, tie, loss), and reports per side the pairs both judged, the raw agreement, Cohen's
kappa, and how often the two judges give opposite outcomes (one a win, the other a loss).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from personalign.evaluation import agreement, pair_outcome


def outcomes(folder: Path) -> dict[str, tuple[str, str]]:
    """key -> (side, outcome) over every method and combination in a judge's folder."""
    out: dict[str, tuple[str, str]] = {}
    for path in sorted(folder.glob("*/*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[f"{path.parent.name}/{row['key']}"] = (row["side"], pair_outcome(row["method_first"],
                                                                                  row["method_second"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--judges", nargs=2, default=["offline", "independent"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    a, b = (outcomes(args.run / "judgments" / j) for j in args.judges)
    common = sorted(set(a) & set(b))
    if not common:
        print(f"error: the two judges share no judged pair in {args.run}", file=sys.stderr)
        return 1
    by_side: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for k in common:
        by_side[a[k][0]][0].append(a[k][1])
        by_side[a[k][0]][1].append(b[k][1])
    rows = {}
    for side in sorted(by_side):
        x, y = by_side[side]
        stats = agreement(x, y)
        stats["opposite"] = sum({p, q} == {"win", "loss"} for p, q in zip(x, y)) / len(x)
        stats["win_rate"] = {j: sum({"win": 1, "tie": 0.5}.get(o, 0) for o in v) / len(v)
                             for j, v in zip(args.judges, (x, y))}
        rows[side] = stats
    print(f"| side | pairs | agreement | kappa | opposite outcomes | win rate {args.judges[0]} | "
          f"win rate {args.judges[1]} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for side, s in rows.items():
        print(f"| {side} | {s['pairs']} | {s['agreement']:.2f} | {s['kappa']:.2f} | {s['opposite']:.2f} | "
              f"{s['win_rate'][args.judges[0]]:.3f} | {s['win_rate'][args.judges[1]]:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "judges": args.judges, "sides": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
