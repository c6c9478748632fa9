"""Generation files: method labels, one resumable JSONL file per (method, preference), and the ledgers that
keep files from mixing settings or weights. The evaluation and the Pareto sweep generate through here,
and ``personalign generate --output`` writes the same files (:func:`write_answers`).

Method labels name files and table rows: ``vanilla``, ``prompt``, ``soup-<merge>``, ``mope-<rule>``,
``mope-pcm`` (the shipped PCM; ``mope-pcm-extrapolate`` with the extrapolate rule), ``expert-<k>`` (the
combination's dimension-k side alone), ``adapter:PATH`` and ``pcm:PATH``; soups and mixtures take ``-w<key>=<weight>`` (a side's weight in the
combination: ``soup-exact-w4=2`` weighs the dimension-4 side twice the others) and ``-x<strength>``
suffixes. :func:`parse_method` turns each into the entry point's
:class:`~personalign.personalize.MethodOptions`, which checks everything (:func:`~personalign.personalize.resolve`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.config import to_dict
from personalign.data import Instruction, JsonlWriter, read_completed, resume_rows
from personalign.errors import ConfigError, DataError, PersonalignError
from personalign.merging import METHODS as SOUP_MERGES
from personalign.merging import PRUNING
from personalign.personalize import Method, MethodOptions, Personalization, resolve

if TYPE_CHECKING:
    from personalign.generation import SamplingConfig
    from personalign.personalize import PersonalizedModel
    from personalign.preferences import Preference

MIX_RULES = ("prob", "logit", "uniform", "extrapolate")
METHOD_FORMS = ("vanilla, prompt, soup-<merge> (merge: psoups, exact, ties, dare, dare_ties), "
                "expert-<k> (the combination's side of dimension k alone), "
                "mope-<rule> (rule: prob, logit, uniform, extrapolate), mope-pcm (MoPE weighted by the shipped "
                "Preference Control Model), mope-pcm-extrapolate (its weights with the extrapolate rule), "
                "adapter:PATH, pcm:PATH (MoPE weighted by a train-pcm folder's PCM); soups, mope-extrapolate and "
                "mope-pcm-extrapolate take a strength suffix -x<strength>, e.g. soup-exact-x2; soups and "
                "mope-prob, -logit and -extrapolate take side weights -w<key>=<weight>[+<key>=<weight>] before it, "
                "key a dimension number or a side, e.g. soup-exact-w4=2 or soup-exact-wP2A=0.5-x2")
_STRENGTH = re.compile(r"^(?P<method>.+)-x(?P<strength>\d+(?:\.\d+)?)$")
_WEIGHTS = re.compile(r"^(?P<method>.+?)-w(?P<weights>[A-Za-z0-9_]+=[^+=]+(?:\+[A-Za-z0-9_]+=[^+=]+)*)$")


@dataclass(frozen=True)
class MethodSpec:
    """One evaluated method: ``label`` names its folders and table rows."""

    label: str
    kind: Method
    variant: str | None = None  # soup: the merge; mope: the mixing rule
    dimension: int | None = None  # expert-k: k, 1-based in dimension order
    adapter: str | None = None  # adapter:PATH
    pcm: str | None = None  # pcm:PATH, learned MoPE
    strength: float = 1.0  # soups and mope-extrapolate: the -x<strength> suffix
    side_weights: tuple[tuple[str, float], ...] = ()  # the -w suffix: (dimension number or side, weight)

    @property
    def uses_experts(self) -> bool:
        return self.kind.uses_experts

    def options(self, experts: str | None, merge_density: float | None) -> MethodOptions:
        """The entry point's options for this method (``merge_density`` applies to the pruning soups)."""
        soup, mope = self.kind is Method.SOUP, self.kind is Method.MOPE
        return MethodOptions(
            method=self.kind.value, experts=experts if self.uses_experts else None,
            merge=self.variant if soup else "psoups",
            merge_density=merge_density if soup and self.variant in PRUNING else None,
            mix=self.variant if mope else "prob", pcm=self.pcm, adapter=self.adapter,
            # labels name their strength: soup-exact is strength 1 whatever the measured default
            strength=self.strength if soup or (mope and self.variant == "extrapolate") else None)


