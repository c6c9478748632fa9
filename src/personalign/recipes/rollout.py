"""Recipe: preference-prompted rollouts (stage 1 of Personalized Soups).

For each side and each instruction, sample N responses (default 2) from the policy with that side's
prompt appended to the instruction. The samples of one instruction share a batch, so they are drawn
together; batches are seeded by position, so an interrupted run resumes with the same text.

config -> main(cfg) -> phases: resolve sides -> load prompts -> resume -> load model -> generate in
batches -> write each batch durably.

Output: one JSON object per line with ``id``, ``prompt``, ``side``, ``sample``, ``policy_prompt``
(the side's prompt, as appended), ``response`` and ``model``, ordered by side, then instruction, then
sample. ``side_limits`` gives one side more (or fewer) instructions than ``limit``; instructions past
``limit`` come after every side's first ``limit``, so raising one side's limit extends a finished file
instead of reordering it. ``side_samples`` does the same for the number of samples: a side's samples
past ``samples`` come last, after every side's instructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.data import JsonlWriter, build_user_message, format_chat, load_prompts, resume_rows
from personalign.errors import ConfigError
from personalign.generation import SamplingConfig
from personalign.generations import generation_settings
from personalign.personalize import MethodOptions, personalize, resolve
from personalign.preferences import PSOUPS_SIDES, load_space


@dataclass(frozen=True)
class RolloutConfig:
    output: str
    sides: tuple[str, ...] = PSOUPS_SIDES
    prompts: str = "builtin:train"
    limit: int | None = None
    # Per side, a number of instructions other than ``limit`` (e.g. {P3B: 650}: more data for a side
    # whose reward model needs it).
    side_limits: dict[str, int] = field(default_factory=dict)
    samples: int = 2
    # Per side, a number of samples per instruction other than ``samples`` (e.g. {P3B: 4}: six pairs
    # per instruction instead of three with pairing: all).
    side_samples: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    dimensions: str | None = None
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    # The paper samples at temperature 1.0; nucleus sampling and a light repetition penalty keep a
    # small model from derailing.
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=160, temperature=1.0, top_p=0.95, repetition_penalty=1.1)
    )


def plan(cfg: RolloutConfig) -> list[dict[str, Any]]:
    """Every output line's identifying fields, in output order (validates the config)."""
    if cfg.samples < 1:
        raise ConfigError(f"samples must be at least 1, got {cfg.samples}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {cfg.batch_size}")
    space = load_space(cfg.dimensions)
    sides = [space.resolve(s) for s in cfg.sides]
    if not sides:
        raise ConfigError("no sides given")
    if len(set(sides)) != len(sides):
        raise ConfigError(f"a side is listed twice in {list(cfg.sides)}")

    def per_side(field_name: str, values: dict[str, int]) -> dict[str, int]:
        out = {}
        for key, n in values.items():
            side = space.resolve(key)
            if side not in sides:
                raise ConfigError(f"{field_name} names {key!r}, which is not one of the sides ({', '.join(sides)})")
            if not isinstance(n, int) or n < 1:
                raise ConfigError(f"{field_name}.{key} must be a whole number of at least 1, got {n!r}")
            out[side] = n
        return out

    limits = per_side("side_limits", cfg.side_limits)
    samples = per_side("side_samples", cfg.side_samples)
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit must be at least 1, got {cfg.limit}")
    items = load_prompts(cfg.prompts)
    base = len(items) if cfg.limit is None else min(cfg.limit, len(items))
    rows = []

    def add(side: str, chosen: list, ks: range) -> None:
        for it in chosen:
            for k in ks:
                rows.append({"id": it.id, "prompt": it.prompt, "side": side, "sample": k,
                             "policy_prompt": space.sides[side].prompt})

    first = {side: range(min(cfg.samples, samples.get(side, cfg.samples))) for side in sides}
    for side in sides:  # every side's first `limit` instructions (or fewer)
        add(side, items[:min(base, limits.get(side, base))], first[side])
    for side in sides:  # then the instructions past `limit` of the sides given more
        add(side, items[base:limits.get(side, base)], first[side])
    for side in sides:  # then the samples past `samples` of the sides given more
        add(side, items[:limits.get(side, base)], range(cfg.samples, samples.get(side, cfg.samples)))
    return rows


def main(cfg: RolloutConfig) -> Path:
    todo_rows = plan(cfg)
    output = Path(cfg.output)
    from personalign.models import canonical_name

    model_name, settings = canonical_name(cfg.model), generation_settings(cfg.sampling, cfg.batch_size)
    # a rerun continues only the same run (rows written before settings were recorded are continued as they are)
    done = resume_rows(output, [{**{k: r[k] for k in ("prompt", "side", "sample")}, "model": model_name,
                                 "sampling": settings} for r in todo_rows], recorded=("model", "sampling"))
    todo = todo_rows[len(done):]
    if not todo:
        return output

    from personalign.models import load_model

    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    # Each row carries its own side's prompt, so the base model answers texts formatted here.
    policy = personalize(model, tok, resolve(None, MethodOptions(method="vanilla"), model=cfg.model), inplace=True)
    texts = [format_chat(tok, build_user_message(r["prompt"], r["policy_prompt"])) for r in todo]
    policy.check_prompts(texts, cfg.sampling, first_index=len(done))

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo_rows), initial=len(done), desc="rollout", unit="response")
    with JsonlWriter(output) as writer:

        def on_batch(start: int, responses: list[str]) -> None:
            batch = [{**todo_rows[start + j], "response": r, "model": model_name, "sampling": settings}
                     for j, r in enumerate(responses)]
            writer.write_many(batch)
            if bar is not None:
                bar.update(len(batch))

        try:
            policy.generate_texts(texts, cfg.sampling, batch_size=cfg.batch_size, first_index=len(done),
                                  on_batch=on_batch)
        finally:
            if bar is not None:
                bar.close()
    return output
