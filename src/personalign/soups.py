"""Exact soups per row: every row of a batch gets the base model plus its own weighted sum of the experts'
LoRA deltas, with no merge and no copy of the model.

An exact soup under weights ``w`` is ``W + sum_k w_k * scale_k * B_k @ A_k`` for each LoRA layer
(:mod:`personalign.merging`'s ``exact`` rule). Applied to an input row ``x`` that is
``x W^T + sum_k w_k * scale_k * (x A_k^T) B_k^T``: with the K experts' ``A`` stacked into one (in, K*r)
matrix and their scaled ``B`` into one (K*r, out) matrix, two matrix products per layer for the whole
batch, each row's ``x A`` scaled by its own weights in between. Rows with different weight vectors
(continuous, negative) therefore share one batch, and a new weight vector costs nothing to switch to.
Rules that are not linear in the weights (psoups, ties, dare) cannot be computed this way; they stay
merged (:func:`personalign.compose.soup_adapter`).
Shapes: B rows, S positions, K experts, r the largest expert rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from personalign.errors import ConfigError, ModelError
from personalign.generation import ModelStep

__all__ = ["RowSoups", "SoupStep"]


class RowSoups:
    """The K experts of one peft model (``adapter_names``), applied to each row with its own weights."""

    def __init__(self, model: Any, adapter_names: Sequence[str]) -> None:
        from personalign.experts import stack_lora

        if not adapter_names:
            raise ConfigError("no experts given; name at least one adapter")
        missing = [n for n in adapter_names if n not in getattr(model, "peft_config", {})]
        if missing:
            raise ConfigError(f"adapter(s) {', '.join(missing)} are not loaded in this model")
        stacked = stack_lora(model, adapter_names)
        if stacked is None:
            raise ModelError("per-row soups need plain LoRA on Linear layers; merge these experts instead")
        self.model, self.names = model, tuple(adapter_names)
        self.k = len(self.names)
        # Per layer: (layer, A stacked (in, K*r), scaled B stacked (K*r, out), r)
        self._layers = [(s.layer, s.a_t.permute(1, 0, 2).reshape(s.a_t.shape[1], -1),
                         s.b_t.reshape(-1, s.b_t.shape[-1]), s.a_t.shape[-1]) for s in stacked]

    @contextlib.contextmanager
    def applied(self, weights: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward pass of ``model`` gives row b the soup of ``weights[b]`` (B, K).

        Rows whose weights are all zero get the base model exactly (no LoRA product is computed for them).
        """
        if weights.dim() != 2 or weights.shape[1] != self.k:
            raise ConfigError(f"soup weights of shape {tuple(weights.shape)}; expected (B, {self.k}) over "
                              f"{', '.join(self.names)}")
        live = weights.ne(0).any(-1)  # (B,)
        rows = None if bool(live.all()) else live.nonzero().flatten()
        for layer, a, b, r in self._layers:
            if rows is not None and rows.numel() == 0:
                layer.forward = layer.base_layer.forward  # every row is the base model (a bound method: a
                # module assigned here would be registered as a submodule, not used as the forward)
            else:
                w = weights if rows is None else weights[rows]
                layer.forward = _row_soup_forward(layer, a, b, w.to(a).repeat_interleave(r, dim=1), rows,
                                                  weights.shape[0])
        try:
            yield
        finally:
            for layer, *_ in self._layers:
                del layer.forward


def _row_soup_forward(layer: Any, a: torch.Tensor, b: torch.Tensor, wr: torch.Tensor, rows: torch.Tensor | None,
                      batch: int) -> Any:
    """The forward of one LoRA layer under per-row weights ``wr`` (R, K*r), each expert's repeated r times,
    for ``rows`` of a batch of ``batch`` (None: every row)."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = layer.base_layer(x, *args, **kwargs)
        xs = x.reshape(batch, -1, x.shape[-1])  # (B, S, in)
        if rows is not None:
            xs = xs[rows]
        delta = ((xs.to(a.dtype) @ a) * wr[:, None, :]) @ b  # (R, S, K*r) -> (R, S, out)
        if rows is None:
            return out + delta.reshape(out.shape).to(out.dtype)
        full = out.reshape(batch, -1, out.shape[-1]).clone()
        full[rows] += delta.to(out.dtype)
        return full.reshape(out.shape)

    return forward


class SoupStep(ModelStep):
    """The decode loop's step for a batch whose rows each have a soup weight vector (B, K)."""

    def __init__(self, soups: RowSoups, weights: torch.Tensor) -> None:
        super().__init__(soups.model)
        self.soups, self.row_weights = soups, weights

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> None:
        if self.row_weights.shape[0] != ids.shape[0]:
            raise ConfigError(f"{self.row_weights.shape[0]} soup weight rows for a batch of {ids.shape[0]}")
        with self.soups.applied(self.row_weights):
            super()._forward(ids, mask, pos)
