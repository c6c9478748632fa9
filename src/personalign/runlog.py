"""Run folders: the resolved config beside ``metrics.jsonl`` (slash-named metrics, one JSON object
per line), and the check that a resumed run is the same run."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personalign.config import to_dict
from personalign.errors import ConfigError, DataError

__all__ = ["MetricsLogger", "prepare_run_dir", "summarize_steps"]

# Fields that may change between an interrupted run and its resumption.
RESUMABLE_FIELDS = frozenset({"progress", "device", "checkpoint_every"})


def prepare_run_dir(folder: str | Path, cfg: Any, resumable: frozenset[str] = frozenset()) -> Path:
    """Create ``folder`` and write ``config.json``; refuse a folder holding another run's config.

    ``resumable``: fields besides :data:`RESUMABLE_FIELDS` that a recipe lets a rerun change (a run
    whose schedule does not depend on its length can be extended: ``steps``)."""
    folder = Path(folder)
    model = getattr(cfg, "model", None)
    if isinstance(model, str):  # a mistyped model folder must not leave its name in the run's config
        from personalign.models import check_model_source

        check_model_source(model)
    folder.mkdir(parents=True, exist_ok=True)
    current = to_dict(cfg)
    path = folder / "config.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = None
        if isinstance(previous, dict):
            previous = {**_added_defaults(cfg, previous), **previous}
        free = RESUMABLE_FIELDS | resumable
        strip = lambda d: {k: v for k, v in (d or {}).items() if k not in free}  # noqa: E731
        if strip(previous) != strip(current):
            diff = sorted(k for k in set(strip(previous)) | set(strip(current))
                          if strip(previous).get(k) != strip(current).get(k))
            raise ConfigError(f"{folder} holds a run with a different config ({', '.join(diff)} differ); "
                              "use another output folder or delete it")
    path.write_text(json.dumps(current, indent=2))
    return folder


DATA_FILE = "data.json"


def data_digest(items: list[tuple[str, ...]]) -> str:
    """An order-independent SHA-256 of a run's training data (tuples of text)."""
    import hashlib

    return hashlib.sha256(json.dumps(sorted(items), ensure_ascii=False).encode()).hexdigest()


def check_run_data(out: Path, data: dict[str, Any], finished: bool, what: str = "pairs") -> None:
    """Refuse a run folder whose model was trained (or started) on other data than ``data`` (a dict with
    ``sha256`` and counts under ``what``), so a rerun never resumes or returns a model of other data. The
    first run records it in ``data.json``; a run finished before that file existed is left as it is."""
    path = Path(out) / DATA_FILE
    if path.exists():
        before = json.loads(path.read_text())
        if before.get("sha256") != data["sha256"]:
            raise DataError(f"{out} was trained on other {what} ({before.get(what)}) than the file now holds "
                            f"({data[what]}); move the folder away to retrain, or use another output_dir")
    elif not finished:
        path.write_text(json.dumps(data, indent=2))


def _added_defaults(cfg: Any, previous: dict[str, Any]) -> dict[str, Any]:
    """Fields a newer version added to the config, at their defaults: a run saved before a field
    existed ran with that field's default behaviour, so it is still the same run."""
    if not dataclasses.is_dataclass(cfg):
        return {}
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in previous:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        out[f.name] = to_dict(default)
    return out


class MetricsLogger:
    """Append metrics to ``metrics.jsonl``; each line has ``step``, ``time`` and slash-named values."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / "metrics.jsonl"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

    def truncate(self, last_step: int) -> None:
        """Drop the lines of steps after ``last_step``: logged before an interruption, redone on resume."""
        rows = self.read()
        keep = [r for r in rows if r.get("step", 0) <= last_step]
        if len(keep) != len(rows):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)


def summarize_steps(rows: list[dict[str, Any]], marker: str, *, first: Sequence[str] = (),
                    last: Sequence[str] = ()) -> dict[str, float]:
    """A training run's final metrics from its step lines (those holding ``marker``): ``<key>_first``
    and ``<key>_last`` are means over the first and last window of steps (a quarter of the steps, 1 to
    10), ``steps`` the last step, ``time/train_seconds`` the sum of ``time/step_seconds``."""
    steps = [r for r in rows if marker in r]
    if not steps:
        return {}
    w = max(1, min(10, len(steps) // 4))

    def mean(key: str, part: list[dict[str, Any]]) -> float:
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "steps": steps[-1]["step"],
        **{f"{k}_first": mean(k, steps[:w]) for k in first},
        **{f"{k}_last": mean(k, steps[-w:]) for k in last},
        "time/train_seconds": sum(r.get("time/step_seconds", 0.0) for r in steps),
    }
