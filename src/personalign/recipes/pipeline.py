"""Recipe: stages 1-4 of Personalized Soups in one command, from one config file.

rollouts -> pairwise labels -> one reward model per side (and optionally one multi-head model) ->
one RL-trained LoRA expert per side, against its side's reward model. The paper's trained baselines
are two more stages, run when ``stages`` names them: ``multitask`` (one adapter fine-tuned on the
chosen responses of every side's pairs) and ``pmorl`` (one policy trained by RL on whole
combinations, each side rewarded by its reward model). Each stage's outputs live in
the run folder; a stage whose outputs are complete is skipped, and an interrupted stage resumes, so
the same command finishes a run however often it is stopped. Two more stages evaluate the run's
experts: ``eval`` (the ``eval`` recipe, into eval/) and ``pareto`` (the Pareto sweep, into pareto/).

The units of the later stages are independent (each reward model, each side's expert after its reward
model, each baseline, each evaluation or Pareto generation file): ``executor: {kind: ray}`` (the CLI's
``--executor ray``) runs them as Ray tasks with the resources of ``executor.resources``, reports a
failing unit with its traceback while the others finish, and a rerun does only what is missing
(:mod:`personalign.executors`, docs/scaling.md). Without it they run in this process, in order.

Every stage config is built and validated before anything runs: a typo in the last section fails
at once, not an hour later.

Run folder layout::

    rollouts.jsonl          stage 1
    pairs.jsonl(.stats.json) stage 2
    rm/<SIDE>/              stage 3, one reward model per side
    experts/<SIDE>/         stage 4, one expert per side (adapter/ + expert.json): an experts folder
                            that ``generate --experts`` and ``eval --experts`` read as it is
    rm/multihead/           stage 3, all sides in one model (when multihead: true)
    baselines/multitask/    stage multitask (adapter/ + expert.json, for eval's adapter:PATH)
    baselines/pmorl/        stage pmorl
    eval/  pareto/          stages eval and pareto (the eval and pareto recipes' run folders)
    executor.jsonl          each unit's start, finish, failure or reuse, and where it ran
    summary.json            per-side pair counts, reward-model accuracy and training time
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from personalign.adapters import WEIGHTS_FILE
from personalign.config import from_dict, to_dict
from personalign.errors import ConfigError
from personalign.executors import ExecutorConfig, Unit, UnitsFailed, make_executor
from personalign.preferences import PSOUPS_SIDES, load_space
from personalign.recipes import label, rollout, train_expert, train_multitask, train_pmorl, train_rm
from personalign.reward_model import CONFIG, WEIGHTS
from personalign.rl import ADAPTER_DIR, EXPERT_JSON


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str
    model: str | None = None
    dimensions: str | None = None
    sides: tuple[str, ...] = PSOUPS_SIDES
    rollout: dict[str, Any] = field(default_factory=dict)  # fields of RolloutConfig
    label: dict[str, Any] = field(default_factory=dict)  # fields of LabelConfig
    reward: dict[str, Any] = field(default_factory=dict)  # fields of TrainRMConfig
    # Per side, fields of TrainRMConfig that differ from ``reward`` for that side's single-side model
    # (e.g. {P2B: {pooling: mean}}); the key ``multihead`` does the same for the multi-head model.
    reward_sides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Fields of TrainExpertConfig. ``reward`` defaults to the side's reward model (rm:<run>/rm/<SIDE>);
    # set it (e.g. "offline") to train against something else.
    expert: dict[str, Any] = field(default_factory=dict)
    # Per side, fields of TrainExpertConfig that differ from ``expert`` for that side (e.g. {P2B: {steps: 100}}).
    expert_sides: dict[str, dict[str, Any]] = field(default_factory=dict)
    multihead: bool = True
    # Fields of TrainMultitaskConfig and TrainPMORLConfig for the baseline stages. P-MORL's ``rewards``
    # default to each side's reward model (rm:<run_dir>/rm/<SIDE>), as the experts'.
    multitask: dict[str, Any] = field(default_factory=dict)
    pmorl: dict[str, Any] = field(default_factory=dict)
    stages: tuple[str, ...] = ("rollout", "label", "reward", "expert")
    # Fields of EvalConfig and ParetoConfig for the stages ``eval`` and ``pareto``, which evaluate this
    # run's experts (``experts`` defaults to <run_dir>/experts) into <run_dir>/eval and <run_dir>/pareto.
    eval: dict[str, Any] = field(default_factory=dict)
    pareto: dict[str, Any] = field(default_factory=dict)
    # Where the independent units run (docs/scaling.md): in this process, in order (local), or as Ray
    # tasks (ray), each asking for its kind's resources.
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


STAGES = ("rollout", "label", "reward", "expert", "multitask", "pmorl", "eval", "pareto")
_DERIVED = {"rollout": {"output", "sides", "model", "dimensions"}, "label": {"rollouts", "output", "dimensions"},
            "reward": {"pairs", "output_dir", "sides", "model", "dimensions"},
            "expert": {"side", "output_dir", "model", "dimensions"},
            "multitask": {"pairs", "output_dir", "sides", "model", "dimensions"},
            "pmorl": {"output_dir", "sides", "model", "dimensions"},
            "eval": {"run_dir", "model", "dimensions"}, "pareto": {"run_dir", "model", "dimensions"}}


def build_baseline_configs(cfg: PipelineConfig) -> tuple[train_multitask.TrainMultitaskConfig,
                                                          train_pmorl.TrainPMORLConfig]:
    space = load_space(cfg.dimensions)
    run = Path(cfg.run_dir)
    sides = [space.resolve(x) for x in cfg.sides]
    common = {"model": cfg.model, "dimensions": cfg.dimensions, "sides": sides}
    mt = from_dict(train_multitask.TrainMultitaskConfig,
                   {**cfg.multitask, **common, "pairs": str(run / "pairs.jsonl"),
                    "output_dir": str(run / "baselines" / "multitask")}, "multitask")
    rewards = {s: f"rm:{run / 'rm' / s}" for s in sides}
    if "reward" in cfg.pmorl:  # one reward for every side, unless rewards names the side
        rewards = {}
    rewards.update({space.resolve(k): v for k, v in cfg.pmorl.get("rewards", {}).items()})
    pm = from_dict(train_pmorl.TrainPMORLConfig,
                   {**cfg.pmorl, **common, "rewards": rewards, "output_dir": str(run / "baselines" / "pmorl")},
                   "pmorl")
    return mt, pm


def build_evaluation_configs(cfg: PipelineConfig) -> tuple[Any, Any]:
    """The ``eval`` and ``pareto`` stages' configs: this run's experts, into <run_dir>/eval and /pareto."""
    from personalign.recipes import evaluate, pareto

    run = Path(cfg.run_dir)
    common = {"model": cfg.model, "dimensions": cfg.dimensions}
    ev = from_dict(evaluate.EvalConfig, {"experts": str(run / "experts"), **cfg.eval, **common,
                                         "run_dir": str(run / "eval")}, "eval")
    pa = from_dict(pareto.ParetoConfig, {"experts": str(run / "experts"), **cfg.pareto, **common,
                                         "run_dir": str(run / "pareto")}, "pareto")
    return ev, pa


def _side_overrides(space: Any, sides: tuple[str, ...], given: dict[str, Any], section: str,
                    derived: set[str]) -> dict[str, dict[str, Any]]:
    """``reward_sides`` / ``expert_sides``: side (or ``multihead`` for rewards) -> its fields, checked."""
    out = {}
    for key, fields in given.items():
        side = key if key == "multihead" and section == "reward_sides" else space.resolve(key)
        if side not in sides and side != "multihead":
            extra = " or multihead" if section == "reward_sides" else ""
            raise ConfigError(f"{section} names {key!r}, which is not one of this pipeline's sides "
                              f"({', '.join(sides)}){extra}")
        if not isinstance(fields, dict):
            raise ConfigError(f"{section}.{key} must be a mapping of fields, e.g. "
                              f"{{{'pooling: mean' if section == 'reward_sides' else 'steps: 100'}}}")
        clash = derived & set(fields)
        if clash:
            raise ConfigError(f"{section}.{key}: {', '.join(sorted(clash))} set by the pipeline itself")
        out[side] = fields
    return out


def _pending(reward: str) -> bool:
    """A reward spec naming a reward model that stage 3 has not written yet."""
    return reward.startswith("rm:") and not (Path(reward[3:]) / CONFIG).is_file()


def _merged(base: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``fields`` on top; nested sections (lora, sampling) merge field by field."""
    merged = {**base, **fields}
    for k, v in fields.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merged[k] = {**base[k], **v}
    return merged


