"""K frozen experts run together: LoRA adapters of one base model in one batched forward, or separate models.

LoRA experts on one base run in *one* forward pass per step over the batch repeated K times (each copy
keeps its own rows of the KV cache), with the K adapters' factors stacked into two batched matmuls per
layer (:class:`_StackedLoRA`); separate models sharing a tokenizer run one after the other.
The decode loop (:mod:`personalign.decoding`) calls :meth:`Experts.forward` once per token; the mixing
rules (:mod:`personalign.mixing`) combine what it returns.
Shapes: B rows, K experts, V vocabulary, L prompt tokens, T response tokens, S positions.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from personalign.errors import ConfigError, ModelError
from personalign.generation import cache_argument, positions

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["BASE_EXPERT", "Experts", "score_responses"]

BASE_EXPERT = "__base__"  # peft's name for "adapters off" inside a mixed-adapter batch

def _vocab_rows(model: Any) -> int:
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embeddings; experts must be causal LMs")
    return int(head.weight.shape[0])


class Experts:
    """K experts sharing one tokenizer. Build with ``from_adapters`` or ``from_models``."""

    def __init__(self, models: Sequence[Any], names: Sequence[str], adapters: bool) -> None:
        self.models = list(models)
        self.names = tuple(names)
        self.adapters = adapters  # True: one peft model, ``names`` are its adapters
        self._cache_arg = cache_argument()

    @classmethod
    def from_adapters(cls, model: Any, adapter_names: Sequence[str]) -> Experts:
        """LoRA adapters of one peft model; ``"__base__"`` is the base model with adapters off."""
        from peft import PeftModel, PeftType

        if not isinstance(model, PeftModel):
            raise ModelError(f"from_adapters needs a peft model, got {type(model).__name__}; "
                             "load the adapters with PeftModel or use Experts.from_models")
        if not adapter_names:
            raise ConfigError("no experts given; name at least one adapter")
        for name in adapter_names:
            if name == BASE_EXPERT:
                continue
            cfg = model.peft_config.get(name)
            if cfg is None:
                raise ConfigError(f"adapter {name!r} is not loaded; loaded: {', '.join(model.peft_config)}")
            if cfg.peft_type != PeftType.LORA or getattr(cfg, "use_dora", False):
                raise ModelError(f"adapter {name!r} is not plain LoRA; peft mixes only LoRA adapters in one "
                                 "batch, so merge it and use Experts.from_models")
        return cls([model], adapter_names, adapters=True)

    @classmethod
    def from_models(cls, models: Sequence[PreTrainedModel],
                    tokenizers: Sequence[PreTrainedTokenizerBase] | None = None) -> Experts:
        """Separate causal LMs (black boxes); they must share a vocabulary, checked here."""
        if not models:
            raise ConfigError("no experts given; pass at least one model")
        sizes = [_vocab_rows(m) for m in models]
        if len(set(sizes)) > 1:
            raise ConfigError(f"experts have different vocabulary sizes {sizes}; token-level mixing needs "
                              "experts that share one tokenizer")
        if tokenizers is not None:
            if len(tokenizers) != len(models):
                raise ConfigError(f"{len(tokenizers)} tokenizers for {len(models)} models; pass one per model")
            vocab = tokenizers[0].get_vocab()
            for i, tok in enumerate(tokenizers[1:], start=1):
                if tok.get_vocab() != vocab:
                    raise ConfigError(f"expert {i} uses a different tokenizer from expert 0; token-level "
                                      "mixing needs experts that share one tokenizer")
        return cls(models, [f"model{i}" for i in range(len(models))], adapters=False)

    @property
    def k(self) -> int:
        return len(self.names)

    def _stacked(self) -> list[_StackedLoRA] | None:
        """Every LoRA Linear with the K experts' factors stacked, rebuilt when a factor changed in place."""
        model = self.models[0]
        if getattr(self, "_lora_params", None) is None:  # walking every module each step costs milliseconds
            self._lora_params = [p for m in _lora_layers(model) for d in (m.lora_A, m.lora_B)
                                 for sub in d.values() for p in sub.parameters()]
        versions = tuple(p._version for p in self._lora_params)
        cached = getattr(self, "_stack_cache", None)
        if cached is not None and cached[0] == versions:
            return cached[1]
        stacked = stack_lora(model, self.names)
        self._stack_cache = (versions, stacked)
        return stacked

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    @property
    def vocab_size(self) -> int:
        return _vocab_rows(self.models[0])

    def new_caches(self) -> list[Any]:
        return [None] * len(self.models)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                caches: list[Any] | None, logits_to_keep: int = 1,
                active: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Any] | None]:
        """Logits of every expert for the last ``logits_to_keep`` positions: (B, K, S, V).

        ``attention_mask`` (B, past + S) covers the cached tokens too; ``caches=None`` runs without a cache.
        ``active`` (B, K) bool, for LoRA experts: run only those (prompt, expert) rows; the logits of the
        others are zeros. Keep the same ``active`` for every call that shares ``caches``.
        """
        kw: dict[str, Any] = {"logits_to_keep": logits_to_keep, "use_cache": caches is not None}
        if self.adapters:
            model = self.models[0]
            if model.training:
                raise ModelError("peft refuses mixed-adapter batches in training mode; call model.eval() first")
            if getattr(model, "_adapters_disabled", False):
                raise ModelError("adapters are disabled on this model; leave the disable_adapter() context "
                                 "(use the '__base__' expert for the base model)")
            b, k = input_ids.shape[0], self.k
            if active is not None and bool(active.all()):
                active = None
            # Expert-major layout: rows are (expert, prompt) pairs, expert by expert, each with its own
            # cache rows; every pair by default (row k * B + b is expert k on prompt b).
            if active is None:
                prompt_of = torch.arange(b, device=input_ids.device).repeat(k)
                expert_of = torch.arange(k, device=input_ids.device).repeat_interleave(b)
            else:
                expert_of, prompt_of = active.to(input_ids.device).t().nonzero(as_tuple=True)
            if caches is not None:
                kw[self._cache_arg] = caches[0]
            args = {"input_ids": input_ids[prompt_of], "attention_mask": attention_mask[prompt_of],
                    "position_ids": position_ids[prompt_of], **kw}
            stacked = self._stacked()
            if stacked is not None:
                groups = None if active is None else _Groups.of(expert_of, k)
                with _patched(stacked, groups):
                    out = model(**args)
            else:  # adapters on modules other than Linear: peft's own mixed-adapter batch
                out = model(**args, adapter_names=[self.names[i] for i in expert_of.tolist()])
            if active is None:
                logits = out.logits.view(k, b, *out.logits.shape[1:]).transpose(0, 1)  # (B, K, S, V)
            else:
                logits = out.logits.new_zeros(b, k, *out.logits.shape[1:])
                logits[prompt_of, expert_of] = out.logits
            new = [getattr(out, self._cache_arg)] if caches is not None else None
            return logits, new
        per_model, new_caches = [], []
        for i, model in enumerate(self.models):
            dev = next(model.parameters()).device
            if caches is not None:
                kw[self._cache_arg] = caches[i]
            out = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                        position_ids=position_ids.to(dev), **kw)
            per_model.append(out.logits.to(self.device))  # (B, S, V)
            new_caches.append(getattr(out, self._cache_arg) if caches is not None else None)
        return torch.stack(per_model, dim=1), (new_caches if caches is not None else None)


