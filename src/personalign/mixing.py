"""Mixing rules for K expert distributions (MoPE and MOD): pure functions of tensors, no model, no decoding.

``mix_prob`` is MoPE's ``p(y) = sum_k alpha_k p_k(y)``, ``mix_logit`` MOD's ``softmax(sum_k w_k logits_k)``,
``mix_uniform`` MoPE without a controller, ``mix_extrapolate`` the base model plus ``strength`` times the
weighted sum of each expert's difference from it (in log-probabilities, as model arithmetic and MOD do:
``softmax(log p_0 + s * sum_k w_k (log p_k - log p_0))``; strength 0 is the base model, strength 1 with
weight 1 on one expert is that expert, strength above 1 says more than any expert); ``mixture_token_logprob`` and ``mixture_sequence_logprob``
re-score recorded tokens under new weights (what REBEL trains the controller with). The experts that
produce the distributions live in :mod:`personalign.experts`; the decode step that calls these rules
once per token in :mod:`personalign.mixture`.
Shapes: B rows, K experts, V vocabulary, T response tokens.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from personalign.errors import ConfigError

__all__ = [
    "MixRule",
    "mix_extrapolate",
    "mix_logit",
    "mix_logprobs",
    "mix_prob",
    "mix_uniform",
    "mixture_sequence_logprob",
    "mixture_token_logprob",
]

_SUM_TOL = 1e-4


class MixRule(str, enum.Enum):
    """How expert distributions are combined."""

    PROB = "prob"  # sum_k alpha_k p_k (MoPE; the paper's best)
    LOGIT = "logit"  # softmax(sum_k w_k logits_k) (MOD, Shi et al. 2024)
    UNIFORM = "uniform"  # PROB with alpha = 1/K (MoPE without a trained controller)
    # base + strength * sum_k w_k (logp_k - logp_base) (model arithmetic; MOD with a base), needs the base
    EXTRAPOLATE = "extrapolate"

    @classmethod
    def parse(cls, value: str) -> MixRule:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown mixing rule {value!r}; choose one of {', '.join(r.value for r in cls)}") from None


# -- pure mixing rules ------------------------------------------------------------------------------------


def _check_simplex(alpha: torch.Tensor) -> None:
    with torch.no_grad():
        if bool((alpha < 0).any()):
            raise ConfigError(f"probability-mixing weights must be non-negative, got min {float(alpha.min()):.4g}; "
                              "use the logit rule for signed weights")
        worst = float((alpha.sum(-1) - 1).abs().max()) if alpha.numel() else 0.0
        if worst > _SUM_TOL:
            raise ConfigError(f"probability-mixing weights must sum to 1 per row, off by {worst:.4g}; "
                              "normalise them (e.g. softmax)")


def _log_mix(logp: torch.Tensor, alpha: torch.Tensor, dim: int) -> torch.Tensor:
    """``log sum_k alpha_k exp(logp_k)`` along ``dim``, stable, and with finite gradients at alpha_k = 0.

    Plain ``logsumexp(log alpha + logp)`` has a 0/0 gradient where a weight is zero; here the shift
    ``m`` is the largest live term, so every live ``alpha_k exp(logp_k - m)`` lies in (0, 1].
    """
    live = alpha > torch.finfo(alpha.dtype).tiny
    with torch.no_grad():
        m = torch.where(live, alpha.clamp_min(torch.finfo(alpha.dtype).tiny).log() + logp, -torch.inf)
        m = m.amax(dim, keepdim=True)
    diff = logp - m
    diff = torch.where(live, diff, diff.clamp(max=0.0))  # dead experts: only keep exp() finite
    return (m + torch.log((alpha * diff.exp()).sum(dim, keepdim=True))).squeeze(dim)


def mix_prob(logits: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log(sum_k alpha_k softmax(logits_k)): (B, K, V) logits, (B, K) weights on the simplex -> (B, V)."""
    _check_k(logits, alpha)
    _check_simplex(alpha)
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, K, V)
    return _log_mix(logp, alpha.to(logp.dtype)[:, :, None], dim=1)  # (B, V)


