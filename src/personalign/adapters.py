"""LoRA adapters as data: the format, reading and writing it (never pickle), delta weights, and a base model
wrapped with adapters already in memory.

An adapter is a plain state dict (what peft's ``get_peft_model_state_dict`` returns and
``adapter_model.safetensors`` holds, keys like ``...q_proj.lora_A.weight``) plus its LoRA settings. For a
module with factors ``A`` (r, in) and ``B`` (out, r) the adapter's delta weight is ``scale * B @ A``,
``scale = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA). The merge rules over adapters are in
:mod:`personalign.merging`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personalign.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

__all__ = [
    "A_SUFFIX",
    "B_SUFFIX",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "LoraAdapter",
    "adapter_from_model",
    "adapter_from_state_dict",
    "base_id",
    "check_fits",
    "delta_weights",
    "load_adapter",
    "module_delta",
    "peft_config_dict",
    "save_adapter",
    "with_adapters",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
_A, _B = A_SUFFIX, B_SUFFIX

# LoRA initialisations that rewrite the base weights: their adapters only make sense on that rewritten base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Hints for tensors a LoRA merge cannot handle, matched by substring of the state-dict key.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA magnitudes do not combine linearly; merge plain LoRA experts",
    "lora_embedding_": "embedding LoRA is not supported; target linear layers only",
    "modules_to_save": "fully trained modules (modules_to_save) cannot be weighted; retrain without them",
    ".lora_B.bias": "LoRA biases (lora_bias=True) are not supported; retrain with lora_bias=False",
}


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One LoRA adapter: its state dict and the settings that give its tensors meaning.

    ``tensors`` maps peft state-dict keys (adapter name removed) to tensors; treat it as read-only.
    ``config`` keeps the full peft config so a saved adapter round-trips; the explicit fields win over it.
    Validated on construction, so an adapter that exists is one the merge rules can handle.
    """

    tensors: Mapping[str, torch.Tensor] = field(repr=False)
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    base_model: str | None
    use_rslora: bool = False
    config: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ModelError(f"LoRA rank r={self.r!r} is invalid: it must be a positive integer")
        if not math.isfinite(float(self.lora_alpha)):
            raise ModelError(f"lora_alpha={self.lora_alpha!r} is invalid: it must be a finite number")
        if not self.tensors:
            raise ModelError("adapter has no LoRA tensors: save the trained adapter with its weights")
        for key in self.tensors:
            if not key.endswith((_A, _B)):
                hint = next((h for s, h in _UNSUPPORTED_KEYS.items() if s in key), None)
                raise ModelError(
                    f"adapter tensor {key!r} cannot be merged: "
                    + (hint or "only LoRA linear layers (lora_A/lora_B weights) can be merged")
                )
        for module in self.modules:
            a, b = self.tensors.get(module + _A), self.tensors.get(module + _B)
            if a is None or b is None:
                missing = _A if a is None else _B
                raise ModelError(
                    f"adapter module {module!r} lacks {missing.lstrip('.')}: the state dict is incomplete"
                )
            if a.dim() != 2 or b.dim() != 2:
                raise ModelError(
                    f"adapter module {module!r} has {a.dim()}-d lora_A: only linear layers can be merged "
                    "(convolution LoRA is not supported)"
                )
            if a.shape[0] != self.r or b.shape[1] != self.r:
                raise ModelError(
                    f"adapter module {module!r} has rank {a.shape[0]} (lora_A {tuple(a.shape)}, lora_B "
                    f"{tuple(b.shape)}) but the config says r={self.r}: per-module ranks (rank_pattern) "
                    "are not supported"
                )

    @property
    def scale(self) -> float:
        """The factor peft multiplies ``B @ A`` by."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def modules(self) -> tuple[str, ...]:
        """Module keys (state-dict prefixes before ``.lora_A.weight``), sorted."""
        return tuple(sorted({k[: -len(_A)] if k.endswith(_A) else k[: -len(_B)] for k in self.tensors}))

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of one module as CPU float32: A (r, in), B (out, r)."""
        return _f32(self.tensors[module + _A]), _f32(self.tensors[module + _B])


# ---------------------------------------------------------------- reading and writing adapters


