"""Recipe: the Pareto front of a composition method between two opposite sides.

config -> main(cfg) -> phases: validate -> generate (one file per method and weight) -> measure ->
front and hypervolume -> report.

The weight ``w`` goes to the first side and ``1 - w`` to the second (concise=0.25,informative=0.75);
sides in ``fixed`` keep weight 1. Soups merge the experts with these weights, MoPE mixes their
next-token distributions with them (``mope-uniform`` ignores weights and is refused). The prompt is
the dominant side's, as for any weighted preference (:meth:`Preference.prompt_sides`).

Each point is measured by ``scorer`` for both sides, averaged over instructions, so both axes are "more
of this side" and the front maximises both: the offline judge's :func:`~personalign.judges.side_score`
(default; the six built-in sides), or a user's scoring function ``module:function`` (the contract of
:mod:`personalign.judges.function`) for sides the offline judge does not know, e.g. a fourth dimension.

Hypervolume needs a reference point that every point dominates. By default it is, per axis, the
smallest score minus ``margin`` times the axis' span (``margin`` times ``max(|min|, 1)`` when all
points tie on that axis). All swept methods share one reference point, so their hypervolumes in one
report are comparable; across reports they are not, unless ``reference_point`` fixes it.

Run folder: ``config.json``, ``generations/<method>/w<weight>.jsonl`` (resumable, as in ``eval``),
``pareto.json``, ``pareto.md``, ``pareto.png``, ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.config import to_dict
from personalign.data import Instruction, load_prompts
from personalign.errors import ConfigError
from personalign.evaluation import hypervolume_2d, pareto_front
from personalign.generation import SamplingConfig
from personalign.generations import (
    GenerationJob,
    MethodSpec,
    check_generation_identity,
    generation_identity,
    job_for,
    missing_requirement,
    parse_method,
    run_generations,
)
from personalign.personalize import Method
from personalign.preferences import Preference, PreferenceSpace, load_space


@dataclass(frozen=True)
class ParetoConfig:
    run_dir: str
    sides: tuple[str, ...] = ("P2A", "P2B")  # x axis, y axis: two sides the scorer measures
    methods: tuple[str, ...] = ("soup-psoups",)  # soup-<merge>, mope-prob or mope-logit
    weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # weight on the first side, in [0, 1]
    fixed: tuple[str, ...] = ()  # other sides held at weight 1, e.g. P1A,P3A
    model: str | None = None
    dimensions: str | None = None
    experts: str | None = None
    prompts: str = "builtin:eval"
    limit: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # its seed is set from `seed`
    batch_size: int = 8
    merge_density: float = 0.5
    seed: int = 0
    # What scores each side: offline (the built-in sides) or module:function (one float per response)
    scorer: str = "offline"
    margin: float = 0.1  # hypervolume reference point: per-axis minimum minus margin x span
    reference_point: tuple[float, ...] = ()  # (x, y) to compare hypervolumes across reports
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if len(self.sides) != 2:
            raise ConfigError(f"sides must name two sides (x axis, y axis), e.g. P2A,P2B; "
                              f"got {list(self.sides)}")
        if not self.weights:
            raise ConfigError("weights is empty; give the weights on the first side, e.g. 0,0.25,0.5,0.75,1")
        bad = [w for w in self.weights if not (math.isfinite(w) and 0 <= w <= 1)]
        if bad:
            raise ConfigError(f"weights {bad} are outside [0, 1]; the first side gets w and the second 1 - w")
        if len(set(self.weights)) != len(self.weights):
            raise ConfigError(f"weights {list(self.weights)} repeat a value")
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise ConfigError(f"margin must be a positive number, e.g. 0.1; got {self.margin}")
        if self.reference_point and len(self.reference_point) != 2:
            raise ConfigError(f"reference_point must be two numbers (x, y), got {list(self.reference_point)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.sampling.seed != 0:
            raise ConfigError("sampling.seed is set from the top-level seed; set seed instead")
        if not self.methods:
            raise ConfigError("methods is empty; give soup-<merge>, mope-prob or mope-logit")
        if self.scorer != "offline" and ":" not in self.scorer:
            raise ConfigError(f"scorer {self.scorer!r} is neither offline nor module:function (a scoring "
                              "function of (prompts, responses, side) -> one float per response)")


def hypervolume_reference(points: Sequence[Sequence[float]], margin: float = 0.1) -> tuple[float, float]:
    """Per axis: the smallest coordinate minus ``margin`` x the axis' span (x ``max(|min|, 1)`` without
    a span), so every point adds area and the extreme points count."""
    if not points:
        raise ConfigError("no points to place a reference point under")
    ref = []
    for axis in (0, 1):
        vals = [float(p[axis]) for p in points]
        lo, span = min(vals), max(vals) - min(vals)
        ref.append(lo - margin * (span if span > 0 else max(abs(lo), 1.0)))
    return ref[0], ref[1]


def sweep_preference(space: PreferenceSpace, sides: Sequence[str], w: float,
                     fixed: Sequence[str]) -> Preference:
    """``w`` on the first side, ``1 - w`` on the second, 1 on each fixed side."""
    weights = {sides[0]: w, sides[1]: round(1.0 - w, 12), **{s: 1.0 for s in fixed}}
    return space.parse(weights)


@dataclass
class ParetoPlan:
    space: PreferenceSpace
    items: list[Instruction]
    sides: tuple[str, str]
    scorer: Scorer
    methods: list[MethodSpec]
    files: dict[tuple[str, float], Path]
    jobs: dict[Path, GenerationJob]


def validate(cfg: ParetoConfig) -> ParetoPlan:
    """Phase 1: everything that needs no model."""
    from personalign.judges import SUPPORTED_SIDES

    space = load_space(cfg.dimensions)
    sx, sy = (space.resolve(s) for s in cfg.sides)
    if sx == sy:
        raise ConfigError(f"sides names {sx} twice; sweep between two different sides, e.g. P2A,P2B")
    scorer = make_scorer(cfg.scorer)
    if cfg.scorer == "offline":
        unmeasured = [s for s in (sx, sy) if s not in SUPPORTED_SIDES]
        if unmeasured:
            raise ConfigError(f"the offline judge cannot score side(s) {', '.join(unmeasured)}; sweep two of "
                              f"{', '.join(SUPPORTED_SIDES)}, or set scorer to a module:function that scores them")
    else:
        for s in (sx, sy):
            scorer.judge.check_side(s)  # a function that declares its sides refuses the others here
    fixed = [space.resolve(s) for s in cfg.fixed]
    swept_dims = {space.dimension_of(sx), space.dimension_of(sy)}
    clash = [s for s in fixed if s in (sx, sy) or space.dimension_of(s) in swept_dims]
    if clash:
        raise ConfigError(f"fixed side(s) {', '.join(clash)} belong to a swept dimension; "
                          "fix sides of other dimensions")
    if len({space.dimension_of(s) for s in fixed}) != len(fixed):
        raise ConfigError(f"fixed {fixed} holds two sides of one dimension; "
                          "fix at most one side per dimension")

    methods = []
    for spec in cfg.methods:
        m = parse_method(spec)
        if m.kind not in (Method.SOUP, Method.MOPE) or m.variant == "uniform":
            raise ConfigError(f"method {m.label} does not take weights; "
                              "sweep soup-<merge>, mope-prob or mope-logit")
        if m.side_weights:
            raise ConfigError(f"method {m.label} carries side weights, and the sweep sets the weights; "
                              "write it without its -w suffix")
        if any(o.label == m.label for o in methods):
            raise ConfigError(f"methods lists {m.label} twice")
        methods.append(m)
    prefs = {w: sweep_preference(space, (sx, sy), w, fixed) for w in cfg.weights}
    for m in methods:
        why = missing_requirement(cfg, m, list(prefs.values()))
        if why:
            raise ConfigError(f"method {m.label} cannot run: {why}")
    items = load_prompts(cfg.prompts, limit=cfg.limit)

    run = Path(cfg.run_dir)
    files: dict[tuple[str, float], Path] = {}
    jobs: dict[Path, GenerationJob] = {}
    for m in methods:
        for w, pref in prefs.items():
            path = run / "generations" / m.label / f"w{w:g}.jsonl"
            files[(m.label, w)] = path
            jobs[path] = job_for(cfg, m, pref.spec(), path)
    return ParetoPlan(space, items, (sx, sy), scorer, methods, files, jobs)


@dataclass(frozen=True)
class Scorer:
    """Scores responses on a side: the offline judge's side score, or a user's checked function."""

    name: str
    judge: Any = None  # a FunctionJudge for module:function

    def mean(self, side: str, prompts: Sequence[str], responses: Sequence[str]) -> float:
        if self.judge is not None:
            values = self.judge.score(prompts, responses, side)
        else:
            from personalign.judges import side_score

            values = [side_score(side, p, r) for p, r in zip(prompts, responses)]
        return sum(values) / len(values)


def make_scorer(spec: str) -> Scorer:
    """``offline`` or ``module:function`` (imported now: a malformed one is an error before any model loads)."""
    if spec == "offline":
        return Scorer("offline")
    from personalign.judges import FunctionJudge

    return Scorer(spec, FunctionJudge(spec))


def main(cfg: ParetoConfig, executor: Any = None) -> dict[str, Any]:
    """Sweep, measure, and write pareto.json/md/png; return the result
    (``report.pareto_markdown``'s layout). ``executor`` (:mod:`personalign.executors`): a Ray executor
    generates the missing points' files one task each."""
    # -- validate ------------------------------------------------------------------------------------
    plan = validate(cfg)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    check_generation_identity(run, generation_identity(cfg))
    (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    # -- generate ------------------------------------------------------------------------------------
    responses = run_generations(cfg, plan.jobs, plan.items, cfg.progress, desc="pareto generate", run=run,
                                executor=executor)

    # -- measure -------------------------------------------------------------------------------------
    sx, sy = plan.sides
    prompts = [it.prompt for it in plan.items]
    points: dict[str, list[dict[str, float]]] = {}
    for m in plan.methods:
        points[m.label] = []
        for w in cfg.weights:
            texts = responses[plan.files[(m.label, w)]]
            points[m.label].append({"weight": w, "x": plan.scorer.mean(sx, prompts, texts),
                                    "y": plan.scorer.mean(sy, prompts, texts), "n": len(texts)})

    # -- front and hypervolume (one reference point for every method) ------------------------------
    every = [(p["x"], p["y"]) for pts in points.values() for p in pts]
    ref = tuple(cfg.reference_point) if cfg.reference_point else hypervolume_reference(every, cfg.margin)
    sweeps = {}
    for m, pts in points.items():
        xy = [(p["x"], p["y"]) for p in pts]
        sweeps[m] = {"points": pts, "front": pareto_front(xy), "hypervolume": hypervolume_2d(xy, ref)}

    # -- report --------------------------------------------------------------------------------------
    from personalign.report import write_pareto_report
    from personalign.runlog import MetricsLogger

    result: dict[str, Any] = {
        "sides": [sx, sy], "names": [plan.space.sides[sx].name, plan.space.sides[sy].name],
        "fixed": [plan.space.resolve(s) for s in cfg.fixed], "instructions": len(plan.items),
        "scorer": plan.scorer.name,
        "margin": cfg.margin, "reference_point": list(ref), "methods": sweeps,
    }
    result["files"] = write_pareto_report(run, result)
    logger = MetricsLogger(run)
    logger.log(len(logger.read()), {f"pareto/hypervolume/{m}": s["hypervolume"] for m, s in sweeps.items()})
    return result
