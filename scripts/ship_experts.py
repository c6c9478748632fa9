"""Copy the experts a pipeline run trained into the model's weights distribution, as its shipped experts.

    python scripts/ship_experts.py runs/psoups-smollm2 [--model smollm2-135m-instruct]

For each ``<run>/experts/<SIDE>/`` holding a finished expert (``expert.json`` + ``adapter/``), writes
``weights/<model>/src/<package>/experts/<SIDE>/`` with the adapter, ``expert.json`` (side, base model,
the training config, final metrics and the judges that labelled its training data), ``metrics.jsonl``
(every training step's metrics) and the run's ``pipeline.json`` (every stage's settings), so what is
shipped says how it was made; paths into ``runs/`` become paths relative to it. ``make experts`` runs
the pipeline, this script, then ``scripts/half_precision.py`` and ``scripts/model_cards.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from personalign.provenance import label_sources_of_dir
from personalign.weights import portable

ROOT = Path(__file__).resolve().parents[1]


def weights_package(model: str) -> Path | None:
    """``weights/<model>/src/<package>/``: the one package of the model's weights distribution."""
    src = ROOT / "weights" / model / "src"
    found = [d for d in src.iterdir() if (d / "__init__.py").is_file()] if src.is_dir() else []
    return found[0] if len(found) == 1 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--command", default="make experts (personalign pipeline --config psoups-smollm2.yaml, then "
                    "scripts/ship_experts.py)", help="how the run was made, recorded in each expert.json")
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
    package = weights_package(args.model)
    if package is None:
        print(f"error: weights/{args.model}/src/ holds no package; create the weights distribution first "
              "(weights/smollm2-135m-instruct is the layout to copy)", file=sys.stderr)
        return 1
    target = package / "experts"
    for side, folder in done.items():
        doc = json.loads((folder / "expert.json").read_text())
        if doc.get("side") != side:
            print(f"error: {folder}/expert.json is for side {doc.get('side')!r}, not {side}", file=sys.stderr)
            return 1
        out = target / side
        tmp = target / f".{side}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder / "adapter", tmp / "adapter")
        if (folder / "metrics.jsonl").is_file():
            shutil.copy2(folder / "metrics.jsonl", tmp / "metrics.jsonl")
        if (args.run_dir / "pipeline.json").is_file():
            shutil.copy2(args.run_dir / "pipeline.json", tmp / "pipeline.json")
        doc["label_judges"] = label_sources_of_dir(folder, "expert.json")  # read before the paths change
        doc["made_by"] = {"run": args.run_dir.name, "command": args.command}
        (tmp / "expert.json").write_text(json.dumps(portable(doc), indent=2) + "\n")
        if (tmp / "pipeline.json").is_file():
            pipeline = json.loads((tmp / "pipeline.json").read_text())
            (tmp / "pipeline.json").write_text(json.dumps(portable(pipeline), indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"{side}: {out.relative_to(ROOT)} ({size / 1e6:.1f} MB; labels from {', '.join(doc['label_judges'])})")
    missing = sorted({"P1A", "P1B", "P2A", "P2B", "P3A", "P3B"} - set(done))
    if missing:
        print(f"not yet trained: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
