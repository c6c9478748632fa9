"""Issue 4's table, per expert: win rate against the prompted base, fluency and on-topic, KL, train time.

Reads what ``personalign eval --single-sides`` left in its run folder (results, verdicts, generations)
and what ``train-expert`` left in each expert's folder (``expert.json``, ``metrics.jsonl``); computes
nothing new but the per-side fluency and on-topic numbers (the eval report pools its sides), the
win / tie / loss counts per side, and per instruction, expert minus base with a bootstrap interval: on-topic
similarity, and each answer's own distinct-2 and repeated 3-gram share (pooled distinct-2 can rise while
some answers loop; an interval below 0, or above 0 for repeats, is a measured loss of fluency).

    python bench/expert_table.py --eval-dir runs/eval-experts --experts runs/psoups-smollm2/experts
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict
from datetime import date
from pathlib import Path

from personalign.data import read_jsonl
from personalign.evaluation import combine_orders, mean_difference_ci, outcome
from personalign.judges.base import pair_key
from personalign.report import (
    cut_to_lengths,
    fluency_per_text,
    load_embedder,
    ontopic_similarities,
    ontopic_similarity,
    text_metrics,
)


def counts(verdict_file: Path, keys: set[str]) -> dict[str, int]:
    """Outcomes of the verdicts for these keys only: the cache also keeps verdicts on earlier generations."""
    out = {"win": 0, "tie": 0, "loss": 0}
    for row in read_jsonl(verdict_file):
        if row["key"] in keys:
            out[combine_orders(outcome(row["method_first"], "a"), outcome(row["method_second"], "b"))] += 1
    if sum(out.values()) != len(keys):
        raise SystemExit(f"{verdict_file} has {sum(out.values())} verdicts for {len(keys)} answers; rerun eval")
    return out


def kl_last(metrics_file: Path, n: int = 10) -> float | None:
    kls = [r["train/kl"] for r in read_jsonl(metrics_file) if "train/kl" in r]
    return sum(kls[-n:]) / len(kls[-n:]) if kls else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-dir", default="runs/eval-experts")
    ap.add_argument("--experts", default="runs/psoups-smollm2/experts")
    ap.add_argument("--results", help="the eval's results file to read the win rates from (default: the run "
                    "folder's results.json, the last judge's; a copy such as results-markdown.json picks another)")
    ap.add_argument("--output", default=str(Path(__file__).with_name("expert_table.json")))
    args = ap.parse_args()
    run, experts = Path(args.eval_dir), Path(args.experts)
    results = json.loads(Path(args.results or run / "results.json").read_text())
    judge = results["judge"]
    by_side = results["win_rates"]["expert-1"]["by_combination"]
    embedder = load_embedder("cpu")
    rows = {}
    for side, wr in by_side.items():
        gens = {m: read_jsonl(run / "generations" / m / f"{side}.jsonl") for m in ("prompt", "expert")}
        metrics, sims, per = {}, {}, {}
        for m, lines in gens.items():
            texts = [str(r.get("response") or "") for r in lines]
            sims[m] = ontopic_similarities([r["prompt"] for r in lines], texts, embedder)
            metrics[m] = {**text_metrics(texts), "ontopic": float(sims[m].mean())}
            per[m] = fluency_per_text(texts)  # each answer's own fluency, for the paired differences below
        if [r["id"] for r in gens["prompt"]] != [r["id"] for r in gens["expert"]]:
            raise SystemExit(f"{run}: the expert's and the base's {side} answers are not on the same instructions")
        # "On-topic not worse than the base's", measured: expert minus base per instruction, bootstrapped.
        ontopic_diff = asdict(mean_difference_ci(sims["expert"], sims["prompt"]))
        # Shorter answers share fewer words with the question: the base's answers cut to the expert's
        # length (per instruction, in words) tell a length effect from a drift off topic.
        cut = cut_to_lengths([b["response"] for b in gens["prompt"]], [e["response"] for e in gens["expert"]])
        metrics["prompt"]["ontopic_cut_to_expert_length"] = ontopic_similarity(
            [r["prompt"] for r in gens["prompt"]], cut, embedder)
        fluency_diff = {k: asdict(mean_difference_ci(per["expert"][k], per["prompt"][k])) for k in per["expert"]}
        doc = json.loads((experts / side / "expert.json").read_text())
        keys = {pair_key(side, e["prompt"], e["response"], b["response"])
                for e, b in zip(gens["expert"], gens["prompt"])}
        rows[side] = {"win_rate": wr["avg"], "counts": counts(run / "judgments" / judge / "expert-1" / f"{side}.jsonl",
                                                              keys),
                      "expert": metrics["expert"], "prompted_base": metrics["prompt"],
                      "ontopic_expert_minus_base": ontopic_diff,
                      "per_answer_expert_minus_base": fluency_diff,
                      "worst_answer_repetition_3": {m: float(v["repetition_3"].max(initial=0.0))
                                                    for m, v in per.items()},
                      "kl_last10": kl_last(experts / side / "metrics.jsonl"),
                      "train_seconds": doc["metrics"].get("time/train_seconds"),
                      "reward_first": doc["metrics"].get("train/reward_raw_first"),
                      "reward_last": doc["metrics"].get("train/reward_raw_last")}
    record = {"date": date.today().isoformat(), "machine": platform.machine(), "eval_dir": str(run),
              "judge": judge, "sides": rows}
    Path(args.output).write_text(json.dumps(record, indent=2))

    print("| side | win rate [95% CI] | W / T / L | words (base) | on-topic (base; base cut to expert length) "
          "| on-topic, expert - base [95% CI] | distinct-2 (base) | repeated 3-grams (base) "
          "| per answer, expert - base [95% CI]: distinct-2; repeated 3-grams | KL last 10 | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for side, r in rows.items():
        w, c, e, b = r["win_rate"], r["counts"], r["expert"], r["prompted_base"]
        d, f = r["ontopic_expert_minus_base"], r["per_answer_expert_minus_base"]
        d2, r3 = f["distinct_2"], f["repetition_3"]
        print(f"| {side} | {100 * w['value']:.1f}% [{100 * w['low']:.1f}, {100 * w['high']:.1f}] "
              f"| {c['win']} / {c['tie']} / {c['loss']} | {e['mean_words']:.0f} ({b['mean_words']:.0f}) "
              f"| {e['ontopic']:.3f} ({b['ontopic']:.3f}; {b['ontopic_cut_to_expert_length']:.3f}) "
              f"| {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
              f"| {e['distinct_2']:.3f} ({b['distinct_2']:.3f}) | {e['repetition_3']:.3f} ({b['repetition_3']:.3f}) "
              f"| {d2['value']:+.3f} [{d2['low']:+.3f}, {d2['high']:+.3f}]; "
              f"{r3['value']:+.3f} [{r3['low']:+.3f}, {r3['high']:+.3f}] "
              f"| {r['kl_last10']:.2f} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
