"""Token-level mixture of K frozen experts (MoPE): mixing rules, a sampler and a teacher-forced scorer.

The mixture is ``p(y_t) = sum_k alpha_k p_k(y_t)`` with per-token weights from a weight provider
(fixed weights now, a learned controller later). Experts are either LoRA adapters on one base model,
run in *one* forward pass per step over the batch repeated K times with peft's ``adapter_names``
(each copy keeps its own rows of the KV cache), or K separate models sharing a tokenizer.

Generation records each expert's log-probability of every chosen token, so the sequence
log-probability of the mixture under *new* weights needs no expert forward pass (REBEL).
Shapes: B rows, K experts, V vocabulary, L prompt tokens, T response tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from personalign.errors import ConfigError, ModelError
from personalign.generation import SamplingConfig
from personalign.kernels import fast_decode

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BASE_EXPERT",
    "Experts",
    "FixedWeights",
    "MixRule",
    "MixedGeneration",
    "StepContext",
    "WeightProvider",
    "generate_mixed",
    "mix_logit",
    "mix_logprobs",
    "mix_prob",
    "mix_uniform",
    "mixture_sequence_logprob",
    "mixture_token_logprob",
    "score_responses",
]

BASE_EXPERT = "__base__"  # peft's name for "adapters off" inside a mixed-adapter batch
_SUM_TOL = 1e-4


class MixRule(str, enum.Enum):
    """How expert distributions are combined."""

    PROB = "prob"  # sum_k alpha_k p_k (MoPE; the paper's best)
    LOGIT = "logit"  # softmax(sum_k w_k logits_k) (MOD, Shi et al. 2024)
    UNIFORM = "uniform"  # PROB with alpha = 1/K (MoPE without a trained controller)

    @classmethod
    def parse(cls, value: str) -> MixRule:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown mixing rule {value!r}; choose one of prob, logit, uniform") from None


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


def mix_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Probability mixing with alpha = 1/K: (B, K, V) -> (B, V)."""
    b, k, _ = logits.shape
    return mix_prob(logits, torch.full((b, k), 1.0 / k, device=logits.device))


def mix_logprobs(logits: torch.Tensor, weights: torch.Tensor | None, rule: MixRule) -> torch.Tensor:
    """Apply ``rule`` to (B, K, V) expert logits with (B, K) weights (ignored for uniform) -> (B, V)."""
    if rule is MixRule.UNIFORM:
        return mix_uniform(logits)
    if weights is None:
        raise ConfigError(f"the {rule.value} mixing rule needs weights; pass a weight provider or use uniform")
    return mix_prob(logits, weights) if rule is MixRule.PROB else mix_logit(logits, weights)


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


# -- weight providers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """What a weight provider sees before token ``step`` is chosen."""

    step: int
    prompt_ids: torch.Tensor  # (B, L) left-padded
    prompt_mask: torch.Tensor  # (B, L)
    generated: torch.Tensor  # (B, step) tokens chosen so far (pad after a row finished)
    finished: torch.Tensor  # (B,) bool


class WeightProvider(Protocol):
    """Returns the (B, K) expert weights for the next token; a learned controller implements this.

    A provider may also have ``active(rows, device) -> (B, K) bool``: the experts it may weight for each
    row during the whole generation. The others are then not run at all (LoRA experts on one base),
    and their weight must stay exactly zero.
    """

    def __call__(self, ctx: StepContext) -> torch.Tensor: ...


@dataclass(frozen=True)
class FixedWeights:
    """The same weights for every row and token (the user's declared mix, or a baseline)."""

    weights: Sequence[float]

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        w = torch.tensor(list(self.weights), dtype=torch.float32, device=ctx.prompt_ids.device)
        return w[None, :].expand(ctx.prompt_ids.shape[0], -1)  # (B, K)


# -- experts ----------------------------------------------------------------------------------------------