def parse_method(spec: str) -> MethodSpec:
    """``soup-exact`` -> soup with the exact merge, ``expert-2`` -> the dimension-2 side's expert,
    ``soup-exact-x2`` -> the exact soup at strength 2, ..."""
    s = str(spec).strip()
    found = None if s.startswith(("adapter:", "pcm:")) else _STRENGTH.match(s)
    if found is not None:
        from personalign.personalize import strength_suffix

        inner = parse_method(found["method"])
        strength = float(found["strength"])
        if not (inner.kind is Method.SOUP or (inner.kind is Method.MOPE and inner.variant == "extrapolate")):
            raise ConfigError(f"method {spec!r}: a strength suffix -x<strength> goes with soup-<merge>, "
                              "mope-extrapolate and mope-pcm-extrapolate only")
        if strength == 1 or s != inner.label + strength_suffix(strength):
            raise ConfigError(f"method {spec!r}: write the strength as {inner.label}{strength_suffix(strength)}"
                              if strength != 1 else f"method {spec!r}: strength 1 is {inner.label}")
        return replace(inner, label=s, strength=strength)
    weighted = None if s.startswith(("adapter:", "pcm:")) else _WEIGHTS.match(s)
    if weighted is not None:
        inner = parse_method(weighted["method"])
        if not (inner.kind in (Method.SOUP, Method.MOPE) and inner.variant != "uniform" and inner.pcm is None):
            raise ConfigError(f"method {spec!r}: side weights -w<key>=<weight> go with soup-<merge>, mope-prob, "
                              "mope-logit and mope-extrapolate only")
        if inner.strength != 1:
            raise ConfigError(f"method {spec!r}: write the side weights before the strength, as in "
                              "soup-exact-w4=2-x1.5")
        pairs: list[tuple[str, float]] = []
        for token in weighted["weights"].split("+"):
            key, _, text = token.partition("=")
            try:
                w = float(text)
            except ValueError:
                w = float("nan")
            if not (w > 0 and w < float("inf")) or w == 1:
                raise ConfigError(f"method {spec!r}: the weight in {token!r} must be a positive number other "
                                  "than 1 (every side weighs 1 unless the suffix names it)")
            if any(k.lower() == key.lower() for k, _ in pairs):
                raise ConfigError(f"method {spec!r} weighs {key!r} twice")
            pairs.append((key, w))
        canonical = inner.label + "-w" + "+".join(f"{k}={w:g}" for k, w in pairs)
        if s != canonical:
            raise ConfigError(f"method {spec!r}: write it as {canonical}")
        return replace(inner, label=s, side_weights=tuple(pairs))
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
    if s == "mope-pcm-extrapolate":  # its weights, with the extrapolating rule (which takes a strength)
        return MethodSpec(s, Method.MOPE, variant="extrapolate", pcm="shipped")
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
    if m.side_weights:
        return weighted_combination(m, combo)
    return combo.spec()


def weighted_combination(m: MethodSpec, combo: Preference) -> str:
    """``combo`` with ``m``'s side weights: every side weight 1 but those its ``-w`` suffix names, by
    dimension number or by side. A key the preference space does not know is refused."""
    space = combo.space
    dims = list(space.dimensions)
    weights = dict.fromkeys(combo.sides, 1.0)
    named: dict[str, str] = {}
    for key, w in m.side_weights:
        if key.isdigit():
            if not 1 <= int(key) <= len(dims):
                raise ConfigError(f"method {m.label}: there is no dimension {key}; the preference space has "
                                  f"{len(dims)}")
            hit = [s for s in combo.sides if space.dimension_of(s) == dims[int(key) - 1]]
        else:
            try:
                side = space.resolve(key)
            except PersonalignError as exc:
                raise ConfigError(f"method {m.label}: {exc}") from None
            hit = [side] if side in weights else []
        for s in hit:
            if s in named:
                raise ConfigError(f"method {m.label} weighs side {s} twice, as {named[s]!r} and {key!r}")
            named[s] = key
            weights[s] = w
    return ",".join(f"{s}={w:g}" for s, w in weights.items())


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


@dataclass(frozen=True)
class GenerationJob:
    """One generation file: a method under one preference (None for vanilla), over the run's prompts."""

    prefs: str | None
    options: MethodOptions
    output: Path


