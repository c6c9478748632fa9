"""Where a prose expert (P4B) differs from its prompted base, by the parts of the prose judge.

Reads the answers ``personalign eval --config examples/structure/eval-experts.yaml`` left in each run
folder (``generations/{expert,prompt}/P4B.jsonl``), scores each with ``examples/structure/prose_judge.py``
and with the labelling judge's sentence count, and reports, per folder, the mean of each part for the
expert and the base and their per-instruction difference with a bootstrap 95% interval. Computes no win
rate: those come from ``personalign eval --judge prose_judge:score``.

    python bench/prose_parts.py runs/eval-structure-experts runs/eval-structure-ontopic \
        --output bench/prose_parts.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

from personalign.data import read_jsonl
from personalign.evaluation import mean_difference_ci

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "structure"


def rows(run: Path, method: str) -> dict[str, str]:
    path = run / "generations" / method / "P4B.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `personalign eval --config examples/structure/eval-experts.yaml "
                         f"--set run_dir={run}` first")
    return {r["id"]: r["response"] for r in read_jsonl(path)}


def measures(text: str) -> dict[str, float]:
    import prose_judge
    import structure_judge

    m = prose_judge.parts(text)
    _, _, _, sentences = structure_judge.layout(text)
    return {"prose_score": prose_judge.score([""], [text], "P4B")[0], "S": m["S"], "P": m["P"],
            "cohesion": m["cohesion"], "length": m["length"], "labeller_sentences": float(sentences),
            "words": m["words"]}


def table(run: Path) -> dict[str, dict[str, float]]:
    expert, base = rows(run, "expert"), rows(run, "prompt")
    ids = sorted(set(expert) & set(base))
    if len(ids) != len(expert) or len(ids) != len(base):
        raise SystemExit(f"{run}: the expert's and the base's answers are for different instructions")
    e = [measures(expert[i]) for i in ids]
    b = [measures(base[i]) for i in ids]
    out: dict[str, dict[str, float]] = {}
    for key in e[0]:
        xs, ys = [m[key] for m in e], [m[key] for m in b]
        d = mean_difference_ci(xs, ys)
        out[key] = {"expert": sum(xs) / len(xs), "base": sum(ys) / len(ys), "difference": d.value, "low": d.low,
                    "high": d.high}
    out["n"] = {"instructions": len(ids)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(EXAMPLE))
    result = {"machine": f"{platform.machine()}, {platform.system()}", "date": date.today().isoformat(),
              "command": "python bench/prose_parts.py " + " ".join(map(str, args.runs)),
              "runs": {str(r): table(r) for r in args.runs}}
    for run, t in result["runs"].items():
        print(f"\n{run} ({t['n']['instructions']} instructions)")
        for key, v in t.items():
            if key != "n":
                print(f"  {key:20s} expert {v['expert']:7.3f}  base {v['base']:7.3f}  "
                      f"diff {v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
