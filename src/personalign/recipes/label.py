"""Recipe: turn rollouts into per-side preference pairs (stage 2 of Personalized Soups).

config -> main(cfg) -> phases: read rollouts -> group the samples of each (side, instruction) into
pairs -> judge every pair on that side's criterion with each judge -> keep the first judge's
verdicts (or only pairs all judges agree on), drop ties -> write pairs -> report counts and agreement.

Output lines: ``prompt``, ``chosen``, ``rejected``, ``side``, ``judge``, ``id``. Beside the output,
``<output>.stats.json`` holds per-side counts (pairs judged, ties dropped, kept) and, with more than
one judge, their agreement (raw and Cohen's kappa) per side.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.config import to_dict
from personalign.data import read_records
from personalign.errors import ConfigError, DataError
from personalign.evaluation import agreement
from personalign.judges import EVALUATION_ONLY, JudgeConfig, build_judge
from personalign.preferences import load_space

ROLLOUT_FIELDS = ("prompt", "side", "response")


@dataclass(frozen=True)
class LabelConfig:
    rollouts: str
    output: str
    judges: tuple[JudgeConfig, ...] = field(default_factory=lambda: (JudgeConfig(),))
    combine: str = "first"  # first: the first judge decides; unanimous: keep pairs all judges agree on
    sides: tuple[str, ...] = ()  # empty: every side in the rollouts
    dimensions: str | None = None
    # disjoint: samples (0, 1), (2, 3), ... of an instruction form pairs (the paper, with 2 samples);
    # all: every two samples form a pair, so n samples give n(n-1)/2 pairs for the cost of n rollouts.
    pairing: str = "disjoint"


PAIRINGS = ("disjoint", "all")


def make_pairs(rows: list[dict[str, Any]], pairing: str = "disjoint") -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of samples of one (side, instruction): disjoint (0, 1), (2, 3), ..., or all n(n-1)/2."""
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    groups: OrderedDict[tuple[str, str], list[dict[str, Any]]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["side"], r["prompt"]), []).append(r)
    pairs = []
    for samples in groups.values():
        if pairing == "all":
            pairs.extend((samples[i], samples[j]) for i in range(len(samples)) for j in range(i + 1, len(samples)))
        else:
            pairs.extend((samples[i], samples[i + 1]) for i in range(0, len(samples) - 1, 2))
    return pairs


def labelling(cfg: LabelConfig) -> dict[str, Any]:
    """The settings the pairs depend on, kept in the stats file: a pipeline relabels when they change."""
    return {"judges": to_dict(list(cfg.judges)), "combine": cfg.combine, "pairing": cfg.pairing,
            "sides": list(cfg.sides), "dimensions": cfg.dimensions}


def main(cfg: LabelConfig) -> dict[str, Any]:
    if cfg.combine not in ("first", "unanimous"):
        raise ConfigError(f"combine must be 'first' or 'unanimous', got {cfg.combine!r}")
    if not cfg.judges:
        raise ConfigError("at least one judge is needed")
    reserved = [j.kind for j in cfg.judges if j.kind in EVALUATION_ONLY]
    if reserved:
        raise ConfigError(f"the {reserved[0]} judge is for evaluation only and never labels training data "
                          "(an evaluation by it would no longer be independent); label with offline, llm or human")
    space = load_space(cfg.dimensions)
    rows = read_records(cfg.rollouts, ROLLOUT_FIELDS, "rollouts file")
    for r in rows:
        r["side"] = space.resolve(r["side"])
    wanted = {space.resolve(s) for s in cfg.sides} if cfg.sides else None
    if wanted:
        absent = sorted(wanted - {r["side"] for r in rows})
        if absent:  # a side asked for is never dropped quietly
            raise DataError(f"{cfg.rollouts} has no rollouts for side(s) {', '.join(absent)} (it has "
                            f"{', '.join(sorted({r['side'] for r in rows})) or 'none'})")
        rows = [r for r in rows if r["side"] in wanted]
    judges = [build_judge(j, space) for j in cfg.judges]
    pairs = make_pairs(rows, cfg.pairing)
    if not pairs:
        raise DataError(f"{cfg.rollouts} has no instruction with two samples of one side to compare")

    by_side: OrderedDict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = OrderedDict()
    for a, b in pairs:
        by_side.setdefault(a["side"], []).append((a, b))

    out_rows: list[dict[str, Any]] = []
    stats: dict[str, Any] = {"sides": {}, "judges": [j.name for j in judges], "labelling": labelling(cfg)}
    for side, side_pairs in by_side.items():
        items = [(a["prompt"], a["response"], b["response"]) for a, b in side_pairs]
        verdicts = [j.judge_many(items, side) for j in judges]
        kept = ties = disagreements = 0
        for k, (a, b) in enumerate(side_pairs):
            votes = [v[k] for v in verdicts]
            verdict = votes[0]
            if cfg.combine == "unanimous" and len(set(votes)) > 1:
                disagreements += 1
                continue
            if verdict == "tie":
                ties += 1
                continue
            chosen, rejected = (a, b) if verdict == "a" else (b, a)
            out_rows.append({"id": a.get("id"), "prompt": a["prompt"], "chosen": chosen["response"],
                             "rejected": rejected["response"], "side": side, "judge": judges[0].name})
            kept += 1
        entry: dict[str, Any] = {"pairs": len(side_pairs), "ties_dropped": ties, "kept": kept}
        if cfg.combine == "unanimous":
            entry["disagreements_dropped"] = disagreements
        if len(judges) > 1:
            entry["agreement"] = {f"{judges[0].name}~{judges[i].name}": agreement(verdicts[0], verdicts[i])
                                  for i in range(1, len(judges))}
        stats["sides"][side] = entry

    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows), encoding="utf-8")
    tmp.replace(output)  # written whole or not at all
    output.with_name(output.name + ".stats.json").write_text(json.dumps(stats, indent=2))
    return stats
