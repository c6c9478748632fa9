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

Determinism and resumption: each sample is drawn from its own generator, seeded by (seed, step, its
index in the step's batch); torch is reseeded from (seed, step) for the rest of the step (minibatch
order, dropout), and the prompts of a step come from a seeded shuffle per pass over the data, so
step s does the same work whether or not the run was interrupted.

Data parallel (under ``torchrun`` or ``accelerate launch``, see docs/distributed.md): each process
takes a contiguous slice of the step's prompts (whole groups), samples and scores them, and the
update sums the gradients over processes (:func:`rl_update`), so the step is the one-process step
on the same global batch (``batch_prompts`` is the global count) and the same samples are drawn.
Only the main process writes the run folder. Under FSDP (an accelerate FSDP config) the frozen base
weights are sharded over the processes; every process then decodes until every process's samples are
finished, and runs a pass with weight 0 on a minibatch that holds none of its samples. Every
``checkpoint_every`` steps the checkpoint holds the LoRA and value-head tensors, the AdamW state,
the RNG, the reward statistics, the KL coefficient and the step; running the same command again
resumes from it, dropping metrics lines written after it.

Run folder: ``config.json``, ``metrics.jsonl``, ``checkpoint/`` while training; at the end
``adapter/`` (a standard peft folder: ``adapter_config.json`` + ``adapter_model.safetensors``),
``value_head.safetensors`` (ppo only, to continue training) and ``expert.json`` (side, base model,
config, final metrics), written last.

Metrics per step: ``train/reward_raw`` (mean reward-function output), ``train/reward`` (mean
normalised score), ``train/reward_total`` (normalised score minus the KL penalty: the objective),
``train/kl`` (mean over samples of the summed per-token KL), ``train/kl_coef``, ``train/loss``,
``train/policy_loss``, ``train/value_loss`` (ppo), ``train/clipfrac``, ``train/entropy`` (mean
per-token entropy of the sampling distribution), ``train/coverage`` (mean share of the question's content
words the samples use, :func:`personalign.judges.offline.question_coverage`: a drift monitor, and with
``ontopic_coef`` > 0 part of the score), ``train/repetition_3`` (mean share of each sample's word
3-grams that repeat an earlier one: a loop monitor, and with ``repeat_coef`` > 0 part of the score),
``train/response_length`` (tokens, end-of-sequence
included), ``train/truncated`` (share of samples that hit ``max_new_tokens``), ``train/lr``,
``time/step_seconds``, ``time/samples_per_second``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personalign.config import to_dict
from personalign.distributed import init as init_distributed
from personalign.errors import ConfigError
from personalign.generation import batch_seed, eos_token_ids
from personalign.judges.offline import question_coverage
from personalign.personalize import Method, build_prompts
from personalign.report import repeated_trigram_shares
from personalign.reward_model import LoraSpec
from personalign.rl import (
    ADAPTER_DIR,
    EXPERT_JSON,
    KLGuard,
    RLState,
    build_policy,
    check_settings,
    resolve_defaults,
    rl_update,
    rollout,
    shape_scores,
    step_prompt_indices,
    stopped_summary,
)
from personalign.runlog import MetricsLogger, prepare_run_dir

if TYPE_CHECKING:

    from personalign.data import Instruction
    from personalign.preferences import PreferenceSpace
    from personalign.rewards import RewardSpec


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
    # Added to each sample's normalised score times its question coverage (0-1, the share of the
    # question's content words it uses): a pull back to the question, in reward standard deviations.
    # 0 (default): coverage is only logged.
    ontopic_coef: float = 0.0
    # Subtracted from each sample's normalised score times its share of word 3-grams that repeat an
    # earlier one of the same sample (0-1; personalign.report.repeated_trigram_shares): a loop pays for
    # its repeats. 0 (default): the share is only logged (train/repetition_3).
    repeat_coef: float = 0.0
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

    c = resolve_defaults(cfg)
    check_settings(c)
    if c.lora.top_layers is not None:
        raise ConfigError(f"lora.top_layers must be null for a policy adapter (it applies to reward models "
                          f"only), got {c.lora.top_layers!r}")
    resolve_dtype(c.dtype, resolve_device(c.device))  # raises ModelError naming the value

    space = load_space(c.dimensions)
    side = space.resolve(c.side)
    reward = parse_reward_spec(c.reward, side)
    instructions = load_prompts(c.prompts, limit=c.limit)
    return Plan(c, side, space, reward, instructions)



