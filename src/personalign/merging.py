"""Merging LoRA experts trained on one base model: the P-Soups average, the exact weighted sum, TIES, DARE.

Every rule is a pure function of adapters (:class:`personalign.adapters.LoraAdapter`: a state dict and its
LoRA settings) and weights, tested on delta weights: for a module with factors ``A`` (r, in) and ``B``
(out, r) an adapter's delta weight is ``scale * B @ A``, ``scale = alpha / r`` (``alpha / sqrt(r)`` for
rsLoRA).

Methods (docs/methods.md, section 2, composition):

* ``psoups`` - the paper's rule: ``lora_A`` and ``lora_B`` are averaged *separately*, so the update is
  ``mean(B) @ mean(A)``, cross terms included. With weights ``w``: ``A = sum_i (|w_i| / sum_j |w_j|) A_i``
  and ``B = sum_i w_i B_i``. Uniform weights ``1/k`` give the paper's average exactly; weight ``w`` on a
  single adapter gives ``w`` times its delta (negative weights subtract); and whenever the experts share
  ``A`` the result equals ``exact`` with the same weights, so one weight vector means the same thing in
  every method. Needs equal ranks.
* ``exact`` - ``sum_i w_i * scale_i * B_i @ A_i`` exactly, as a LoRA of rank ``sum(r_i)`` (A stacked on
  rows, weighted and scaled B side by side), servable by peft as an ordinary adapter; optionally
  compressed to a given rank by truncated SVD.
* ``ties``, ``dare``, ``dare_ties`` - peft's task-arithmetic merges applied to each module's delta weights,
  then factored back to a LoRA by truncated SVD (reported error).

Weights are real numbers (negative allowed); pass ``Preference.normalized()`` for an average. All merge
math runs on CPU in float32, one module at a time; results are cast back to the adapters' dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from personalign.adapters import A_SUFFIX as _A
from personalign.adapters import B_SUFFIX as _B
from personalign.adapters import LoraAdapter, base_id, module_delta
from personalign.errors import ConfigError, ModelError

__all__ = [
    "METHODS",
    "PRUNING",
    "MergeReport",
    "check_merge_options",
    "compress_adapter",
    "merge_adapters",
    "merge_defaults",
]

METHODS = ("psoups", "exact", "ties", "dare", "dare_ties")


@dataclass(frozen=True)
class MergeReport:
    """What a merge did and how far its result is from the exact weighted sum.

    ``svd_error``: per module, relative Frobenius error of the truncated-SVD factorisation (empty when
    nothing was factored). ``deviation``: per module, ``||delta_merged - delta_exact||_F / ||delta_exact||_F``
    where ``delta_exact = sum_i w_i * delta_i``: the cross terms of ``psoups``, the pruning of TIES/DARE,
    the truncation of a compressed ``exact`` merge (about 1e-7 for an uncompressed one); at a ``strength``
    other than 1 the reference is ``strength * delta_exact``.
    """

    method: str
    weights: tuple[float, ...]
    rank: int
    svd_error: Mapping[str, float]
    deviation: Mapping[str, float]
    strength: float = 1.0

    def summary(self) -> dict[str, float]:
        """Largest and mean errors, with slash names as in ``metrics.jsonl``."""
        out: dict[str, float] = {"merge/rank": float(self.rank), "merge/strength": self.strength}
        for name, values in (("svd_error", self.svd_error), ("deviation", self.deviation)):
            if values:
                out[f"merge/{name}_max"] = max(values.values())
                out[f"merge/{name}_mean"] = sum(values.values()) / len(values)
        return out


def compress_adapter(adapter: LoraAdapter, rank: int) -> tuple[LoraAdapter, dict[str, float]]:
    """Truncate every module's delta to ``rank`` by SVD (never forming the dense delta).

    Returns the compressed adapter (rank ``min(rank, adapter.r)``, scale 1) and, per module, the relative
    Frobenius error ``||delta - delta_k||_F / ||delta||_F`` - zero when ``rank`` >= the delta's true rank.
    """
    _check_rank(rank)
    k = min(rank, adapter.r)
    tensors, errors = {}, {}
    for module in adapter.modules:
        a, b = adapter.factors(module)
        # delta = scale * B @ A = Qb (Rb Ra^T) Qa^T: the SVD of the small core is the SVD of the delta.
        qb, rb = torch.linalg.qr(adapter.scale * b)  # (out, p), (p, r)
        qa, ra = torch.linalg.qr(a.T)  # (in, q), (q, r)
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
        new_b, new_a, errors[module] = _truncate(qb @ u, s, vh @ qa.T, k)
        tensors[module + _A], tensors[module + _B] = new_a, new_b
    return _derived(adapter, tensors, k, _dtype_of([adapter])), errors


def _truncate(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``k`` factors ``(B, A)`` of ``u diag(s) vh`` (sqrt(s) on each side, zero-padded when fewer than
    ``k`` singular values exist) and the relative Frobenius error of the truncation."""
    kept = min(k, s.numel())
    root = s[:kept].sqrt()
    b = torch.zeros(u.shape[0], k)
    a = torch.zeros(k, vh.shape[1])
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    total = float(s.square().sum())
    error = math.sqrt(float(s[kept:].square().sum()) / total) if total > 0 else 0.0
    return b, a, error


