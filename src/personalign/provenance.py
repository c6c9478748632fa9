"""Which judge labelled the data a trained artefact learned from: its *label source*.

An evaluation by the judge that labelled the training data (or by reward models trained on its
labels) partly measures how well a method learned that judge, not the preference itself.
``personalign eval`` records the label sources of every method it evaluates and warns when the
evaluating judge is one of them.

Sources are names: ``offline``, ``llm:<model>``, ``human``, a reward's ``module:function``, or
``unknown`` when the artefact does not say. They are read, never guessed, from (first found):

* a reward model: ``label_judges`` in ``reward_config.json`` where recorded, else the ``judge`` field
  of its training pairs (the file its run's ``config.json`` names) for its sides;
* an expert: ``label_judges`` in ``expert.json`` (the shipping script records it), else its run's
  ``pipeline.json`` label judges, else its reward (``offline``, ``rm:FOLDER`` as above,
  ``module:function``), else the ``judge`` field of the pairs it was trained on (multitask);
* a PCM: ``label_judges`` in ``pcm.json``, else its rewards, as for an expert.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["UNKNOWN", "evaluating_sources", "label_sources_of_dir", "label_sources_of_reward",
           "label_sources_of_rm", "made_by_runs", "pair_judges", "rl_prompts", "unseen_prompts"]

UNKNOWN = "unknown"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _sorted(sources: Iterable[str]) -> list[str]:
    return sorted(set(sources))


def pair_judges(pairs_file: str | Path, sides: Iterable[str] | None = None) -> list[str]:
    """The distinct ``judge`` names in a pairs file (for ``sides`` only, when given)."""
    wanted = set(sides) if sides is not None else None
    found: set[str] = set()
    try:
        with open(pairs_file, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and (wanted is None or row.get("side") in wanted):
                    found.add(str(row.get("judge") or UNKNOWN))
    except OSError:
        return [UNKNOWN]
    return _sorted(found) or [UNKNOWN]


def _declared(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    """A metadata file and the label sources it declares: ``({}, [unknown])`` when it is unreadable,
    ``(doc, None)`` when it declares none."""
    doc = _read_json(path)
    if doc is None:
        return {}, [UNKNOWN]
    return doc, (_sorted(doc["label_judges"]) if doc.get("label_judges") else None)


def label_sources_of_rm(folder: str | Path) -> list[str]:
    """A reward model's label sources (a folder written by ``train-rm``)."""
    from personalign.reward_model import CONFIG

    folder = Path(folder)
    cfg, declared = _declared(folder / CONFIG)
    if declared is not None:
        return declared
    run_cfg = _read_json(folder / "config.json") or {}
    pairs = run_cfg.get("pairs")
    return pair_judges(pairs, cfg.get("sides")) if pairs else [UNKNOWN]


def label_sources_of_reward(spec: str) -> list[str]:
    """The label sources behind a reward spec: ``offline``, ``rm:FOLDER`` or ``module:function``."""
    spec = str(spec)
    if spec == "offline":
        return ["offline"]
    if spec.startswith("rm:"):
        from personalign.judges.reward_model import reward_model_sources

        try:
            folders = set(reward_model_sources(spec[3:], weights=False).values())
        except Exception:  # noqa: BLE001 - a folder that is gone leaves the source unknown, never an error
            return [UNKNOWN]
        return _sorted(s for f in folders for s in label_sources_of_rm(f))
    return [spec]


def _pipeline_label_judges(doc: dict[str, Any]) -> list[str]:
    judges = (doc.get("label") or {}).get("judges") or []
    out = []
    for j in judges:
        kind = j.get("kind", "offline") if isinstance(j, dict) else str(j)
        out.append(f"llm:{j.get('model')}" if kind == "llm" and isinstance(j, dict) else kind)
    return out


def label_sources_of_dir(folder: str | Path, meta_name: str) -> list[str]:
    """An expert (``meta_name`` ``expert.json``) or a PCM (``pcm.json``) folder's label sources."""
    folder = Path(folder)
    doc, declared = _declared(folder / meta_name)
    if declared is not None:
        return declared
    pipeline = _read_json(folder / "pipeline.json")
    if pipeline is not None and _pipeline_label_judges(pipeline):
        return _sorted(_pipeline_label_judges(pipeline))
    rewards = doc.get("rewards") or ({"_": doc["reward"]} if doc.get("reward") else {})
    if not rewards:
        pairs = doc.get("pairs") or (doc.get("config") or {}).get("pairs")  # trained on labelled pairs
        return pair_judges(pairs) if pairs else [UNKNOWN]
    return _sorted(s for spec in rewards.values() for s in label_sources_of_reward(str(spec)))


