"""Recipe: the demo. Answers a few held-out instructions under contrasting preference combinations
and shows the answers side by side.

config -> main(cfg) -> phases: pick instructions -> load model -> generate every (instruction,
combination, method) in one shared batch (the server's continuous-batching engine, no HTTP): preference
prompting and, with experts (shipped, or ``experts``), the exact soup and the token-level mixture (MoPE)
of each combination, with a progress line -> show one table per instruction (a section per method when
the terminal is too narrow for the columns) -> write ``demo.jsonl`` when a run folder is given.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.data import load_builtin
from personalign.errors import ConfigError, DataError
from personalign.generation import SamplingConfig
from personalign.personalize import Method, MethodOptions, build_prompts, resolve
from personalign.preferences import load_space

if TYPE_CHECKING:
    from rich.console import Console

    from personalign.personalize import Personalization

DEFAULT_INSTRUCTIONS = 3
DEFAULT_COMBINATIONS = ("P1A,P2A,P3A", "P1B,P2B,P3B")


@dataclass(frozen=True)
class DemoConfig:
    model: str | None = None
    combinations: tuple[str, ...] = DEFAULT_COMBINATIONS
    instructions: tuple[str, ...] = ()  # empty = the first few built-in evaluation instructions
    num_instructions: int = DEFAULT_INSTRUCTIONS
    method: str = "prompt"
    output_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # 128 new tokens: long enough for the long answers (informative, expert) to show their difference from the
    # short ones, which end well before; every row stops at its end of sequence.
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=128, temperature=0.0))
    experts: str | None = None  # None: the shipped experts, when there are any for the model
    # Composition methods shown when experts exist; mope is weighted by the shipped PCM when the demo
    # uses the shipped experts and a PCM ships for them, else by the preference's fixed weights.
    compose: tuple[str, ...] = ("soup", "mope")
    # The soup's merge rule. "exact" (the weighted sum of the experts' LoRA deltas) decodes in the shared
    # batch with every other row; psoups, ties and dare merge a model per combination and decode beside it.
    soup_merge: str = "exact"


def experts_for(cfg: DemoConfig) -> str | None:
    """The experts folder the demo composes, or None (preference prompting only)."""
    from personalign.compose import resolve_experts_dir, shipped_experts_dir
    from personalign.models import canonical_name

    if cfg.experts is not None:
        return str(resolve_experts_dir(cfg.experts, canonical_name(cfg.model)))
    shipped = shipped_experts_dir(canonical_name(cfg.model))
    return str(shipped) if shipped is not None else None


# -- what each method is called on screen, and what it is ----------------------------------------------------

_MERGES = {"exact": "as the sum of their LoRA deltas, weighted by the preference",
           "psoups": "by averaging their LoRA factors with the preference's weights (Personalized Soups)",
           "ties": "by TIES, weighted by the preference", "dare": "by DARE, weighted by the preference",
           "dare_ties": "by DARE-TIES, weighted by the preference"}


def method_name(spec: Personalization) -> str:
    """The method's name on screen (short, so that it fits a narrow column): what really produced the row."""
    m, o = spec.method, spec.options
    if m is Method.PROMPT:
        return "prompting"
    if m is Method.VANILLA:
        return "no preference"
    if m is Method.SOUP:
        name = "psoups" if o.merge == "psoups" else f"{o.merge} soup"
        return name if o.strength == 1 else f"{name} x{o.strength:g}"
    if m is Method.MOPE:
        return "MoPE (PCM)" if spec.pcm_dir is not None else f"MoPE ({o.mix})"
    return spec.label


def method_help(spec: Personalization) -> str:
    """One sentence on what the method does with the preference."""
    m, o = spec.method, spec.options
    if m is Method.PROMPT:
        return "the base model, the preference's prompt appended to the instruction"
    if m is Method.VANILLA:
        return "the base model, no preference prompt"
    if m is Method.SOUP:
        strength = "" if o.strength == 1 else (f", at strength {o.strength:g} ({o.strength:g} times that delta; the "
                                               "default measured for these experts)")
        return f"the chosen sides' experts (one LoRA per side) merged {_MERGES.get(o.merge, f'by {o.merge}')}{strength}"
    if m is Method.MOPE:
        how = ("weighted at every token by the preference control model (PCM)" if spec.pcm_dir is not None
               else f"with the preference's fixed weights ({o.mix} rule)")
        return f"the chosen sides' experts mixed token by token, {how}"
    if m is Method.EXPERT:
        return "one side's expert"
    return spec.label