class _StackedLoRA:
    """One LoRA Linear applying K adapters to an expert-major batch (rows k*N..(k+1)*N-1 are expert k)
    with two batched matmuls, instead of peft's per-adapter loop over sub-batches: on a CPU the loop's
    many small operations cost more than the experts' arithmetic."""

    def __init__(self, layer: Any, names: Sequence[str]) -> None:
        lin = layer.base_layer
        ranks = [layer.lora_A[n].weight.shape[0] for n in names if n in layer.lora_A]
        r = max(ranks) if ranks else 1
        a = torch.zeros(len(names), r, lin.in_features, dtype=lin.weight.dtype, device=lin.weight.device)
        b = torch.zeros(len(names), lin.out_features, r, dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            for i, n in enumerate(names):
                if n in layer.lora_A:  # zero rows beyond an expert's rank keep the product exact
                    ri = layer.lora_A[n].weight.shape[0]
                    a[i, :ri] = layer.lora_A[n].weight
                    b[i, :, :ri] = layer.lora_B[n].weight * layer.scaling[n]
        self.layer, self.a_t, self.b_t = layer, a.transpose(1, 2), b.transpose(1, 2)  # (K, in, r), (K, r, out)

    def forward(self, x: torch.Tensor, *args: Any, groups: _Groups | None = None, **kwargs: Any) -> torch.Tensor:
        out = self.layer.base_layer(x, *args, **kwargs)
        k = self.a_t.shape[0]
        if groups is None:  # every expert on every prompt: K equal groups of rows
            xs = x.reshape(k, -1, x.shape[-1]).to(self.a_t.dtype)  # (K, N*S, in)
            delta = torch.bmm(torch.bmm(xs, self.a_t), self.b_t)  # (K, N*S, out)
            return out + delta.reshape(out.shape).to(out.dtype)
        # Groups of unequal size: rows go to their slots in K groups padded to the largest, then back.
        rows = x.reshape(groups.rows, -1, x.shape[-1]).to(self.a_t.dtype)  # (R, S, in)
        padded = rows.new_zeros(k * groups.width, rows.shape[1], rows.shape[2])
        padded[groups.slot] = rows
        delta = torch.bmm(torch.bmm(padded.view(k, -1, rows.shape[2]), self.a_t), self.b_t)  # (K, W*S, out)
        delta = delta.view(k * groups.width, rows.shape[1], -1)[groups.slot]  # (R, S, out)
        return out + delta.reshape(out.shape).to(out.dtype)


@dataclass(frozen=True)
class _Groups:
    """Rows sorted by expert, in groups of unequal size: ``slot[i]`` is row i's place when every group is
    padded to ``width`` rows."""

    rows: int
    width: int
    slot: torch.Tensor  # (R,)

    @classmethod
    def of(cls, expert_of: torch.Tensor, k: int) -> _Groups:
        counts = torch.bincount(expert_of, minlength=k)
        width = int(counts.max())
        start = torch.cumsum(counts, 0) - counts  # first row of each expert's group
        rank = torch.arange(expert_of.numel(), device=expert_of.device) - start[expert_of]
        return cls(int(expert_of.numel()), width, expert_of * width + rank)


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def stack_lora(model: Any, names: Sequence[str]) -> list[_StackedLoRA] | None:
    """Stacked factors for every LoRA layer, or None where a layer is not a plain LoRA Linear (embedding,
    convolution, bias or merged adapters), which peft's mixed batch handles instead."""
    from torch import nn

    out = []
    for layer in _lora_layers(model):
        # A layer none of ``names`` adapts is patched too (zero factors): left alone, peft would apply its
        # active adapter to every row.
        used = [n for n in names if n in layer.lora_A or n in getattr(layer, "lora_embedding_A", {})]
        plain = (isinstance(getattr(layer, "base_layer", None), nn.Linear) and all(n in layer.lora_A for n in used)
                 and not getattr(layer, "merged_adapters", []) and not any(getattr(layer, "lora_bias", {}).get(n)
                                                                          for n in used))
        if not plain:
            return None
        out.append(_StackedLoRA(layer, names))
    return out


@contextlib.contextmanager
def _patched(stacked: list[_StackedLoRA], groups: _Groups | None = None) -> Any:
    for s in stacked:
        # An instance attribute shadows the class's forward.
        s.layer.forward = s.forward if groups is None else functools.partial(s.forward, groups=groups)
    try:
        yield
    finally:
        for s in stacked:
            del s.layer.forward


@torch.no_grad()
def score_responses(experts: Experts, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-prob of each response token under each expert, one pass: (B, T, K), 0 on padding.

    Prompts are left-padded (B, L), responses right-padded (B, T), so the response logits are the last T+1.
    """
    device = experts.device
    ids = torch.cat([prompt_ids, response_ids], 1).to(device)  # (B, L + T)
    mask = torch.cat([prompt_mask, response_mask], 1).to(device).long()
    t = response_ids.shape[1]
    logits, _ = experts.forward(ids, mask, positions(mask), None, logits_to_keep=t + 1)  # (B, K, T + 1, V)
    target = response_ids.to(device)[:, :, None]  # (B, T, 1)
    cols = []
    for i in range(experts.k):  # one expert at a time bounds the float32 copy to (B, T, V)
        lp = logits[:, i, :-1].float()
        cols.append((lp.gather(-1, target) - torch.logsumexp(lp, -1, keepdim=True)).squeeze(-1))  # (B, T)
    return torch.stack(cols, -1) * response_mask.to(device)[..., None]  # (B, T, K)
