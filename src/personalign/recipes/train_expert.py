"""Recipe: train one expert policy, a LoRA adapter on the base model, against one side's reward
(stage 4 of Personalized Soups).

config -> main(cfg) -> validate (before any model loads) -> load base + LoRA -> resume -> per step:
rollout -> score -> reference log-probs -> KL penalty -> advantages -> loss -> step -> log -> checkpoint;
at the end: save the adapter and ``expert.json``.

Algorithms (``algorithm``):

* ``rloo`` (default, critic-free): ``group_size`` samples per prompt; each sample's reward is its
  normalised score minus ``kl_coef`` times its sequence KL to the reference; its advantage is that
  reward minus the mean of the other samples of the same prompt (:func:`group_advantages`); loss
  :func:`sequence_policy_loss`. No value model, so one forward pass fewer than PPO and nothing to
  warm up: the better choice for a small model on a CPU.
* ``grpo``: the same, with the advantage divided by the group's standard deviation. The KL term stays
  in the reward (as for rloo) rather than in the loss, so both critic-free methods share one rule.
* ``ppo`` (the paper's): per-token reward ``-beta * KL_t``, plus the normalised score at the last
  response token (Ziegler et al. 2019, as in TRL); values from a linear head on the policy's last
  hidden state, trained with the clipped value loss (weight ``vf_coef``); GAE advantages, whitened;
  clipped policy loss; ``beta`` adaptive from 0.2 (target 6, horizon 10000); 8 epochs over each batch.

Every algorithm normalises the reward function's output by a running mean/std (the paper's reward
normalisation). The KL reference is the *same* model with its adapter disabled (``disable_adapter``),
never a second copy. Log-probabilities are those of the temperature-scaled distribution the samples
were drawn from; sampling uses no top-k and no repetition penalty (and top-p 1 by default) so that
the loss sees the probabilities the samples actually had. Rollouts stop at end-of-sequence (every id
from :func:`eos_token_ids`); the response mask covers the tokens up to and including the first one.

Determinism and resumption: each step reseeds torch from (seed, step) before sampling, and the
prompts of a step come from a seeded shuffle per pass over the data, so step s does the same work
whether or not the run was interrupted. Every ``checkpoint_every`` steps the checkpoint holds the
LoRA and value-head tensors, the AdamW state, the RNG, the reward statistics, the KL coefficient and
the step; running the same command again resumes from it, dropping metrics lines written after it.

Run folder: ``config.json``, ``metrics.jsonl``, ``checkpoint/`` while training; at the end
``adapter/`` (a standard peft folder: ``adapter_config.json`` + ``adapter_model.safetensors``),
``value_head.safetensors`` (ppo only, to continue training) and ``expert.json`` (side, base model,
config, final metrics), written last.

Metrics per step: ``train/reward_raw`` (mean reward-function output), ``train/reward`` (mean
normalised score), ``train/reward_total`` (normalised score minus the KL penalty: the objective),
``train/kl`` (mean over samples of the summed per-token KL), ``train/kl_coef``, ``train/loss``,
``train/policy_loss``, ``train/value_loss`` (ppo), ``train/clipfrac``, ``train/entropy`` (mean
per-token entropy of the sampling distribution), ``train/response_length`` (tokens, end-of-sequence
included), ``train/truncated`` (share of samples that hit ``max_new_tokens``), ``train/lr``,
``time/step_seconds``, ``time/samples_per_second``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from personalign.checkpoint import load_checkpoint, save_checkpoint
from personalign.config import to_dict
from personalign.errors import ConfigError, ModelError
from personalign.generation import Method, batch_seed, build_prompts, eos_token_ids
from personalign.kernels import fast_decode
from personalign.losses import (
    AdaptiveKLController,
    RunningMeanStd,
    gae_advantages,
    group_advantages,
    kl_per_token,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_policy_loss,
)
from personalign.reward_model import LoraSpec
from personalign.runlog import MetricsLogger, prepare_run_dir, summarize_steps

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from personalign.data import Instruction
    from personalign.preferences import PreferenceSpace
    from personalign.rewards import RewardSpec

ALGORITHMS = ("rloo", "grpo", "ppo")
KL_ESTIMATORS = ("k1", "k3")
ADAPTER_DIR = "adapter"
VALUE_HEAD = "value_head.safetensors"
EXPERT_JSON = "expert.json"


@dataclass(frozen=True)
class TrainExpertConfig:
    side: str
    output_dir: str
    model: str | None = None  # None: the embedded default
    dimensions: str | None = None  # a YAML file of extra dimensions
    reward: str = "offline"  # offline | rm:PATH | PATH | module:function
    algorithm: str = "rloo"  # rloo | grpo | ppo
    prompts: str = "builtin:train"
    limit: int | None = None
    # The paper's rank and alpha. No dropout: with dropout the policy that is trained differs from the
    # one that sampled, and an update on the whole batch can no longer reuse its forward pass.
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=16, alpha=32, dropout=0.0))
    # None = per algorithm: 1.4e-5 for ppo (the paper's), 5e-5 for rloo/grpo (see DEFAULT_LR).
    lr: float | None = None
    weight_decay: float = 0.0
    steps: int = 100
    batch_prompts: int = 4  # prompts per step; samples per step = batch_prompts * group_size
    group_size: int = 4  # samples per prompt (at least 2 for rloo/grpo)
    ppo_epochs: int | None = None  # None: 8 for ppo (the paper's), 1 for rloo/grpo
    minibatch_size: int | None = None  # samples per optimizer step; None: the whole batch
    kl_coef: float | None = None  # None: 0.2 for ppo (adaptive, the paper's), 0.05 for rloo/grpo (fixed)
    adaptive_kl: bool | None = None  # None: True for ppo, False otherwise
    kl_target: float = 6.0
    kl_horizon: int = 10000
    # Guard against reward hacking: stop when a step's sampled policy is more than this many nats from
    # the base (mean sequence KL) and keep the policy of the step before. A policy that has found an
    # exploit of its reward model leaves the base fast (one expert here went from 1.9 to 8.4 nats in
    # eleven steps, its answers turning into strings of praise). None: no guard.
    kl_stop: float | None = None
    kl_estimator: str = "k1"  # k1 (the paper's penalty) or k3 (non-negative)
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    max_new_tokens: int = 64  # the paper's 512 is far too slow on a CPU
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0  # subtracted from the score of samples cut at max_new_tokens
    seed: int = 0
    checkpoint_every: int = 20
    device: str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA (LoRA weights stay float32)
    # bf16 autocast. Off by default: on a CPU without native bf16 (AVX2 only) it measured 2x slower
    # for generation and 9x slower for the training pass, and bf16 log-probs add noise to the KL and
    # the ratio. Turn it on for CUDA or a CPU with AVX512-BF16/AMX.
    autocast_bf16: bool = False
    progress: bool = True


# Adam moves every LoRA weight by about lr per step, whatever the gradient's scale. LoRA fine-tuning
# commonly needs about ten times a full fine-tune's rate (1e-4 to 2e-4 for supervised LoRA); RL
# gradients are noisier and the offline rewards can be gamed, so rloo/grpo start at half of that,
# with the KL penalty as the brake. PPO keeps the paper's 1.4e-5.
DEFAULT_LR = {"rloo": 5e-5, "grpo": 5e-5, "ppo": 1.4e-5}
DEFAULT_EPOCHS = {"rloo": 1, "grpo": 1, "ppo": 8}
DEFAULT_KL = {"rloo": 0.05, "grpo": 0.05, "ppo": 0.2}


def resolve_defaults(cfg: TrainExpertConfig) -> TrainExpertConfig:
    """``cfg`` with the per-algorithm defaults (None fields) filled in."""
    a = cfg.algorithm
    return dataclasses.replace(
        cfg,
        lr=DEFAULT_LR[a] if cfg.lr is None else cfg.lr,
        ppo_epochs=DEFAULT_EPOCHS[a] if cfg.ppo_epochs is None else cfg.ppo_epochs,
        kl_coef=DEFAULT_KL[a] if cfg.kl_coef is None else cfg.kl_coef,
        adaptive_kl=(a == "ppo") if cfg.adaptive_kl is None else cfg.adaptive_kl,
    )


# -- validation -------------------------------------------------------------------------------------


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class Plan:
    """What validation found: everything the run needs that does not need a model."""

    cfg: TrainExpertConfig  # per-algorithm defaults filled in
    side: str  # the resolved side id
    space: PreferenceSpace
    reward: RewardSpec
    instructions: list[Instruction]


def validate(cfg: TrainExpertConfig) -> Plan:
    """Check every field, the side, the reward spec and the prompts; load no model."""
    from personalign.data import load_prompts
    from personalign.models import resolve_device, resolve_dtype
    from personalign.preferences import load_space
    from personalign.rewards import parse_reward_spec

    _require(cfg.algorithm in ALGORITHMS, "algorithm", cfg.algorithm, f"one of {', '.join(ALGORITHMS)}")
    c = resolve_defaults(cfg)
    _require(_finite(c.lr) and c.lr > 0, "lr", c.lr, "a positive number (e.g. lr=5e-5)")
    _require(_finite(c.weight_decay) and c.weight_decay >= 0, "weight_decay", c.weight_decay, "a number >= 0")
    _require(c.steps >= 1, "steps", c.steps, "at least 1")
    _require(c.batch_prompts >= 1, "batch_prompts", c.batch_prompts, "at least 1")
    if c.algorithm in ("rloo", "grpo"):
        _require(c.group_size >= 2, "group_size", c.group_size,
                 f"at least 2 for {c.algorithm}, which compares samples of the same prompt "
                 "(e.g. group_size=4, or algorithm=ppo)")
    else:
        _require(c.group_size >= 1, "group_size", c.group_size, "at least 1")
    n = c.batch_prompts * c.group_size
    _require(c.ppo_epochs >= 1, "ppo_epochs", c.ppo_epochs, "at least 1")
    _require(c.minibatch_size is None or 1 <= c.minibatch_size <= n, "minibatch_size", c.minibatch_size,
             f"between 1 and the samples per step ({n} = batch_prompts x group_size), or null for all")
    _require(_finite(c.kl_coef) and c.kl_coef >= 0, "kl_coef", c.kl_coef, "a number >= 0")
    _require(c.kl_estimator in KL_ESTIMATORS, "kl_estimator", c.kl_estimator,
             f"one of {', '.join(KL_ESTIMATORS)}")
    _require(_finite(c.kl_target) and c.kl_target > 0, "kl_target", c.kl_target, "a positive number")
    _require(c.kl_stop is None or (_finite(c.kl_stop) and c.kl_stop > 0), "kl_stop", c.kl_stop,
             "a positive number of nats, or unset for no guard")
    _require(c.kl_horizon >= 1, "kl_horizon", c.kl_horizon, "at least 1")
    for name in ("clip_range", "value_clip_range", "max_grad_norm"):
        v = getattr(c, name)
        _require(_finite(v) and v > 0, name, v, "a positive number")
    _require(_finite(c.vf_coef) and c.vf_coef >= 0, "vf_coef", c.vf_coef, "a number >= 0")
    _require(_finite(c.gamma) and 0 < c.gamma <= 1, "gamma", c.gamma, "in (0, 1]")
    _require(_finite(c.lam) and 0 <= c.lam <= 1, "lam", c.lam, "in [0, 1]")
    _require(c.max_new_tokens >= 1, "max_new_tokens", c.max_new_tokens, "at least 1")
    _require(_finite(c.temperature) and 0 < c.temperature <= 10, "temperature", c.temperature,
             "in (0, 10] (RL needs sampling; 1.0 is the paper's)")
    _require(_finite(c.top_p) and 0 < c.top_p <= 1, "top_p", c.top_p, "in (0, 1]")
    _require(_finite(c.missing_eos_penalty) and c.missing_eos_penalty >= 0, "missing_eos_penalty",
             c.missing_eos_penalty, "a number >= 0")
    _require(c.checkpoint_every >= 1, "checkpoint_every", c.checkpoint_every, "at least 1")
    _require(c.lora.r >= 1, "lora.r", c.lora.r, "at least 1")
    _require(_finite(c.lora.alpha) and c.lora.alpha > 0, "lora.alpha", c.lora.alpha, "a positive number")
    _require(_finite(c.lora.dropout) and 0 <= c.lora.dropout < 1, "lora.dropout", c.lora.dropout, "in [0, 1)")
    _require(len(c.lora.target_modules) > 0, "lora.target_modules", list(c.lora.target_modules),
             "a non-empty list such as q_proj,v_proj")
    resolve_dtype(c.dtype, resolve_device(c.device))  # raises ModelError naming the value

    space = load_space(c.dimensions)
    side = space.resolve(c.side)
    reward = parse_reward_spec(c.reward, side)
    instructions = load_prompts(c.prompts, limit=c.limit)
    return Plan(c, side, space, reward, instructions)


# -- pieces each phase calls (tested on their own) -------------------------------------------------


def step_prompt_indices(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Prompts of step ``step``: a stream of seeded shuffles, one per pass over the data, so any step's
    prompts are known without replaying the earlier steps (resumption needs this)."""
    orders: dict[int, list[int]] = {}
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n_prompts)
        if epoch not in orders:
            order = list(range(n_prompts))
            random.Random(batch_seed(seed, epoch)).shuffle(order)
            orders[epoch] = order
        out.append(orders[epoch][pos])
    return out


