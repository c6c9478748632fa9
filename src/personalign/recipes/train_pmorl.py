"""Recipe: the P-MORL baseline of Personalized Soups: ONE LoRA policy trained by RL on prompts that carry
a whole combination of sides, against the mean of those sides' rewards.

config -> main(cfg) -> validate (before any model loads) -> load base + LoRA -> resume -> per step:
rollout (each prompt with a random combination) -> score (each response on its own combination's
sides) -> reference log-probs -> KL penalty -> advantages -> loss -> step -> log -> checkpoint; at the
end: save the adapter and ``expert.json``.

Prompts. Every step draws ``batch_prompts`` instructions (the same seeded stream as train-expert) and,
for each, one combination uniformly at random from ``space.combinations(sides)`` (one side per
dimension: the benchmark's eight by default). The policy sees the instruction with the combination's
prompts joined in dimension order (``Preference.prompt``), the wording used everywhere else; the
``group_size`` samples of a prompt share its combination, so group baselines compare like with like.

Reward. Each sample is scored by :class:`personalign.rewards.CombinedReward` over the sides of ITS
combination, on the instruction and the sampled RESPONSE (the reference code scored the prompt alone).
Each side's reward is normalised by one running mean/std per side, shared by every combination that
contains the side, so no side wins by its raw scale; the combination's reward is the mean of its
sides' normalised rewards. That mean then goes through the same running normalisation as
train-expert's score (so ``kl_coef`` means the same in both recipes) before the KL penalty.
Per-side reward sources: ``reward`` for every side (``offline``, a multi-head ``rm:PATH`` scoring them
all, loaded once) and ``rewards`` for per-side overrides (``rewards.P1A=rm:runs/rm/P1A``).

Algorithms, hyper-parameters, defaults, validation, rollouts, log-probabilities, the KL reference
(the adapter disabled) and determinism are train-expert's, shared through :mod:`personalign.rl`: the RL
fields (:class:`~personalign.rl.RLSettings`) are repeated here with the same defaults and checked by
:func:`~personalign.rl.check_settings`, and the same rollout and update run; each sample is drawn
from its own generator, seeded by (seed, step, its index in the step's batch). Resumption is exact:
the checkpoint holds the LoRA (and value head), the optimizer, the RNG, the per-side and the overall
reward statistics and the KL coefficient.

Data parallel (under ``torchrun`` or ``accelerate launch``, see docs/distributed.md): as train-expert,
each process takes a contiguous slice of the step's prompts (whole groups) and scores its samples'
raw rewards; the raw rewards are gathered, and every process normalises the whole batch in the
one-process order (:func:`score_samples`), so the shared per-side statistics see every sample. The
update sums the gradients over processes; only the main process writes the run folder.

Run folder: as train-expert's; ``expert.json`` has ``kind: pmorl``, the sides, the combinations and
each side's reward. Metrics: train-expert's, with ``train/reward_raw`` the mean over samples of their
sides' raw rewards, ``train/reward_combined`` the mean CombinedReward output, and
``train/reward_raw/<SIDE>`` each side's mean raw reward over the samples scored on it.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personalign.config import to_dict
from personalign.data import build_user_message, format_chat
from personalign.distributed import Dist, require_unsharded
from personalign.distributed import init as init_distributed
from personalign.errors import ConfigError, ModelError
from personalign.generation import batch_seed, eos_token_ids
from personalign.judges.offline import question_coverage
from personalign.losses import RunningMeanStd
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
    from collections.abc import Mapping, Sequence

    from personalign.data import Instruction
    from personalign.preferences import Preference, PreferenceSpace
    from personalign.rewards import CombinedReward, RewardFunction, RewardSpec

@dataclass(frozen=True)
class TrainPMORLConfig:
    output_dir: str
    sides: tuple[str, ...] = ()  # empty: every side but the extra style sides P3C, P3D (8 combinations)
    reward: str = "offline"  # every side's reward unless `rewards` names it: offline | rm:PATH | module:function
    rewards: dict[str, str] = field(default_factory=dict)  # side -> reward spec, overriding `reward`
    # From here on: the RL settings of personalign.rl.RLSettings, with train-expert's defaults.
    model: str | None = None
    dimensions: str | None = None
    algorithm: str = "rloo"  # rloo | grpo | ppo
    prompts: str = "builtin:train"
    limit: int | None = None
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=16, alpha=32, dropout=0.0))  # as train-expert
    lr: float | None = None
    weight_decay: float = 0.0
    steps: int = 100
    batch_prompts: int = 4
    group_size: int = 4
    ppo_epochs: int | None = None
    minibatch_size: int | None = None
    kl_coef: float | None = None
    adaptive_kl: bool | None = None
    kl_target: float = 6.0
    kl_horizon: int = 10000
    kl_stop: float | None = None  # as train-expert's: end the run when a step's samples drift too far
    kl_estimator: str = "k1"
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    missing_eos_penalty: float = 0.0
    ontopic_coef: float = 0.0  # as train-expert's: + coefficient x question coverage on the normalised score
    repeat_coef: float = 0.0  # as train-expert's: - coefficient x the share of repeated 3-grams
    seed: int = 0
    checkpoint_every: int = 20
    device: str = "auto"
    dtype: str = "auto"
    autocast_bf16: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Plan:
    """What validation found: everything the run needs that does not need a model."""

    cfg: TrainPMORLConfig  # per-algorithm defaults filled in
    space: PreferenceSpace
    combinations: list[Preference]
    sides: tuple[str, ...]  # every side of some combination, in dimension order
    rewards: dict[str, RewardSpec]  # side -> its reward source
    instructions: list[Instruction]


def validate(cfg: TrainPMORLConfig) -> Plan:
    """Check every field, the sides, each side's reward spec and the prompts; load no model."""
    from personalign.data import load_prompts
    from personalign.models import resolve_device, resolve_dtype
    from personalign.preferences import load_space
    from personalign.rewards import parse_reward_spec

    if cfg.lora.top_layers is not None:
        raise ConfigError(f"lora.top_layers must be null for a policy adapter (it applies to reward models "
                          f"only), got {cfg.lora.top_layers!r}")
    space = load_space(cfg.dimensions)
    combinations = space.combinations(cfg.sides or None)
    used = {s for p in combinations for s in p.sides}
    sides = tuple(s for s in space.sides if s in used)
    per_side: dict[str, str] = {}
    for key, spec in cfg.rewards.items():
        side = space.resolve(key)
        if side in per_side:
            raise ConfigError(f"rewards.{key}: side {side} is named twice in rewards; keep one entry")
        if side not in sides:
            raise ConfigError(f"rewards.{key}: side {side} is not in any combination trained here (sides: "
                              f"{', '.join(sides)}); drop it or add it to sides")
        per_side[side] = spec
    c = resolve_defaults(cfg)
    check_settings(c)
    resolve_dtype(c.dtype, resolve_device(c.device))  # raises ModelError naming the value
    specs = {s: parse_reward_spec(per_side.get(s, cfg.reward), s) for s in sides}
    return Plan(c, space, combinations, sides, specs, load_prompts(c.prompts, limit=c.limit))


