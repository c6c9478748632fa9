"""Recipe: merge the experts of a preference into one adapter, or into a full model (Personalized Soups).

config -> main(cfg) -> phases: resolve preference, experts and merge options -> merge (in memory, cached)
-> write the adapter, or load the base, fold the adapter into its weights and write the model with its
tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalign.compose import soup_adapter
from personalign.errors import ConfigError
from personalign.adapters import save_adapter
from personalign.personalize import MethodOptions, personalize, resolve


@dataclass(frozen=True)
class MergeConfig:
    prefs: str
    output: str
    experts: str | None = None  # None = the experts shipped for the model
    method: str = "psoups"
    rank: int | None = None
    density: float | None = None
    seed: int | None = None
    # the merged delta is strength x the weighted average of the experts' deltas; None: the measured default
    strength: float | None = None
    full_model: bool = False  # write base + merged delta as a standalone model
    model: str | None = None
    dimensions: str | None = None
    device: str = "auto"
    dtype: str = "auto"


def main(cfg: MergeConfig) -> dict[str, Any]:
    # -- resolve: the preference, its experts and the merge options, checked before anything loads
    spec = resolve(cfg.prefs, MethodOptions(method="soup", experts=cfg.experts, merge=cfg.method, merge_rank=cfg.rank,
                                            merge_density=cfg.density, merge_seed=cfg.seed, strength=cfg.strength),
                   model=cfg.model, dimensions=cfg.dimensions)
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} is not empty; choose a new folder")

    # -- merge (in memory; the cache keeps a copy) -> write the adapter, or the base with it folded in
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.full_model:
        from personalign.models import load_model

        base, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        soup = personalize(base, tok, spec, inplace=True)
        soup.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        report = soup.merge_report or {}
    else:
        adapter, report, _ = soup_adapter(dict(spec.weights), dict(spec.experts), method=cfg.method, rank=cfg.rank,
                                          density=spec.merge_density, seed=spec.merge_seed,
                                          preference=spec.preference.spec(), strength=spec.options.strength)
        save_adapter(adapter, tmp)
    (tmp / "merge_report.json").write_text(json.dumps({**report, "experts": str(spec.experts_dir)}, indent=2))
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return report
