"""Recipe: personalized generation for one instruction or a whole file.

config -> main(cfg) -> phases: resolve the personalization (every check, no model) -> load prompts ->
resume -> load the base model and personalize it -> generate in batches -> write each batch durably.

A file run writes one JSON object per line (``id``, ``prompt``, ``prefs``, ``method``, ``response``,
``model``). Run again with the same arguments after an interruption, it checks that the lines already
written belong to this run and continues after them, without duplicating any.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.data import Instruction, check_prompt_size, load_prompts
from personalign.errors import DataError
from personalign.generation import SamplingConfig
from personalign.generations import write_answers
from personalign.personalize import MethodOptions, Personalization, PersonalizedModel, personalize, resolve


@dataclass(frozen=True)
class GenerateConfig:
    prefs: str | None = None  # None only with method=vanilla
    prefs_text: str | None = None  # the preference described in words instead (personalign.words)
    db: str | None = None  # the profile store for prefs "profile:NAME" (default: profiles.sqlite in the cache)
    method: str = "prompt"
    model: str | None = None  # None = the embedded default
    dimensions: str | None = None  # YAML file with user dimensions
    input: str | None = None  # file or builtin:/hf: source; None = `instructions`
    instructions: tuple[str, ...] = ()
    output: str | None = None
    limit: int | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # The method's options (personalign.personalize.MethodOptions); those of other methods keep their defaults.
    experts: str | None = None  # experts folder; None = the experts shipped for the model
    merge: str = "psoups"  # soup: psoups | exact | ties | dare | dare_ties
    merge_rank: int | None = None  # soup exact/ties/dare: compress to this rank
    merge_density: float | None = None  # soup ties/dare (default 0.5)
    merge_seed: int | None = None  # soup dare (default 0)
    mix: str = "prob"  # mope: prob | logit | uniform | extrapolate
    # soup, and mope with mix extrapolate: how strongly the preference speaks (1 = the experts' average); None:
    # the default measured for the experts and rule (personalign.personalize.default_strengths)
    strength: float | None = None
    adapter: str | None = None  # adapter: a peft adapter folder (multitask, P-MORL, RLHF policies)
    pcm: str | None = None  # mope: a train-pcm folder (learned per-token weights), or "shipped"
    # expert/soup/mope: sides without an expert are only prompted, not refused (always with prefs_text)
    prompt_missing: bool = False

    def method_options(self) -> MethodOptions:
        from personalign.personalize import Method

        missing = self.prompt_missing or (self.prefs_text is not None and Method.parse(self.method).uses_experts)
        return MethodOptions(method=self.method, experts=self.experts, merge=self.merge, merge_rank=self.merge_rank,
                             merge_density=self.merge_density, merge_seed=self.merge_seed, mix=self.mix,
                             strength=self.strength, pcm=self.pcm, adapter=self.adapter, prompt_missing=missing)


def request(cfg: GenerateConfig) -> Personalization:
    """The config's method and preference, checked completely before any model is loaded."""
    profiles = None
    if cfg.db is not None:
        from personalign.profiles import Profiles

        if Path(cfg.db).is_dir():
            raise DataError(f"profile store {cfg.db} is a directory; give the SQLite file (default: profiles.sqlite "
                            "in the cache folder)")
        if not Path(cfg.db).is_file():
            raise DataError(f"profile store {cfg.db} does not exist; save a profile there first (personalign serve "
                            "--db, or personalign.profiles.Profiles)")
        profiles = Profiles(cfg.db)
    return resolve(described(cfg)[0], cfg.method_options(), model=cfg.model, dimensions=cfg.dimensions,
                   profiles=profiles)


def described(cfg: GenerateConfig) -> tuple[str | None, str]:
    """The preference (``prefs``, or the sides ``prefs_text`` names) and what the text says beyond them."""
    if cfg.prefs_text is None:
        return cfg.prefs, ""
    from personalign.preferences import load_space
    from personalign.words import read_preference

    if cfg.prefs is not None:
        raise DataError("give --prefs or --prefs-text, not both")
    read = read_preference(cfg.prefs_text, load_space(cfg.dimensions))
    return read.spec(), read.rest


def main(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Generate and return the rows (for a file run: all rows, including those resumed)."""
    # -- validate: the personalization and the prompts, before any model loads
    spec = request(cfg)
    if cfg.instructions and cfg.input is not None:
        raise DataError("give either an instruction or --input (input), not both")
    if cfg.output is not None and cfg.input is None:
        raise DataError("--output (output) needs --input (input): a file of instructions to answer")
    if cfg.input is not None:
        items = load_prompts(cfg.input, limit=cfg.limit)
    elif cfg.instructions:
        items = [Instruction(check_prompt_size(t, "the instruction")) for t in cfg.instructions if t.strip()]
        if not items:
            raise DataError("the instruction is empty")
    else:
        raise DataError("give an instruction, or --input FILE")
    if cfg.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    from personalign.models import known_context

    context = known_context(cfg.model)  # before loading, where the config is at hand (the prompts are checked later)
    if context is not None and cfg.sampling.max_new_tokens >= context:
        raise DataError(f"--max-new-tokens {cfg.sampling.max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context} tokens; lower it")
    prefs, rest = described(cfg)
    if cfg.prefs_text is not None:  # shown for confirmation
        extra = f"; the rest as a prompt: {rest!r}" if rest else ""
        print(f"read from the description: {prefs}{extra}", file=sys.stderr)
    if rest and spec.prompt_suffix:  # what no side covers joins each instruction as a prompt
        sentence = (rest[:1].upper() + rest[1:]).rstrip(".") + "."
        items = [dataclasses.replace(i, prompt=f"{i.prompt} {sentence}") for i in items]

    # -- load and personalize (only if something is left to generate) -> generate -> write each batch
    def build() -> PersonalizedModel:
        from personalign.models import load_model

        base, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        model = personalize(base, tok, spec, inplace=True)
        report = model.merge_report or {}
        if "merge/svd_error_max" in report:  # a compressed soup: how much the truncation lost
            print(f"soup compressed to rank {report['merge/rank']:g}: truncation error (relative Frobenius, per "
                  f"module) max {report['merge/svd_error_max']:.3g}, mean {report['merge/svd_error_mean']:.3g}; "
                  f"distance from the exact weighted sum max {report.get('merge/deviation_max', float('nan')):.3g}",
                  file=sys.stderr)
        return model

    return write_answers(spec, build, items, Path(cfg.output) if cfg.output else None, cfg.sampling,
                         batch_size=cfg.batch_size, progress=cfg.progress)