def _cache_argument() -> str:
    # transformers 5.x renamed ``past_key_values`` to ``cache`` (input and output); follow the installed one.
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


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
        self._cache_arg = _cache_argument()

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
        stacked = _stack_lora(model, self.names)
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


def _stack_lora(model: Any, names: Sequence[str]) -> list[_StackedLoRA] | None:
    """Stacked factors for every LoRA layer, or None where a layer is not a plain LoRA Linear (embedding,
    convolution, bias or merged adapters), which peft's mixed batch handles instead."""
    from torch import nn

    out = []
    for layer in _lora_layers(model):
        used = [n for n in names if n in layer.lora_A or n in getattr(layer, "lora_embedding_A", {})]
        if not used:
            continue
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


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # As transformers' generate: positions count real tokens, so a left-padded row matches itself alone.
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# -- generation -------------------------------------------------------------------------------------------


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
        if self.rule is MixRule.LOGIT:
            raise ConfigError("re-weighting a logit-rule sample needs full distributions; sample with rule prob")
        return mixture_sequence_logprob(self.expert_logprobs, weights, self.mask)


def _check_weights(alpha: torch.Tensor, b: int, k: int) -> None:
    if tuple(alpha.shape) != (b, k):
        raise ConfigError(f"the weight provider returned shape {tuple(alpha.shape)}; expected (B, K) = ({b}, {k})")