def build_expert_configs(cfg: PipelineConfig) -> dict[str, train_expert.TrainExpertConfig]:
    space = load_space(cfg.dimensions)
    run = Path(cfg.run_dir)
    sides = tuple(space.resolve(x) for x in cfg.sides)
    overrides = _side_overrides(space, sides, cfg.expert_sides, "expert_sides", _DERIVED["expert"])
    out = {}
    for s in sides:
        data = {"reward": f"rm:{run / 'rm' / s}", **_merged(cfg.expert, overrides.get(s, {})), "model": cfg.model,
                "dimensions": cfg.dimensions, "side": s, "output_dir": str(run / "experts" / s)}
        out[s] = from_dict(train_expert.TrainExpertConfig, data, f"expert_sides.{s}" if s in overrides else "expert")
    return out


def build_stage_configs(cfg: PipelineConfig) -> tuple[rollout.RolloutConfig, label.LabelConfig,
                                                       dict[str, train_rm.TrainRMConfig]]:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    for section in STAGES:
        clash = _DERIVED[section] & set(getattr(cfg, section))
        if clash:
            raise ConfigError(f"{section}: {', '.join(sorted(clash))} set by the pipeline itself (run_dir, sides, model)")
    space = load_space(cfg.dimensions)
    sides = tuple(space.resolve(s) for s in cfg.sides)
    run = Path(cfg.run_dir)
    common = {"model": cfg.model, "dimensions": cfg.dimensions}
    roll = from_dict(rollout.RolloutConfig, {**cfg.rollout, **common, "output": str(run / "rollouts.jsonl"),
                                             "sides": list(sides)}, "rollout")
    lab = from_dict(label.LabelConfig, {**cfg.label, "dimensions": cfg.dimensions,
                                        "rollouts": roll.output, "output": str(run / "pairs.jsonl")}, "label")
    overrides = _side_overrides(space, sides, cfg.reward_sides, "reward_sides", _DERIVED["reward"])

    def rm_config(fields: dict[str, Any], out: str, rm_sides: list[str], where: str) -> train_rm.TrainRMConfig:
        return from_dict(train_rm.TrainRMConfig, {**_merged(cfg.reward, fields), **common, "pairs": lab.output,
                                                  "output_dir": out, "sides": rm_sides}, where)

    rms = {s: rm_config(overrides.get(s, {}), str(run / "rm" / s), [s], f"reward_sides.{s}" if s in overrides
                        else "reward") for s in sides}
    if cfg.multihead and len(sides) > 1:
        rms["multihead"] = rm_config(overrides.get("multihead", {}), str(run / "rm" / "multihead"), list(sides),
                                     "reward_sides.multihead" if "multihead" in overrides else "reward")
    if "expert" in cfg.stages:  # validated now, not after hours of training
        from personalign.judges.offline import SUPPORTED_SIDES

        own = {space.resolve(k) for k in cfg.expert_sides}
        for side, ex in build_expert_configs(cfg).items():
            try:
                if not _pending(ex.reward):
                    train_expert.validate(ex)
                elif side in SUPPORTED_SIDES:  # its reward model comes from stage 3: check everything else
                    train_expert.validate(replace(ex, reward="offline"))
            except ConfigError as exc:
                raise ConfigError(f"{f'expert_sides.{side}' if side in own else 'expert'}: {exc}") from None
    if "multitask" in cfg.stages or "pmorl" in cfg.stages:
        mt, pm = build_baseline_configs(cfg)
        if "multitask" in cfg.stages and Path(mt.pairs).is_file():  # else stage 2 writes it first
            train_multitask.validate(mt)
        if "pmorl" in cfg.stages:  # reward models still to come from stage 3 stand in as offline
            ready = {s: r for s, r in pm.rewards.items() if not _pending(r)}
            train_pmorl.validate(replace(pm, rewards=ready, reward="offline") if ready != pm.rewards else pm)
    # every section's fields, and the methods the last stages name, now: a typo fails at once, not after
    # hours of training (the experts the methods need are checked once trained)
    from personalign.generations import parse_method

    build_expert_configs(cfg)
    build_baseline_configs(cfg)
    ev, pa = build_evaluation_configs(cfg)
    for section, methods in (("eval", (*ev.methods, ev.reference)), ("pareto", pa.methods)):
        if section in cfg.stages:
            for m in methods:
                try:
                    parse_method(m)
                except ConfigError as exc:
                    raise ConfigError(f"{section}: {exc}") from None
    return roll, lab, rms