def main(cfg: TrainExpertConfig) -> dict[str, float]:
    plan = validate(cfg)  # before any model loads
    c, side = plan.cfg, plan.side
    dist = init_distributed(c.device)  # one process unless a launcher started several
    dist.require_per_process(c.batch_prompts, "batch_prompts", "prompt")
    if dist.is_main:
        prepare_run_dir(cfg.output_dir, cfg)
    dist.barrier()
    out = Path(cfg.output_dir)
    logger = MetricsLogger(out)
    if (out / EXPERT_JSON).is_file() and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file():
        return json.loads((out / EXPERT_JSON).read_text()).get("metrics", {})
    device_name = dist.resolve_device(c.device)

    # -- model: the policy is the base with a LoRA adapter; the reference is the same with it disabled
    from personalign.models import load_model
    from personalign.reward_model import base_fingerprint
    from personalign.rewards import reward_from_spec

    load_device, load_dtype = dist.load_place(c.device, c.dtype)
    base, tok = load_model(c.model, device=load_device, dtype=load_dtype)
    fingerprint = base_fingerprint(base)
    model = build_policy(base, c.lora, c.seed)
    dist.shard_frozen(model)  # FSDP only: the base weights sharded over the processes, the LoRA whole
    device = next(model.parameters()).device
    rl = RLState(model, c, dist)
    reward_fn = reward_from_spec(plan.reward, side, device=device_name, dtype=c.dtype)
    eos = eos_token_ids(base, tok)
    preference = plan.space.parse(side)
    policy_texts = build_prompts(tok, [it.prompt for it in plan.instructions], preference, Method.PROMPT)

    # -- resume: a killed run continues from its last checkpoint; the metrics after it are redone
    ckpt = out / "checkpoint"
    step, _ = rl.resume(ckpt)
    if dist.is_main:
        logger.truncate(step)

    bar = None
    if c.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=step, desc=f"train-expert {side} ({c.algorithm})", unit="step")

    g = c.group_size
    n = c.batch_prompts * g  # samples per step, over every process
    first_prompt, stop_prompt = dist.shard(c.batch_prompts)  # this process's prompts of each step
    first = first_prompt * g  # index of this process's first sample in the step's batch
    guard = KLGuard(rl, c.kl_stop)
    stopped: dict[str, Any] | None = None
    while step < c.steps:
        t0 = time.perf_counter()
        guard.before()
        step_seed = batch_seed(c.seed, step)
        torch.manual_seed(step_seed)
        prompt_ids = step_prompt_indices(len(policy_texts), c.batch_prompts, step, c.seed)
        prompt_ids = prompt_ids[first_prompt:stop_prompt]
        idx = [i for i in prompt_ids for _ in range(g)]  # a prompt's samples are consecutive (groups)

        # -- rollout: sample with the adapter enabled, stop at end-of-sequence; each sample seeded by
        # its index in the step's batch, so the samples do not depend on how the batch is split
        model.eval()
        ro = rollout(model, tok, [policy_texts[i] for i in idx], eos, max_new_tokens=c.max_new_tokens,
                     temperature=c.temperature, top_p=c.top_p, autocast=c.autocast_bf16,
                     seeds=[batch_seed(step_seed, first + j) for j in range(len(idx))], all_done=dist.all_done)
        mask = ro.mask  # (N, T)

        # -- score: the reward function on the decoded text, normalised by running statistics
        asked = [plan.instructions[i].prompt for i in idx]
        raw = reward_fn(asked, ro.texts).to(device)  # (N,)
        score = raw - c.missing_eos_penalty * (~ro.finished).float()
        score_n = rl.normalize(score)  # (N,)
        coverage = torch.tensor(question_coverage(asked, ro.texts), dtype=score_n.dtype, device=device)  # (N,)
        repetition = torch.tensor(repeated_trigram_shares(ro.texts), dtype=score_n.dtype, device=device)  # (N,)
        score_n = shape_scores(score_n, coverage, repetition, c)

        # -- reference log-probs -> KL penalty -> advantages -> loss -> step
        update = rl_update(rl, ro, score_n, c, first, n)
        step += 1

        # -- log: the global batch's numbers
        seconds = time.perf_counter() - t0
        metrics = {
            "train/reward_raw": float(dist.gather(raw).mean()),
            "train/reward": float(dist.gather(score_n).mean()),
            "train/coverage": float(dist.gather(coverage).mean()),
            "train/repetition_3": float(dist.gather(repetition).mean()),
            **update,
            "train/response_length": float(dist.gather(mask.sum(1)).mean()),
            "train/truncated": float(dist.gather((~ro.finished).float()).mean()),
            "train/lr": c.lr,
            "time/step_seconds": seconds,
            "time/samples_per_second": n / seconds,
        }
        if dist.is_main:
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
    dist.barrier()  # every metrics line is written
    final = stopped_summary(logger.read(), stopped)
    if stopped is not None and c.progress and dist.is_main:
        print(f"train-expert {side}: step {stopped['step']} sampled {stopped['kl']:.2f} nats from the base "
              f"(kl_stop {c.kl_stop}); keeping the policy of step {stopped['kept_step']}", file=sys.stderr)
    rl.save(out)
    if not dist.is_main:
        return final
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