# -- generation ------------------------------------------------------------------------------------------------

Progress = Callable[[int, int], None]  # (answers done, tokens generated)


def generate_all(model: Any, tokenizer: Any, specs: Sequence[Personalization], instructions: Sequence[str],
                 sampling: SamplingConfig, experts_dir: str | None,
                 on_progress: Progress | None = None) -> list[list[str]]:
    """Every spec's answer to every instruction, all decoded together by the server's engine: prompting,
    exact soups and MoPE rows share one batch (each row its own preference and method), each row leaving at
    its end of sequence. Other soups decode beside it on their merged model. A sampled demo (temperature > 0)
    runs each spec as its own batch seeded with ``sampling.seed``, as ``generate`` does, so that the same
    seed gives the same answers."""
    import threading

    from personalign.serve.batching import Models
    from personalign.serve.engine import Engine, Job

    rows = len(specs) * len(instructions)
    model_name = getattr(model.config, "personalign_base", None) or model.name_or_path
    merged = sum(1 for s in specs if s.method.changes_weights)
    engine = Engine(Models(model, tokenizer, max_models=max(1, merged)), max_batch=max(1, rows),
                    max_queue=max(1, len(specs)), experts_dir=None if experts_dir is None else Path(experts_dir),
                    model_name=model_name)
    lock = threading.Lock()
    done = [0]

    def count(_choice: int, _piece: str, reason: str | None) -> None:
        if reason is not None:
            with lock:
                done[0] += 1

    seeded = sampling.temperature > 0
    jobs = [Job(build_prompts(tokenizer, instructions, s.preference, s.method), 1, sampling, (), seeded, True, s,
                on_event=count) for s in specs]
    from concurrent.futures import wait

    try:
        futures = [engine.submit(job) for job in jobs]
        while True:
            pending = wait(futures, timeout=0.25).not_done
            if on_progress is not None:
                on_progress(min(done[0], rows), engine.tokens)
            if not pending:
                break
    finally:
        engine.close()
    return [[text for text, _reason, _count in f.result()] for f in futures]


def main(cfg: DemoConfig, show: bool = True, console: Console | None = None) -> list[dict[str, Any]]:
    space = load_space()
    prefs = [space.parse(c) for c in cfg.combinations]
    if not prefs:
        raise DataError("the demo needs at least one combination")
    if cfg.instructions:
        instructions = list(cfg.instructions)
    else:
        if cfg.num_instructions < 1:
            raise DataError(f"num_instructions must be at least 1, got {cfg.num_instructions}")
        # Spread over domains: one instruction from each of the first few domains.
        seen: set[str | None] = set()
        instructions = []
        for item in load_builtin("eval"):
            if item.domain not in seen:
                seen.add(item.domain)
                instructions.append(item.prompt)
            if len(instructions) == cfg.num_instructions:
                break

    # Every personalized model the demo shows, checked before the model loads.
    if Method.parse(cfg.method) is Method.VANILLA:
        raise ConfigError("the demo contrasts preferences, and method vanilla follows none; use method prompt "
                          "(or generate --method vanilla for the base model's answer)")
    specs = [resolve(p, MethodOptions(method=Method.parse(cfg.method).value), model=cfg.model) for p in prefs]
    experts = experts_for(cfg) if cfg.compose else None
    if experts is not None:
        from personalign.models import canonical_name
        from personalign.pcm import SHIPPED, shipped_pcm_dir

        learned = cfg.experts is None and shipped_pcm_dir(canonical_name(cfg.model)) is not None
        for name in cfg.compose:
            options = MethodOptions(method=name, experts=experts,
                                    pcm=SHIPPED if name == "mope" and learned else None,
                                    **({"merge": cfg.soup_merge} if name == "soup" else {}))
            specs += [resolve(p, options, model=cfg.model) for p in prefs]

    from personalign.models import load_model

    if show and console is None:
        from rich.console import Console

        console = Console()
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    load_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    if show:
        assert console is not None
        show_methods(console, specs)
        answers = _generate_with_progress(console, model, tok, specs, instructions, cfg.sampling, experts)
    else:
        answers = generate_all(model, tok, specs, instructions, cfg.sampling, experts)
    gen_s = time.perf_counter() - t1

    rows = [{"instruction": q, "prefs": spec.preference.spec(), "describe": spec.preference.describe(),
             "method": spec.label, "response": r}
            for spec, texts in zip(specs, answers) for q, r in zip(instructions, texts)]
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "demo.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    if show:
        assert console is not None
        show_table(console, instructions, prefs, specs, rows, load_s, gen_s)
    return rows