def job_for(cfg: Any, m: MethodSpec, prefs: str | None, output: Path) -> GenerationJob:
    """The job of one file. ``cfg`` is an EvalConfig or a ParetoConfig (the generation fields they share)."""
    return GenerationJob(prefs, m.options(cfg.experts, cfg.merge_density), Path(output))


def job_spec(cfg: Any, job: GenerationJob) -> Personalization:
    """The job's personalization, checked by the entry point (no model is loaded)."""
    return resolve(job.prefs, job.options, model=cfg.model, dimensions=cfg.dimensions)


def missing_requirement(cfg: Any, m: MethodSpec, prefs: list[Preference | None]) -> str | None:
    """Why ``m`` cannot run for these preferences (a missing adapter, expert or PCM), or None."""
    for pref in prefs or [None]:
        try:
            resolve(pref, m.options(cfg.experts, cfg.merge_density), model=cfg.model, dimensions=cfg.dimensions)
        except PersonalignError as exc:
            return str(exc)
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



def generation_sources(spec: Personalization) -> dict[str, str]:
    """The trained weights one generation file depends on, by SHA-256: each expert its preference
    uses, the ``adapter:`` folder, the PCM. Empty for methods that use only the base model."""
    from personalign import compose
    from personalign.pcm import PCM_WEIGHTS

    files: dict[str, Path] = {}
    if spec.adapter_dir is not None:
        files["adapter"] = spec.adapter_dir / compose.ADAPTER_FILES[1]
    for side, folder in spec.experts.items():
        files[f"expert/{side}"] = folder / compose.ADAPTER_FILES[1]
    if spec.pcm_dir is not None:
        files["pcm"] = spec.pcm_dir / PCM_WEIGHTS
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


