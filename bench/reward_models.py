"""Reward models of a pipeline run: held-out accuracy per side (single-side models next to the
multi-head model) and scoring speed (responses per second, every side) of six separate models
versus the one multi-head model, measured in one process.

    python bench/reward_models.py --run-dir runs/psoups-smollm2 [--responses 64]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from personalign.data import read_jsonl
from personalign.models import load_model
from personalign.data import split_by_prompt
from personalign.reward_model import RewardModel


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion p measured on n trials."""
    if not n:
        return (float("nan"), float("nan"))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def probe_cv(folder: Path, side: str) -> dict:
    """The step-0 probe record: cross-validated accuracy per penalty and the chosen one, when logged."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return {}
    first = json.loads(path.read_text().splitlines()[0])
    cv = {k.rsplit("=", 1)[1]: v for k, v in first.items() if k.startswith(f"probe/cv_accuracy/{side}/")}
    out = {"probe_start_accuracy": first.get(f"eval/accuracy/{side}")}
    if cv:
        out.update({"probe_cv_accuracy": cv, "probe_l2": first.get(f"probe/l2/{side}")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/psoups-smollm2")
    ap.add_argument("--responses", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=str(Path(__file__).with_name("reward_models.json")))
    args = ap.parse_args()
    run = Path(args.run_dir)
    rm_dir = run / "rm"
    sides = sorted(p.name for p in rm_dir.iterdir() if p.name != "multihead" and (p / "reward_model.safetensors").exists())
    record: dict = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                    "run_dir": str(run), "sides": {}}
    stats = json.loads((run / "pairs.jsonl.stats.json").read_text())["sides"]
    for s in sides:
        cfg = json.loads((rm_dir / s / "reward_config.json").read_text())
        m = cfg.get("metrics", {})
        acc, n = m.get("eval/accuracy"), m.get("data/eval_pairs")
        record["sides"][s] = {"pairs": stats[s]["kept"], "ties_dropped": stats[s]["ties_dropped"],
                              "pooling": cfg.get("pooling", "last"), "single_accuracy": acc,
                              "single_accuracy_95ci": wilson(acc, n) if acc is not None else None,
                              "single_eval_pairs": n, "train_seconds": m.get("time/train_seconds"),
                              **probe_cv(rm_dir / s, s)}
    multi_cfg = rm_dir / "multihead" / "reward_config.json"
    if multi_cfg.exists():
        mm = json.loads(multi_cfg.read_text()).get("metrics", {})
        for s in sides:
            record["sides"][s]["multihead_accuracy"] = mm.get(f"eval/accuracy/{s}")
            record["sides"][s]["multihead_probe"] = probe_cv(rm_dir / "multihead", s)
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
    multi = None
    if multi_cfg.exists():
        base, tok = load_model(device="cpu", dtype="float32")
        multi = RewardModel.load(rm_dir / "multihead", base=base, tokenizer=tok)

    def separate() -> float:
        t0 = time.perf_counter()
        for model in singles:
            model.score(prompts, responses, batch_size=16)
        return len(prompts) / (time.perf_counter() - t0)

    def one() -> float:
        t0 = time.perf_counter()
        multi.score(prompts, responses, batch_size=16)
        return len(prompts) / (time.perf_counter() - t0)

    runs: dict[str, list[float]] = {"separate": [], "multihead": []}
    for k in range(args.repeats):  # alternate the order between repetitions
        order = ["separate", "multihead"] if k % 2 == 0 else ["multihead", "separate"]
        for name in order:
            if name == "multihead" and multi is None:
                continue
            runs[name].append(separate() if name == "separate" else one())
    record["scoring"] = {"responses": len(prompts), "repeats": args.repeats,
                         "separate_models_responses_per_s": statistics.median(runs["separate"])}
    if multi is not None:
        fast = statistics.median(runs["multihead"])
        record["scoring"].update({"multihead_responses_per_s": fast,
                                  "speedup": fast / record["scoring"]["separate_models_responses_per_s"]})
    print(json.dumps(record, indent=2))
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