def adapter_from_state_dict(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> LoraAdapter:
    """An adapter from a peft state dict and its ``adapter_config.json`` contents (refusing variants
    whose tensors do not combine as plain LoRA)."""
    cfg = dict(config)
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ModelError(f"adapter is peft_type={peft_type!r}: only LoRA adapters can be merged")
    refusals = [
        (bool(cfg.get("use_dora")), "use_dora=True: DoRA magnitudes do not combine linearly"),
        (bool(cfg.get("rank_pattern")), "a rank_pattern: per-module ranks are not supported"),
        (bool(cfg.get("alpha_pattern")), "an alpha_pattern: per-module alphas are not supported"),
        (bool(cfg.get("lora_bias")), "lora_bias=True: LoRA biases are not supported"),
        (bool(cfg.get("target_parameters")), "target_parameters: only LoRA on linear modules is supported"),
    ]
    for bad, what in refusals:
        if bad:
            raise ModelError(f"adapter config has {what}; train the experts as plain LoRA to merge them")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ModelError(
            f"adapter was initialised with init_lora_weights={init!r}, which rewrites the base weights; "
            "convert it to a plain LoRA first (peft's save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    targets = cfg.get("target_modules")
    if targets is None:
        raise ModelError("adapter config has no target_modules: it is not a LoRA adapter config")
    targets = targets if isinstance(targets, str) else tuple(sorted(targets))
    base = cfg.get("base_model_name_or_path") or None
    return LoraAdapter(
        tensors=dict(tensors),
        r=cfg.get("r", 8),
        lora_alpha=cfg.get("lora_alpha", 8),
        target_modules=targets,
        base_model=base,
        use_rslora=bool(cfg.get("use_rslora", False)),
        config=cfg,
    )


def adapter_from_model(model: PeftModel, adapter_name: str = "default") -> LoraAdapter:
    """The named adapter of an in-memory ``PeftModel`` (after training, without a round trip to disk)."""
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in model.peft_config:
        raise ModelError(
            f"the model has no adapter {adapter_name!r}; it has {', '.join(sorted(model.peft_config))}"
        )
    tensors = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    config = _jsonable(model.peft_config[adapter_name].to_dict())
    return adapter_from_state_dict({k: v.detach().clone() for k, v in tensors.items()}, config)


def load_adapter(folder: str | Path) -> LoraAdapter:
    """Read a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``; never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ModelError(f"no {CONFIG_FILE} in {folder}: give a folder written by peft's save_pretrained")
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ModelError(
                f"{folder} holds only adapter_model.bin (pickle), which is never loaded; re-save it with "
                "save_pretrained(folder, safe_serialization=True)"
            )
        raise ModelError(f"no {WEIGHTS_FILE} in {folder}: the adapter's weights are missing")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise ModelError(f"cannot read {cfg_path}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path} does not hold an adapter config (a JSON object)")
    try:
        tensors = load_file(weights)
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"cannot read {weights}: {exc}") from None
    return adapter_from_state_dict(tensors, config)


def peft_config_dict(adapter: LoraAdapter) -> dict[str, Any]:
    """The ``adapter_config.json`` contents of ``adapter`` (what peft builds its LoraConfig from)."""
    config = dict(adapter.config)
    config.update(
        peft_type="LORA",
        r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        use_rslora=adapter.use_rslora,
        target_modules=adapter.target_modules
        if isinstance(adapter.target_modules, str)
        else list(adapter.target_modules),
        base_model_name_or_path=adapter.base_model,
        rank_pattern={},
        alpha_pattern={},
        inference_mode=True,
    )
    return _jsonable(config)


def save_adapter(adapter: LoraAdapter, folder: str | Path) -> Path:
    """Write ``adapter`` as a peft adapter folder that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config_dict(adapter), indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter.tensors.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


# ---------------------------------------------------------------- delta weights


def delta_weights(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """Per module, the dense update the adapter adds to the base weight: ``scale * B @ A`` (out, in)."""
    return {module: module_delta(adapter, module) for module in adapter.modules}


def module_delta(adapter: LoraAdapter, module: str) -> torch.Tensor:
    a, b = adapter.factors(module)
    return adapter.scale * (b @ a)  # (out, in)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


def base_id(name: str | None) -> str | None:
    return (name.strip().rstrip("/") or None) if name else None


def _jsonable(value: Any) -> Any:
    """peft configs hold sets and enums; ``adapter_config.json`` holds lists and strings."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_PEFT_PREFIX = "base_model.model."


def check_fits(adapter: LoraAdapter, base: PreTrainedModel, what: str = "the adapter") -> None:
    """Refuse an adapter whose modules ``base`` lacks or whose shapes differ: it was trained on another base
    model, whatever its config records (the name there is checked before loading, by
    :func:`personalign.compose.check_base`)."""
    trained_on = f" (trained on {adapter.base_model!r})" if adapter.base_model else ""
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))
    for module in adapter.modules:
        name = module.removeprefix(_PEFT_PREFIX)
        try:
            target = base.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{what}{trained_on} adapts module {name!r}, which this base model does not have: it "
                             "was trained on another base model; use that model or an adapter trained on this one") from None
        a, b = adapter.tensors[module + _A], adapter.tensors[module + _B]
        if hasattr(target, "in_features") and hasattr(target, "out_features"):
            have = (int(target.out_features), int(target.in_features))
        elif getattr(target, "weight", None) is not None and target.weight.dim() == 2:
            shape = tuple(target.weight.shape)
            have = (shape[1], shape[0]) if fan_in_fan_out else (shape[0], shape[1])
        else:
            continue
        if (b.shape[0], a.shape[1]) != have:
            raise ModelError(f"{what}{trained_on} does not fit this base model: module {name!r} is {have[0]}x{have[1]} "
                             f"here but {b.shape[0]}x{a.shape[1]} in the adapter; use the base model it was trained "
                             "on, or an adapter trained on this one")


def with_adapters(base: PreTrainedModel, adapters: Mapping[str, LoraAdapter]) -> Any:
    """``base`` wrapped by peft with each adapter loaded under its name, from tensors already in memory."""
    from peft import LoraConfig, PeftModel
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from peft.utils import set_peft_model_state_dict

    def config(adapter: LoraAdapter) -> LoraConfig:
        cfg = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**peft_config_dict(adapter)))
        cfg.inference_mode = True
        return cfg

    names = list(adapters)
    if not names:
        raise ConfigError("no adapters given; name at least one")
    for name in names:
        check_fits(adapters[name], base, "the adapter" if len(names) == 1 else f"adapter {name!r}")
    first = config(adapters[names[0]])
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(first.task_type, PeftModel)
    model = cls(base, first, names[0])
    for i, name in enumerate(names):
        if i:
            model.add_adapter(name, config(adapters[name]))
        set_peft_model_state_dict(model, dict(adapters[name].tensors), adapter_name=name)
    model.eval()
    return model
