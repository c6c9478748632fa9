"""MoPE's decoding step: K frozen experts mixed token by token, with weights from a provider.

:class:`MixtureStep` plugs into the one decode loop (:func:`personalign.generation.decode`): each step
runs every expert once on the new token (:class:`personalign.experts.Experts`, KV caches), hands the
experts' next-token log-probabilities to the weight provider through the step context, and mixes them
with a rule of :mod:`personalign.mixing`. The repetition penalty acts on each expert's logits as
transformers' does on a single model's, and the penalised distributions are mixed, so a mixture of
identical experts samples exactly what one of them samples; (applied to the mixture's log-probabilities
instead, the same penalty is far weaker — log-probs are near zero for likely tokens — and mixtures loop).

The step records each expert's log-probability of every chosen token, so the sequence log-probability
of the mixture under *new* weights needs no expert forward pass (REBEL).
Shapes: B rows, K experts, V vocabulary, L prompt tokens, T response tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from personalign.errors import ConfigError
from personalign.experts import BASE_EXPERT, Experts
from personalign.generation import SamplingConfig, StepContext, decode, penalize_repetition, seeded_generator
from personalign.mixing import MixRule, mix_logprobs, mixture_sequence_logprob

__all__ = ["FixedWeights", "MixedGeneration", "MixtureStep", "WeightProvider", "generate_mixed"]


class WeightProvider(Protocol):
    """Returns the (B, K) expert weights for the next token; a learned controller implements this.

    ``ctx.expert_logprobs`` (B, K, V) holds the experts' next-token log-probabilities. A provider may
    also have ``active(rows, device) -> (B, K) bool``: the experts it may weight for each row during the
    whole generation. The others are then not run at all (LoRA experts on one base), and their weight
    must stay exactly zero.
    """

    def __call__(self, ctx: StepContext) -> torch.Tensor: ...


@dataclass(frozen=True)
class FixedWeights:
    """The same weights for every row and token (the user's declared mix, or a baseline)."""

    weights: Sequence[float]

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        w = torch.tensor(list(self.weights), dtype=torch.float32, device=ctx.prompt_ids.device)
        return w[None, :].expand(ctx.prompt_ids.shape[0], -1)  # (B, K)


@dataclass(frozen=True)
class MixedGeneration:
    """Sampled responses with everything needed to re-score them under other weights."""

    tokens: torch.Tensor  # (B, T) pad after end-of-sequence
    mask: torch.Tensor  # (B, T) 1 on real tokens, end-of-sequence included
    weights: torch.Tensor  # (B, T, K) the weights used at each step
    # (B, T, K) each expert's log-prob of the chosen token; -log V for experts the provider's ``active``
    # left out (not run; their weight is zero throughout)
    expert_logprobs: torch.Tensor
    logprobs: torch.Tensor  # (B, T) the mixture's log-prob of the chosen token (before temperature etc.)
    rule: MixRule

    def sequence_logprob(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) log pi(y|x) under the recorded weights, or under new (B, T, K) / (B, K) probability weights."""
        if weights is None:
            return (self.logprobs * self.mask).sum(-1)
        if self.rule in (MixRule.LOGIT, MixRule.EXTRAPOLATE):
            raise ConfigError(f"re-weighting a {self.rule.value}-rule sample needs full distributions; sample "
                              "with rule prob")
        return mixture_sequence_logprob(self.expert_logprobs, weights, self.mask)


class MixtureStep:
    """The decode loop's step for a token-level mixture of ``experts`` under ``rule``."""

    def __init__(self, experts: Experts, weights: WeightProvider | None, rule: MixRule = MixRule.PROB, *,
                 strength: float = 1.0) -> None:
        if rule is not MixRule.UNIFORM and weights is None:
            raise ConfigError(f"the {rule.value} mixing rule needs a weight provider; pass FixedWeights or use "
                              "uniform")
        # The extrapolate rule moves away from the base model: the base runs as the last expert
        # (``__base__``, adapters off) and the provider weights the others.
        self.base_index: int | None = None
        if rule is MixRule.EXTRAPOLATE:
            if not experts.adapters or experts.names[-1] != BASE_EXPERT or BASE_EXPERT in experts.names[:-1]:
                raise ConfigError(f"the extrapolate rule needs the base model as the last expert: build the "
                                  f"experts with Experts.from_adapters(model, [...sides, {BASE_EXPERT!r}])")
            self.base_index = experts.k - 1
        elif strength != 1:
            raise ConfigError(f"strength goes with the extrapolate rule, not {rule.value}: a probability or "
                              "logit mixture cannot go beyond its experts")
        if not math.isfinite(strength) or strength < 0:
            raise ConfigError(f"strength must be a finite number >= 0, got {strength!r}")
        self.strength = float(strength)
        self.experts, self.provider, self.rule = experts, weights, rule
        self.models = experts.models
        self.vocab_size = experts.vocab_size
        self._caches: list | None = None
        self._logits: torch.Tensor | None = None
        self._active: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def start(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        b, k = input_ids.shape[0], self.k
        # Experts a row's provider never weights are not run (LoRA experts on one base): with 3 of 6 sides
        # per preference, half the rows.
        self._active = None
        if self.rule is not MixRule.UNIFORM and self.experts.adapters and hasattr(self.provider, "active"):
            active = self.provider.active(b, input_ids.device).to(input_ids.device).bool()  # (B, K)
            if tuple(active.shape) != (b, k) or bool((~active.any(-1)).any()):
                raise ConfigError(f"the weight provider's active experts have shape {tuple(active.shape)} or a "
                                  f"row with none; expected ({b}, {k}) with at least one per row")
            if self.base_index is not None:  # the base always runs
                active = torch.cat([active, active.new_ones(b, 1)], 1)
            self._active = active
        self._records = []
        self._logits, self._caches = self.experts.forward(input_ids, mask, position_ids, self.experts.new_caches(),
                                                          active=self._active)  # (B, K, 1, V)

    def scores(self, ctx: StepContext, penalty: float) -> torch.Tensor:
        assert self._logits is not None and ctx.seen is not None
        b, k = ctx.prompt_ids.shape[0], self.k
        raw = self._logits[:, :, -1].float()  # (B, K, V), or (B, K + 1, V) with the base last
        base = None
        if self.base_index is not None:
            raw, base = raw[:, :k], raw[:, k]
        expert_lp = F.log_softmax(raw, dim=-1)
        if self.rule is MixRule.UNIFORM:
            alpha = torch.full((b, k), 1.0 / k, device=raw.device)
        else:
            alpha = self.provider(replace(ctx, expert_logprobs=expert_lp)).to(raw.device).float()
            if tuple(alpha.shape) != (b, k):
                raise ConfigError(f"the weight provider returned shape {tuple(alpha.shape)}; expected (B, K) = "
                                  f"({b}, {k})")
            if self._active is not None and bool((alpha[~self._active[:, :k]] != 0).any()):
                raise ConfigError("the weight provider weighted an expert outside its active experts, "
                                  "which was not run; keep those weights at exactly zero")
        extra = {} if base is None else {"base": base, "strength": self.strength}
        mixed = mix_logprobs(expert_lp, alpha, self.rule, **extra)  # (B, V)
        self._last = (alpha, expert_lp, mixed)
        if penalty == 1:
            return mixed
        if base is not None:
            extra["base"] = penalize_repetition(base, ctx.seen, penalty)
        return mix_logprobs(F.log_softmax(penalize_repetition(raw, ctx.seen, penalty), dim=-1), alpha, self.rule,
                            **extra)

    @property
    def k(self) -> int:
        """The experts the provider weights (the base of the extrapolate rule not counted)."""
        return self.experts.k - (self.base_index is not None)

    def accept(self, tokens: torch.Tensor, ctx: StepContext) -> None:
        assert self._last is not None
        alpha, expert_lp, mixed = self._last
        b, k = expert_lp.shape[:2]
        self._records.append((alpha, expert_lp.gather(-1, tokens[:, None, None].expand(b, k, 1)).squeeze(-1),
                              mixed.gather(-1, tokens[:, None]).squeeze(-1)))  # (B, K), (B, K), (B,)

    def advance(self, tokens: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        self._logits, self._caches = self.experts.forward(tokens[:, None], mask, position_ids, self._caches,
                                                          active=self._active)

    def result(self, tokens: torch.Tensor, mask: torch.Tensor) -> MixedGeneration:
        """The generation just decoded, with the recorded weights and log-probabilities."""
        valid = mask.bool()
        return MixedGeneration(
            tokens=tokens,
            mask=mask.long(),
            weights=torch.stack([a for a, _, _ in self._records], 1),
            expert_logprobs=torch.stack([e for _, e, _ in self._records], 1) * valid[..., None],
            logprobs=torch.stack([m for _, _, m in self._records], 1) * valid,
            rule=self.rule,
        )


def generate_mixed(
    experts: Experts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    weights: WeightProvider | None = None,
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int | None = None,
    rule: MixRule = MixRule.PROB,
    sampling: SamplingConfig | None = None,
    strength: float = 1.0,
) -> MixedGeneration:
    """Sample from the token-level mixture of ``experts`` for a left-padded prompt batch (B, L).

    ``sampling`` defaults to ``SamplingConfig()``; its seed drives a private generator. The extrapolate
    rule (with its ``strength``) needs the base as the last expert (``__base__``).
    """
    sampling = SamplingConfig() if sampling is None else sampling
    eos = [int(e) for e in eos_token_ids]
    if not eos:
        raise ConfigError("no end-of-sequence ids given; generation would never stop")
    pad = eos[0] if pad_token_id is None else int(pad_token_id)
    device = experts.device
    step = MixtureStep(experts, weights, rule, strength=strength)
    out = decode(step, input_ids.to(device), attention_mask.to(device).long(), sampling, eos=eos, pad=pad,
                 generator=seeded_generator(sampling.seed, device))
    return step.result(out.tokens, out.mask)
