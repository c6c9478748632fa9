"""Side experts on disk and in memory: where they live, which a preference needs, soups and their cache.

An *experts folder* holds one LoRA expert per side: ``<folder>/<SIDE>/`` is a peft adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``), either directly or in an ``adapter/``
subfolder as ``personalign train-expert`` writes it. The experts shipped for the embedded default
live inside the package (``personalign/data/experts/<model>/``) and are used when no folder is given.

A preference's weights become merge or mixing weights: a hard combination (``1A,2A,3A``) gives each
chosen side 1/k, the paper's uniform average; a weighted one (``concise=0.7,informative=0.3``) gives
its weights divided by the sum of their absolute values, so negative weights push away from a side.
Soups are merged in memory; each is also cached per (experts, weights, method) under ``<cache>/soups/``,
so switching back to a preference already seen costs one adapter read. The entry point that turns a
preference and a method into a model is :mod:`personalign.personalize`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.errors import ConfigError, ModelError, PreferenceError

if TYPE_CHECKING:

    from personalign.adapters import LoraAdapter
    from personalign.preferences import Preference

__all__ = [
    "adapter_folder",
    "check_base",
    "expert_folders",
    "expert_weights",
    "file_digest",
    "require_experts",
    "resolve_experts_dir",
    "shipped_experts_dir",
    "soup_adapter",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def shipped_experts_dir(model_name: str) -> Path | None:
    """The experts an installed weights distribution ships for ``model_name``, if any
    (:mod:`personalign.weights`)."""
    from personalign.weights import shipped_folder

    folder = shipped_folder(model_name, "experts")
    return folder if folder is not None and folder.is_dir() and any(folder.iterdir()) else None


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


def soup_key(weights: dict[str, float], folders: dict[str, Path], method: str, rank: int | None,
             density: float | None, seed: int | None, strength: float = 1.0) -> str:
    """The cache key of a soup: the merge and its options, and each expert's weight and file digest."""
    key_src: dict[str, Any] = {"method": method, "rank": rank, "density": density, "seed": seed,
                               "experts": [[s, round(w, 8), file_digest(folders[s] / ADAPTER_FILES[1])]
                                           for s, w in weights.items()]}
    if strength != 1:  # (keys of plain soups as before)
        key_src["strength"] = round(float(strength), 8)
    return hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]


def soup_adapter(weights: dict[str, float], folders: dict[str, Path], *, method: str = "psoups",
                 rank: int | None = None, density: float | None = None, seed: int | None = None,
                 preference: str = "", cache: Path | None = None,
                 strength: float = 1.0) -> tuple[LoraAdapter, dict[str, Any], Path]:
    """The merged adapter of the experts ``folders[side]`` under ``weights``, its report and its cache folder.

    ``strength`` multiplies the merged delta (1: the weighted average). Merged in memory; writing it to ``<cache>/soups/<key>/`` is a side effect, so the next request for the
    same soup reads one file instead of merging (a cache that cannot be written is only skipped).
    """
    from personalign.adapters import load_adapter, save_adapter
    from personalign.merging import merge_adapters
    from personalign.models import cache_root

    root = (cache or cache_root()) / "soups"
    target = root / soup_key(weights, folders, method, rank, density, seed, strength)
    report_path = target / "merge_report.json"
    if report_path.is_file() and all((target / f).is_file() for f in ADAPTER_FILES):
        return load_adapter(target), json.loads(report_path.read_text()), target

    sides = list(weights)
    adapters = [load_adapter(folders[s]) for s in sides]
    merged, report = merge_adapters(adapters, [weights[s] for s in sides], method=method, rank=rank,
                                    density=density, seed=seed, strength=strength)
    info = {"sides": weights, "method": method, "preference": preference, **report.summary()}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            save_adapter(merged, tmp)
            (tmp / "merge_report.json").write_text(json.dumps(info, indent=2))
            if target.exists():  # a broken earlier attempt
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        warnings.warn(f"the soup could not be cached in {root} ({exc}); it is merged again next time", stacklevel=2)
    return merged, info, target


def check_base(model_name: str, folder: str | Path) -> None:
    """Refuse an adapter trained on another base model than ``model_name``; reads only its config."""
    from personalign.adapters import CONFIG_FILE

    path = Path(folder) / CONFIG_FILE
    try:
        trained_on = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:  # unreadable, not UTF-8 or not JSON, not an object
        raise ModelError(f"cannot read {path}: {exc}") from None
    if trained_on and model_name and str(trained_on).rstrip("/") != str(model_name).rstrip("/"):
        raise ModelError(f"adapter {folder} was trained on base model {trained_on!r}, not {model_name!r}; "
                         f"use --model {trained_on} or experts trained on this model")