def mix_logit(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log softmax(sum_k w_k logits_k) with any real weights (B, K): the MOD rule, as log-probs (B, V).

    Each expert is log-softmaxed first; that shifts its logits by a constant, which softmax ignores.
    """
    _check_k(logits, weights)
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, K, V)
    return F.log_softmax((weights.to(logp.dtype)[:, :, None] * logp).sum(1), dim=-1)  # (B, V)


def mix_extrapolate(logits: torch.Tensor, base: torch.Tensor, weights: torch.Tensor,
                    strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """log softmax(log p_0 + s * sum_k w_k (log p_k - log p_0)): (B, K, V) expert logits, (B, V) base logits,
    (B, K) weights (any real numbers; a preference's are normalised to sum 1), ``strength`` a number or (B,)
    -> (B, V) log-probs.

    With weights summing to 1, strength 1 is the geometric (logit) mixture of the experts; strength 0 the
    base model; weight 1 on one expert at strength 1 exactly that expert.
    """
    _check_k(logits, weights)
    if tuple(base.shape) != (logits.shape[0], logits.shape[2]):
        raise ConfigError(f"base logits of shape {tuple(base.shape)} do not match (B, V) = "
                          f"{(logits.shape[0], logits.shape[2])}")
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, K, V)
    base_lp = F.log_softmax(base.float(), dim=-1)  # (B, V)
    s = torch.as_tensor(strength, dtype=logp.dtype, device=logp.device)
    s = s[:, None] if s.dim() == 1 else s
    shift = (weights.to(logp.dtype)[:, :, None] * (logp - base_lp[:, None])).sum(1)  # (B, V)
    # -inf - -inf (a token both rule out, e.g. masked) is nan; such a token stays impossible.
    shift = torch.nan_to_num(shift, nan=0.0)
    return F.log_softmax(base_lp + s * shift, dim=-1)


def mix_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Probability mixing with alpha = 1/K: (B, K, V) -> (B, V)."""
    b, k, _ = logits.shape
    return mix_prob(logits, torch.full((b, k), 1.0 / k, device=logits.device))


def mix_logprobs(logits: torch.Tensor, weights: torch.Tensor | None, rule: MixRule, *,
                 base: torch.Tensor | None = None, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Apply ``rule`` to (B, K, V) expert logits with (B, K) weights (ignored for uniform) -> (B, V).

    ``base`` (B, V), the base model's logits, and ``strength`` go with the extrapolate rule only."""
    if rule is not MixRule.EXTRAPOLATE and (base is not None or not _is_one(strength)):
        raise ConfigError(f"base logits and strength go with the extrapolate rule, not {rule.value}: a "
                          "probability or logit mixture cannot go beyond its experts")
    if rule is MixRule.UNIFORM:
        return mix_uniform(logits)
    if weights is None:
        raise ConfigError(f"the {rule.value} mixing rule needs weights; pass a weight provider or use uniform")
    if rule is MixRule.EXTRAPOLATE:
        if base is None:
            raise ConfigError("the extrapolate rule needs the base model's logits")
        return mix_extrapolate(logits, base, weights, strength)
    return mix_prob(logits, weights) if rule is MixRule.PROB else mix_logit(logits, weights)


def _is_one(strength: float | torch.Tensor) -> bool:
    return bool(torch.as_tensor(strength).eq(1).all())


def mixture_token_logprob(expert_logprobs: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log sum_k alpha_k p_k(y_t) from each expert's log-prob of the token: (..., K), (..., K) -> (...).

    Differentiable in ``alpha``: the training loss for the controller needs nothing else per token.
    """
    if expert_logprobs.shape[-1] != alpha.shape[-1]:
        raise ConfigError(f"weights name {alpha.shape[-1]} experts but log-probs hold {expert_logprobs.shape[-1]}; "
                          "pass one weight per expert")
    _check_simplex(alpha)
    alpha = alpha.expand_as(expert_logprobs)
    return _log_mix(expert_logprobs.float(), alpha.to(torch.float32), dim=-1)


def mixture_sequence_logprob(expert_logprobs: torch.Tensor, alpha: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """Sequence log-prob of the mixture: (B, T, K) token log-probs, (B, T, K) or (B, K) weights, (B, T) mask
    -> (B,). Padding contributes nothing."""
    if alpha.dim() == 2:
        alpha = alpha[:, None, :]  # one weight vector per row, shared by its tokens
    tok = mixture_token_logprob(expert_logprobs, alpha)  # (B, T)
    return (tok * mask.to(tok.dtype)).sum(-1)


def _check_k(logits: torch.Tensor, weights: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ConfigError(f"expert logits must be (B, K, V), got shape {tuple(logits.shape)}")
    if tuple(weights.shape) != tuple(logits.shape[:2]):
        raise ConfigError(f"weights of shape {tuple(weights.shape)} do not match (B, K) = "
                          f"{tuple(logits.shape[:2])}; return one weight per expert per row")
