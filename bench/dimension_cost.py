"""What adding a preference dimension costs: P-Soups (the new sides only) against multitask and P-MORL.

The Personalized Soups claim: a new dimension costs the experts of its own two sides, trained
independently and composed with the existing ones, while multitask and P-MORL must be retrained over
every combination (2^d of them for d binary dimensions). This script puts numbers on it for the
structure dimension (``examples/structure``) added to the three built-in ones, on this machine.

- **P-Soups, measured in full**: the wall time of the structure run (``--new``, made by
  ``personalign pipeline --config examples/structure/pipeline.yaml``): rollouts, labels, a reward model
  and an RL expert per new side, from its ``summary.json`` and ``executor.jsonl``. Also extrapolated from
  a short run of the same expert recipe in this run, like the alternatives, for a like-for-like row (the
  full run's steps were slower than the short run's: ``expert_full_per_step_s`` against ``per_step_s``).
- **Multitask and P-MORL, measured on short runs and extrapolated**: each retrained as its shipped
  recipe (``--old``'s ``baselines/*/config.json``) over all eight sides (16 combinations), run for a few
  steps in a fresh folder; the seconds per step (median after a warm-up step) times the steps the full
  recipe would take. P-MORL's shipped recipe gives 120 steps of 4 prompts to 8 combinations; over 16
  combinations the same steps give each half the training, so both 120 and 240 steps are reported.
  Multitask's is one epoch over the chosen responses of every side's pairs (the old and the new).
- **MoPE's learned controller, measured on a short run and extrapolated**: mixing K=4 experts needs no
  training (``mope-uniform``, ``mope-prob``), but the Preference Control Model takes the preference as
  input and must be retrained to know the new sides: the shipped PCM's recipe (``--pcm``'s
  ``config.json``) over the eight experts (``--experts``, the six and the new two), its setup (model,
  reference answers, reward scales: the short run's wall time less its timed steps) plus its steps.
- In the same run, alternating the order over repetitions: a short run of the new side's expert recipe
  (its per-step cost against the full run's), and P-MORL over the old six sides (what the 8-combination
  recipe costs per step today).

Both alternatives also need the new sides' rollouts and labels (multitask trains on the pairs) and
their reward models (P-MORL's reward): those are the same measured seconds as P-Soups', listed apart.

    python bench/dimension_cost.py [--old runs/psoups-smollm2] [--new runs/structure-smollm2]
        [--dimensions examples/structure/dimensions.yaml] [--pcm runs/pcm-smollm2-t07]
        [--experts runs/experts-structure] [--steps 3] [--reps 2] [--reuse bench/dimension_cost.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def cli(command: str, config: dict, root: Path, name: str, env: dict) -> float:
    """``personalign COMMAND --config FILE`` in a fresh process; its wall time."""
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "personalign", command, "--config", str(path)],
                          check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def step_seconds(metrics: Path) -> list[float]:
    """Seconds of each step after the first, from the wall-clock ``time`` of consecutive metric rows."""
    rows = [r for r in read_jsonl(metrics) if "time" in r and "step" in r]
    return [b["time"] - a["time"] for a, b in itertools.pairwise(rows) if b["step"] == a["step"] + 1]


def measured_new(new: Path, root: Path, env: dict) -> tuple[dict, str]:
    """The structure run's wall time per stage: P-Soups' cost of the new dimension, in full; and where the
    label stage's time comes from. A run made before the label stage timed itself is labelled again here,
    with its own label settings on its own rollouts, and that is timed (file times are no record: a
    checkout rewrites them)."""
    summary = json.loads((new / "summary.json").read_text())
    log = read_jsonl(new / "executor.jsonl")
    units = {e["unit"]: e["seconds"] for e in log if e["event"] == "finished"}
    label = summary["stages"].get("label", {}).get("seconds")
    source = "the run's summary.json"
    if label is None:
        settings = summary["stages"]["label"]["labelling"]
        cfg = {"rollouts": str(new / "rollouts.jsonl"), "output": str(root / "relabelled.jsonl"),
               **{k: settings[k] for k in ("judges", "combine", "pairing", "sides", "dimensions")}}
        label = cli("label", cfg, root, "relabel", env)
        kept = {s: v["kept"] for s, v in json.loads((root / "relabelled.jsonl.stats.json").read_text())["sides"].items()}
        want = {s: v["kept"] for s, v in summary["stages"]["label"]["sides"].items()}
        if kept != want:
            raise SystemExit(f"labelling {new}'s rollouts again kept {kept} pairs, the run kept {want}")
        source = "labelled again in this run (same rollouts, judge and settings; same pairs kept)"
    return {"rollout": summary["stages"]["rollout"]["seconds"], "label": label,
            **{name: secs for name, secs in sorted(units.items())}}, source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="runs/psoups-smollm2")
    ap.add_argument("--new", default="runs/structure-smollm2")
    ap.add_argument("--dimensions", default="examples/structure/dimensions.yaml")
    ap.add_argument("--judge-path", default="examples/structure", help="Where the new dimension's judge lives.")
    ap.add_argument("--pcm", default="runs/pcm-smollm2-t07", help="A train-pcm run whose recipe is retrained.")
    ap.add_argument("--experts", default="runs/experts-structure", help="The six old experts and the new ones.")
    ap.add_argument("--steps", type=int, default=3, help="Timed steps of each short run (after one warm-up).")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--output", default="bench/dimension_cost.json")
    ap.add_argument("--reuse", help="A previous output whose timed short runs are used instead of running them "
                                    "again (the cost table is computed anew; the file records this).")
    args = ap.parse_args()

    old, new = Path(args.old), Path(args.new)
    new_sides = json.loads((new / "pipeline.json").read_text())["sides"]
    mt = json.loads((old / "baselines/multitask/config.json").read_text())
    pm = json.loads((old / "baselines/pmorl/config.json").read_text())
    ex = json.loads((new / "experts" / new_sides[0] / "config.json").read_text())
    pc = json.loads((Path(args.pcm) / "config.json").read_text())
    old_sides = pm["sides"]
    sides = old_sides + new_sides
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.judge_path, os.environ.get("PYTHONPATH")]))}
    n = args.steps + 1

    with tempfile.TemporaryDirectory(prefix="dimcost-") as tmp:
        root = Path(tmp)
        pairs = root / "pairs.jsonl"  # every side's pairs: what a multitask retrain trains on
        pairs.write_text((old / "pairs.jsonl").read_text() + (new / "pairs.jsonl").read_text())
        # an old side whose reward model's weights are gone (pruned run folders) is rewarded by the offline
        # judge instead: cheaper than a reward model's forward pass, so its per-step cost is a lower bound
        old_rewards = {s: r if not r.startswith("rm:") or (Path(r[3:]) / "reward_model.safetensors").is_file()
                       else "offline" for s, r in pm["rewards"].items()}
        rewards = {**old_rewards, **{s: f"rm:{new / 'rm' / s}" for s in new_sides}}
        configs = {
            "multitask16": ("train-multitask", {**mt, "pairs": str(pairs), "sides": sides,
                                                "dimensions": args.dimensions, "max_steps": 5 * n,
                                                "log_every": 1, "checkpoint_every": 10_000, "progress": False}),
            "pmorl16": ("train-pmorl", {**pm, "sides": sides, "rewards": rewards, "dimensions": args.dimensions,
                                        "steps": n, "checkpoint_every": 10_000, "progress": False}),
            "pmorl8": ("train-pmorl", {**pm, "rewards": old_rewards, "steps": n, "checkpoint_every": 10_000, "progress": False}),
            "expert": ("train-expert", {**ex, "steps": n, "checkpoint_every": 10_000, "progress": False}),
            "pcm16": ("train-pcm", {**pc, "sides": sides, "rewards": rewards, "dimensions": args.dimensions,
                                    "experts": args.experts, "steps": n, "checkpoint_every": 10_000,
                                    "progress": False}),
        }
        load_before = os.getloadavg()
        runs = []
        reused = json.loads(Path(args.reuse).read_text()) if args.reuse else None
        if reused is not None:  # the timed runs of an earlier invocation; the table is computed again
            runs = reused["runs"]
            load_before, load_after = reused["machine"]["loadavg_before"], reused["machine"]["loadavg_after"]
            if {r["config"] for r in runs} != set(configs):
                raise SystemExit(f"{args.reuse} times {sorted({r['config'] for r in runs})}, not {sorted(configs)}")
        for rep in range(args.reps if reused is None else 0):
            names = list(configs) if rep % 2 == 0 else list(configs)[::-1]
            for name in names:
                command, cfg = configs[name]
                out = root / f"{name}-{rep}"
                wall = cli(command, {**cfg, "output_dir": str(out)}, root, f"{name}-{rep}", env)
                secs = step_seconds(out / "metrics.jsonl")
                final = json.loads((out / "expert.json").read_text()).get("metrics", {}) \
                    if (out / "expert.json").is_file() else {}
                steps_logged = len(secs) + 1
                r = {"config": name, "rep": rep, "wall_s": round(wall, 1), "step_s": [round(s, 3) for s in secs],
                     "median_step_s": round(statistics.median(secs), 3),
                     # everything but the steps after the first: process start, model, references, step 1
                     "setup_s": round(wall - sum(secs), 1), "steps": steps_logged,
                     "examples": final.get("data/examples")}
                print(json.dumps(r), flush=True)
                runs.append(r)
        if reused is None:
            load_after = os.getloadavg()

    def per_step(name: str) -> float:
        return statistics.median(r["median_step_s"] for r in runs if r["config"] == name)

    def setup(name: str) -> float:
        return statistics.median(r["setup_s"] for r in runs if r["config"] == name)

    with tempfile.TemporaryDirectory(prefix="dimcost-label-") as tmp:
        psoups, label_source = measured_new(new, Path(tmp), env)
    shared = {k: v for k, v in psoups.items() if k in ("rollout", "label") or k.startswith("reward/")}
    experts = {k: v for k, v in psoups.items() if k.startswith("expert/")}
    examples = next(r["examples"] for r in runs if r["config"] == "multitask16" and r["examples"])
    mt_steps = mt["epochs"] * math.ceil(examples / mt["batch_size"]) if mt.get("max_steps") is None \
        else mt["max_steps"]
    combos_old, combos_new = 2 ** (len(old_sides) // 2), 2 ** (len(sides) // 2)
    pm_steps = {"same steps": pm["steps"], "same per combination": pm["steps"] * combos_new // combos_old}
    shared_s = sum(shared.values())
    table = {
        "P-Soups (new sides' experts, measured)": {"retrain_s": sum(experts.values()), "shared_s": shared_s,
                                                   "how": "measured: " + ", ".join(experts)},
        # the same short-run measurement as the alternatives below, so that the comparison is like for like
        "P-Soups (new sides' experts, extrapolated)": {
            "retrain_s": len(experts) * (setup("expert") + (ex["steps"] - 1) * per_step("expert")),
            "shared_s": shared_s,
            "how": f"{len(experts)} x (setup {setup('expert'):.0f} s + {ex['steps'] - 1} steps x "
                   f"{per_step('expert'):.1f} s)"},
        "multitask (retrained on every side, extrapolated)": {
            "retrain_s": setup("multitask16") + (mt_steps - 1) * per_step("multitask16"),
            "shared_s": shared["rollout"] + shared["label"],
            "how": f"setup {setup('multitask16'):.0f} s + {mt_steps - 1} steps ({examples} examples, batch "
                   f"{mt['batch_size']}) x {per_step('multitask16'):.2f} s"},
        **{f"P-MORL (16 combinations, {k}, extrapolated)": {
            "retrain_s": setup("pmorl16") + (steps - 1) * per_step("pmorl16"), "shared_s": shared_s,
            "how": f"setup {setup('pmorl16'):.0f} s + {steps - 1} steps x {per_step('pmorl16'):.1f} s"}
            for k, steps in pm_steps.items()},
        "MoPE's controller (retrained for K=4, extrapolated)": {
            "retrain_s": sum(experts.values()) + setup("pcm16") + (pc["steps"] - 1) * per_step("pcm16"),
            "shared_s": shared_s,
            "how": f"the new experts (measured) + setup {setup('pcm16'):.0f} s + {pc['steps'] - 1} steps x "
                   f"{per_step('pcm16'):.1f} s"},
    }
    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "command": "python " + " ".join(sys.argv),
        **({"runs_timed_by": reused["command"], "runs_timed_on": reused["date"]} if reused is not None else {}),
        "old": str(old), "new": str(new), "new_sides": new_sides, "rewards": rewards,
        "combinations": {"before": combos_old, "after": combos_new},
        "psoups_measured_s": {k: round(v, 1) for k, v in psoups.items()},
        "label_seconds_from": label_source,
        "per_step_s": {name: per_step(name) for name in configs},
        "expert_full_per_step_s": statistics.median(step_seconds(new / "experts" / new_sides[0] / "metrics.jsonl")),
        "runs": runs,
        "cost": {k: {**v, "total_s": round(v["retrain_s"] + v["shared_s"], 1),
                     "retrain_s": round(v["retrain_s"], 1), "shared_s": round(v["shared_s"], 1)}
                 for k, v in table.items()},
    }
    Path(args.output).write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: doc[k] for k in ("psoups_measured_s", "per_step_s", "expert_full_per_step_s", "cost")},
                     indent=2))


if __name__ == "__main__":
    main()
