"""Recipe: personalized generation for one instruction or a whole file.

config -> main(cfg) -> phases: resolve preference -> load prompts -> resume -> load model ->
generate in batches -> write each batch durably.

A file run writes one JSON object per line (``id``, ``prompt``, ``prefs``, ``method``, ``response``,
``model``). Run again with the same arguments after an interruption, it checks that the lines already
written belong to this run and continues after them, without duplicating any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.data import Instruction, JsonlWriter, load_prompts, resume_rows
from personalign.errors import DataError
from personalign.generation import Method, SamplingConfig, build_prompts, generate_texts
from personalign.preferences import Preference, load_space


@dataclass(frozen=True)
class GenerateConfig:
    prefs: str | None = None  # None only with method=vanilla
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


def resolve_preference(cfg: GenerateConfig) -> Preference | None:
    method = Method.parse(cfg.method)
    space = load_space(cfg.dimensions)
    if cfg.prefs is None:
        if method is not Method.VANILLA:
            raise DataError(f"--prefs is required with --method {method.value}; e.g. --prefs 1A,2A,3A")
        return None
    return space.parse(cfg.prefs)


def _row(item: Instruction, pref: Preference | None, method: Method, model: str, response: str) -> dict[str, Any]:
    return {
        "id": item.id,
        "prompt": item.prompt,
        "prefs": pref.spec() if pref else None,
        "method": method.value,
        "response": response,
        "model": model,
    }


def main(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Generate and return the rows (for a file run: all rows, including those resumed)."""
    # Validate everything cheap before loading a model.
    method = Method.parse(cfg.method)
    pref = resolve_preference(cfg)
    if cfg.input is not None:
        items = load_prompts(cfg.input, limit=cfg.limit)
    elif cfg.instructions:
        items = [Instruction(t) for t in cfg.instructions if t.strip()]
        if not items:
            raise DataError("the instruction is empty")
    else:
        raise DataError("give an instruction, or --input FILE")
    if cfg.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {cfg.batch_size}")

    done: list[dict[str, Any]] = []
    output = Path(cfg.output) if cfg.output else None
    if output is not None:
        spec = pref.spec() if pref else None
        done = resume_rows(output, [{"prompt": it.prompt, "prefs": spec, "method": method.value} for it in items])
    todo = items[len(done):]
    if not todo:
        return done

    from personalign.models import canonical_name, load_model

    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    model_name = canonical_name(cfg.model)
    texts = build_prompts(tok, [it.prompt for it in todo], pref, method)

    rows: list[dict[str, Any]] = list(done)
    writer = JsonlWriter(output) if output is not None else None
    bar = None
    if cfg.progress and output is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=len(done), desc="generate", unit="prompt")

    def on_batch(start: int, responses: list[str]) -> None:
        batch = [_row(items[start + j], pref, method, model_name, r) for j, r in enumerate(responses)]
        rows.extend(batch)
        if writer is not None:
            writer.write_many(batch)
        if bar is not None:
            bar.update(len(batch))

    try:
        generate_texts(model, tok, texts, cfg.sampling, batch_size=cfg.batch_size, first_index=len(done),
                       on_batch=on_batch)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    return rows