def _trained(folder: str) -> bool:
    """The files whose presence makes train-expert, train-multitask and train-pmorl return at once."""
    return (Path(folder) / EXPERT_JSON).is_file() and (Path(folder) / ADAPTER_DIR / WEIGHTS_FILE).is_file()


def training_units(cfg: PipelineConfig, rms: dict[str, train_rm.TrainRMConfig]) -> list[Unit]:
    """Stages reward, expert, multitask and pmorl as independent units, in the order one process runs
    them: each reward model; each side's expert after its side's reward model (when it trains against
    it); multitask; P-MORL after the reward models it is rewarded by. A unit whose outputs are complete is
    ``done`` (its recipe returns at once)."""
    run = Path(cfg.run_dir)
    units: list[Unit] = []
    if "reward" in cfg.stages:
        for name, rm_cfg in rms.items():
            out = Path(rm_cfg.output_dir)
            units.append(Unit(f"reward/{name}", train_rm.main, rm_cfg, "reward",
                              done=(out / WEIGHTS).is_file() and (out / CONFIG).is_file()))
    ours = {f"rm:{run / 'rm' / name}": f"reward/{name}" for name in rms} if "reward" in cfg.stages else {}
    if "expert" in cfg.stages:
        for side, ex_cfg in build_expert_configs(cfg).items():
            after = (ours[ex_cfg.reward],) if ex_cfg.reward in ours else ()
            units.append(Unit(f"expert/{side}", train_expert.main, ex_cfg, "expert", after,
                              done=_trained(ex_cfg.output_dir)))
    if "multitask" in cfg.stages or "pmorl" in cfg.stages:
        mt, pm = build_baseline_configs(cfg)
        if "multitask" in cfg.stages:
            units.append(Unit("baseline/multitask", train_multitask.main, mt, "baseline",
                              done=_trained(mt.output_dir)))
        if "pmorl" in cfg.stages:
            after = tuple(ours[r] for r in pm.rewards.values() if r in ours)
            units.append(Unit("baseline/pmorl", train_pmorl.main, pm, "baseline", after,
                              done=_trained(pm.output_dir)))
    return units