# -- pieces each phase calls (tested on their own) -------------------------------------------------


def step_combinations(n_combinations: int, per_step: int, step: int, seed: int) -> list[int]:
    """The combination of each prompt of step ``step``: uniform draws from a generator seeded by
    (seed, step), so any step's draws are known without replaying the earlier steps."""
    rng = random.Random(f"pmorl-combinations:{seed}:{step}")
    return [rng.randrange(n_combinations) for _ in range(per_step)]


def side_rewards(specs: Mapping[str, RewardSpec], *, device: str = "auto",
                 dtype: str = "auto") -> dict[str, RewardFunction]:
    """Side -> reward function; a reward-model folder named for several sides is loaded once."""
    from personalign.rewards import ModelReward, reward_from_spec

    loaded: dict[str, ModelReward] = {}
    out: dict[str, RewardFunction] = {}
    for side, spec in specs.items():
        if spec.kind == "rm" and spec.target in loaded:
            out[side] = ModelReward(loaded[spec.target].model, side, name=str(spec))
            continue
        out[side] = reward_from_spec(spec, side, device=device, dtype=dtype)
        if isinstance(out[side], ModelReward):
            loaded[spec.target] = out[side]  # type: ignore[assignment]
    return out


def combination_rewards(combinations: Sequence[Preference], rewards: Mapping[str, RewardFunction]
                        ) -> tuple[dict[str, CombinedReward], dict[str, RunningMeanStd]]:
    """One CombinedReward per combination (key: its spec), all sharing one running normalisation per
    side, and those per-side statistics (for checkpoints)."""
    from personalign.rewards import CombinedReward

    stats = {s: RunningMeanStd() for s in rewards}
    out: dict[str, CombinedReward] = {}
    for pref in combinations:
        combined = CombinedReward({s: rewards[s] for s in pref.sides})
        combined.stats = {s: stats[s] for s in pref.sides}  # a side is normalised alike in every combination
        out[pref.spec()] = combined
    return out, stats


