"""Wall time of the pipeline's fan-out stages in one process, and as Ray tasks on one and on two workers.

The stages measured are the ones whose units are independent: a reward model per side, an expert per
side (each after its side's reward model) and the Pareto sweep's generation files (one per weight).
Two sides (P2A, P2B) on the embedded model (or ``--model``), sized to take a few minutes per run on
a shared 2-core machine: the shipped config's reward-model recipe for one epoch on 16 instructions per
side, 2 RL steps of 2 x 2 samples of 16 tokens per expert, two Pareto points of 4 instructions. Rollouts and labels are made once (synthetic responses, labelled by the offline judge)
and copied into every run folder, so each run does exactly the fan-out stages. The script uses the
package's public API and its command line only (``personalign pipeline`` in a subprocess, its files read
as a user reads them).

Each run is ``personalign pipeline`` as a user runs it, in a fresh process and run folder:

- ``local``: no ``--executor``: one process, the units in order, torch on every core;
- ``local1``: the same with ``personalign --threads 1`` (torch on one thread, as in each Ray task);
- ``ray1``: ``--executor ray --num-cpus 1``: a local Ray instance with one CPU, each unit asks for 1;
- ``ray2``: ``--executor ray --num-cpus 2``: two CPUs, two units at a time.

Wall time is the whole command (Ray's start included); the fan-out span is from the first unit's start
to the last unit's end, from the run's ``executor.jsonl``. Repetitions alternate the order of the three
configurations. Ratios are per repetition, then the median.

    python bench/pipeline_fanout.py [--reps 2] [--model PATH] [--output bench/pipeline_fanout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from personalign import load_prompts, parse_preference

SHORT = ["Rain is water.", "It is wet.", "Clouds drop water.", "Water falls from clouds."]
LONG = [
    ("Rain forms when water vapour condenses into droplets around dust; heavy droplets fall, feeding rivers "
     "and lakes, and the cycle begins again as the sun warms the surface."),
    ("Warm air rises, cools, and its moisture condenses; the droplets merge until gravity wins and they fall "
     "as rain, sometimes as snow when the air below is cold enough."),
    ("Evaporation lifts water from oceans; condensation builds clouds; precipitation returns it, completing a "
     "cycle that moves heat and fresh water around the planet."),
    ("Droplets collide and coalesce inside clouds; once updrafts cannot hold them, they fall, often cooling "
     "the air beneath the storm and producing gusts ahead of it."),
]
# name -> (options before the command, options of the pipeline command)
CONFIGS = {"local": ([], []), "local1": (["--threads", "1"], []),
           "ray1": ([], ["--executor", "ray", "--num-cpus", "1"]),
           "ray2": ([], ["--executor", "ray", "--num-cpus", "2"])}


def config(run_dir: Path, model: str | None) -> dict:
    from importlib import resources

    base = yaml.safe_load((resources.files("personalign") / "configs" / "psoups-smollm2.yaml").read_text())
    return {
        "run_dir": str(run_dir), "model": model, "sides": ["P2A", "P2B"], "multihead": False,
        "rollout": {"prompts": "builtin:train", "limit": 16, "samples": 2, "progress": False},
        "label": base["label"],
        "reward": {**base["reward"], "epochs": 1, "eval_fraction": 0.25, "progress": False},
        "reward_sides": {"P2B": {"pooling": "mean"}},
        "expert": {**base["expert"], "steps": 2, "batch_prompts": 2, "group_size": 2, "max_new_tokens": 16,
                   "checkpoint_every": 100, "progress": False},
        "pareto": {"limit": 4, "weights": [0.0, 1.0], "batch_size": 4, "sampling": {"max_new_tokens": 16},
                   "progress": False, "dtype": "float32"},
        "stages": ["label", "reward", "expert", "pareto"],
    }


def pipeline(before: list[str], path: Path, after: list[str]) -> subprocess.CompletedProcess:
    """``personalign [before] pipeline --config PATH [after]`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "personalign", *before, "pipeline", "--config", str(path), *after],
                          check=False, capture_output=True, text=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def prepare(template: Path, model: str | None) -> None:
    """Rollouts (synthetic, in the order and format ``personalign rollout`` writes them) and labels, once."""
    cfg = {**config(template, model), "stages": ["label"]}
    roll = cfg["rollout"]
    rows = [{"id": it.id, "prompt": it.prompt, "side": side, "sample": k,
             "policy_prompt": parse_preference(side).prompt()}
            for side in cfg["sides"] for it in load_prompts(roll["prompts"], limit=roll["limit"])
            for k in range(roll["samples"])]
    rows = [{**r, "response": (SHORT if r["sample"] == 0 else LONG)[i % 4], "model": "synthetic"}
            for i, r in enumerate(rows)]
    template.mkdir(parents=True, exist_ok=True)
    (template / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = template.with_suffix(".yaml")
    path.write_text(json.dumps(cfg))
    proc = pipeline([], path, [])
    if proc.returncode != 0:
        raise SystemExit(f"labelling failed:\n{proc.stderr[-4000:]}")


def one_run(name: str, template: Path, root: Path, model: str | None, rep: int) -> dict:
    run = root / f"{name}-{rep}"
    run.mkdir(parents=True)
    for f in ("rollouts.jsonl", "pairs.jsonl", "pairs.jsonl.stats.json"):
        shutil.copy2(template / f, run / f)  # copy2 keeps the times: the labels stay fresh
    path = root / f"{name}-{rep}.yaml"
    path.write_text(json.dumps(config(run, model)))
    t0 = time.perf_counter()
    before, after = CONFIGS[name]
    proc = pipeline(before, path, after)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    log = read_jsonl(run / "executor.jsonl")
    starts = [e["time"] for e in log if e["event"] == "started"]
    ends = [e["time"] for e in log if e["event"] == "finished"]
    units = {e["unit"]: e.get("seconds") for e in log if e["event"] == "finished"}
    settings = {**json.loads((run / "pipeline.json").read_text()), "run_dir": "RUN"}  # the resolved config
    return {"config": name, "rep": rep, "wall_s": round(wall, 1), "fanout_s": round(max(ends) - min(starts), 1),
            "units": len(units), "unit_seconds": units, "settings": settings}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--output", default="bench/pipeline_fanout.json")
    ap.add_argument("--configs", default="local,ray1,ray2", help="comma-separated, of " + ",".join(CONFIGS))
    args = ap.parse_args()

    names = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        root = Path(tmp)
        load_before = os.getloadavg()
        prepare(root / "template", args.model)
        runs = []
        for rep in range(args.reps):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                r = one_run(name, root / "template", root, args.model, rep)
                print(json.dumps({k: v for k, v in r.items() if k not in ("unit_seconds", "settings")}), flush=True)
                runs.append(r)
        load_after = os.getloadavg()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["config"] == name)

    def ratio(a: str, b: str, key: str) -> float:
        per = [next(r[key] for r in runs if r["config"] == a and r["rep"] == i)
               / next(r[key] for r in runs if r["config"] == b and r["rep"] == i) for i in range(args.reps)]
        return round(statistics.median(per), 3)

    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "command": "python " + " ".join(sys.argv),
        "settings": runs[0]["settings"],
        "runs": [{k: v for k, v in r.items() if k != "settings"} for r in runs],
        "median": {n: {"wall_s": med(n, "wall_s"), "fanout_s": med(n, "fanout_s")} for n in names},
        # wall time: the whole command, the same work in every configuration. The fan-out span of a local
        # run covers the training units only (its generation files are not units), so spans compare
        # between Ray configurations only.
        "ratios": {f"{a}/{b} {key}": ratio(a, b, f"{key}_s") for a in names for b in names if a < b
                   for key in (("wall", "fanout") if a.startswith("ray") and b.startswith("ray") else ("wall",))},
    }
    Path(args.output).write_text(json.dumps(doc, indent=2))
    print(json.dumps({"median": doc["median"], "ratios": doc["ratios"], "load": doc["machine"]}, indent=2))


if __name__ == "__main__":
    main()