def response_mask(tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on response tokens up to and including the first end-of-sequence, 0 after it.

    Generation pads finished rows with the pad id, which is often the end-of-sequence id itself, so
    only the *first* end-of-sequence counts. # (B, T) -> (B, T) long
    """
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)).long()
    eos_before = is_eos.cumsum(1) - is_eos  # end-of-sequence tokens strictly before each position
    return (eos_before == 0).long()


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + T): prompt (left-padded) + response
    attention_mask: torch.Tensor  # (B, P + T): prompt mask + response mask
    response: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) float: 1 up to and including the first end-of-sequence
    finished: torch.Tensor  # (B,) bool: the response ended with end-of-sequence
    texts: list[str]  # decoded responses, end-of-sequence excluded


@torch.no_grad()
def rollout(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], eos_ids: list[int],
            *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
            autocast: bool = False) -> Rollout:
    """Sample one response per input text with ``model.generate``, stopping at any of ``eos_ids``."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # decoder-only batches are left-padded
    add_special = not getattr(tokenizer, "chat_template", None)  # chat text already holds its specials
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), fast_decode(model):
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             repetition_penalty=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_ids,
                             pad_token_id=pad_id)
    prompt_len = enc["input_ids"].shape[1]
    response = out[:, prompt_len:]  # (B, T)
    mask = response_mask(response, eos_ids)
    finished = torch.isin(response, torch.tensor(eos_ids, device=device)).any(1)
    lengths = mask.sum(1) - finished.long()  # tokens before the end-of-sequence
    decoded = [tokenizer.decode(response[i, : int(lengths[i])], skip_special_tokens=True).strip()
               for i in range(response.shape[0])]
    attention_mask = torch.cat([enc["attention_mask"], mask], 1)  # (B, P + T)
    return Rollout(out, attention_mask, response, mask.float(), finished, decoded)


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      n_response: int, temperature: float = 1.0, value_head: nn.Module | None = None,
                      entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probabilities of the last ``n_response`` tokens under ``model`` (B, T); with ``value_head``
    also the values of the states before each of them (B, T); with ``entropy`` the per-token entropy.

    Position ids follow the attention mask, as ``generate`` numbers left-padded prompts; only the
    response positions' logits are computed.
    """
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                logits_to_keep=n_response + 1, output_hidden_states=value_head is not None, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # (B, T, V): position j predicts token j + 1
    tokens = input_ids[:, -n_response:]  # (B, T)
    norm = torch.logsumexp(logits, -1)  # (B, T)
    logp = logits.gather(-1, tokens[..., None]).squeeze(-1) - norm
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1][:, -n_response - 1 : -1]  # (B, T, H)
        with torch.autocast(input_ids.device.type, enabled=False):  # values and returns stay float32
            values = value_head(hidden.float()).squeeze(-1)
    ent = None
    if entropy:
        with torch.no_grad():  # a metric: never part of the graph
            ent = norm.detach() - (torch.softmax(logits.detach(), -1) * logits.detach()).sum(-1)
    return logp, values, ent


def build_policy(base: PreTrainedModel, lora: LoraSpec, seed: int) -> Any:
    """Wrap ``base`` with a fresh LoRA adapter (lora_B is zero: the policy starts equal to the base)."""
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in base.named_modules()]
    targets = [t for t in lora.target_modules if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise ModelError(f"none of the LoRA target modules {list(lora.target_modules)} exist in this base "
                         "model; set lora.target_modules to its linear layers (e.g. q_proj,v_proj)")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                     task_type="CAUSAL_LM")
    return get_peft_model(base, cfg)


def save_adapter(model: Any, folder: Path) -> None:
    """``model``'s adapter as a standard peft folder, written whole or not at all (tmp, then rename).
    The base embeddings never change, so they are not saved with it."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), save_embedding_layers=False)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