@dataclass
class Scores:
    combined: torch.Tensor  # (N,) the mean of the sample's sides' normalised rewards
    raw: torch.Tensor  # (N,) the mean of the sample's sides' raw rewards
    raw_by_side: dict[str, torch.Tensor]  # side -> raw rewards of the samples scored on it


def score_samples(combined: Mapping[str, CombinedReward], keys: Sequence[str], prompts: Sequence[str],
                  responses: Sequence[str], dist: Dist | None = None, first: int = 0) -> Scores:
    """Score sample i on the combination ``keys[i]``: ITS sides' rewards of (prompts[i], responses[i]).

    ``prompts`` are the instructions without preference prompt (reward models add their side's own
    wording); the responses are what the policy wrote. Combinations are normalised in order of first
    appearance, which fixes the order the shared per-side statistics update in.

    Data parallel: ``keys`` is the whole batch's, ``prompts`` and ``responses`` this process's samples
    ``first ..``; each process computes its samples' raw rewards, they are gathered, and every process
    normalises the whole batch as one process would. The returned scores are the whole batch's.
    """
    dist = dist or Dist()
    n = len(responses)
    mine = list(keys[first:first + n])
    sides = list(dict.fromkeys(s for key in dict.fromkeys(keys) for s in combined[key].rewards))
    col = {s: j for j, s in enumerate(sides)}
    raw_local = torch.full((n, len(sides)), float("nan"))  # (n, S): NaN on sides outside the combination
    for key in dict.fromkeys(mine):
        idx = [i for i, k in enumerate(mine) if k == key]
        for side, values in combined[key].raw([prompts[i] for i in idx], [responses[i] for i in idx]).items():
            raw_local[idx, col[side]] = values
    every = dist.gather(raw_local.to(dist.device or "cpu")).cpu() if dist.active else raw_local  # (N, S)
    out, raw = torch.zeros(len(keys)), torch.zeros(len(keys))
    raw_by_side: dict[str, list[torch.Tensor]] = {}
    for key in dict.fromkeys(keys):
        idx = [i for i, k in enumerate(keys) if k == key]
        fn = combined[key]
        values = {s: every[idx, col[s]] for s in fn.rewards}
        out[idx] = fn.combine(values)
        raw[idx] = torch.stack(list(values.values())).mean(0)
        for side, v in values.items():
            raw_by_side.setdefault(side, []).append(v)
    return Scores(out, raw, {s: torch.cat(v) for s, v in raw_by_side.items()})


# -- the recipe ------------------------------------------------------------------------------------


