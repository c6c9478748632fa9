"""Recipe: merge the experts of a preference into one adapter, or into a full model (Personalized Soups).

config -> main(cfg) -> phases: resolve preference and experts -> merge (cached) -> write the adapter,
or load the base, fold the adapter into its weights and write the model with its tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalign import compose
from personalign.errors import ConfigError
from personalign.preferences import load_space


@dataclass(frozen=True)
class MergeConfig:
    prefs: str
    output: str
    experts: str | None = None  # None = the experts shipped for the model
    method: str = "psoups"
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    full_model: bool = False  # write base + merged delta as a standalone model
    model: str | None = None
    dimensions: str | None = None
    device: str = "auto"
    dtype: str = "auto"


def main(cfg: MergeConfig) -> dict[str, Any]:
    from personalign.models import canonical_name

    pref = load_space(cfg.dimensions).parse(cfg.prefs)
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} is not empty; choose a new folder")
    folder = compose.resolve_experts_dir(cfg.experts, canonical_name(cfg.model))
    seed = cfg.seed if cfg.seed is not None or not cfg.method.startswith("dare") else 0
    adapter, report = compose.soup_adapter(pref, folder, method=cfg.method, rank=cfg.rank, density=cfg.density,
                                           seed=seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.full_model:
        from personalign.models import load_model

        base, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        merged = compose.load_expert_model(base, adapter, merge=True)
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    else:
        shutil.copytree(adapter, tmp)
    (tmp / "merge_report.json").write_text(json.dumps({**report, "experts": str(folder)}, indent=2))
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return report