def answer_row(item: Instruction, spec: Personalization, response: str,
               settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of a generation file: ``settings`` (:func:`generation_settings`) make it reproducible."""
    pref = spec.preference
    row = {"id": item.id, "prompt": item.prompt, "prefs": pref.spec() if pref else None, "method": spec.label,
           "response": response, "model": spec.model_name}
    return {**row, "sampling": settings} if settings is not None else row


def generation_settings(sampling: SamplingConfig, batch_size: int) -> dict[str, Any]:
    """What decides a file's text besides the method and preference: the sampling settings, the seed and the
    batch size (each batch is seeded by its position)."""
    return {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "repetition_penalty": sampling.repetition_penalty, "seed": sampling.seed, "batch_size": batch_size}


def write_answers(spec: Personalization, build: Callable[[], PersonalizedModel], items: list[Instruction],
                  output: Path | None, sampling: SamplingConfig, *, batch_size: int = 8,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Answer every instruction under ``spec`` and return the rows. With ``output``, each batch is written
    durably as it comes, and a rerun checks that the lines already there belong to this run and continues
    after them. ``build`` makes the personalized model, only when something is left to generate."""
    done: list[dict[str, Any]] = []
    settings = generation_settings(sampling, batch_size)
    if output is not None:  # a rerun continues only the same run: same text asked for, same settings
        prefs = spec.preference.spec() if spec.preference else None
        done = resume_rows(output, [{"prompt": it.prompt, "prefs": prefs, "method": spec.label,
                                     "model": spec.model_name, "sampling": settings} for it in items],
                           recorded=("model", "sampling"))
    todo = items[len(done):]
    if not todo:
        return done
    model = build()
    model.check_prompts([model.format(it.prompt) for it in todo], sampling, first_index=len(done))
    rows: list[dict[str, Any]] = list(done)
    writer = JsonlWriter(output) if output is not None else None
    bar = progress_bar(progress and output is not None, len(items), "generate", "prompt")
    if bar is not None:
        bar.update(len(done))

    def on_batch(start: int, responses: list[str]) -> None:
        batch = [answer_row(items[start + j], spec, r, settings) for j, r in enumerate(responses)]
        rows.extend(batch)
        if writer is not None:
            writer.write_many(batch)
        if bar is not None:
            bar.update(len(batch))

    try:
        model.generate([it.prompt for it in todo], sampling, batch_size=batch_size, first_index=len(done),
                       on_batch=on_batch)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    return rows


@dataclass(frozen=True)
class GenerationTask:
    """One generation file as a unit of work another process can run (:func:`generate_file`)."""

    cfg: Any  # the EvalConfig or ParetoConfig
    job: GenerationJob
    items: tuple[Instruction, ...]


def generate_file(task: GenerationTask) -> int:
    """Generate (or resume) one file with its own copy of the base model; the number of rows written."""
    from personalign.models import load_model
    from personalign.personalize import personalize

    cfg, items = task.cfg, list(task.items)
    spec = job_spec(cfg, task.job)

    def build() -> PersonalizedModel:
        base, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        return personalize(base, tok, spec)

    rows = write_answers(spec, build, items, task.job.output, replace(cfg.sampling, seed=cfg.seed),
                         batch_size=cfg.batch_size, progress=False)
    return len(rows)


def fan_out_generations(cfg: Any, jobs: dict[Path, GenerationJob], items: list[Instruction], executor: Any,
                        run: Path | None = None) -> None:
    """Generate every missing or incomplete file as one unit of ``executor`` (a Ray task each): files are
    independent, each unit loads its own base model. Complete files are left alone; files made with weights
    that changed since are moved aside first, as :func:`run_generations` does. Raises
    :class:`~personalign.executors.UnitsFailed` listing the files that failed once the others are done."""
    from personalign.executors import Unit

    ledger = GenerationSources(run) if run is not None else None
    units, sources = [], {}
    for path, job in jobs.items():
        if ledger is not None:
            sources[path] = generation_sources(job_spec(cfg, job))
            note = ledger.stale(path, sources[path])
            if note is not None:
                print(note, file=sys.stderr)
        if complete_rows(path, items) is None:
            name = str(path)  # run/generations/<method>/<file>.jsonl -> generate/run/<method>/<file>
            if run is not None and path.is_relative_to(run / "generations"):
                name = f"{run.name}/{path.relative_to(run / 'generations').as_posix()}"
            units.append(Unit(f"generate/{name.removesuffix('.jsonl')}", generate_file,
                              GenerationTask(cfg, job, tuple(items)), "generate"))
    if units:
        report = executor.run(units)
        if ledger is not None:  # the files made now, with today's weights: not stale on the next read
            for u in units:
                if u.name in report.results:
                    ledger.record(u.cfg.job.output, sources[u.cfg.job.output])
        report.raise_failures()


def run_generations(cfg: Any, jobs: dict[Path, GenerationJob], items: list[Instruction], progress: bool,
                    desc: str = "eval generate", run: Path | None = None,
                    executor: Any = None) -> dict[Path, list[str]]:
    """Each job's responses: complete files are read, others generated or resumed.

    The base model is loaded once, on the first file that needs it, and personalized per file. With
    ``run`` (the run folder), each file's weights are checked against ``generations/sources.json``
    first: a file made by an expert, adapter or PCM that has been retrained since is regenerated.
    With a Ray ``executor`` (:mod:`personalign.executors`), the missing files are generated first, one
    task each (:func:`fan_out_generations`); a local executor changes nothing.
    """
    from personalign.personalize import personalize

    if executor is not None and executor.kind != "local":
        fan_out_generations(cfg, jobs, items, executor, run)
    out: dict[Path, list[str]] = {}
    ledger = GenerationSources(run) if run is not None else None
    base: list[Any] = []
    sampling = replace(cfg.sampling, seed=cfg.seed)
    bar = progress_bar(progress, len(jobs), desc, "file")
    try:
        for path, job in jobs.items():
            spec = job_spec(cfg, job)
            sources = generation_sources(spec) if ledger is not None else {}
            if ledger is not None:
                note = ledger.stale(path, sources)
                if note is not None:
                    print(note, file=sys.stderr)
            rows = complete_rows(path, items)
            if rows is None:
                def build(spec: Personalization = spec) -> PersonalizedModel:
                    if not base:
                        from personalign.models import load_model

                        base.extend(load_model(cfg.model, device=cfg.device, dtype=cfg.dtype))
                    return personalize(base[0], base[1], spec)

                write_answers(spec, build, items, path, sampling, batch_size=cfg.batch_size, progress=cfg.progress)
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


def progress_bar(progress: bool, total: int, desc: str, unit: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)

