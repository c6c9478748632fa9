"""A faster CPU path for the linear layers of decoding, where each step multiplies few rows.

During decoding a linear layer sees one row per sequence (B rows, or K*B for a token-level mixture).
On CPUs, ``torch.nn.functional.linear`` computes ``x @ W.T`` for such thin inputs well below what the
memory bandwidth allows: on the reference machine (2 AVX2 cores, float32) the 211 linear layers of
SmolLM2-135M take 54 ms for one row but 96-127 ms for 2-4 rows. Computing the same product as
``(W @ x.T).T``, with the rows padded up to a size the BLAS handles well, takes 52-57 ms for 2-4 rows
and is 1.1-1.5x faster from 16 to 128 rows (``bench/linear_kernels.py`` measures it on the machine at
hand; results in ``bench/RESULTS.md``).

``fast_decode(model)`` routes every ``nn.Linear`` of a model through that product for 2 to 128 rows while
gradients are off; training, gradients, other devices and other dtypes keep ``torch.nn.functional.linear``.
Results equal the plain product up to float rounding (summation order). Set
``PERSONALIGN_FAST_LINEAR=0`` to turn it off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 128  # beyond this many rows the plain product is as fast (prefill, training)
_ATTR = "_personalign_fast_linear"


def padded_rows(rows: int) -> int:
    """Row count to pad a thin product to: 4, 8, 16, then the next multiple of 16 (sizes the CPU BLAS
    runs at full speed; odd sizes such as 3 or 7 rows cost up to twice as much as 4 or 8)."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    for size in (4, 8, 16):
        if rows <= size:
            return size
    return -(-rows // 16) * 16


def enabled() -> bool:
    return os.environ.get("PERSONALIGN_FAST_LINEAR", "1").strip().lower() not in ("0", "false", "no", "off")


def thin_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x.T).T`` on padded rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    target = padded_rows(rows)
    if target > rows:
        flat = torch.cat([flat, flat.new_zeros(target - rows, flat.shape[1])])
    out = (weight @ flat.t()).t()[:rows]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _use_thin(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if x.device.type != "cpu" or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return False
    # One row is a matrix-vector product, which the plain path already runs at memory speed.
    return x.dim() >= 1 and 2 <= x.numel() // max(1, x.shape[-1]) <= MAX_ROWS


def _forward_for(layer: nn.Linear) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if _use_thin(x, layer.weight):
            return thin_linear(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    return forward


def plain_copy(model: Any) -> Any:
    """A deep copy of ``model`` without the routing of a :func:`fast_decode` block that is still open on it
    (a copied forward would still compute with the original layer's weights)."""
    import copy

    clone = copy.deepcopy(model)
    for module in clone.modules():
        if getattr(module, _ATTR, False):
            del module.forward
            delattr(module, _ATTR)
    return clone


@contextlib.contextmanager
def fast_decode(*models: Any) -> Iterator[None]:
    """Within the block, the plain ``nn.Linear`` layers of ``models`` use the thin-input product when
    gradients are off. Nested use is fine: a layer already routed is left to its outer block."""
    if not enabled():
        yield
        return
    patched: list[nn.Linear] = []
    for model in models:
        for module in model.modules():
            # Exactly nn.Linear: subclasses (quantised layers, peft wrappers) have forwards of their own.
            if type(module) is nn.Linear and not getattr(module, _ATTR, False) and "forward" not in module.__dict__:
                module.forward = _forward_for(module)  # an instance attribute shadows the class's forward
                setattr(module, _ATTR, True)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
            delattr(module, _ATTR)