# ---------------------------------------------------------------- the merge rules


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    method: str = "psoups",
    *,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    majority_sign_method: str = "total",
    strength: float = 1.0,
) -> tuple[LoraAdapter, MergeReport]:
    """Merge LoRA experts of one base model into one adapter, validating everything before any math.

    ``weights`` default to ``1/k`` each (the paper's average). ``rank``: target rank of an ``exact``
    merge's SVD compression (none by default) or of the TIES/DARE factorisation (default: the largest
    expert rank, as peft's ``*_svd`` merges). ``density``: fraction of each delta TIES/DARE keep, in
    (0, 1]. ``seed``: DARE's random pruning (default 0; the global RNG is left untouched). ``strength``: the
    merged delta is multiplied by it (every rule is linear in a common scale of its weights, so this is the
    rule's merge of the weights times ``strength``); 1 is the plain merge, 0 no change to the base.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    adapters = list(adapters)
    if not adapters:
        raise ConfigError("no adapters to merge: give at least one trained expert")
    w = _check_weights(weights, len(adapters))
    _check_adapters(adapters, method)
    check_merge_options(method, rank, density, seed, majority_sign_method)
    strength = _check_strength(strength)

    if method == "psoups":
        merged, errors = _psoups(adapters, w), {}
    elif method == "exact":
        merged, errors = _exact(adapters, w), {}
        if rank is not None:
            merged, errors = compress_adapter(merged, rank)
    else:
        k = rank if rank is not None else max(a.r for a in adapters)
        merged, errors = _task_merge(adapters, w, method, density, k, DEFAULT_DARE_SEED if seed is None else seed,
                                     majority_sign_method)
    if strength != 1:
        merged = _scaled(merged, strength)
    report = MergeReport(method, w, merged.r, errors, _deviation(adapters, tuple(strength * x for x in w), merged),
                         strength)
    return merged, report


def _psoups(adapters: list[LoraAdapter], w: tuple[float, ...]) -> LoraAdapter:
    """The paper's separate averaging of A and B, generalised to real weights (see the module docstring)."""
    total = sum(abs(x) for x in w)
    same_scale = len({a.scale for a in adapters}) == 1
    tensors = {}
    for module in adapters[0].modules:
        a_sum, b_sum = None, None
        for adapter, wi in zip(adapters, w):
            a, b = adapter.factors(module)
            # Experts of different scales: fold each scale into its B, so the merged scale is 1.
            b = b if same_scale else adapter.scale * b
            a_sum = abs(wi) / total * a if a_sum is None else a_sum + abs(wi) / total * a
            b_sum = wi * b if b_sum is None else b_sum + wi * b
        tensors[module + _A], tensors[module + _B] = a_sum, b_sum
    if same_scale:
        first = adapters[0]
        return _derived(first, tensors, first.r, _dtype_of(adapters), first.lora_alpha, first.use_rslora)
    return _derived(adapters[0], tensors, adapters[0].r, _dtype_of(adapters))