def _generate_with_progress(console: Console, model: Any, tok: Any, specs: Sequence[Personalization],
                            instructions: Sequence[str], sampling: SamplingConfig,
                            experts: str | None) -> list[list[str]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows = len(specs) * len(instructions)
    # Short columns, so that the line fits 60 columns: "generating ━━━━━━━━━━ 7/18 answers 1234 tokens 0:00:21"
    with Progress(TextColumn("generating"), BarColumn(bar_width=10), MofNCompleteColumn(),
                  TextColumn("answers {task.fields[tokens]} tokens"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("generate", total=rows, tokens=0)

        def update(done: int, tokens: int) -> None:
            progress.update(task, completed=done, tokens=tokens)

        return generate_all(model, tok, specs, instructions, sampling, experts, on_progress=update)


# -- the table -------------------------------------------------------------------------------------------------

MIN_ANSWER_WIDTH = 24  # a column narrower than this is hard to read: the demo stacks sections instead


def show_methods(console: Console, specs: Sequence[Personalization]) -> None:
    """What each method the demo shows is, a line each (wrapped, never cut)."""
    from rich.text import Text

    for name, what in dict.fromkeys((method_name(s), method_help(s)) for s in specs):
        console.print(Text.assemble((name, "bold"), f": {what}"), overflow="fold")


def show_table(console: Console, instructions: Sequence[str], prefs: Sequence[Any],
               specs: Sequence[Personalization], rows: Sequence[dict[str, Any]], load_s: float,
               gen_s: float) -> None:
    """One table per instruction: a row per method, a column per preference. When the console is too
    narrow for the columns, each instruction is a section per method, each answer under its preference."""
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    by_key = {(r["instruction"], r["prefs"], r["method"]): r["response"] for r in rows}
    methods = list(dict.fromkeys((s.label, method_name(s), method_help(s)) for s in specs))
    names = [name for _, name, _ in methods]
    headers = [(p.describe(), f"({p.spec()})") for p in prefs]
    longest_word = max(len(w) for h in headers for part in h for w in part.split())
    name_w = max(len(n) for n in names)
    answer_w = max(MIN_ANSWER_WIDTH, longest_word)
    # Each column takes its width, one space of padding either side and one rule.
    wide = 1 + (name_w + 3 if len(methods) > 1 else 0) + len(prefs) * (answer_w + 3) <= console.width
    for instr in instructions:
        if wide:
            table = Table(title=instr, show_lines=True, expand=True)
            if len(methods) > 1:
                table.add_column("method", no_wrap=True, min_width=name_w, style="bold")
            for describe, spec in headers:
                table.add_column(f"{describe}\n{spec}", ratio=1, min_width=answer_w, overflow="fold")
            for label, name, _ in methods:
                cells = [by_key.get((instr, p.spec(), label), "") for p in prefs]
                table.add_row(*([name] if len(methods) > 1 else []), *cells)
            console.print(table)
        else:
            console.rule(characters="=")
            console.print(Text(instr, style="bold"), overflow="fold")
            for label, name, _ in methods:
                console.print(Text.assemble("- ", (name, "bold magenta"), " -"), overflow="fold")
                for p, (describe, spec) in zip(prefs, headers):
                    console.print(Text.assemble((describe, "bold cyan"), " ", (spec, "cyan")), overflow="fold")
                    console.print(Padding(Text(by_key.get((instr, p.spec(), label), ""), overflow="fold"),
                                          (0, 0, 1, 2)))
    console.print(f"[dim]model loaded in {load_s:.1f} s; {len(rows)} responses generated in {gen_s:.1f} s[/dim]")
