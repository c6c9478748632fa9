"""Copy the experts a pipeline run trained into the package, as the experts shipped for its model.

    python scripts/ship_experts.py runs/psoups-smollm2 [--model smollm2-135m-instruct]

For each ``<run>/experts/<SIDE>/`` holding a finished expert (``expert.json`` + ``adapter/``), writes
``src/personalign/data/experts/<model>/<SIDE>/`` with the adapter, ``expert.json`` (side, base model,
the training config and final metrics), ``metrics.jsonl`` (every training step's metrics) and the
run's ``pipeline.json`` (every stage's settings), so what is shipped says how it was made. ``make experts`` runs the pipeline and then this script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    experts = args.run_dir / "experts"
    if not experts.is_dir():
        print(f"error: {experts} does not exist; run personalign pipeline first", file=sys.stderr)
        return 1
    done = {d.name: d for d in sorted(experts.iterdir())
            if (d / "expert.json").is_file() and (d / "adapter" / "adapter_model.safetensors").is_file()}
    if not done:
        print(f"error: no finished expert in {experts} (each needs expert.json and adapter/)", file=sys.stderr)
        return 1
    target = ROOT / "src" / "personalign" / "data" / "experts" / args.model
    for side, folder in done.items():
        doc = json.loads((folder / "expert.json").read_text())
        if doc.get("side") != side:
            print(f"error: {folder}/expert.json is for side {doc.get('side')!r}, not {side}", file=sys.stderr)
            return 1
        out = target / side
        tmp = target / f".{side}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder / "adapter", tmp / "adapter")
        shutil.copy2(folder / "expert.json", tmp / "expert.json")
        if (folder / "metrics.jsonl").is_file():
            shutil.copy2(folder / "metrics.jsonl", tmp / "metrics.jsonl")
        if (args.run_dir / "pipeline.json").is_file():
            shutil.copy2(args.run_dir / "pipeline.json", tmp / "pipeline.json")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{side}: {out.relative_to(ROOT)} ({size / 1e6:.1f} MB)")
    missing = sorted({"P1A", "P1B", "P2A", "P2B", "P3A", "P3B"} - set(done))
    if missing:
        print(f"not yet trained: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
