"""Reinforcement learning of a LoRA policy against a reward: the pieces train-expert and train-pmorl share.

One step is ``rollout -> score (the recipe's) -> reference log-probs -> KL penalty -> advantages -> loss
-> step``; :func:`rollout` samples with the one decode loop (:mod:`personalign.generation`),
:func:`rl_update` does everything after the score, :class:`RLState` holds what trains and resumes, and
:class:`KLGuard` ends a run whose policy leaves the base too far. The losses themselves are in
:mod:`personalign.losses`.

The RL settings (``algorithm``, ``lr``, ``group_size``, ``kl_coef`` ...) are fields that the recipes'
configs share (:class:`RLSettings`); :func:`resolve_defaults` fills the per-algorithm defaults and
:func:`check_settings` checks them before any model loads.

Why one file of about 480 lines: one RL step, rollout to optimizer step, with the state it trains and
resumes; the losses themselves are in :mod:`personalign.losses`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import nn

from personalign.checkpoint import load_checkpoint, save_checkpoint
from personalign.config import finite, require
from personalign.distributed import Dist
from personalign.errors import ModelError
from personalign.generation import batch_seed
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
from personalign.runlog import summarize_steps

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from personalign.reward_model import LoraSpec

ALGORITHMS = ("rloo", "grpo", "ppo")
KL_ESTIMATORS = ("k1", "k3")
ADAPTER_DIR = "adapter"
VALUE_HEAD = "value_head.safetensors"
EXPERT_JSON = "expert.json"



class RLSettings(Protocol):
    """The RL fields a recipe's config carries (train-expert's and train-pmorl's, with the same defaults)."""

    algorithm: str
    lora: LoraSpec
    lr: float | None
    weight_decay: float
    steps: int
    batch_prompts: int
    group_size: int
    ppo_epochs: int | None
    minibatch_size: int | None
    kl_coef: float | None
    ontopic_coef: float
    repeat_coef: float
    adaptive_kl: bool | None
    kl_target: float
    kl_horizon: int
    kl_stop: float | None
    kl_estimator: str
    clip_range: float
    value_clip_range: float
    vf_coef: float
    gamma: float
    lam: float
    max_grad_norm: float
    max_new_tokens: int
    temperature: float
    top_p: float
    missing_eos_penalty: float
    checkpoint_every: int
    autocast_bf16: bool


S = TypeVar("S")

# commonly needs about ten times a full fine-tune's rate (1e-4 to 2e-4 for supervised LoRA); RL
# gradients are noisier and the offline rewards can be gamed, so rloo/grpo start at half of that,
# with the KL penalty as the brake. PPO keeps the paper's 1.4e-5.
DEFAULT_LR = {"rloo": 5e-5, "grpo": 5e-5, "ppo": 1.4e-5}
DEFAULT_EPOCHS = {"rloo": 1, "grpo": 1, "ppo": 8}
DEFAULT_KL = {"rloo": 0.05, "grpo": 0.05, "ppo": 0.2}


def resolve_defaults(cfg: S) -> S:
    """``cfg`` with the per-algorithm defaults (None fields) filled in."""
    require(cfg.algorithm in ALGORITHMS, "algorithm", cfg.algorithm, f"one of {', '.join(ALGORITHMS)}")
    a = cfg.algorithm
    return dataclasses.replace(
        cfg,
        lr=DEFAULT_LR[a] if cfg.lr is None else cfg.lr,
        ppo_epochs=DEFAULT_EPOCHS[a] if cfg.ppo_epochs is None else cfg.ppo_epochs,
        kl_coef=DEFAULT_KL[a] if cfg.kl_coef is None else cfg.kl_coef,
        adaptive_kl=(a == "ppo") if cfg.adaptive_kl is None else cfg.adaptive_kl,
    )