def evaluating_sources(judge_name: str, judge: Any = None) -> list[str]:
    """What an evaluating judge *is*, as label sources: a reward-model judge is the judges its models
    learned from; any other judge is itself (``offline``, ``independent``, ``llm:<model>``, ``human``)."""
    parts = getattr(judge, "judges", None)
    if callable(parts):  # a judge routing sides to several judges: each of them
        return _sorted(s for j in parts() for s in evaluating_sources(
            "rm-" if getattr(j, "folder", None) is not None else str(getattr(j, "name", "")), j))
    folder = getattr(judge, "folder", None)
    if judge_name.startswith("rm-") and folder is not None:
        return _sorted(s for f in set(judge.sources.values()) for s in label_sources_of_rm(f))
    if judge_name.startswith("offline"):
        return ["offline"]
    return [str(getattr(judge, "name", judge_name))]


def rl_prompts(expert_folder: str | Path) -> tuple[str, list[int]]:
    """The prompts an expert saw in RL training, from its ``expert.json`` (or its run's ``config.json``):
    ``(prompt source, sorted indices into it)``. Every index the configured ``steps`` draw is counted, also
    when the run stopped early (an upper bound, the safe side for choosing held-out prompts)."""
    from personalign.errors import ConfigError
    from personalign.rl import step_prompt_indices

    folder = Path(expert_folder)
    doc = _read_json(folder / "expert.json")
    cfg = (doc or {}).get("config") or _read_json(folder / "config.json")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("prompts", "steps", "batch_prompts", "seed")):
        raise ConfigError(f"{folder} records no RL training config (expert.json or config.json with prompts, "
                          "steps, batch_prompts and seed)")
    from personalign.data import load_prompts

    n = len(load_prompts(cfg["prompts"], limit=cfg.get("limit")))
    seen = {i for step in range(int(cfg["steps"]))
            for i in step_prompt_indices(n, int(cfg["batch_prompts"]), step, int(cfg["seed"]))}
    return str(cfg["prompts"]), sorted(seen)


def unseen_prompts(experts_dir: str | Path, n: int, seed: int = 0) -> tuple[str, list[int]]:
    """``n`` instructions that no expert in ``experts_dir`` (its ``<SIDE>/`` folders) saw in RL, from the
    source they all trained on, in an order shuffled by ``seed``: ``(source, indices into it)``. Held-out
    prompts for choosing settings without touching the evaluation set."""
    import random

    from personalign.data import load_prompts
    from personalign.errors import ConfigError

    folders = sorted(p for p in Path(experts_dir).iterdir() if p.is_dir())
    if not folders:
        raise ConfigError(f"{experts_dir} holds no expert folders")
    sources, seen = set(), set()
    for folder in folders:
        source, idx = rl_prompts(folder)
        sources.add(source)
        seen |= set(idx)
    if len(sources) != 1:
        raise ConfigError(f"the experts in {experts_dir} trained on different prompt sources "
                          f"({', '.join(sorted(sources))}); held-out prompts need one source")
    source = sources.pop()
    free = [i for i in range(len(load_prompts(source))) if i not in seen]
    random.Random(seed).shuffle(free)
    if n > len(free):
        raise ConfigError(f"only {len(free)} instructions of {source} are unseen by every expert in "
                          f"{experts_dir}; ask for at most that many")
    return source, free[:n]


def made_by_runs(experts: Path, sides: Iterable[str]) -> dict[str, str | None]:
    """Side -> the run that made the shipped expert in ``experts/<side>/`` (``expert.json``'s ``made_by``), for
    the sides that have one: what a PCM records of the experts it learned to weight."""
    out: dict[str, str | None] = {}
    for side in sides:
        doc = experts / side / "expert.json"
        if doc.is_file():
            out[side] = (json.loads(doc.read_text()).get("made_by") or {}).get("run")
    return out
