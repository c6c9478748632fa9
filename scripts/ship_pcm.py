"""Copy a trained Preference Control Model into the package, as the PCM shipped for its model's experts.

    python scripts/ship_pcm.py runs/pcm-smollm2 [--model smollm2-135m-instruct]

The run folder must hold a finished ``personalign train-pcm`` run (``pcm.json`` + ``pcm.safetensors``)
trained on that base model. Writes ``src/personalign/data/pcm/<model>/`` with the weights, ``pcm.json``
(architecture, sides, base model, rewards, training config and final metrics), ``metrics.jsonl`` (every
training step) and the run's ``config.json``, so what is shipped says how it was made. ``--pcm shipped``
(generate), the ``mope-pcm`` method (eval, pareto) and the demo use it. ``make pcm`` trains and ships.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("pcm.safetensors", "pcm.json", "metrics.jsonl", "config.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    run = args.run_dir
    if not ((run / "pcm.json").is_file() and (run / "pcm.safetensors").is_file()):
        print(f"error: {run} holds no finished PCM (pcm.json and pcm.safetensors); run personalign train-pcm "
              "to the end first", file=sys.stderr)
        return 1
    try:
        doc = json.loads((run / "pcm.json").read_text())
    except json.JSONDecodeError as exc:
        print(f"error: {run}/pcm.json is unreadable ({exc})", file=sys.stderr)
        return 1
    if doc.get("kind") != "pcm":
        print(f"error: {run}/pcm.json does not describe a PCM", file=sys.stderr)
        return 1
    base = (doc.get("base") or {}).get("name")
    if base != args.model:
        print(f"error: the PCM in {run} was trained on base model {base!r}, not {args.model}", file=sys.stderr)
        return 1
    target = ROOT / "src" / "personalign" / "data" / "pcm" / args.model
    tmp = target.parent / f".{args.model}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, tmp / name)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    size = sum(f.stat().st_size for f in target.iterdir())
    steps = doc.get("steps", (doc.get("config") or {}).get("steps"))
    print(f"{target.relative_to(ROOT)}: sides {', '.join(doc.get('sides', []))}, {steps} steps "
          f"({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