def check_settings(c: RLSettings) -> None:
    """Check the RL fields of a config whose per-algorithm defaults are filled in; load nothing."""
    require(c.algorithm in ALGORITHMS, "algorithm", c.algorithm, f"one of {', '.join(ALGORITHMS)}")
    require(finite(c.lr) and c.lr > 0, "lr", c.lr, "a positive number (e.g. lr=5e-5)")
    require(finite(c.weight_decay) and c.weight_decay >= 0, "weight_decay", c.weight_decay, "a number >= 0")
    require(c.steps >= 1, "steps", c.steps, "at least 1")
    require(c.batch_prompts >= 1, "batch_prompts", c.batch_prompts, "at least 1")
    if c.algorithm in ("rloo", "grpo"):
        require(c.group_size >= 2, "group_size", c.group_size,
                 f"at least 2 for {c.algorithm}, which compares samples of the same prompt "
                 "(e.g. group_size=4, or algorithm=ppo)")
    else:
        require(c.group_size >= 1, "group_size", c.group_size, "at least 1")
    n = c.batch_prompts * c.group_size
    require(c.ppo_epochs >= 1, "ppo_epochs", c.ppo_epochs, "at least 1")
    require(c.minibatch_size is None or 1 <= c.minibatch_size <= n, "minibatch_size", c.minibatch_size,
             f"between 1 and the samples per step ({n} = batch_prompts x group_size), or null for all")
    require(finite(c.kl_coef) and c.kl_coef >= 0, "kl_coef", c.kl_coef, "a number >= 0")
    require(c.kl_estimator in KL_ESTIMATORS, "kl_estimator", c.kl_estimator,
             f"one of {', '.join(KL_ESTIMATORS)}")
    require(finite(c.kl_target) and c.kl_target > 0, "kl_target", c.kl_target, "a positive number")
    require(c.kl_stop is None or (finite(c.kl_stop) and c.kl_stop > 0), "kl_stop", c.kl_stop,
             "a positive number of nats, or unset for no guard")
    require(c.kl_horizon >= 1, "kl_horizon", c.kl_horizon, "at least 1")
    for name in ("clip_range", "value_clip_range", "max_grad_norm"):
        v = getattr(c, name)
        require(finite(v) and v > 0, name, v, "a positive number")
    require(finite(c.vf_coef) and c.vf_coef >= 0, "vf_coef", c.vf_coef, "a number >= 0")
    require(finite(c.gamma) and 0 < c.gamma <= 1, "gamma", c.gamma, "in (0, 1]")
    require(finite(c.lam) and 0 <= c.lam <= 1, "lam", c.lam, "in [0, 1]")
    require(c.max_new_tokens >= 1, "max_new_tokens", c.max_new_tokens, "at least 1")
    require(finite(c.temperature) and 0 < c.temperature <= 10, "temperature", c.temperature,
             "in (0, 10] (RL needs sampling; 1.0 is the paper's)")
    require(finite(c.top_p) and 0 < c.top_p <= 1, "top_p", c.top_p, "in (0, 1]")
    require(finite(c.missing_eos_penalty) and c.missing_eos_penalty >= 0, "missing_eos_penalty",
             c.missing_eos_penalty, "a number >= 0")
    require(finite(c.ontopic_coef) and c.ontopic_coef >= 0, "ontopic_coef", c.ontopic_coef,
             "a finite number >= 0 (0: question coverage only logged)")
    require(finite(c.repeat_coef) and c.repeat_coef >= 0, "repeat_coef", c.repeat_coef,
             "a finite number >= 0 (0: the share of repeated 3-grams only logged)")
    require(c.checkpoint_every >= 1, "checkpoint_every", c.checkpoint_every, "at least 1")
    require(c.lora.r >= 1, "lora.r", c.lora.r, "at least 1")
    require(finite(c.lora.alpha) and c.lora.alpha > 0, "lora.alpha", c.lora.alpha, "a positive number")
    require(finite(c.lora.dropout) and 0 <= c.lora.dropout < 1, "lora.dropout", c.lora.dropout, "in [0, 1)")
    require(len(c.lora.target_modules) > 0, "lora.target_modules", list(c.lora.target_modules),
             "a non-empty list such as q_proj,v_proj")


# -- pieces each phase calls (tested on their own) -------------------------------------------------


def shape_scores(score_n: torch.Tensor, coverage: torch.Tensor, repetition: torch.Tensor,
                 c: RLSettings) -> torch.Tensor:
    """The score an update sees: the normalised reward, plus ``ontopic_coef`` x each sample's question
    coverage (0-1), minus ``repeat_coef`` x its share of word 3-grams that repeat an earlier one (0-1), both
    in reward standard deviations. The repetition term makes a looping answer pay for each repeat, which a
    reward that counts list lines or question words would otherwise pay for."""
    if c.ontopic_coef:
        score_n = score_n + c.ontopic_coef * coverage
    if c.repeat_coef:
        score_n = score_n - c.repeat_coef * repetition
    return score_n


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


