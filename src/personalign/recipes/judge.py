"""Recipe: judge pairs of responses on one side's criterion.

Input lines hold ``prompt``, ``a`` and ``b``; each output line is the input plus ``verdict`` (``a``,
``b`` or ``tie``), ``side`` and ``judge``. Everything is validated before the first verdict; written
to a file, the output appears whole (temporary file, then rename), so a failure loses nothing that
was there before.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.data import read_records
from personalign.judges import JudgeConfig, build_judge
from personalign.preferences import load_space


@dataclass(frozen=True)
class JudgeFileConfig:
    side: str
    input: str
    output: str | None = None  # None: standard output
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    dimensions: str | None = None


def main(cfg: JudgeFileConfig) -> list[dict[str, Any]]:
    space = load_space(cfg.dimensions)
    side = space.resolve(cfg.side)
    rows = read_records(cfg.input, ("prompt", "a", "b"), "pairs to judge")
    judge = build_judge(cfg.judge, space)
    verdicts = judge.judge_many([(r["prompt"], r["a"], r["b"]) for r in rows], side)
    out = [{**r, "side": side, "verdict": v, "judge": judge.name} for r, v in zip(rows, verdicts)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    if cfg.output:
        path = Path(cfg.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    else:
        sys.stdout.write(text)
    return out