class RLState:
    """What an RL loop over a LoRA policy trains and resumes: the adapter (and, for PPO, a value head
    on the last hidden state), AdamW over both, the running reward statistics and the KL controller.
    Shared by ``train-expert`` and ``train-pmorl``; a checkpoint holds all of it plus the step."""

    def __init__(self, model: Any, c: Any):
        self.model = model
        self.value_head: nn.Module | None = None
        if c.algorithm == "ppo":
            self.value_head = nn.Linear(model.config.hidden_size, 1).to(next(model.parameters()).device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.value_head is not None:
            self.params += list(self.value_head.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        self.stats = RunningMeanStd()
        self.kl_ctl = AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon)

    def normalize(self, score: torch.Tensor) -> torch.Tensor:
        """Fold this batch's scores into the running statistics, then return them normalised (float)."""
        self.stats.update(score)
        return self.stats.normalize(score).float()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.model).items()}
        if self.value_head is not None:
            state.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        result = set_peft_model_state_dict(self.model, lora)
        if not lora or getattr(result, "unexpected_keys", []):
            raise ModelError("the checkpoint's LoRA tensors do not fit this model; delete the checkpoint folder "
                             "to start over")
        if self.value_head is not None:
            self.value_head.load_state_dict({k[11:]: v for k, v in state.items() if k.startswith("value_head.")})

    def save_checkpoint(self, folder: Path, step: int, **extra: Any) -> None:
        save_checkpoint(folder, self.trainable_state(), self.opt,
                        {"step": step, "reward_stats": self.stats.state_dict(), "kl_coef": self.kl_ctl.value,
                         **extra})

    def resume(self, folder: Path) -> tuple[int, dict[str, Any]]:
        """Load the checkpoint in ``folder`` if there is one: (its step, its progress record), else (0, {})."""
        restored = load_checkpoint(folder, self.opt)
        if restored is None:
            return 0, {}
        state, progress = restored
        self.load_trainable_state(state)
        self.stats.load_state_dict(progress["reward_stats"])
        self.kl_ctl.value = float(progress["kl_coef"])
        return int(progress["step"]), progress

    def save(self, out: Path) -> None:
        """The adapter (``adapter/``) and, for PPO, the value head (``value_head.safetensors``)."""
        save_adapter(self.model, out / ADAPTER_DIR)
        if self.value_head is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()},
                      str(out / VALUE_HEAD))


