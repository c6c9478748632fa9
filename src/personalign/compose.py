"""Composing side experts at request time: Personalized Soups (merge parameters) and MoPE (mix tokens).

An *experts folder* holds one LoRA expert per side: ``<folder>/<SIDE>/`` is a peft adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``), either directly or in an ``adapter/``
subfolder as ``personalign train-expert`` writes it. The experts shipped for the embedded default
live inside the package (``personalign/data/experts/<model>/``) and are used when no folder is given.

A preference's weights become merge or mixing weights: a hard combination (``1A,2A,3A``) gives each
chosen side 1/k, the paper's uniform average; a weighted one (``concise=0.7,informative=0.3``) gives
its weights divided by the sum of their absolute values, so negative weights push away from a side.
Merged soups are cached per (experts, weights, method) under ``<cache>/soups/``, so switching back to
a preference already seen costs one adapter load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.errors import ConfigError, ModelError, PreferenceError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from personalign.generation import SamplingConfig
    from personalign.mixing import Experts, MixRule, WeightProvider
    from personalign.preferences import Preference

__all__ = [
    "adapter_folder",
    "expert_folders",
    "expert_weights",
    "generate_mixture_texts",
    "load_expert_model",
    "load_mixture",
    "require_experts",
    "resolve_experts_dir",
    "shipped_experts_dir",
    "soup_adapter",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def shipped_experts_dir(model_name: str) -> Path | None:
    """The experts shipped inside the package for ``model_name`` (an embedded model's name), if any."""
    from personalign.models import EMBEDDED_MODELS

    if model_name not in EMBEDDED_MODELS:  # paths and hub ids never name a shipped folder
        return None
    folder = Path(__file__).parent / "data" / "experts" / model_name
    return folder if folder.is_dir() and any(folder.iterdir()) else None


def resolve_experts_dir(experts: str | Path | None, model_name: str) -> Path:
    """The user's experts folder, or the shipped one for the model."""
    if experts is not None:
        folder = Path(experts)
        if not folder.is_dir():
            raise ConfigError(f"experts folder {folder} does not exist; give a folder of <SIDE>/ adapters "
                              "written by personalign train-expert")
        return folder
    shipped = shipped_experts_dir(model_name)
    if shipped is None:
        raise ConfigError(f"no experts are shipped for model {model_name!r}; train them with personalign "
                          "train-expert and pass --experts FOLDER")
    return shipped


def adapter_folder(folder: Path) -> Path | None:
    """``folder`` or ``folder/adapter`` if it holds a complete peft adapter, else None."""
    for cand in (folder, folder / "adapter"):
        if all((cand / f).is_file() for f in ADAPTER_FILES):
            return cand
    return None


def expert_folders(folder: str | Path) -> dict[str, Path]:
    """Side id -> adapter folder, for every ``<SIDE>/`` in ``folder`` that holds a complete adapter."""
    out: dict[str, Path] = {}
    for sub in sorted(Path(folder).iterdir()):
        if sub.is_dir():
            found = adapter_folder(sub)
            if found is not None:
                out[sub.name] = found
    return out


def expert_weights(pref: Preference) -> dict[str, float]:
    """Side -> weight for the sides that take part (non-zero weight), normalised by the sum of |w|."""
    return {s: w for s, w in pref.normalized().items() if w != 0}


def require_experts(pref: Preference, folders: dict[str, Path], where: Path | str) -> dict[str, float]:
    """The preference's expert weights, or an error naming the sides that have no expert in ``where``."""
    weights = expert_weights(pref)
    missing = [s for s in weights if s not in folders]
    if missing:
        have = ", ".join(folders) or "none"
        raise PreferenceError(f"no expert for side(s) {', '.join(missing)} in {where} (experts there: {have}); "
                              f"train one with: personalign train-expert --side {missing[0]} -o {where}/{missing[0]}")
    return weights


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, hex. Remembered per (path, size, modification time): an evaluation
    asks for the same experts' digests once per generation file."""
    st = Path(path).stat()
    return _digest_of(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def soup_adapter(pref: Preference, experts_dir: str | Path, *, method: str = "psoups", rank: int | None = None,
                 density: float | None = None, seed: int | None = None, cache: Path | None = None,
                 ) -> tuple[Path, dict[str, Any]]:
    """The merged adapter folder for ``pref`` (built once, then served from the cache) and its report."""
    from personalign.merging import METHODS, load_adapter, merge_adapters, save_adapter
    from personalign.models import cache_root

    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    folders = expert_folders(experts_dir)
    weights = require_experts(pref, folders, experts_dir)
    sides = list(weights)
    key_src = {"method": method, "rank": rank, "density": density, "seed": seed,
               "experts": [[s, round(weights[s], 8), file_digest(folders[s] / ADAPTER_FILES[1])] for s in sides]}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    root = (cache or cache_root()) / "soups"
    target = root / key
    report_path = target / "merge_report.json"
    if report_path.is_file() and all((target / f).is_file() for f in ADAPTER_FILES):
        return target, json.loads(report_path.read_text())

    adapters = [load_adapter(folders[s]) for s in sides]
    merged, report = merge_adapters(adapters, [weights[s] for s in sides], method=method, rank=rank,
                                    density=density, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        save_adapter(merged, tmp)
        info = {"sides": weights, "method": method, "preference": pref.spec(), **report.summary()}
        (tmp / "merge_report.json").write_text(json.dumps(info, indent=2))
        if target.exists():  # a broken earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, info


def load_expert_model(base: PreTrainedModel, adapter_folder: str | Path, merge: bool = True) -> PreTrainedModel:
    """``base`` with one adapter (an expert or a soup); merged into the weights by default, so generation
    costs exactly what the base model costs."""
    from peft import PeftModel

    from personalign.merging import load_adapter

    _check_base(base, load_adapter(adapter_folder).base_model, adapter_folder)
    model = PeftModel.from_pretrained(base, str(adapter_folder))
    if merge:
        return model.merge_and_unload()
    return model


def load_mixture(base: PreTrainedModel, pref: Preference, experts_dir: str | Path) -> tuple[Experts, list[float]]:
    """The experts of ``pref``'s sides as adapters of one peft model, and the preference's weights."""
    from peft import PeftModel

    from personalign.merging import load_adapter
    from personalign.mixing import Experts

    folders = expert_folders(experts_dir)
    weights = require_experts(pref, folders, experts_dir)
    if any(w < 0 for w in weights.values()):
        raise PreferenceError(f"token-level mixing needs non-negative weights, got {pref.spec()!r}; "
                              "use --method soup for negative weights")
    sides = list(weights)
    for s in sides:
        _check_base(base, load_adapter(folders[s]).base_model, folders[s])
    model = PeftModel.from_pretrained(base, str(folders[sides[0]]), adapter_name=sides[0])
    for s in sides[1:]:
        model.load_adapter(str(folders[s]), adapter_name=s)
    model.eval()
    return Experts.from_adapters(model, sides), [weights[s] for s in sides]


def _check_base(base: PreTrainedModel, adapter_base: str | None, folder: str | Path) -> None:
    have = getattr(base.config, "personalign_base", None) or base.name_or_path
    if adapter_base and have and adapter_base.rstrip("/") != str(have).rstrip("/"):
        raise ModelError(f"adapter {folder} was trained on base model {adapter_base!r}, not {have!r}; "
                         f"use --model {adapter_base} or experts trained on this model")


def generate_mixture_texts(
    experts: Experts,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    weights: WeightProvider | None,
    rule: MixRule,
    sampling: SamplingConfig,
    *,
    batch_size: int = 8,
    first_index: int = 0,
    on_batch: Callable[[int, list[str]], None] | None = None,
) -> list[str]:
    """Like :func:`personalign.generation.generate_texts`, decoding from the token-level mixture.

    Batches are seeded by position as there, so a resumed file run produces the same text.
    """
    from dataclasses import replace

    from personalign.data import batched
    from personalign.generation import batch_seed, eos_token_ids
    from personalign.mixing import generate_mixed

    eos = eos_token_ids(experts.models[0], tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    tokenizer.padding_side = "left"
    add_special = not getattr(tokenizer, "chat_template", None)
    outputs: list[str] = []
    for start, chunk in batched(list(texts), batch_size):
        enc = tokenizer(list(chunk), return_tensors="pt", padding=True, add_special_tokens=add_special)
        seeded = replace(sampling, seed=batch_seed(sampling.seed, first_index + start) % (2**31))
        out = generate_mixed(experts, enc["input_ids"], enc["attention_mask"], weights, eos_token_ids=eos,
                             pad_token_id=pad, rule=rule, sampling=seeded)
        tokens = out.tokens.masked_fill(out.mask == 0, pad)
        responses = [r.strip() for r in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        outputs.extend(responses)
        if on_batch is not None:
            on_batch(first_index + start, responses)
    return outputs
