"""Keep the text evidence in ``runs/`` and remove the weights, optimizer states and checkpoints.

    python scripts/prune_runs.py [--runs runs] [--apply]

``bench/RESULTS.md`` cites results, judgments, generations, metrics and plots; those stay. Every
weights file (``*.safetensors``), every resumable checkpoint folder and peft's empty template card go;
``runs/REMOVED.md`` lists each with its size, its sha256 and the command that makes it again (the
training config each run wrote beside its output). Without ``--apply`` nothing is deleted and the
list is printed. Rerunning with ``--apply`` keeps the entries already listed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

# The run folder's marker file -> the command that trains it again from its own config.json.
TRAINERS = (("reward_config.json", "train-rm"), ("pcm.json", "train-pcm"), ("expert.json", None))
EXPERT_KINDS = {"expert": "train-expert", "multitask": "train-multitask", "pmorl": "train-pmorl"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_folder(path: Path, root: Path) -> Path | None:
    """The training run a file belongs to: the nearest folder above it with a config.json and a marker."""
    for folder in [path.parent, *path.parents]:
        if folder == root.parent:
            return None
        if (folder / "config.json").is_file() and any((folder / m).is_file() for m, _ in TRAINERS):
            return folder
    return None


def command_for(folder: Path | None) -> str:
    if folder is None:
        return "not made by a training command (no run config above it)"
    for marker, command in TRAINERS:
        if (folder / marker).is_file():
            if command is None:
                kind = json.loads((folder / marker).read_text()).get("kind", "expert")
                command = EXPERT_KINDS.get(kind, "train-expert")
            return f"personalign {command} --config {folder}/config.json --set output_dir={folder}"
    return "unknown"


def removable(root: Path) -> list[Path]:
    found: set[Path] = set()
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix in (".safetensors", ".bin", ".pt") or "checkpoint" in path.relative_to(root).parts:
            found.add(path)
        elif path.name == "README.md" and path.parent.name == "adapter" and "[More Information Needed]" in \
                path.read_text(errors="replace"):
            found.add(path)  # peft's empty template card
    return sorted(found)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--apply", action="store_true", help="delete the files (default: list them)")
    args = ap.parse_args()
    root = args.runs
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 1
    manifest = root / "removed.json"
    entries = {e["path"]: e for e in json.loads(manifest.read_text())} if manifest.is_file() else {}
    for path in removable(root):
        entries[str(path)] = {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256(path),
                              "regenerate": command_for(run_folder(path, root))}
    total = sum(e["bytes"] for e in entries.values())
    print(f"{len(entries)} files, {total / 1e6:.1f} MB")
    if not args.apply:
        for e in entries.values():
            print(f"{e['bytes']:>10}  {e['path']}")
        return 0
    rows = sorted(entries.values(), key=lambda e: e["path"])
    manifest.write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Removed from runs/", "",
             f"{len(rows)} files ({total / 1e6:.1f} MB) of weights, optimizer states and checkpoints were removed "
             "from the run folders by `python scripts/prune_runs.py --apply`; the text evidence that "
             "`bench/RESULTS.md` cites (results, judgments, generations, metrics, plots, configs) stays. The "
             "shipped experts and PCM live in `weights/smollm2-135m-instruct`. Each command below trains "
             "the file's run again from the config it wrote; sampling on a CPU is seeded, so the same "
             "machine and library versions give the same weights (compare the sha256).", "",
             "| file | bytes | sha256 | regenerate |", "|---|---:|---|---|"]
    lines += [f"| `{e['path']}` | {e['bytes']} | `{e['sha256'][:16]}…` | `{e['regenerate']}` |" for e in rows]
    (root / "REMOVED.md").write_text("\n".join(lines) + "\n")
    for e in rows:
        Path(e["path"]).unlink(missing_ok=True)
    for folder in sorted({p for p in root.rglob("checkpoint") if p.is_dir()}):
        shutil.rmtree(folder)
    print(f"removed; listed in {root / 'REMOVED.md'} and {manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