def expert_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Final metrics of an RL run: reward at the start and the end, KL and length at the end, time."""
    return summarize_steps(rows, "train/reward_raw", first=["train/reward_raw"],
                           last=["train/reward_raw", "train/kl", "train/response_length"])


class KLGuard:
    """``kl_stop``: stop an RL run at the first step whose samples are more than ``limit`` nats from the
    base, and keep the policy that sampled the step before. Call :meth:`before` ahead of each rollout
    and :meth:`after` with the step's KL; when it returns a record, the kept policy is loaded and the
    run should end. With ``limit`` None it does nothing."""

    def __init__(self, rl: RLState, limit: float | None):
        self.rl, self.limit = rl, limit
        self.sampler: dict[str, torch.Tensor] | None = None  # the policy sampling this step
        self.kept: dict[str, torch.Tensor] | None = None  # the last one whose samples were within limit

    def before(self) -> None:
        if self.limit is not None:
            self.sampler = {k: v.detach().clone() for k, v in self.rl.trainable_state().items()}

    def after(self, step: int, kl: float) -> dict[str, Any] | None:
        if self.limit is None:
            return None
        if kl <= self.limit:
            self.kept = self.sampler
            return None
        if self.kept is not None:
            self.rl.load_trainable_state(self.kept)
        return {"step": step, "kl": kl, "kl_stop": self.limit,
                "kept_step": step - 1 if self.kept is not None else step}


def stopped_summary(rows: list[dict[str, Any]], stopped: dict[str, Any] | None) -> dict[str, float]:
    """:func:`expert_summary`, of the kept policy's steps when a :class:`KLGuard` stopped the run
    (the train time still counts every step)."""
    final = expert_summary(rows)
    if stopped is None:
        return final
    kept = [r for r in rows if r.get("step", 0) <= stopped["kept_step"]] or rows
    return {**expert_summary(kept), "time/train_seconds": final["time/train_seconds"]}


def single_pass(model: nn.Module, c: TrainExpertConfig, n: int) -> bool:
    """True when the update is one step on the whole batch with a critic-free loss and no dropout:
    the gradient pass then sees exactly the parameters and inputs the old log-probs would, so its own
    log-probs (detached) serve as the old ones and one forward pass of three is saved."""
    return (c.algorithm != "ppo" and c.ppo_epochs == 1 and (c.minibatch_size or n) >= n
            and not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()))


def rl_update(state: RLState, ro: Rollout, score_n: torch.Tensor, c: TrainExpertConfig) -> dict[str, float]:
    """reference log-probs -> KL penalty -> advantages -> loss -> step, for one batch of rollouts whose
    normalised scores are ``score_n`` (N,). Shared by train-expert and train-pmorl."""
    model, value_head, opt, params, kl_ctl = state.model, state.value_head, state.opt, state.params, state.kl_ctl
    device = score_n.device
    n, t = ro.response.shape
    mask = ro.mask  # (N, T)
    g = c.group_size

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if c.autocast_bf16 else nullcontext()

    # -- the sampling policy's log-probs, and the reference's: the same model with the adapter disabled
    single = single_pass(model, c, n)
    if single:  # one update on the whole batch: its forward pass gives the old log-probs too
        model.train()
        with autocast():
            logp, _, entropy = response_logprobs(model, ro.input_ids, ro.attention_mask, t, c.temperature,
                                                 entropy=True)
        old_logp, old_values = logp.detach(), None
    with torch.no_grad(), autocast():
        if not single:
            old_logp, old_values, entropy = response_logprobs(model, ro.input_ids, ro.attention_mask, t,
                                                                 c.temperature, value_head, entropy=True)
        with model.disable_adapter():
            ref_logp, _, _ = response_logprobs(model, ro.input_ids, ro.attention_mask, t, c.temperature)

    # -- KL penalty
    kl = kl_per_token(old_logp, ref_logp, c.kl_estimator) * mask  # (N, T)
    seq_kl = kl.sum(1)  # (N,)
    beta = kl_ctl.value if c.adaptive_kl else c.kl_coef

    # -- advantages
    if c.algorithm == "ppo":
        rewards = -beta * kl  # (N, T)
        last = (mask.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(n, device=device), last] += score_n
        advantages, returns = gae_advantages(rewards, old_values, mask, c.gamma, c.lam)
        advantages = masked_whiten(advantages, mask)
    else:
        advantages = group_advantages(score_n - beta * seq_kl, g, c.algorithm)  # (N,)
        returns = None

    # -- loss and step: ppo_epochs passes over the batch in minibatches
    model.train()
    sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0}
    updates = 0
    for _ in range(c.ppo_epochs):
        for sel in torch.randperm(n, device=device).split(c.minibatch_size or n):
            if single:
                sel, values = torch.arange(n, device=device), None  # the forward pass above, in order
            else:
                with autocast():
                    logp, values, _ = response_logprobs(model, ro.input_ids[sel], ro.attention_mask[sel], t,
                                                           c.temperature, value_head)
            if c.algorithm == "ppo":
                pl, info = ppo_policy_loss(logp, old_logp[sel], advantages[sel], mask[sel], c.clip_range)
                vl = ppo_value_loss(values, old_values[sel], returns[sel], mask[sel], c.value_clip_range)
                loss = pl + c.vf_coef * vl
                sums["value_loss"] += vl.item()
            else:
                pl, info = sequence_policy_loss(logp, old_logp[sel], advantages[sel], mask[sel], c.clip_range)
                loss = pl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            opt.step()
            sums["loss"] += loss.item()
            sums["policy_loss"] += pl.item()
            sums["clipfrac"] += info["clipfrac"]
            updates += 1
    if c.adaptive_kl:
        kl_ctl.update(float(seq_kl.mean()), n)
    return {
        "train/reward_total": float((score_n - beta * seq_kl).mean()),
        "train/kl": float(seq_kl.mean()),
        "train/kl_coef": beta,
        "train/entropy": float(masked_mean(entropy, mask)),
        **{f"train/{k}": v / updates for k, v in sums.items() if c.algorithm == "ppo" or k != "value_loss"},
    }


def main(cfg: TrainExpertConfig) -> dict[str, float]:
    plan = validate(cfg)  # before any model loads
    c, side = plan.cfg, plan.side
    out = prepare_run_dir(cfg.output_dir, cfg)
    logger = MetricsLogger(out)
    if (out / EXPERT_JSON).is_file() and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file():
        return json.loads((out / EXPERT_JSON).read_text()).get("metrics", {})

    # -- model: the policy is the base with a LoRA adapter; the reference is the same with it disabled
    from personalign.models import load_model
    from personalign.reward_model import base_fingerprint
    from personalign.rewards import reward_from_spec

    base, tok = load_model(c.model, device=c.device, dtype=c.dtype)
    fingerprint = base_fingerprint(base)
    model = build_policy(base, c.lora, c.seed)
    device = next(model.parameters()).device
    rl = RLState(model, c)
    reward_fn = reward_from_spec(plan.reward, side, device=c.device, dtype=c.dtype)
    eos = eos_token_ids(base, tok)
    preference = plan.space.parse(side)
    policy_texts = build_prompts(tok, [it.prompt for it in plan.instructions], preference, Method.PROMPT)

    # -- resume: a killed run continues from its last checkpoint; the metrics after it are redone
    ckpt = out / "checkpoint"
    step, _ = rl.resume(ckpt)
    logger.truncate(step)

    bar = None
    if c.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=step, desc=f"train-expert {side} ({c.algorithm})", unit="step")

    g = c.group_size
    n = c.batch_prompts * g
    guard = KLGuard(rl, c.kl_stop)
    stopped: dict[str, Any] | None = None
    while step < c.steps:
        t0 = time.perf_counter()
        guard.before()
        torch.manual_seed(batch_seed(c.seed, step))
        prompt_ids = step_prompt_indices(len(policy_texts), c.batch_prompts, step, c.seed)
        idx = [i for i in prompt_ids for _ in range(g)]  # a prompt's samples are consecutive (groups)

        # -- rollout: sample with the adapter enabled, stop at end-of-sequence
        model.eval()
        ro = rollout(model, tok, [policy_texts[i] for i in idx], eos, max_new_tokens=c.max_new_tokens,
                     temperature=c.temperature, top_p=c.top_p, autocast=c.autocast_bf16)
        mask = ro.mask  # (N, T)

        # -- score: the reward function on the decoded text, normalised by running statistics
        raw = reward_fn([plan.instructions[i].prompt for i in idx], ro.texts).to(device)  # (N,)
        score = raw - c.missing_eos_penalty * (~ro.finished).float()
        score_n = rl.normalize(score)  # (N,)

        # -- reference log-probs -> KL penalty -> advantages -> loss -> step
        update = rl_update(rl, ro, score_n, c)
        step += 1

        # -- log
        seconds = time.perf_counter() - t0
        metrics = {
            "train/reward_raw": float(raw.mean()),
            "train/reward": float(score_n.mean()),
            **update,
            "train/response_length": float(mask.sum(1).mean()),
            "train/truncated": float((~ro.finished).float().mean()),
            "train/lr": c.lr,
            "time/step_seconds": seconds,
            "time/samples_per_second": n / seconds,
        }
        logger.log(step, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['train/reward_raw']:.3f}", kl=f"{metrics['train/kl']:.3f}")

        # -- guard: a policy that left the base by more than kl_stop is not kept
        stopped = guard.after(step, metrics["train/kl"])
        if stopped is not None:
            break

        # -- checkpoint
        if step % c.checkpoint_every == 0 and step < c.steps:
            rl.save_checkpoint(ckpt, step)
    if bar is not None:
        bar.close()

    # -- save: a standard peft adapter folder, the value head (ppo), then expert.json last
    final = stopped_summary(logger.read(), stopped)
    if stopped is not None and c.progress:
        print(f"train-expert {side}: step {stopped['step']} sampled {stopped['kl']:.2f} nats from the base "
              f"(kl_stop {c.kl_stop}); keeping the policy of step {stopped['kept_step']}", file=sys.stderr)
    rl.save(out)
    doc = {
        "kind": "expert",
        "side": side,
        "side_name": plan.space.sides[side].name,
        "policy_prompt": preference.prompt(),
        "base": fingerprint,
        "adapter": ADAPTER_DIR,
        "algorithm": c.algorithm,
        "reward": str(plan.reward),
        "config": to_dict(c),
        "metrics": final,
        **({"stopped": stopped} if stopped is not None else {}),
    }
    (out / EXPERT_JSON).write_text(json.dumps(doc, indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    return final