def rollout(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], eos_ids: list[int],
            *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
            autocast: bool = False, generator: torch.Generator | None = None,
            seeds: list[int] | None = None, all_done: Any = None) -> Rollout:
    """Sample one response per input text (no repetition penalty), stopping at any of ``eos_ids``.

    ``seeds``: one per text, each row drawing from its own generator, so a sample does not depend on
    which other texts share its batch (the recipes seed each sample by its index in the global batch,
    and any number of processes then draws the same samples). Otherwise ``generator``, or with None
    torch's global generator. ``all_done``: decoding in lockstep with other processes (FSDP, see
    :func:`personalign.generation.decode_steps`).
    """
    from personalign.generation import ModelStep, SamplingConfig, decode, encode_batch, pad_token_id

    device = next(model.parameters()).device
    if seeds is not None:
        if len(seeds) != len(texts):
            raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts; give one per text")
        generator = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    ids, prompt_mask = encode_batch(tokenizer, texts, device)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              repetition_penalty=1.0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = decode(ModelStep(model), ids, prompt_mask, sampling, eos=eos_ids,
                     pad=pad_token_id(tokenizer, eos_ids), generator=generator, all_done=all_done)
    response = out.tokens  # (B, T) pad after a row's end-of-sequence
    mask = response_mask(response, eos_ids)
    finished = torch.isin(response, torch.tensor(eos_ids, device=device)).any(1)
    lengths = mask.sum(1) - finished.long()  # tokens before the end-of-sequence
    decoded = [tokenizer.decode(response[i, : int(lengths[i])], skip_special_tokens=True).strip()
               for i in range(response.shape[0])]
    attention_mask = torch.cat([prompt_mask, mask], 1)  # (B, P + T)
    return Rollout(torch.cat([ids, response], 1), attention_mask, response, mask.float(), finished, decoded)


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
    Shared by ``train-expert`` and ``train-pmorl``; a checkpoint holds all of it plus the step.

    ``dist``: the data-parallel processes (:mod:`personalign.distributed`); each holds its slice of
    every batch, and only the main one writes."""

    def __init__(self, model: Any, c: Any, dist: Dist | None = None):
        self.model = model
        self.dist = dist or Dist()
        self.value_head: nn.Module | None = None
        if c.algorithm == "ppo":
            self.value_head = nn.Linear(model.config.hidden_size, 1).to(next(model.parameters()).device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.value_head is not None:
            self.params += list(self.value_head.parameters())
        self.dist.broadcast(self.params)  # equal on every process from the start (they are seeded alike)
        self.opt = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        self.stats = RunningMeanStd()
        self.kl_ctl = AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon)

    def normalize(self, score: torch.Tensor) -> torch.Tensor:
        """Fold this batch's scores (every process's) into the running statistics, then return this
        process's normalised (float)."""
        self.stats.update(self.dist.gather(score))
        return self.stats.normalize(score).float()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        # LoRA tensors only: the base weights of an adapted output layer never change (and under FSDP
        # they are sharded)
        lora = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        state = {f"lora.{k}": v for k, v in lora.items()}
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
        """Written by the main process (every process holds the same state); the others wait for it."""
        if self.dist.is_main:
            save_checkpoint(folder, self.trainable_state(), self.opt,
                            {"step": step, "reward_stats": self.stats.state_dict(), "kl_coef": self.kl_ctl.value,
                             **extra})
        self.dist.barrier()

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
        """The adapter (``adapter/``) and, for PPO, the value head (``value_head.safetensors``); by the
        main process, the others waiting for it."""
        if self.dist.is_main:
            save_adapter(self.model, out / ADAPTER_DIR)
            if self.value_head is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()},
                          str(out / VALUE_HEAD))
        self.dist.barrier()


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


def single_pass(model: nn.Module, c: RLSettings, n: int) -> bool:
    """True when the update is one step on the whole batch with a critic-free loss and no dropout:
    the gradient pass then sees exactly the parameters and inputs the old log-probs would, so its own
    log-probs (detached) serve as the old ones and one forward pass of three is saved."""
    return (c.algorithm != "ppo" and c.ppo_epochs == 1 and (c.minibatch_size or n) >= n
            and not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()))


