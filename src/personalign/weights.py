"""Weights shipped for a base model, found through the ``personalign.weights`` entry point group.

The library carries no weights. A distribution that ships experts (and a PCM) for a base model
registers one entry point, named after the model as ``personalign`` names it (``smollm2-135m-instruct``
for the embedded default, else the Hugging Face id or path a user passes as ``--model``), whose
object is a callable returning the folders::

    [project.entry-points."personalign.weights"]
    smollm2-135m-instruct = "personalign_weights_smollm2:folders"

    def folders() -> dict[str, Path | None]:
        return {"experts": <folder of <SIDE>/ expert folders>, "pcm": <PCM folder or None>}

The experts for the embedded default ship this way, from ``weights/smollm2-135m-instruct`` in this
repository (installed by ``make install``); experts for another base model ship the same way.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from personalign.errors import ConfigError

__all__ = ["GROUP", "shipped_folder"]

GROUP = "personalign.weights"
KINDS = ("experts", "pcm")


def shipped_folder(model_name: str, kind: str) -> Path | None:
    """The folder of ``kind`` (experts or pcm) a weights distribution ships for ``model_name``, if any."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    found = [ep for ep in entry_points(group=GROUP) if ep.name == model_name]
    if not found:
        return None
    if len(found) > 1:
        dists = ", ".join(sorted({getattr(ep.dist, "name", "?") for ep in found}))
        raise ConfigError(f"several installed distributions ship weights for {model_name!r} ({dists}); "
                          "uninstall all but one")
    ep = found[0]
    try:
        folders = ep.load()()
        folder = folders.get(kind)
    except Exception as exc:  # noqa: BLE001 - a broken plug-in is a one-line error, not a traceback
        raise ConfigError(f"the weights distribution {getattr(ep.dist, 'name', ep.value)!r} for {model_name!r} "
                          f"is broken ({type(exc).__name__}: {exc}); reinstall it") from None
    return Path(folder) if folder is not None else None


# -- half precision: stored smaller only where the tokens do not change ------------------------------

HALF_CHECK = "half_precision_check.json"


def to_half(src: Path, dst: Path) -> None:
    """Copy a safetensors file with its float32 tensors stored as float16 (other tensors unchanged)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    half = {k: v.to(torch.float16) if v.dtype == torch.float32 else v for k, v in tensors.items()}
    save_file(half, str(dst), metadata=metadata)


def check_cases(sides: list[str], combinations: list[str]) -> list[tuple[str, str | None, str]]:
    """(method, merge or mixing rule, preference) for each expert alone, both soups and MoPE."""
    cases: list[tuple[str, str | None, str]] = [("expert", None, s) for s in sides]
    for combo in combinations:
        cases += [("soup", "psoups", combo), ("soup", "exact", combo), ("mope", "prob", combo)]
    return cases


def half_precision_check(model: Any, tokenizer: Any, experts: dict[str, Path], prompts: list[str],
                         cases: list[tuple[str, str | None, str]], *, max_new_tokens: int = 48,
                         model_name: str | None = None) -> dict[str, Any]:
    """Greedy answers of every case with each experts folder of ``experts`` (label -> folder; the first is
    the reference), and whether each other folder gives the same text for every prompt."""
    import tempfile

    from personalign.generation import SamplingConfig
    from personalign.personalize import MethodOptions, personalize, resolve

    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    reference, *others = experts
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache:
        for method, variant, prefs in cases:
            texts = {}
            for label, folder in experts.items():
                # soups at strength 1 whatever the experts' measured default: the check is of the weights
                opts = MethodOptions(method=method, experts=str(folder),
                                     merge=variant if method == "soup" else "psoups",
                                     mix=variant if method == "mope" else "prob",
                                     strength=1.0 if method == "soup" else None)
                spec = resolve(prefs, opts, model=model_name)
                texts[label] = personalize(model, tokenizer, spec, cache=Path(cache)).generate(
                    prompts, sampling, batch_size=len(prompts))
            out.append({"method": method, "variant": variant, "prefs": prefs, reference: texts[reference],
                        "same": {o: texts[o] == texts[reference] for o in others}})
    return {"prompts": prompts, "max_new_tokens": max_new_tokens, "reference": reference, "cases": out,
            "all_same": all(all(c["same"].values()) for c in out)}


def portable(doc: Any, runs_root: str = "runs") -> Any:
    """``doc`` (parsed JSON) with every path into the local ``runs_root`` folder made relative to it
    (``rm:runs/psoups-smollm2/rm/P1A`` -> ``rm:psoups-smollm2/rm/P1A``): shipped metadata names the run
    that made it, never a folder of the machine that trained it."""
    import re

    pattern = re.compile(rf"(^|(?<=[:=\s]))\.?/?{re.escape(runs_root.strip('/'))}/")
    if isinstance(doc, dict):
        return {k: portable(v, runs_root) for k, v in doc.items()}
    if isinstance(doc, list):
        return [portable(v, runs_root) for v in doc]
    if isinstance(doc, str):
        return pattern.sub("", doc)
    return doc