def _sample(scores: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Next token per row from (B, V) scores: greedy at temperature 0, else temperature then top-p."""
    if sampling.temperature == 0:
        return scores.argmax(-1)
    scores = scores / sampling.temperature
    if sampling.top_p < 1:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # mass before this token already exceeds top_p
        drop[:, 0] = False
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -torch.inf))
    return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.no_grad()
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
) -> MixedGeneration:
    """Sample from the token-level mixture of ``experts`` for a left-padded prompt batch (B, L).

    Each step runs every expert once on the new token only (KV caches), mixes, samples. The repetition
    penalty acts on each expert's logits as transformers' does on a single model's (a seen token's
    positive logit is divided by it, a negative one multiplied), and the penalised distributions are
    mixed, so a mixture of identical experts samples exactly what one of them samples under
    ``generate``; tokens in the prompt count as seen, padding does not. (Applied to the mixture's
    log-probabilities instead, the same penalty is far weaker — log-probs are near zero for likely
    tokens — and mixtures loop.) The recorded log-probabilities are the unpenalised ones.
    ``sampling`` defaults to ``SamplingConfig()``; its seed drives a private generator.
    """
    sampling = SamplingConfig() if sampling is None else sampling
    eos = [int(e) for e in eos_token_ids]
    if not eos:
        raise ConfigError("no end-of-sequence ids given; generation would never stop")
    pad = eos[0] if pad_token_id is None else int(pad_token_id)
    if rule is not MixRule.UNIFORM and weights is None:
        raise ConfigError(f"the {rule.value} mixing rule needs a weight provider; pass FixedWeights or use uniform")
    device = experts.device
    input_ids, mask = input_ids.to(device), attention_mask.to(device).long()
    b, k = input_ids.shape[0], experts.k
    if bool((mask.sum(-1) == 0).any()):
        raise ConfigError("a prompt row has no tokens; every row needs at least one unpadded token")
    if bool((mask[:, -1] == 0).any()):
        raise ConfigError("prompts must be left-padded (the last column is padding); set padding_side='left'")

    with fast_decode(*experts.models):  # thin-input linear layers: each step multiplies K*B rows
        return _decode(experts, input_ids, mask, weights, eos, pad, rule, sampling)


def _decode(experts: Experts, input_ids: torch.Tensor, mask: torch.Tensor, weights: WeightProvider | None,
            eos: list[int], pad: int, rule: MixRule, sampling: SamplingConfig) -> MixedGeneration:
    device = experts.device
    b, k = input_ids.shape[0], experts.k
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    eos_t = torch.tensor(eos, device=device)
    seen = torch.zeros(b, experts.vocab_size, device=device)  # (B, V) counts of prompt/generated tokens
    seen.scatter_add_(1, input_ids, mask.float())
    pos = _positions(mask)  # (B, L)
    # Experts a row's provider never weights are not run (LoRA experts on one base): with 3 of 6 sides
    # per preference, half the rows.
    active = None
    if rule is not MixRule.UNIFORM and experts.adapters and hasattr(weights, "active"):
        active = weights.active(b, device).to(device).bool()  # (B, K)
        if tuple(active.shape) != (b, k) or bool((~active.any(-1)).any()):
            raise ConfigError(f"the weight provider's active experts have shape {tuple(active.shape)} or a row "
                              f"with none; expected ({b}, {k}) with at least one per row")
    logits, caches = experts.forward(input_ids, mask, pos, experts.new_caches(), active=active)  # (B, K, 1, V)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    toks, valid, ws, lps, mixed_lps = [], [], [], [], []
    for step in range(sampling.max_new_tokens):
        raw = logits[:, :, -1].float()  # (B, K, V)
        expert_lp = F.log_softmax(raw, dim=-1)
        if rule is MixRule.UNIFORM:
            alpha = torch.full((b, k), 1.0 / k, device=device)
        else:
            generated = torch.stack(toks, 1) if toks else input_ids.new_zeros(b, 0)
            alpha = weights(StepContext(step, input_ids, mask, generated, finished.clone())).to(device).float()
            _check_weights(alpha, b, k)
            if active is not None and bool((alpha[~active] != 0).any()):
                raise ConfigError("the weight provider weighted an expert outside its active experts, "
                                  "which was not run; keep those weights at exactly zero")
        mixed = mix_logprobs(expert_lp, alpha, rule)  # (B, V)
        scores = mixed
        if sampling.repetition_penalty != 1:
            rp = sampling.repetition_penalty
            penal = torch.where(seen[:, None] > 0, torch.where(raw < 0, raw * rp, raw / rp), raw)
            scores = mix_logprobs(F.log_softmax(penal, dim=-1), alpha, rule)
        nxt = _sample(scores, sampling, gen)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)  # (B,)
        toks.append(nxt)
        valid.append(~finished)
        ws.append(alpha)
        lps.append(expert_lp.gather(-1, nxt[:, None, None].expand(b, k, 1)).squeeze(-1))  # (B, K)
        mixed_lps.append(mixed.gather(-1, nxt[:, None]).squeeze(-1))  # (B,)
        seen.scatter_add_(1, nxt[:, None], (~finished).float()[:, None])
        finished = finished | torch.isin(nxt, eos_t)
        if bool(finished.all()) or step == sampling.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        logits, caches = experts.forward(nxt[:, None], mask, next_pos, caches, active=active)
        next_pos = next_pos + 1

    out_mask = torch.stack(valid, 1)
    return MixedGeneration(
        tokens=torch.stack(toks, 1),
        mask=out_mask.long(),
        weights=torch.stack(ws, 1),
        expert_logprobs=torch.stack(lps, 1) * out_mask[..., None],
        logprobs=torch.stack(mixed_lps, 1) * out_mask,
        rule=rule,
    )


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
    logits, _ = experts.forward(ids, mask, _positions(mask), None, logits_to_keep=t + 1)  # (B, K, T + 1, V)
    target = response_ids.to(device)[:, :, None]  # (B, T, 1)
    cols = []
    for i in range(experts.k):  # one expert at a time bounds the float32 copy to (B, T, V)
        lp = logits[:, i, :-1].float()
        cols.append((lp.gather(-1, target) - torch.logsumexp(lp, -1, keepdim=True)).squeeze(-1))  # (B, T)
    return torch.stack(cols, -1) * response_mask.to(device)[..., None]  # (B, T, K)
