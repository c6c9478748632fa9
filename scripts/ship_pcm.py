"""Copy a trained Preference Control Model into the model's weights distribution, beside its experts.

    python scripts/ship_pcm.py runs/pcm-smollm2 [--model smollm2-135m-instruct] [--made-by COMMAND]

The run folder must hold a finished ``personalign train-pcm`` run (``pcm.json`` + ``pcm.safetensors``)
trained on that base model. Writes ``weights/<model>/src/<package>/pcm/`` with the weights, ``pcm.json``
(architecture, sides, base model, rewards, the judges that labelled their training data, training config
and final metrics), ``metrics.jsonl`` (every training step) and the run's ``config.json``, so what is
shipped says how it was made; paths into ``runs/`` become paths relative to it. ``--pcm shipped``
(generate), the ``mope-pcm`` method (eval, pareto) and the demo use it. ``make pcm`` trains and ships.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from personalign.provenance import label_sources_of_dir, made_by_runs
from personalign.weights import portable

ROOT = Path(__file__).resolve().parents[1]
FILES = ("pcm.safetensors", "pcm.json", "metrics.jsonl", "config.json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--made-by", default="personalign train-pcm, then scripts/ship_pcm.py",
                    help="the command that made the run, as the model card states it")
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
    src = ROOT / "weights" / args.model / "src"
    packages = [d for d in src.iterdir() if (d / "__init__.py").is_file()] if src.is_dir() else []
    if len(packages) != 1:
        print(f"error: weights/{args.model}/src/ holds no package; create the weights distribution first "
              "(weights/smollm2-135m-instruct is the layout to copy)", file=sys.stderr)
        return 1
    target = packages[0] / "pcm"
    tmp = target.parent / ".pcm.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, tmp / name)
    doc["label_judges"] = label_sources_of_dir(run, "pcm.json")
    doc["made_by"] = {"run": run.name, "command": args.made_by}
    doc["experts"] = "../experts (the experts shipped beside this PCM)"
    # which run made each expert it learned to weight: the model card says when one was replaced since
    doc["experts_runs"] = made_by_runs(target.parent / "experts", doc.get("sides", []))
    (tmp / "pcm.json").write_text(json.dumps(portable(doc), indent=2) + "\n")
    if (tmp / "config.json").is_file():
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps(portable(config), indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    size = sum(f.stat().st_size for f in target.iterdir())
    steps = doc.get("steps", (doc.get("config") or {}).get("steps"))
    print(f"{target.relative_to(ROOT)}: sides {', '.join(doc.get('sides', []))}, {steps} steps "
          f"({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
