"""Recipe: the demo. Answers a few held-out instructions under contrasting preference combinations
and shows the answers side by side.

config -> main(cfg) -> phases: pick instructions -> load model -> generate every (instruction,
combination) in one batched pass -> with experts (shipped, or ``experts``), also the soup and the
token-level mixture of each combination -> show a table -> write ``demo.jsonl`` when a run folder is
given.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.data import load_builtin
from personalign.errors import DataError
from personalign.generation import SamplingConfig
from personalign.personalize import Method, MethodOptions, build_prompts, personalize, resolve
from personalign.preferences import load_space

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
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=160, temperature=0.0))
    experts: str | None = None  # None: the shipped experts, when there are any for the model
    # Composition methods shown when experts exist; mope is weighted by the shipped PCM when the demo
    # uses the shipped experts and a PCM ships for them, else by the preference's fixed weights.
    compose: tuple[str, ...] = ("soup", "mope")


def experts_for(cfg: DemoConfig) -> str | None:
    """The experts folder the demo composes, or None (preference prompting only)."""
    from personalign.compose import resolve_experts_dir, shipped_experts_dir
    from personalign.models import canonical_name

    if cfg.experts is not None:
        return str(resolve_experts_dir(cfg.experts, canonical_name(cfg.model)))
    shipped = shipped_experts_dir(canonical_name(cfg.model))
    return str(shipped) if shipped is not None else None


def main(cfg: DemoConfig, show: bool = True) -> list[dict[str, Any]]:
    method = Method.parse(cfg.method)
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
    experts = experts_for(cfg) if cfg.compose else None
    composed = []
    if experts is not None:
        from personalign.models import canonical_name
        from personalign.pcm import SHIPPED, shipped_pcm_dir

        learned = cfg.experts is None and shipped_pcm_dir(canonical_name(cfg.model)) is not None
        for name in cfg.compose:
            pcm = SHIPPED if name == "mope" and learned else None
            composed += [resolve(p, MethodOptions(method=name, experts=experts, pcm=pcm), model=cfg.model)
                         for p in prefs]
    plain = resolve(None, MethodOptions(method="vanilla"), model=cfg.model)

    from personalign.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    load_s = time.perf_counter() - t0

    # Prompting: every preference's prompts in shared batches (each text carries its preference prompt).
    texts: list[str] = []
    keys: list[tuple[int, int]] = []
    for pi, pref in enumerate(prefs):
        texts += build_prompts(tok, instructions, pref, method)
        keys += [(ii, pi) for ii in range(len(instructions))]
    t1 = time.perf_counter()
    responses = personalize(model, tok, plain).generate_texts(texts, cfg.sampling, batch_size=cfg.batch_size)

    rows = [
        {"instruction": instructions[ii], "prefs": prefs[pi].spec(), "describe": prefs[pi].describe(),
         "method": method.value, "response": r}
        for (ii, pi), r in zip(keys, responses)
    ]
    for spec in composed:
        answers = personalize(model, tok, spec).generate(instructions, cfg.sampling, batch_size=cfg.batch_size)
        rows += [{"instruction": q, "prefs": spec.preference.spec(), "describe": spec.preference.describe(),
                  "method": spec.label, "response": r} for q, r in zip(instructions, answers)]
    gen_s = time.perf_counter() - t1
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "demo.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    if show:
        _show(instructions, prefs, rows, load_s, gen_s)
    return rows


def _show(instructions: list[str], prefs: list[Any], rows: list[dict[str, Any]], load_s: float, gen_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    by_key = {(r["instruction"], r["prefs"], r["method"]): r["response"] for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for instr in instructions:
        table = Table(title=instr, show_lines=True, expand=True)
        if len(methods) > 1:
            table.add_column("method", ratio=0)
        for p in prefs:
            table.add_column(f"{p.describe()}  ({p.spec()})", ratio=1)
        for m in methods:
            cells = [by_key.get((instr, p.spec(), m), "") for p in prefs]
            table.add_row(*([m] if len(methods) > 1 else []), *cells)
        console.print(table)
    console.print(f"[dim]model loaded in {load_s:.1f} s; {len(rows)} responses generated in {gen_s:.1f} s[/dim]")