def _complete(path: Path, expected_lines: int) -> bool:
    if not path.exists():
        return False
    with path.open("rb") as fh:
        return sum(1 for _ in fh) >= expected_lines


def main(cfg: PipelineConfig) -> dict[str, Any]:
    roll, lab, rms = build_stage_configs(cfg)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "pipeline.json").write_text(json.dumps(to_dict(cfg), indent=2))
    summary: dict[str, Any] = {"stages": {}}

    if "rollout" in cfg.stages:
        t0 = time.perf_counter()
        rollout.main(roll)  # resumes; a complete file is left as it is
        summary["stages"]["rollout"] = {"seconds": time.perf_counter() - t0}

    if "label" in cfg.stages:
        t0 = time.perf_counter()
        pairs = Path(lab.output)
        stats_path = pairs.with_name(pairs.name + ".stats.json")
        fresh = (pairs.exists() and stats_path.exists()
                 and pairs.stat().st_mtime >= Path(roll.output).stat().st_mtime)
        stats = json.loads(stats_path.read_text()) if fresh else {}
        # relabel when the rollouts grew or the labelling settings (judges, margins, pairing) changed
        same = stats.get("labelling") == label.labelling(lab)
        if not (same and _complete(Path(roll.output), len(rollout.plan(roll)))):
            stats = label.main(lab)
        summary["stages"]["label"] = {**stats, "seconds": time.perf_counter() - t0}

    # -- reward models, experts, baselines: independent units, in this process or as Ray tasks --------
    executor = make_executor(cfg.executor, log=run / "executor.jsonl")
    stage_of = {"reward": "reward", "expert": "expert", "baseline": ""}

    def record(name: str, result: Any) -> None:
        kind, _, key = name.partition("/")
        if stage_of[kind]:
            summary["stages"].setdefault(stage_of[kind], {})[key] = result
        else:  # baseline/multitask -> stages.multitask
            summary["stages"][key] = result
        _write_summary(run, summary)

    report = executor.run(training_units(cfg, rms), on_done=record)
    if report.failures:
        summary["failed"] = {name: f.error for name, f in report.failures.items()}
        _write_summary(run, summary)
        report.raise_failures()

    # -- evaluation and Pareto sweep of this run's experts (their generation files fan out) ----------
    if "eval" in cfg.stages or "pareto" in cfg.stages:
        from personalign.recipes import evaluate, pareto

        ev, pa = build_evaluation_configs(cfg)
        failed: dict[str, Any] = {}
        if "eval" in cfg.stages:
            try:
                results = evaluate.main(ev, executor=executor)
                summary["stages"]["eval"] = {"report": results["files"]["markdown"], "win_rate": {
                    m: w["avg"]["value"] for m, w in results["win_rates"].items()}}
            except UnitsFailed as exc:  # generation files that failed; the others are written
                failed.update(exc.failures)
            _write_summary(run, summary)
        if "pareto" in cfg.stages:  # independent of the evaluation: runs whether or not it failed
            try:
                result = pareto.main(pa, executor=executor)
                summary["stages"]["pareto"] = {"report": result["files"]["markdown"], "hypervolume": {
                    m: v["hypervolume"] for m, v in result["methods"].items()}}
            except UnitsFailed as exc:
                failed.update(exc.failures)
        if failed:
            summary["failed"] = {name: f.error for name, f in failed.items()}
            _write_summary(run, summary)
            raise UnitsFailed(failed)
    _write_summary(run, summary)
    return summary


def _write_summary(run: Path, summary: dict[str, Any]) -> None:
    tmp = run / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(run / "summary.json")
