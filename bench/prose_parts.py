"""Where a prose expert (P4B) differs from its prompted base, by the parts of the prose judge.

Reads the answers ``personalign eval --config examples/structure/eval-experts.yaml`` left in each run
folder (``generations/{expert,prompt}/P4B.jsonl``), scores each with ``examples/structure/prose_judge.py``,
with the labelling judge's sentence count and with the answer's own distinct-2 (fluency per answer; the
eval report's distinct-2 pools all answers), and reports, per folder, the mean of each part for the
expert and the base and their per-instruction difference with a bootstrap 95% interval. Computes no win
rate: those come from ``personalign eval --judge prose_judge:score``. With ``--coherence`` it adds the
parts of ``coherence_judge.py`` (the labeller of the coherence-trained expert), with the embedded model.

With ``--four-way RUN`` (a run of ``examples/structure/eval.yaml``) it reads the prose criterion of the
four-way composition instead: per method, each combination with P4B, the method's answer against
preference prompting's for the same instruction, decided by the prose judge's score at its margin (the
score depends on neither the order nor the other answer, so this is what ``personalign eval`` with this
judge would record), averaged over those combinations with an interval that resamples instructions.

    python bench/prose_parts.py runs/eval-structure-experts runs/eval-structure-ontopic \
        --four-way runs/eval-structure-143 --output bench/prose_parts.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

from personalign.data import read_jsonl
from personalign.evaluation import mean_difference_ci, mean_win_rate_ci

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "structure"


def rows(run: Path, method: str) -> dict[str, tuple[str, str]]:
    """Instruction id -> (instruction, answer)."""
    path = run / "generations" / method / "P4B.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `personalign eval --config examples/structure/eval-experts.yaml "
                         f"--set run_dir={run}` first")
    return {r["id"]: (r["prompt"], r["response"]) for r in read_jsonl(path)}


def measures(text: str) -> dict[str, float]:
    import prose_judge
    import structure_judge

    from personalign.report import fluency_per_text

    m = prose_judge.parts(text)
    _, _, _, sentences = structure_judge.layout(text)
    return {"prose_score": prose_judge.from_parts(m), "S": m["S"], "P": m["P"],
            "cohesion": m["cohesion"], "length": m["length"], "labeller_sentences": float(sentences),
            "words": m["words"], "distinct_2": float(fluency_per_text([text])["distinct_2"][0])}


def coherence_measures(answers: list[tuple[str, str]]) -> list[dict[str, float]]:
    """The labelling judge of the coherence-trained expert, by part: its context gain, finished last
    sentence, markup share and score (``examples/structure/coherence_judge.py``; runs the embedded model)."""
    import coherence_judge

    parts = coherence_judge.parts([q for q, _ in answers], [a for _, a in answers])
    return [{"coherence_score": coherence_judge.from_parts(p) if coherence_judge.WORD.search(a)
             else coherence_judge.EMPTY, "context_gain": p["G"], "finished": p["E"], "markup": p["M"]}
            for p, (_, a) in zip(parts, answers, strict=True)]


def table(run: Path, coherence: bool = False) -> dict[str, dict[str, float]]:
    expert, base = rows(run, "expert"), rows(run, "prompt")
    ids = sorted(set(expert) & set(base))
    if len(ids) != len(expert) or len(ids) != len(base):
        raise SystemExit(f"{run}: the expert's and the base's answers are for different instructions")
    e = [measures(expert[i][1]) for i in ids]
    b = [measures(base[i][1]) for i in ids]
    if coherence:
        for m, extra in zip(e + b, coherence_measures([expert[i] for i in ids] + [base[i] for i in ids]),
                            strict=True):
            m.update(extra)
    out: dict[str, dict[str, float]] = {}
    for key in e[0]:
        xs, ys = [m[key] for m in e], [m[key] for m in b]
        d = mean_difference_ci(xs, ys)
        out[key] = {"expert": sum(xs) / len(xs), "base": sum(ys) / len(ys), "difference": d.value, "low": d.low,
                    "high": d.high}
    out["n"] = {"instructions": len(ids)}
    return out


def four_way(run: Path) -> dict[str, dict]:
    """Method -> the P4B criterion by the prose judge against preference prompting, over the combinations
    with P4B: win rate with its interval, and win / tie / loss counts. Pairs are decided by the project's
    function judge at the prose judge's margin, in both orders, as ``personalign eval`` decides them."""
    import prose_judge

    from personalign.evaluation import combine_orders, outcome
    from personalign.judges import FunctionJudge

    judge = FunctionJudge("prose_judge:score", {"P4B": prose_judge.MARGIN})
    combos = sorted(p.stem for p in (run / "generations" / "prompt").glob("*.jsonl") if "P4B" in p.stem.split("+"))
    if not combos:
        raise SystemExit(f"{run} has no preference-prompting answers for a combination with P4B")
    out: dict[str, dict] = {}
    for method in sorted(p.name for p in (run / "generations").iterdir() if p.is_dir() and p.name != "prompt"):
        table: dict[str, list[str]] = {}
        for combo in combos:
            path = run / "generations" / method / f"{combo}.jsonl"
            if not path.is_file():
                break
            mine = {r["id"]: r["response"] for r in read_jsonl(path)}
            base = {r["id"]: r["response"] for r in read_jsonl(run / "generations" / "prompt" / f"{combo}.jsonl")}
            ids = sorted(base)
            if set(mine) != set(base):
                raise SystemExit(f"{path}: not the instructions preference prompting answered")
            first = judge.judge_many([("", mine[i], base[i]) for i in ids], "P4B")
            second = judge.judge_many([("", base[i], mine[i]) for i in ids], "P4B")
            table[combo] = [combine_orders(outcome(x, "a"), outcome(y, "b")) for x, y in zip(first, second)]
        else:
            w = mean_win_rate_ci(table)
            flat = [o for col in table.values() for o in col]
            out[method] = {"win_rate": {"value": w.value, "low": w.low, "high": w.high, "n": w.n},
                           "combinations": len(table),
                           "counts": {k: flat.count(k) for k in ("win", "tie", "loss")}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--four-way", type=Path, help="a run of examples/structure/eval.yaml")
    ap.add_argument("--coherence", action="store_true",
                    help="also the parts of coherence_judge (loads the embedded model)")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(EXAMPLE))
    result = {"machine": f"{platform.machine()}, {platform.system()}", "date": date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "runs": {str(r): table(r, args.coherence) for r in args.runs}}
    if args.four_way:
        result["four_way"] = {"run": str(args.four_way), "methods": four_way(args.four_way)}
    for run, t in result["runs"].items():
        print(f"\n{run} ({t['n']['instructions']} instructions)")
        for key, v in t.items():
            if key != "n":
                print(f"  {key:20s} expert {v['expert']:7.3f}  base {v['base']:7.3f}  "
                      f"diff {v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]")
    for method, r in result.get("four_way", {}).get("methods", {}).items():
        w, c = r["win_rate"], r["counts"]
        print(f"four-way P4B by the prose judge, {method}: {100 * w['value']:.1f} [{100 * w['low']:.1f}, "
              f"{100 * w['high']:.1f}]  W/T/L {c['win']}/{c['tie']}/{c['loss']}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
