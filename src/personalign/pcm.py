"""The Preference Control Model (PCM) of MoPE: per-token weights over frozen experts, from the preference
and cheap features of the decoding state.

Design (the paper's PCM is a 160M LLaMA; this one must cost next to nothing beside the experts):

* **Preference** = a weight vector over *every* side the PCM knows (``sides``), normalised to sum 1.
  One PCM therefore serves every combination and every weighted preference. The head outputs one
  logit per known side; the softmax runs over the preference's active sides only (weight > 0), so
  inactive sides get exactly 0.
* **Prior**: the logits are ``log w + MLP(...)`` with the MLP's last layer initialised to zero, so an
  untrained PCM *is* the user's declared mix (uniform for a hard combination) and training learns a
  per-token correction to it.
* **Context** (``context=True``), read at every step without any extra transformer:
  per active expert the entropy of its next-token distribution (divided by log V), its largest
  probability, and its disagreement with the declared mixture ``KL(p_k || sum_j w_j p_j)`` squashed to
  [0, 1) (these are laid out in the slots of the known sides, zero for inactive ones); the position
  ``log(1 + t) / log(513)``; and the mean of the frozen base model's *input embeddings* over the
  prompt (instruction + preference prompt) and over the tokens generated so far, each layer-normed
  and projected to ``proj`` dimensions. ``context=False`` is the ablation: weights depend on the
  preference alone (one weight vector per preference, constant over tokens).
* **MLP**: two hidden layers of ``hidden`` units (SiLU). With 6 sides, hidden 64, proj 32 and the
  576-wide SmolLM2 embeddings that is about 46k parameters (37k of them the embedding projection).

Features are recorded during generation (:class:`PCMWeights` with ``record=True``), and they do not
depend on the PCM's parameters (experts are frozen, tokens fixed), so a training step recomputes the
weights of a whole batch of responses from the record, with no expert forward pass.

Saved as ``pcm.safetensors`` + ``pcm.json`` (architecture, sides, base-model fingerprint); loading
checks the sides and the base model and says what to do on a mismatch.

Why one file of about 490 lines: the controller is one object with its inputs; its configuration,
its features, the quantities its training reads and the weight provider that runs it change together.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from personalign.errors import ConfigError, ModelError, PreferenceError
from personalign.experts import Experts
from personalign.generation import StepContext
from personalign.mixing import mixture_sequence_logprob

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from personalign.preferences import Preference

__all__ = [
    "PCM_CONFIG",
    "PCM_WEIGHTS",
    "PCMConfig",
    "PCMInputs",
    "PCMWeights",
    "PreferenceControlModel",
    "expert_features",
    "pcm_sequence_logprob",
    "pooled_embeddings",
    "position_feature",
    "preference_utility",
    "preference_vector",
    "read_pcm_config",
    "resolve_pcm_dir",
    "shipped_pcm_dir",
    "step_inputs",
    "weight_kl",
]

PCM_WEIGHTS = "pcm.safetensors"
PCM_CONFIG = "pcm.json"
SHIPPED = "shipped"  # --pcm shipped: the PCM shipped with the package for the model's shipped experts
FORMAT = 1
EXPERT_FEATURES = 3  # entropy, top probability, disagreement with the declared mixture
_POSITION_NORM = math.log(513.0)  # log(1 + t) / log(513): 1 at t = 512, independent of max_new_tokens


# -- configuration and model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PCMConfig:
    """The architecture; saved in ``pcm.json`` and needed to rebuild the model."""

    sides: tuple[str, ...]  # every side the PCM can weight, in the preference space's order
    embed_size: int = 0  # width of the base model's input embeddings (needed when context is on)
    context: bool = True  # False: weights depend on the preference only (ablation)
    hidden: int = 64
    proj: int = 32  # width of the projected pooled embeddings

    def __post_init__(self) -> None:
        if not self.sides or len(set(self.sides)) != len(self.sides):
            raise ConfigError(f"a PCM needs distinct sides, got {list(self.sides)}")
        if self.hidden < 1 or self.proj < 1:
            raise ConfigError(f"PCM hidden and proj must be at least 1, got hidden={self.hidden} "
                              f"proj={self.proj}")
        if self.context and self.embed_size < 1:
            raise ConfigError("a PCM with context needs embed_size, the base model's hidden size")

    @property
    def n_sides(self) -> int:
        return len(self.sides)

    @property
    def n_scalars(self) -> int:
        """Per-step scalar features: EXPERT_FEATURES per known side, plus the position."""
        return EXPERT_FEATURES * self.n_sides + 1


@dataclass(frozen=True)
class PCMInputs:
    """What the PCM reads, for B rows and T steps (``scalars`` etc. are None without context)."""

    pref: torch.Tensor  # (B, S) normalised preference weights, 0 on inactive sides
    scalars: torch.Tensor | None = None  # (B, T, 3S + 1)
    prompt_emb: torch.Tensor | None = None  # (B, H) mean input embedding of the prompt
    gen_emb: torch.Tensor | None = None  # (B, T, H) mean input embedding of the tokens before step t

    def select(self, rows: torch.Tensor) -> PCMInputs:
        """The same inputs for a subset of rows (a minibatch)."""
        pick = lambda x: None if x is None else x[rows]
        return PCMInputs(self.pref[rows], pick(self.scalars), pick(self.prompt_emb), pick(self.gen_emb))


class PreferenceControlModel(nn.Module):
    """Preference (+ context features) -> weights over the known sides, 0 on the inactive ones."""

    def __init__(self, config: PCMConfig, base: Mapping[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.base = dict(base or {})  # fingerprint of the base model whose embeddings and experts it reads
        s = config.n_sides
        in_dim = s
        if config.context:
            self.proj_prompt = nn.Linear(config.embed_size, config.proj)
            self.proj_gen = nn.Linear(config.embed_size, config.proj, bias=False)
            in_dim += config.n_scalars + config.proj
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, config.hidden), nn.SiLU(),
            nn.Linear(config.hidden, config.hidden), nn.SiLU(),
            nn.Linear(config.hidden, s),
        )
        # Zero output layer: a fresh PCM returns the declared weights exactly (see the module docstring).
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @property
    def sides(self) -> tuple[str, ...]:
        return self.config.sides

    def logits(self, inputs: PCMInputs) -> torch.Tensor:
        """``log w + MLP(features)``: (B, S) without context, (B, T, S) with it; -inf on inactive sides."""
        dtype = self.mlp[0].weight.dtype  # inputs follow the parameters (float32 unless cast)
        pref = inputs.pref.to(dtype)
        if pref.dim() != 2 or pref.shape[-1] != self.config.n_sides:
            raise ConfigError(f"preference weights of shape {tuple(pref.shape)}; expected "
                              f"(B, {self.config.n_sides}) over the sides {', '.join(self.sides)}")
        if bool((pref <= 0).all(-1).any()):
            raise PreferenceError("a preference row has no side with positive weight; give some side a "
                                  "weight")
        prior = torch.where(pref > 0, pref.clamp_min(1e-30).log(), -torch.inf)  # (B, S)
        if not self.config.context:
            return prior + self.mlp(pref)
        if inputs.scalars is None or inputs.prompt_emb is None or inputs.gen_emb is None:
            raise ConfigError("this PCM reads context features; record them with PCMWeights(record=True)")
        t = inputs.scalars.shape[1]
        h = inputs.prompt_emb.shape[-1:]
        emb = self.proj_prompt(F.layer_norm(inputs.prompt_emb.to(dtype), h))  # (B, E)
        emb = emb[:, None] + self.proj_gen(F.layer_norm(inputs.gen_emb.to(dtype), h))  # (B, T, E)
        pref_t = pref[:, None].expand(-1, t, -1)  # (B, T, S)
        x = torch.cat([pref_t, inputs.scalars.to(dtype), emb], -1)  # (B, T, S + 3S + 1 + E)
        return prior[:, None] + self.mlp(x)

    def forward(self, inputs: PCMInputs) -> torch.Tensor:
        """Weights over the known sides: (B, S) without context, (B, T, S) with it; rows sum to 1."""
        return torch.softmax(self.logits(inputs), -1)

    def weights(self, inputs: PCMInputs, steps: int) -> torch.Tensor:
        """Weights for every step, (B, T, S), in both modes."""
        w = self(inputs)
        return w[:, None].expand(-1, steps, -1) if w.dim() == 2 else w

    # -- sides -----------------------------------------------------------------------------------------
    def side_index(self, names: Sequence[str]) -> list[int]:
        """Position of each expert (named by its side) among the PCM's sides."""
        unknown = [n for n in names if n not in self.sides]
        if unknown:
            raise PreferenceError(f"this PCM weights sides {', '.join(self.sides)}, not "
                                  f"{', '.join(unknown)}; train one that knows them: personalign train-pcm "
                                  f"--set "
                                  f"sides={','.join(list(self.sides) + unknown)}")
        return [self.sides.index(n) for n in names]

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, folder: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``pcm.safetensors`` then ``pcm.json`` (last, so a complete JSON means a complete PCM)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (PCM_WEIGHTS + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / PCM_WEIGHTS)
        arch = {k: v for k, v in asdict(self.config).items() if k != "sides"}
        doc = {"kind": "pcm", "format": FORMAT, "sides": list(self.sides), "architecture": arch,
               "base": self.base, **dict(extra or {})}
        tmp = folder / (PCM_CONFIG + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, folder / PCM_CONFIG)
        return folder

    @classmethod
    def load(cls, folder: str | Path, base_model: PreTrainedModel | None = None,
             sides: Sequence[str] | None = None, device: str | torch.device = "cpu",
             ) -> PreferenceControlModel:
        """Read a PCM folder; with ``base_model``, refuse one trained on another base; with ``sides``,
        refuse one that cannot weight them."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        doc = read_pcm_config(folder, sides)
        cfg_path, weights = Path(folder) / PCM_CONFIG, Path(folder) / PCM_WEIGHTS
        known = {f.name for f in fields(PCMConfig)} - {"sides"}
        arch = {k: v for k, v in doc.get("architecture", {}).items() if k in known}
        pcm = cls(PCMConfig(sides=tuple(doc["sides"]), **arch), base=doc.get("base"))
        try:
            state = load_file(str(weights))
            pcm.load_state_dict(state)
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise ModelError(f"{weights} does not fit {cfg_path} ({type(exc).__name__}); retrain the "
                             "PCM") from None
        if base_model is not None:
            pcm.check_base(base_model, str(folder))
        return pcm.to(device).eval()

    def check_base(self, base_model: PreTrainedModel, where: str = "this PCM") -> None:
        """The PCM reads the base model's input embeddings and its experts' distributions: same base only."""
        from personalign.reward_model import base_fingerprint, check_fingerprint

        if not self.base:
            return
        check_fingerprint(self.base, base_model, f"PCM {where}")
        have, want = base_fingerprint(base_model).get("name"), self.base.get("name")
        if have and want and str(have).rstrip("/") != str(want).rstrip("/"):
            raise ModelError(f"PCM {where} was trained on base model {want!r}, not {have!r}; use --model "
                             f"{want} or train a PCM on this model with personalign train-pcm")


def shipped_pcm_dir(model_name: str) -> Path | None:
    """The PCM an installed weights distribution ships for ``model_name``, if any
    (:mod:`personalign.weights`)."""
    from personalign.weights import shipped_folder

    folder = shipped_folder(model_name, "pcm")
    if folder is None:
        return None
    return folder if (folder / PCM_CONFIG).is_file() and (folder / PCM_WEIGHTS).is_file() else None


def resolve_pcm_dir(pcm: str | Path, model_name: str) -> Path:
    """A PCM folder, or for ``shipped`` the one shipped for the model (trained for its shipped experts)."""
    if str(pcm) != SHIPPED:
        return Path(pcm)
    folder = shipped_pcm_dir(model_name)
    if folder is None:
        raise ConfigError(f"no PCM is shipped for model {model_name!r}; train one with personalign train-pcm "
                          "and pass its folder instead of 'shipped'")
    return folder


def read_pcm_config(folder: str | Path, sides: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``pcm.json`` of a PCM folder, checked (and, with ``sides``, checked to weight them) without
    loading any tensor: commands call it before loading models."""
    folder = Path(folder)
    cfg_path = folder / PCM_CONFIG
    if not cfg_path.is_file() or not (folder / PCM_WEIGHTS).is_file():
        raise ModelError(f"{folder} is not a PCM folder (needs {PCM_CONFIG} and {PCM_WEIGHTS}); "
                         "train one with personalign train-pcm")
    try:
        doc = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg_path} is unreadable ({exc}); retrain the PCM") from None
    if not isinstance(doc, dict) or doc.get("kind") != "pcm" or doc.get("format") != FORMAT:
        raise ModelError(f"{cfg_path} does not describe a PCM of format {FORMAT}; retrain it with train-pcm")
    known = [str(s) for s in doc.get("sides", [])]
    unknown = [s for s in (sides or ()) if s not in known]
    if unknown:
        raise PreferenceError(f"the PCM in {folder} weights sides {', '.join(known)}, not "
                              f"{', '.join(unknown)}; train one that knows them: personalign train-pcm "
                              f"--set sides={','.join(known + unknown)}")
    return doc


