"""Reward models of a pipeline run: held-out accuracy per side (single-side models next to the
multi-head model) and scoring speed (responses per second, every side) of six separate models
versus the one multi-head model, measured in one process.

    python bench/reward_models.py --run-dir runs/psoups-smollm2 [--responses 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from personalign.data import read_jsonl
from personalign.models import load_model
from personalign.recipes.train_rm import split_by_prompt
from personalign.reward_model import RewardModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/psoups-smollm2")
    ap.add_argument("--responses", type=int, default=64)
    ap.add_argument("--output", default=str(Path(__file__).with_name("reward_models.json")))
    args = ap.parse_args()
    run = Path(args.run_dir)
    rm_dir = run / "rm"
    sides = sorted(p.name for p in rm_dir.iterdir() if p.name != "multihead" and (p / "reward_model.safetensors").exists())
    record: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                    "run_dir": str(run), "sides": {}}
    stats = json.loads((run / "pairs.jsonl.stats.json").read_text())["sides"]
    for s in sides:
        m = json.loads((rm_dir / s / "reward_config.json").read_text()).get("metrics", {})
        record["sides"][s] = {"pairs": stats[s]["kept"], "ties_dropped": stats[s]["ties_dropped"],
                              "single_accuracy": m.get("eval/accuracy"), "single_eval_pairs": m.get("data/eval_pairs"),
                              "train_seconds": m.get("time/train_seconds")}
    multi_cfg = rm_dir / "multihead" / "reward_config.json"
    if multi_cfg.exists():
        mm = json.loads(multi_cfg.read_text()).get("metrics", {})
        for s in sides:
            record["sides"][s]["multihead_accuracy"] = mm.get(f"eval/accuracy/{s}")
        record["multihead_train_seconds"] = mm.get("time/train_seconds")

    # Scoring speed on held-out responses: every side's reward for each response.
    pairs = read_jsonl(run / "pairs.jsonl")
    _, held = split_by_prompt(pairs, 0.1, 0)
    prompts = [r["prompt"] for r in held][: args.responses]
    responses = [r["chosen"] for r in held][: args.responses]
    singles = []
    for s in sides:
        base, tok = load_model(device="cpu", dtype="float32")
        singles.append(RewardModel.load(rm_dir / s, base=base, tokenizer=tok))
    t0 = time.perf_counter()
    for model in singles:
        model.score(prompts, responses, batch_size=16)
    separate = len(prompts) / (time.perf_counter() - t0)
    record["scoring"] = {"responses": len(prompts), "separate_models_responses_per_s": separate}
    if multi_cfg.exists():
        base, tok = load_model(device="cpu", dtype="float32")
        multi = RewardModel.load(rm_dir / "multihead", base=base, tokenizer=tok)
        t0 = time.perf_counter()
        multi.score(prompts, responses, batch_size=16)
        one = len(prompts) / (time.perf_counter() - t0)
        record["scoring"].update({"multihead_responses_per_s": one, "speedup": one / separate})
    print(json.dumps(record, indent=2))
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
