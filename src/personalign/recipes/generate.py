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
    experts: str | None = None  # experts folder; None = the experts shipped for the model
    merge: str = "psoups"  # soup: psoups | exact | ties | dare | dare_ties
    merge_rank: int | None = None  # exact/ties/dare: compress to this rank
    merge_density: float | None = None  # ties/dare
    mix: str = "prob"  # mope: prob | logit | uniform
    adapter: str | None = None  # adapter: a peft adapter folder (multitask, P-MORL, RLHF policies)
    pcm: str | None = None  # mope: a train-pcm folder (learned per-token weights), or "shipped"


def resolve_preference(cfg: GenerateConfig) -> Preference | None:
    method = Method.parse(cfg.method)
    space = load_space(cfg.dimensions)
    if cfg.prefs is None:
        if method is not Method.VANILLA:
            raise DataError(f"--prefs is required with --method {method.value}; e.g. --prefs 1A,2A,3A")
        return None
    return space.parse(cfg.prefs)


def check_method(cfg: GenerateConfig, method: Method, pref: Preference | None) -> None:
    """Option combinations that cannot work, refused before any model is loaded."""
    from personalign.merging import METHODS
    from personalign.mixing import MixRule

    if method is Method.EXPERT and pref is not None:
        active = [s for s, w in pref.weights if w != 0]
        if len(active) != 1:
            raise DataError(f"--method expert uses one side's expert, but {pref.spec()!r} names {len(active)}; "
                            "use --method soup or --method mope to combine experts")
    if method is Method.SOUP and cfg.merge not in METHODS:
        raise DataError(f"unknown --merge {cfg.merge!r}; choose one of {', '.join(METHODS)}")
    if method is Method.MOPE:
        MixRule.parse(cfg.mix)
    if cfg.pcm is not None:
        if method is not Method.MOPE or MixRule.parse(cfg.mix) is not MixRule.PROB:
            raise DataError("--pcm FOLDER goes with --method mope --mix prob (the PCM weights a probability mixture)")
        from personalign.models import canonical_name
        from personalign.pcm import read_pcm_config, resolve_pcm_dir

        read_pcm_config(resolve_pcm_dir(cfg.pcm, canonical_name(cfg.model)),
                        [s for s, w in pref.weights if w != 0] if pref else None)
    if (method is Method.ADAPTER) != (cfg.adapter is not None):
        raise DataError("--adapter FOLDER goes with --method adapter (and --method adapter needs --adapter)")
    if cfg.adapter is not None:
        from personalign.compose import ADAPTER_FILES, adapter_folder

        if adapter_folder(Path(cfg.adapter)) is None:
            raise DataError(f"{cfg.adapter} holds no adapter ({' and '.join(ADAPTER_FILES)}, directly or in adapter/)")


def prepare_model(cfg: GenerateConfig, method: Method, pref: Preference | None, model: Any, tok: Any,
                  model_name: str) -> tuple[Any, Any]:
    """The model to generate with: the base, an expert, a soup (merged into the weights), or for MoPE
    the experts and their mixing weights (returned as the second item)."""
    from personalign import compose

    if method is Method.ADAPTER:
        return compose.load_expert_model(model, compose.adapter_folder(Path(cfg.adapter))), None
    if not method.uses_experts or pref is None:
        return model, None

    folder = compose.resolve_experts_dir(cfg.experts, model_name)
    if method is Method.EXPERT:
        side = next(s for s, w in pref.weights if w != 0)
        folders = compose.expert_folders(folder)
        if side not in folders:
            raise DataError(f"no expert for side {side} in {folder} (experts there: {', '.join(folders) or 'none'})")
        return compose.load_expert_model(model, folders[side]), None
    if method is Method.SOUP:
        adapter, _ = compose.soup_adapter(pref, folder, method=cfg.merge, rank=cfg.merge_rank,
                                          density=cfg.merge_density, seed=0 if cfg.merge.startswith("dare") else None)
        return compose.load_expert_model(model, adapter), None
    from personalign.mixing import FixedWeights, MixRule

    experts, weights = compose.load_mixture(model, pref, folder)
    if cfg.pcm is not None:
        from personalign.pcm import PCMWeights, PreferenceControlModel, resolve_pcm_dir

        pcm = PreferenceControlModel.load(resolve_pcm_dir(cfg.pcm, model_name), base_model=model,
                                          sides=experts.names, device=experts.device)
        provider = PCMWeights(pcm, experts, model.get_input_embeddings(), pref)
        return provider.experts, (provider, MixRule.PROB)  # the provider's experts record each step's logits
    rule = MixRule.parse(cfg.mix)
    return experts, (None if rule is MixRule.UNIFORM else FixedWeights(weights), rule)


def method_label(cfg: GenerateConfig, method: Method) -> str:
    """The method as recorded in output rows: variants are distinct (``soup-exact``, ``mope-uniform``)."""
    if method is Method.SOUP:
        return f"soup-{cfg.merge}"
    if method is Method.MOPE:
        if cfg.pcm == "shipped":
            return "mope-pcm"
        return f"mope-pcm-{Path(cfg.pcm).resolve().name}" if cfg.pcm else f"mope-{cfg.mix}"
    if method is Method.ADAPTER:
        return f"adapter-{Path(cfg.adapter).resolve().name}"
    return method.value


def _row(item: Instruction, pref: Preference | None, method: str, model: str, response: str) -> dict[str, Any]:
    return {
        "id": item.id,
        "prompt": item.prompt,
        "prefs": pref.spec() if pref else None,
        "method": method,
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
    check_method(cfg, method, pref)
    if method.uses_experts and pref is not None:
        from personalign import compose
        from personalign.models import canonical_name

        folder = compose.resolve_experts_dir(cfg.experts, canonical_name(cfg.model))
        compose.require_experts(pref, compose.expert_folders(folder), folder)

    label = method_label(cfg, method)
    done: list[dict[str, Any]] = []
    output = Path(cfg.output) if cfg.output else None
    if output is not None:
        spec = pref.spec() if pref else None
        done = resume_rows(output, [{"prompt": it.prompt, "prefs": spec, "method": label} for it in items])
    todo = items[len(done):]
    if not todo:
        return done

    from personalign.models import canonical_name, load_model

    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    model_name = canonical_name(cfg.model)
    model, mixture = prepare_model(cfg, method, pref, model, tok, model_name)
    texts = build_prompts(tok, [it.prompt for it in todo], pref, method)

    rows: list[dict[str, Any]] = list(done)
    writer = JsonlWriter(output) if output is not None else None
    bar = None
    if cfg.progress and output is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=len(done), desc="generate", unit="prompt")

    def on_batch(start: int, responses: list[str]) -> None:
        batch = [_row(items[start + j], pref, label, model_name, r) for j, r in enumerate(responses)]
        rows.extend(batch)
        if writer is not None:
            writer.write_many(batch)
        if bar is not None:
            bar.update(len(batch))

    try:
        if mixture is not None:
            from personalign.compose import generate_mixture_texts

            generate_mixture_texts(model, tok, texts, mixture[0], mixture[1], cfg.sampling,
                                   batch_size=cfg.batch_size, first_index=len(done), on_batch=on_batch)
        else:
            generate_texts(model, tok, texts, cfg.sampling, batch_size=cfg.batch_size, first_index=len(done),
                           on_batch=on_batch)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    return rows