def _exact(adapters: list[LoraAdapter], w: tuple[float, ...]) -> LoraAdapter:
    """``sum_i w_i scale_i B_i A_i`` as one LoRA: [B_1 w_1 s_1 | B_2 w_2 s_2 | ...] @ [A_1; A_2; ...]."""
    kept = [(a, wi) for a, wi in zip(adapters, w) if wi != 0]  # zero weights add nothing but rank
    tensors = {}
    for module in adapters[0].modules:
        parts = [(adapter.factors(module), wi * adapter.scale) for adapter, wi in kept]
        tensors[module + _A] = torch.cat([a for (a, _), _ in parts], dim=0)  # (R, in)
        tensors[module + _B] = torch.cat([c * b for (_, b), c in parts], dim=1)  # (out, R)
    return _derived(adapters[0], tensors, sum(a.r for a, _ in kept), _dtype_of(adapters))


def _task_merge(
    adapters: list[LoraAdapter], w: tuple[float, ...], method: str, density: float, rank: int, seed: int,
    majority_sign_method: str,
) -> tuple[LoraAdapter, dict[str, float]]:
    """peft's TIES / DARE on each module's delta weights, factored back to rank ``rank`` by SVD."""
    from peft.utils import merge_utils

    weights = torch.tensor(w, dtype=torch.float32)
    tensors, errors = {}, {}
    # DARE draws its masks from torch's global RNG; fork it so a seed gives the same merge every time
    # without disturbing the caller's random state. Modules go in sorted order, so draws are stable.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # density=1 means "keep everything", which peft announces with a warning on every module.
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
        for module in adapters[0].modules:
            deltas = [module_delta(a, module) for a in adapters]  # k x (out, in)
            if method == "ties":
                delta = merge_utils.ties(deltas, weights, density, majority_sign_method)
            elif method == "dare":
                delta = merge_utils.dare_linear(deltas, weights, density)
            else:
                delta = merge_utils.dare_ties(deltas, weights, density, majority_sign_method)
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            new_b, new_a, errors[module] = _truncate(u, s, vh, rank)
            tensors[module + _A], tensors[module + _B] = new_a, new_b
    return _derived(adapters[0], tensors, rank, _dtype_of(adapters)), errors


def _deviation(adapters: list[LoraAdapter], w: tuple[float, ...], merged: LoraAdapter) -> dict[str, float]:
    """Per module, relative Frobenius distance of the merged delta from ``sum_i w_i delta_i``."""
    out = {}
    for module in adapters[0].modules:
        exact = sum(wi * module_delta(a, module) for a, wi in zip(adapters, w))
        got = module_delta(merged, module)
        norm = float(torch.linalg.norm(exact))
        diff = float(torch.linalg.norm(got - exact))
        out[module] = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    return out


# ---------------------------------------------------------------- validation


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ConfigError(f"strength={strength!r} is invalid: it must be a finite number >= 0 (1 = the plain "
                          "merge, 0 = the base model)")
    return float(strength)


def _scaled(adapter: LoraAdapter, strength: float) -> LoraAdapter:
    """``adapter`` with its delta multiplied by ``strength`` (every B scaled; A and the settings kept)."""
    tensors = {k: (v.float() * strength).to(v.dtype) if k.endswith(_B) else v for k, v in adapter.tensors.items()}
    return LoraAdapter(tensors=tensors, r=adapter.r, lora_alpha=adapter.lora_alpha,
                       target_modules=adapter.target_modules, base_model=adapter.base_model,
                       use_rslora=adapter.use_rslora, config=dict(adapter.config))


def _check_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    if weights is None:
        return tuple(1.0 / n for _ in range(n))
    try:
        w = tuple(float(x) for x in weights)
    except (TypeError, ValueError):
        raise ConfigError(f"merge weights {list(weights)!r} must be real numbers, as in [0.7, 0.3]") from None
    if len(w) != n:
        raise ConfigError(f"got {len(w)} merge weights for {n} adapters: give exactly one weight per adapter")
    bad = [x for x in w if not math.isfinite(x)]
    if bad:
        raise ConfigError(f"merge weights {list(w)} contain {bad[0]}: every weight must be a finite number")
    if all(x == 0 for x in w):
        raise ConfigError(f"merge weights {list(w)} are all zero: give at least one adapter a nonzero weight")
    return w


