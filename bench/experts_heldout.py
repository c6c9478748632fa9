"""The six shipped experts against their prompted base on instructions no expert trained on.

``bench/RESULTS.md``'s expert table is measured on ``builtin:eval``. This script measures the same
thing on the other held-out set: instructions of ``builtin:train`` that no shipped expert saw in RL
(:func:`personalign.provenance.rl_prompts`), ``--n`` of them in a seeded order. Each expert answers with
its side's prompt, the base model with the same prompt; both orders are judged on the side's criterion by
the independent judge (which labelled nothing the experts learned from) and by the offline judge (which
labelled their training pairs). Sampling as the recorded evaluation (96 new tokens, temperature 0.7,
top-p 0.9, repetition penalty 1.1, seed 0). Everything goes through ``personalign eval --single-sides``.

    python bench/experts_heldout.py [--n 96] [--run-dir runs/eval-experts-heldout]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from personalign import load_prompts
from personalign.compose import shipped_experts_dir
from personalign.provenance import unseen_prompts

MODEL = "smollm2-135m-instruct"
SETTINGS = ["--set", "sampling.max_new_tokens=96", "--set", "sampling.temperature=0.7", "--set", "sampling.top_p=0.9",
            "--set", "sampling.repetition_penalty=1.1", "--set", "batch_size=24"]


def held_out(n: int) -> list[dict[str, str]]:
    """``n`` instructions of builtin:train that no shipped expert trained on, in a seeded order."""
    source, idx = unseen_prompts(shipped_experts_dir(MODEL), n, seed=0)
    items = load_prompts(source)
    print(f"{n} instructions of {source} that no shipped expert saw", file=sys.stderr)
    return [{"id": f"train-{i}", "prompt": items[i].prompt} for i in idx]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--run-dir", default="runs/eval-experts-heldout")
    ap.add_argument("--judges", default="independent,offline")
    ap.add_argument("--output", default="bench/experts_heldout.json")
    args = ap.parse_args()
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    prompts = run / "prompts.jsonl"
    rows = held_out(args.n)
    if prompts.exists() and prompts.read_text() != "".join(json.dumps(r) + "\n" for r in rows):
        raise SystemExit(f"{prompts} holds other instructions; use another --run-dir")
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
           "instructions": args.n, "experts": str(shipped_experts_dir(MODEL)), "judges": {}}
    for judge in args.judges.split(","):
        cmd = [sys.executable, "-m", "personalign", "eval", "--single-sides", "--run-dir", str(run), "--judge", judge,
               "--set", f"prompts={prompts}", *SETTINGS]
        subprocess.run(cmd, check=True)
        res = json.loads((run / "results.json").read_text())
        by_side = res["win_rates"]["expert-1"]["by_combination"]
        out["judges"][res["judge"]] = {side: {k: wr["avg"][k] for k in ("value", "low", "high")}
                                       for side, wr in by_side.items()}
    Path(args.output).write_text(json.dumps(out, indent=2))
    sides = list(next(iter(out["judges"].values())))
    print("| judge | " + " | ".join(sides) + " |\n|---|" + "---:|" * len(sides))
    for judge, per in out["judges"].items():
        print(f"| {judge} | " + " | ".join(f"{100 * per[s]['value']:.1f} [{100 * per[s]['low']:.1f}, "
                                           f"{100 * per[s]['high']:.1f}]" for s in sides) + " |")


if __name__ == "__main__":
    main()
