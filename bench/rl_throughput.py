"""RL training throughput: personalign's critic-free loop (``train-expert --algorithm rloo``) versus
TRL's ``RLOOTrainer`` on the same settings, in one process.

Same base model, same LoRA (r=16, alpha=32, attention and MLP projections; dropout 0 by default as
train-expert's default, ``--lora-dropout`` to change), same prompts
with the side's preference prompt, 4 prompts x 4 samples per step, the same maximum completion length,
temperature 1, learning rate, KL coefficient and reward (the offline judge of the side). The first step
of each run is warm-up and not counted; samples per second is 16 / the median step time of a run.

Each repetition runs both loops, alternating which runs first (ours then TRL, TRL then ours, ...), so that
neither always runs on a machine the other has just warmed (or left busy). The ratio is the median over
repetitions of each repetition's ratio; the record also gives each order's ratio, so that an order effect
shows instead of hiding in the median.

    python bench/rl_throughput.py [--reps 2] [--steps 3] [--side P2A] [--max-new-tokens 48] [--lora-dropout 0]
                                  [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from personalign.data import build_user_message, load_builtin
from personalign.judges.offline import side_score
from personalign.preferences import default_space

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ours(args, out: Path) -> list[float]:
    """``personalign train-expert`` as a user runs it; step times from its metrics.jsonl."""
    overrides = {
        "model": args.model, "reward": "offline", "algorithm": "rloo", "lora.r": 16, "lora.alpha": 32,
        "lora.dropout": args.lora_dropout, "lora.target_modules": ",".join(TARGETS), "lr": 5e-5,
        "steps": args.steps + 1, "batch_prompts": 4, "group_size": 4, "kl_coef": 0.05,
        "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "checkpoint_every": 10_000,
        "device": "cpu", "dtype": "float32", "progress": False,
    }
    sets = [a for k, v in overrides.items() if v is not None for a in ("--set", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "personalign", "train-expert", "--side", args.side, "-o", str(out),
                    *sets], check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["time/step_seconds"] for r in rows if "time/step_seconds" in r][1:]


def trl(args, out: Path) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from personalign.models import load_model

    model, tok = load_model(args.model, device="cpu", dtype="float32")
    side_prompt = default_space().sides[args.side].prompt
    prompts = [i.prompt for i in load_builtin("train")]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": build_user_message(p, side_prompt)}],
                               "instruction": p} for p in prompts])

    def reward(prompts, completions, instruction, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [side_score(args.side, q, t) for q, t in zip(instruction, texts)]

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    cfg = RLOOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, per_device_train_batch_size=16, num_generations=4,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, learning_rate=5e-5, beta=0.05,
        max_steps=args.steps + 1, logging_steps=1, save_strategy="no", report_to=[], seed=0,
    )
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules=list(TARGETS))
    trainer = RLOOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          peft_config=peft_cfg, callbacks=[Timer()])
    trainer.train()
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2, help="Repetitions; each runs both loops, alternating order.")
    ap.add_argument("--steps", type=int, default=3, help="Timed steps per run (after one warm-up step).")
    ap.add_argument("--side", default="P2A")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--output", default=str(Path(__file__).with_name("rl_throughput.json")))
    args = ap.parse_args()
    if args.reps < 1 or args.steps < 1:
        raise SystemExit("--reps and --steps must be at least 1")
    n = 16  # samples per step: 4 prompts x 4 samples
    reps = []
    for rep in range(args.reps):
        order = ["ours", "trl"] if rep % 2 == 0 else ["trl", "ours"]
        times: dict[str, list[float]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in order:
                started = time.perf_counter()
                times[name] = (ours if name == "ours" else trl)(args, Path(tmp) / name)
                print(f"rep {rep + 1}/{args.reps} ({' then '.join(order)}): {name} median step "
                      f"{statistics.median(times[name]):.1f} s (run {time.perf_counter() - started:.0f} s)", flush=True)
        row = {"order": order, "ours_step_s": times["ours"], "trl_step_s": times["trl"],
               "ours_samples_per_s": n / statistics.median(times["ours"]),
               "trl_samples_per_s": n / statistics.median(times["trl"])}
        row["ratio"] = row["ours_samples_per_s"] / row["trl_samples_per_s"]
        reps.append(row)
    by_order = {}
    for first in ("ours", "trl"):
        rows = [r for r in reps if r["order"][0] == first]
        if rows:
            by_order[f"{first}_first"] = {
                "reps": len(rows),
                "ours_samples_per_s": statistics.median(r["ours_samples_per_s"] for r in rows),
                "trl_samples_per_s": statistics.median(r["trl_samples_per_s"] for r in rows),
                "ratio": statistics.median(r["ratio"] for r in rows),
            }
    record = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "model": args.model or "smollm2-135m-instruct", "side": args.side,
        "samples_per_step": n, "steps": args.steps, "max_new_tokens": args.max_new_tokens,
        "lora_dropout": args.lora_dropout, "reps": reps, "by_order": by_order,
        "ours_samples_per_s": statistics.median(r["ours_samples_per_s"] for r in reps),
        "trl_samples_per_s": statistics.median(r["trl_samples_per_s"] for r in reps),
        "ratio": statistics.median(r["ratio"] for r in reps),
    }
    print(json.dumps(record, indent=2))
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