# -- features (pure) --------------------------------------------------------------------------------------


def expert_features(expert_logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per expert: entropy / log V, top probability, and KL(p_k || sum_j w_j p_j) / (1 + KL).

    (B, K, V) next-token log-probs, (B, K) declared weights (0 for experts not in the preference)
    -> (B, K, 3), each in [0, 1]. About five passes over (B, K, V), and no reduction across K of a
    (B, K, V) tensor, which is slow on a CPU (logsumexp over K cost more than all the rest together).
    """
    logp = expert_logp.float()
    p = logp.exp()  # (B, K, V)
    neg_entropy = (p * logp).nansum(-1)  # (B, K); nansum: 0 * -inf for a masked token counts 0
    top = p.amax(-1)  # (B, K)
    mix = torch.einsum("bk,bkv->bv", weights.to(p.dtype), p)  # (B, V) the declared mixture
    cross = torch.einsum("bkv,bv->bk", p, mix.clamp_min(torch.finfo(p.dtype).tiny).log())  # (B, K)
    kl = (neg_entropy - cross).clamp_min(0)  # KL(p_k || mix) = sum p_k log p_k - sum p_k log mix
    return torch.stack([-neg_entropy / math.log(logp.shape[-1]), top, kl / (1 + kl)], -1)


def position_feature(step: int) -> float:
    """log(1 + t) / log(513): grows fast early, where the response's character is decided."""
    return math.log1p(step) / _POSITION_NORM


def step_inputs(pcm: PreferenceControlModel, pref: torch.Tensor, index: torch.Tensor, expert_logp: torch.Tensor,
                steps: Sequence[int], prompt_emb: torch.Tensor, gen_sum: torch.Tensor) -> PCMInputs:
    """What a context PCM reads before one token of each row: (B, S) preference weights over its sides,
    the sides of the experts run, (K,) for every row or (B, K) per row (-1 for a padding slot, whose
    log-probs are ignored), their (B, K, V) next-token log-probs, the tokens each row has generated so far
    (rows of one batch may be at different steps), the (B, H) pooled prompt embedding and the (B, H) sum of
    the generated tokens' embeddings -> inputs with one position (B, 1, ...)."""
    device = pref.device
    s = len(pcm.sides)
    if index.dim() == 1:
        feats = expert_features(expert_logp, pref[:, index])  # (B, K, 3)
        feats = _scatter_sides(feats, index, s)  # (B, S, 3)
    else:  # per row; padding goes to a spare slot S, dropped
        slot = index.masked_fill(index < 0, s)  # (B, K)
        weights = torch.cat([pref, pref.new_zeros(pref.shape[0], 1)], 1).gather(1, slot)  # (B, K), 0 on padding
        raw = expert_features(expert_logp, weights)  # (B, K, 3)
        feats = raw.new_zeros(raw.shape[0], s + 1, raw.shape[-1])
        feats.scatter_(1, slot[..., None].expand(-1, -1, raw.shape[-1]), raw)
        feats = feats[:, :s]
    feats = feats * (pref > 0)[..., None]  # (B, S, 3)
    pos = torch.tensor([[position_feature(t)] for t in steps], device=device)  # (B, 1)
    scalars = torch.cat([feats.flatten(1), pos], -1)  # (B, 3S + 1)
    count = torch.tensor([max(t, 1) for t in steps], device=device, dtype=gen_sum.dtype)[:, None]
    gen_emb = gen_sum / count  # (B, H); zero at step 0
    return PCMInputs(pref, scalars[:, None], prompt_emb, gen_emb[:, None])


def pooled_embeddings(embeddings: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of the (V, H) embedding rows of ``ids`` (B, L) -> (B, H); zero for an empty row."""
    emb = F.embedding(ids.to(embeddings.device), embeddings).float()  # (B, L, H)
    m = mask.to(emb.device, emb.dtype)[..., None]
    return (emb * m).sum(1) / m.sum(1).clamp_min(1)


def preference_vector(pref: Preference, sides: Sequence[str]) -> torch.Tensor:
    """A preference's normalised weights laid out over ``sides`` (S,); refuses negative weights and
    sides outside ``sides``."""
    weights = {s: w for s, w in pref.normalized().items() if w != 0}
    if any(w < 0 for w in weights.values()):
        raise PreferenceError(f"token-level mixing needs non-negative weights, got {pref.spec()!r}; "
                              "use --method soup for negative weights")
    unknown = [s for s in weights if s not in sides]
    if unknown:
        raise PreferenceError(f"side(s) {', '.join(unknown)} of {pref.spec()!r} are not among "
                              f"{', '.join(sides)}; train a PCM (and experts) for them")
    out = torch.zeros(len(sides))
    for s, w in weights.items():
        out[list(sides).index(s)] = w
    return out


def _scatter_sides(x: torch.Tensor, index: torch.Tensor, n_sides: int) -> torch.Tensor:
    """(B, K, F) per-expert values into (B, S, F) side slots (zeros elsewhere)."""
    out = x.new_zeros(x.shape[0], n_sides, x.shape[-1])
    out[:, index] = x
    return out


# -- training quantities (pure) ---------------------------------------------------------------------------


def pcm_sequence_logprob(pcm: PreferenceControlModel, inputs: PCMInputs, expert_logprobs: torch.Tensor,
                         index: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_theta(y) of recorded responses under the PCM's current weights, and those weights.

    (B, T, K) recorded expert log-probs of the chosen tokens, ``index`` (K,) the experts' positions
    among the PCM's sides, (B, T) response mask -> ((B,), (B, T, S)). Differentiable in the PCM.
    """
    alpha = pcm.weights(inputs, expert_logprobs.shape[1])  # (B, T, S)
    return mixture_sequence_logprob(expert_logprobs, alpha[..., index], mask), alpha


def preference_utility(rewards: torch.Tensor, ref_rewards: torch.Tensor, weights: torch.Tensor,
                       scales: torch.Tensor) -> torch.Tensor:
    """U = sum_j w_j sigmoid((r_j(y) - r_j(y_ref)) / scale_j) over the active sides (w_j > 0).

    (N, S) rewards of the responses and of their references, (N, S) normalised weights, (S,) scales
    -> (N,). Inactive sides' rewards may hold anything (NaN included): they are never read.
    """
    active = weights > 0
    diff = torch.where(active, rewards - ref_rewards, torch.zeros_like(rewards))
    return (torch.where(active, weights, 0.0) * torch.sigmoid(diff / scales)).sum(-1)


def weight_kl(alpha: torch.Tensor, prior: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of KL(alpha_t || prior): (B, T, S) weights, (B, S) declared weights,
    (B, T) mask -> scalar. The optional pull toward the user's declared mix."""
    prior = prior[:, None].expand_as(alpha).to(alpha.dtype)
    active = prior > 0
    # Logs only of active entries (and clamped): 0 * log 0 would make the gradient NaN, not 0.
    tiny = torch.finfo(alpha.dtype).tiny
    log_a = torch.where(active, alpha, 1.0).clamp_min(tiny).log()
    log_p = torch.where(active, prior, 1.0).log()
    kl = (torch.where(active, alpha, 0.0) * (log_a - log_p)).sum(-1)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


# -- the weight provider ----------------------------------------------------------------------------------


class PCMWeights:
    """A :class:`~personalign.mixture.WeightProvider` backed by a PCM, for the experts of a preference.

    The PCM's features are computed from the experts' next-token log-probabilities, which the mixture
    step passes in the step context (``ctx.expert_logprobs``). ``preference`` is a Preference (same for
    every row) or a (B, S) tensor of normalised weights over the PCM's sides (one row each). With
    ``record=True`` the features of every step are kept for :meth:`recorded` (training).
    """

    def __init__(self, pcm: PreferenceControlModel, experts: Experts, embeddings: torch.Tensor | nn.Embedding,
                 preference: Preference | torch.Tensor, *, record: bool = False) -> None:
        self.pcm = pcm
        self.experts = experts
        self.index = torch.tensor(pcm.side_index(experts.names), dtype=torch.long)  # (K,)
        if isinstance(preference, torch.Tensor):
            pref = preference
        else:
            pref = preference_vector(preference, pcm.sides)
        if pref.shape[-1] != len(pcm.sides):
            raise ConfigError(f"preference weights of width {pref.shape[-1]}; the PCM knows "
                              f"{len(pcm.sides)} sides")
        covered = torch.zeros(len(pcm.sides), dtype=torch.bool)
        covered[self.index] = True
        uncovered = ((pref.reshape(-1, len(pcm.sides)) > 0) & ~covered).any(0)
        if bool(uncovered.any()):
            names = [pcm.sides[i] for i in uncovered.nonzero().flatten().tolist()]
            raise PreferenceError(f"no expert loaded for side(s) {', '.join(names)} of the preference; load "
                                  "the experts of every side it weights")
        self.pref = pref.float()
        weight = embeddings.weight if isinstance(embeddings, nn.Embedding) else embeddings
        self.embeddings = weight.detach()  # (V, H) frozen
        self.record = record
        self._steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._prompt_emb: torch.Tensor | None = None
        self._gen_sum: torch.Tensor | None = None

    def _rows(self, b: int, device: torch.device) -> torch.Tensor:
        pref = self.pref.to(device)
        if pref.dim() == 1:
            return pref[None].expand(b, -1)
        if pref.shape[0] != b:
            raise ConfigError(f"{pref.shape[0]} preference rows for a batch of {b}; give one row per "
                              "prompt row")
        return pref

    def active(self, rows: int, device: torch.device) -> torch.Tensor:
        """(B, K) True for the experts of each row's preference: the PCM weights no other (its softmax
        runs over the preference's sides), so the mixture need not run them."""
        return self._rows(rows, device)[:, self.index.to(device)] > 0

    @torch.no_grad()
    def __call__(self, ctx: StepContext) -> torch.Tensor:
        b, device = ctx.prompt_ids.shape[0], ctx.prompt_ids.device
        pref = self._rows(b, device)  # (B, S)
        index = self.index.to(device)
        if not self.pcm.config.context:
            alpha = self.pcm(PCMInputs(pref))  # (B, S)
            return alpha[:, index]
        logp = ctx.expert_logprobs  # (B, K, V)
        if logp is None or logp.shape[0] != b:
            raise ConfigError("the PCM needs the experts' next-token log-probabilities in the step context; "
                              "generate with personalign.mixture.MixtureStep (generate_mixed)")
        emb = self.embeddings
        if ctx.step == 0:  # a new batch: reset the running sums
            self._prompt_emb = pooled_embeddings(emb, ctx.prompt_ids, ctx.prompt_mask).to(device)  # (B, H)
            self._gen_sum = torch.zeros_like(self._prompt_emb)
            self._steps = []
        else:
            last = F.embedding(ctx.generated[:, -1].to(emb.device), emb).float()  # (B, H)
            self._gen_sum = self._gen_sum + last.to(device)
        inputs = step_inputs(self.pcm, pref, index, logp, [ctx.step] * b, self._prompt_emb, self._gen_sum)
        alpha = self.pcm(inputs)[:, 0]  # (B, S)
        if self.record:
            self._steps.append((inputs.scalars[:, 0], inputs.gen_emb[:, 0]))
        return alpha[:, index]

    def recorded(self, batch_rows: int | None = None) -> PCMInputs:
        """The inputs the PCM read at every step of the last generation: (B, T, ...)."""
        if not self.pcm.config.context:
            if batch_rows is None:
                raise ConfigError("give batch_rows to recorded() for a PCM without context")
            return PCMInputs(self._rows(batch_rows, self.pref.device))
        if not self.record or not self._steps:
            raise ConfigError("nothing recorded; build PCMWeights(..., record=True) and generate first")
        scalars = torch.stack([s for s, _ in self._steps], 1)  # (B, T, 3S + 1)
        gen = torch.stack([g for _, g in self._steps], 1)  # (B, T, H)
        return PCMInputs(self._rows(scalars.shape[0], scalars.device), scalars, self._prompt_emb, gen)