def rl_update(state: RLState, ro: Rollout, score_n: torch.Tensor, c: RLSettings, first: int = 0,
              total: int | None = None) -> dict[str, float]:
    """reference log-probs -> KL penalty -> advantages -> loss -> step, for one batch of rollouts whose
    normalised scores are ``score_n`` (N,). Shared by train-expert and train-pmorl.

    Data-parallel (``state.dist`` active): this process holds samples ``first .. first + N`` of a
    global batch of ``total`` (whole groups); minibatches are drawn over the global batch, each
    process's loss is its share of the global token mean, and the gradients are summed, so the step
    is the one-process step on the global batch. The returned metrics are the global batch's."""
    model, value_head, opt, params, kl_ctl = state.model, state.value_head, state.opt, state.params, state.kl_ctl
    dist = state.dist
    all_sum = dist.all_sum if dist.active else None
    device = score_n.device
    n, t = ro.response.shape
    total = n if total is None else total
    mask = ro.mask  # (N, T)
    g = c.group_size

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if c.autocast_bf16 else nullcontext()

    # -- the sampling policy's log-probs, and the reference's: the same model with the adapter disabled
    single = single_pass(model, c, total)
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
        advantages = masked_whiten(advantages, mask, all_sum=all_sum)
    else:
        advantages = group_advantages(score_n - beta * seq_kl, g, c.algorithm)  # (N,)
        returns = None

    # -- loss and step: ppo_epochs passes over the (global) batch in minibatches
    model.train()
    sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0}
    updates = 0
    for _ in range(c.ppo_epochs):
        for global_sel in torch.randperm(total, device=device).split(c.minibatch_size or total):
            if single:
                sel = torch.arange(n, device=device)  # the forward pass above, in order
            else:  # this process's samples of the minibatch
                mine = (global_sel >= first) & (global_sel < first + n)
                sel = global_sel[mine] - first
            # this process's share of the minibatch's token mean: its tokens over every process's
            tokens = mask[sel].sum()
            weight = tokens / dist.all_sum(tokens).clamp(min=1) if dist.active else 1.0
            if len(sel) == 0 and dist.fsdp is not None:  # lockstep: a pass on one sample, with weight 0
                sel = torch.zeros(1, dtype=torch.long, device=device)
            opt.zero_grad(set_to_none=True)
            if len(sel) > 0:
                if not single:
                    with autocast():
                        logp, values, _ = response_logprobs(model, ro.input_ids[sel], ro.attention_mask[sel], t,
                                                               c.temperature, value_head)
                if c.algorithm == "ppo":
                    pl, info = ppo_policy_loss(logp, old_logp[sel], advantages[sel], mask[sel], c.clip_range)
                    vl = ppo_value_loss(values, old_values[sel], returns[sel], mask[sel], c.value_clip_range)
                    loss = pl + c.vf_coef * vl
                else:
                    pl, info = sequence_policy_loss(logp, old_logp[sel], advantages[sel], mask[sel], c.clip_range)
                    vl = torch.zeros(())
                    loss = pl
                (loss * weight).backward()
                parts = torch.stack([loss.detach().float().cpu(), pl.detach().float().cpu(),
                                     vl.detach().float().cpu(), torch.tensor(info["clipfrac"])])
            else:  # none of this process's samples in the minibatch: it adds zero gradients
                parts = torch.zeros(4)
            dist.sum_grads(params)
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            opt.step()
            if dist.active:
                parts = dist.all_sum((parts * float(weight)).to(device)).cpu()
            sums["loss"] += float(parts[0])
            sums["policy_loss"] += float(parts[1])
            sums["value_loss"] += float(parts[2])
            sums["clipfrac"] += float(parts[3])
            updates += 1
    objective = dist.gather(score_n - beta * seq_kl)  # (total,)
    seq_kl_all = dist.gather(seq_kl)
    if c.adaptive_kl:
        kl_ctl.update(float(seq_kl_all.mean()), total)
    return {
        "train/reward_total": float(objective.mean()),
        "train/kl": float(seq_kl_all.mean()),
        "train/kl_coef": beta,
        "train/entropy": float(masked_mean(entropy, mask, all_sum=all_sum)),
        **{f"train/{k}": v / updates for k, v in sums.items() if c.algorithm == "ppo" or k != "value_loss"},
    }