def _check_adapters(adapters: list[LoraAdapter], method: str) -> None:
    """Refuse adapters that cannot be combined, naming the first offending adapter by position."""
    first = adapters[0]
    # an adapter that records no base model is not refused (as loading one on a model does not refuse it)
    known = [(i, a) for i, a in enumerate(adapters) if a.base_model]
    for i, a in known[1:]:
        if base_id(a.base_model) != base_id(known[0][1].base_model):
            raise ModelError(
                f"adapter {i} was trained on base model {a.base_model!r} but adapter {known[0][0]} on "
                f"{known[0][1].base_model!r}: merge only experts of one base model"
            )
    for i, a in enumerate(adapters[1:], start=1):
        if a.target_modules != first.target_modules:
            raise ModelError(
                f"adapter {i} targets {a.target_modules!r} but adapter 0 targets {first.target_modules!r}: "
                "merge only experts trained with the same target_modules"
            )
        if set(a.modules) != set(first.modules):
            only = sorted(set(a.modules) ^ set(first.modules))
            raise ModelError(
                f"adapter {i} and adapter 0 adapt different modules (e.g. {only[0]!r}): merge only experts "
                "trained with the same LoRA settings"
            )
        for module in first.modules:
            (a0, b0), (ai, bi) = first.factors(module), a.factors(module)
            if a0.shape[1] != ai.shape[1] or b0.shape[0] != bi.shape[0]:
                raise ModelError(
                    f"module {module!r} is {bi.shape[0]}x{ai.shape[1]} in adapter {i} but "
                    f"{b0.shape[0]}x{a0.shape[1]} in adapter 0: the adapters belong to different base models"
                )
    if method == "psoups":
        ranks = [a.r for a in adapters]
        if len(set(ranks)) > 1:
            raise ModelError(
                f"psoups averages lora_A and lora_B entry by entry, so it needs equal ranks, got r={ranks}; "
                "use method='exact' (any ranks)"
            )


PRUNING = ("ties", "dare", "dare_ties")  # merges that keep a fraction (density) of each delta
DEFAULT_DENSITY = 0.5
DEFAULT_DARE_SEED = 0


def merge_defaults(method: str, density: float | None, seed: int | None) -> tuple[float | None, int | None]:
    """The density and seed a merge runs with when the user gives none: density 0.5 for the pruning
    merges, seed 0 for DARE's random pruning; ``None`` where the option does not apply."""
    if density is None and method in PRUNING:
        density = DEFAULT_DENSITY
    if seed is None and method in ("dare", "dare_ties"):
        seed = DEFAULT_DARE_SEED
    return density, seed


def check_merge_options(method: str, rank: int | None, density: float | None, seed: int | None,
                        sign: str = "total") -> None:
    """Refuse options a merge method does not take, or takes with other values, before any tensor is read."""
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if rank is not None:
        if method == "psoups":
            raise ConfigError(
                "rank does not apply to psoups (it keeps the experts' rank); use method='exact' with rank"
            )
        _check_rank(rank)
    if method in PRUNING:
        if density is None:
            raise ConfigError(
                f"method {method!r} needs density, the fraction of each delta kept, e.g. density=0.5"
            )
        if not (0 < density <= 1):
            raise ConfigError(f"density={density!r} is invalid: it must be in (0, 1] (1 keeps every entry)")
    elif density is not None:
        raise ConfigError(f"density applies only to ties, dare and dare_ties, not to {method!r}; drop it")
    if seed is not None and method not in ("dare", "dare_ties"):
        raise ConfigError(
            f"seed applies only to dare and dare_ties (random pruning), not to {method!r}; drop it"
        )
    if sign not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method={sign!r} is invalid: use 'total' or 'frequency'")


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank={rank!r} is invalid: it must be a positive integer, e.g. rank=16")


# ---------------------------------------------------------------- small helpers


def _derived(
    template: LoraAdapter, tensors: dict[str, torch.Tensor], r: int, dtype: torch.dtype,
    lora_alpha: float | None = None, use_rslora: bool = False,
) -> LoraAdapter:
    """A new adapter on ``template``'s base and modules; by default of scale 1 (alpha = r, no rsLoRA),
    because merged factors carry their scales already."""
    return LoraAdapter(
        tensors={k: v.to(dtype).contiguous() for k, v in tensors.items()},
        r=r,
        lora_alpha=r if lora_alpha is None else lora_alpha,
        target_modules=template.target_modules,
        base_model=template.base_model,
        use_rslora=use_rslora,
        config=dict(template.config),
    )


def _dtype_of(adapters: Sequence[LoraAdapter]) -> torch.dtype:
    dtypes = {t.dtype for a in adapters for t in a.tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