def main(cfg: TrainPMORLConfig) -> dict[str, float]:
    plan = validate(cfg)  # before any model loads
    c = plan.cfg
    dist = init_distributed(c.device)  # one process unless a launcher started several
    require_unsharded(dist, "train-pmorl")  # FSDP: train-rm and train-expert only
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

    base, tok = load_model(c.model, device=device_name, dtype=c.dtype)
    fingerprint = base_fingerprint(base)
    model = build_policy(base, c.lora, c.seed)
    device = next(model.parameters()).device
    rl = RLState(model, c, dist)
    combined, side_stats = combination_rewards(plan.combinations,
                                               side_rewards(plan.rewards, device=device_name, dtype=c.dtype))
    keys = [p.spec() for p in plan.combinations]
    eos = eos_token_ids(base, tok)

    # -- resume: a killed run continues from its last checkpoint; the metrics after it are redone
    ckpt = out / "checkpoint"
    step, progress = rl.resume(ckpt)
    if progress:
        if set(progress.get("side_stats", {})) != set(side_stats):
            raise ModelError(f"checkpoint {ckpt} holds reward statistics of other sides; delete it to start over")
        for s, st in side_stats.items():
            st.load_state_dict(progress["side_stats"][s])
    if dist.is_main:
        logger.truncate(step)

    bar = None
    if c.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=step, unit="step",
                   desc=f"train-pmorl {len(keys)} combinations ({c.algorithm})")

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
        prompt_ids = step_prompt_indices(len(plan.instructions), c.batch_prompts, step, c.seed)
        combo_ids = step_combinations(len(keys), c.batch_prompts, step, c.seed)
        step_keys = [keys[k] for k in combo_ids for _ in range(g)]  # every sample's combination, the whole batch
        idx = [i for i in prompt_ids[first_prompt:stop_prompt] for _ in range(g)]  # groups are consecutive
        cidx = [k for k in combo_ids[first_prompt:stop_prompt] for _ in range(g)]  # ... and share a combination
        instructions = [plan.instructions[i].prompt for i in idx]

        # -- rollout: each prompt with its combination's preference prompt, the adapter enabled; each
        # sample seeded by its index in the step's batch, so the samples do not depend on the split
        texts = [format_chat(tok, build_user_message(x, plan.combinations[k].prompt()))
                 for x, k in zip(instructions, cidx)]
        model.eval()
        ro = rollout(model, tok, texts, eos, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                     top_p=c.top_p, autocast=c.autocast_bf16,
                     seeds=[batch_seed(step_seed, first + j) for j in range(len(idx))])

        # -- score: each RESPONSE on its own combination's sides, then the running normalisation (of the
        # whole batch, in every process)
        scores = score_samples(combined, step_keys, instructions, ro.texts, dist, first)
        mine = scores.combined[first:first + len(idx)]
        score = mine.to(device) - c.missing_eos_penalty * (~ro.finished).float()
        score_n = rl.normalize(score)  # (N,)
        coverage = torch.tensor(question_coverage(instructions, ro.texts), dtype=score_n.dtype,
                                device=device)  # (N,)
        repetition = torch.tensor(repeated_trigram_shares(ro.texts), dtype=score_n.dtype, device=device)  # (N,)
        score_n = shape_scores(score_n, coverage, repetition, c)

        # -- reference log-probs -> KL penalty -> advantages -> loss -> step
        update = rl_update(rl, ro, score_n, c, first, n)
        step += 1

        # -- log: the global batch's numbers
        seconds = time.perf_counter() - t0
        metrics = {
            "train/reward_raw": float(scores.raw.mean()),
            "train/reward_combined": float(scores.combined.mean()),
            "train/reward": float(dist.gather(score_n).mean()),
            "train/coverage": float(dist.gather(coverage).mean()),
            "train/repetition_3": float(dist.gather(repetition).mean()),
            **update,
            "train/response_length": float(dist.gather(ro.mask.sum(1)).mean()),
            "train/truncated": float(dist.gather((~ro.finished).float()).mean()),
            "train/lr": c.lr,
            **{f"train/reward_raw/{s}": float(v.mean()) for s, v in sorted(scores.raw_by_side.items())},
            "time/step_seconds": seconds,
            "time/samples_per_second": n / seconds,
        }
        if dist.is_main:
            logger.log(step, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['train/reward_combined']:.3f}", kl=f"{metrics['train/kl']:.3f}")

        # -- guard: a policy that left the base by more than kl_stop is not kept
        stopped = guard.after(step, metrics["train/kl"])
        if stopped is not None:
            break

        # -- checkpoint
        if step % c.checkpoint_every == 0 and step < c.steps:
            rl.save_checkpoint(ckpt, step, side_stats={s: st.state_dict() for s, st in side_stats.items()})
    if bar is not None:
        bar.close()

    # -- save: a standard peft adapter folder, the value head (ppo), then expert.json last
    dist.barrier()  # every metrics line is written
    final = stopped_summary(logger.read(), stopped)
    rl.save(out)
    if not dist.is_main:
        return final
    doc = {
        "kind": "pmorl",
        "sides": list(plan.sides),
        "side_names": [plan.space.sides[s].name for s in plan.sides],
        "combinations": keys,
        "base": fingerprint,
        "adapter": ADAPTER_DIR,
        "algorithm": c.algorithm,
        "rewards": {s: str(spec) for s, spec in plan.rewards.items()},
        "config": to_dict(cfg),
        "metrics": final,
        **({"stopped": stopped} if stopped is not None else {}),
    }
    (out / EXPERT_JSON).write_text(json.dumps(doc, indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    return final
