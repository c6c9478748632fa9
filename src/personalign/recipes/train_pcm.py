"""Recipe: train the Preference Control Model (MoPE) with REBEL, the experts frozen.

config -> main(cfg) -> validate (before any model loads) -> load base + every side's expert + rewards
-> build PCM -> resume -> per step: preferences -> references -> rollout -> score -> utility -> loss ->
step -> log -> checkpoint; at the end ``pcm.safetensors`` + ``pcm.json``.

* **Preferences**: each step takes ``batch_prompts`` instructions, each with its own preference: with
  probability ``weighted_fraction`` a random *weighted* preference (a random number of dimensions, one
  random side each, Dirichlet(``dirichlet_alpha``) weights; a single dimension takes both of its sides,
  as in ``concise=0.7,informative=0.3``), otherwise one of the hard combinations of the trained sides
  (the benchmark's 8 for the six P-SOUPS sides). Every preference weights at least two sides: with one,
  there is nothing to control.
* **Rollout**: two responses per (instruction, preference) from the token-level mixture of *all* the
  trained sides' experts (one batched forward per step), the PCM giving each row's weights (zero on
  sides outside its preference), features and expert log-probs recorded. The recorded log-probs are
  the untempered mixture's and sampling uses no repetition penalty, so with the default temperature 1
  and top_p 1 they are exactly the probabilities the samples were drawn with (on-policy REBEL). A
  lower ``temperature``/``top_p`` samples the pairs as the mixture is served (and as the references
  are drawn) while D(y) stays measured on the untempered mixture: REBEL's least-squares target holds
  for pairs drawn from any distribution, and the utilities then compare replies of one kind.
* **References** ``y_ref``: the base model (adapters disabled) with the preference prompt, sampled as
  ``generate`` samples (``ref_*``). The base sees only the prompt text, so a reference serves every
  preference with the same prompt (the same dominant side per dimension); each is generated once and
  kept in ``references.jsonl`` in the run folder (a resumed run reads it back).
* **Utility**: ``U = sum_j w_j sigmoid((r_j(x, y) - r_j(x, y_ref)) / scale_j)`` with the preference's
  normalised weights (:func:`personalign.pcm.preference_utility`). Scales: the offline judge's scores
  live in different units per side (a school grade for expertise, log2 words for concision, ...), so
  ``scale_j = offline_scale x`` that side's tie margin (:data:`~personalign.judges.offline.DEFAULT_MARGINS`,
  the smallest difference the judge calls a win): with the default 4, a one-margin lead gives 0.56 and a
  four-margin lead 0.73. Reward models and user functions are used as they are (scale 1), unless
  ``calibrate_scales`` measures each side's scale first (:func:`calibrate_scales`: the typical reward gap
  between two replies of the prompted base, so that no side's wider reward range decides the utility
  alone). ``reward_scales`` overrides any side.
* **Loss**: REBEL (:func:`personalign.losses.rebel_loss`) on the PCM's parameters only. D(y) is the
  sum over response tokens of log pi_theta - log pi_old, both from the recorded expert log-probs:
  pi_old with the weights used at sampling time, pi_theta with the PCM's weights recomputed from the
  recorded features (:func:`personalign.pcm.pcm_sequence_logprob`), so the gradient epochs
  (``epochs``) need no expert forward pass. ``eta`` (default 1): utilities lie in [0, 1], so one update
  asks a pair's relative log-probability to move by at most about one nat. ``prior_coef`` adds
  ``prior_coef x`` the mean per-token KL(alpha || declared weights) (:func:`personalign.pcm.weight_kl`):
  a pull toward the user's mix (uniform for a hard combination) where the rewards carry no signal.
  Off by default, as in the paper.

Determinism and resumption: a step's instructions, preferences, sampling seeds and minibatch order all
derive from (seed, step), and every response and reference is drawn from its own generator, seeded by
its index in the step's batch (so the samples do not depend on how the batch is split); every ``checkpoint_every`` steps the checkpoint holds the PCM, AdamW's state
and the step, and running the same command again resumes from it (metrics lines after it are dropped
and redone). The learning rate is constant, so the run's length is not part of its identity: a finished
run keeps its checkpoint, and running it again with a larger ``steps`` extends it exactly as if it had
been asked for that many steps from the start (a smaller ``steps`` is refused). A PCM learns to weigh
particular experts, so ``experts.json`` records their SHA-256 digests when a run starts, and a rerun whose
experts changed since is refused before any model loads.

Run folder: ``config.json``, ``experts.json``, ``metrics.jsonl``, ``references.jsonl``, ``checkpoint/``,
then ``pcm.safetensors`` and ``pcm.json`` (architecture, sides, base model, config, final metrics),
written last. Metrics per step: ``train/loss``, ``train/rebel_loss``, ``train/prior_kl``,
``train/utility`` (mean over responses), ``train/utility_gap`` (mean |U(y) - U(y')|),
``train/win_vs_ref`` (share of sides on which a response beats its reference), ``train/reward/<SIDE>``
(raw), ``train/weight_entropy`` (mean per-token entropy of the weights, over the active sides),
``train/weight_shift`` (mean per-token |alpha - declared weights|_1), ``train/weight/<SIDE>`` (mean
weight of the side over the tokens of responses whose preference includes it), ``train/log_ratio``
(mean |D(y)| after the update), ``train/response_length``, ``train/lr``, ``time/step_seconds``.

Data parallel (under ``torchrun`` or ``accelerate launch``, see docs/distributed.md): each process
takes a contiguous slice of the step's pairs (``batch_prompts`` is the global count) and generates,
scores and records its rows; the step's missing references (and the calibration replies) are split the
same way and gathered. Each process's REBEL loss is its share of the minibatch's mean (its pairs over
the minibatch's), the prior term its share of the token mean, and the gradients are summed, so every
process steps to the one-process PCM. Metrics are the whole batch's; only the main process writes the
run folder (``references.jsonl`` included).

Why one file of 600 lines: one workflow, its validation and the long description above; the pieces
it calls are in :mod:`personalign.rebel`, :mod:`personalign.pcm` and :mod:`personalign.mixture`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personalign.checkpoint import load_checkpoint, save_checkpoint
from personalign.config import finite as _finite
from personalign.config import require as _require
from personalign.config import to_dict
from personalign.distributed import Dist, require_unsharded
from personalign.distributed import init as init_distributed
from personalign.errors import ConfigError, PreferenceError
from personalign.generation import (
    ModelStep,
    SamplingConfig,
    batch_seed,
    decode,
    encode_batch,
    eos_token_ids,
    generate_texts,
    pad_token_id,
    seeded_generator,
)
from personalign.losses import rebel_loss
from personalign.pcm import (
    PCM_CONFIG,
    PCM_WEIGHTS,
    PCMConfig,
    PCMWeights,
    PreferenceControlModel,
    pcm_sequence_logprob,
    preference_utility,
    preference_vector,
    weight_kl,
)
from personalign.personalize import Method, build_prompts
from personalign.rebel import (
    ReferenceCache,
    SideRewards,
    calibration_spread,
    decode_responses,
    sample_preference,
    score_batch,
)
from personalign.rl import step_prompt_indices
from personalign.runlog import MetricsLogger, prepare_run_dir, summarize_steps

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from personalign.data import Instruction
    from personalign.experts import Experts
    from personalign.preferences import Preference, PreferenceSpace
    from personalign.rewards import RewardSpec

REFERENCES = "references.jsonl"
SCALES = "scales.json"


@dataclass(frozen=True)
class TrainPCMConfig:
    output_dir: str
    experts: str | None = None  # folder of <SIDE>/ experts; None: the experts shipped for the model
    model: str | None = None  # None: the embedded default
    dimensions: str | None = None  # a YAML file of extra dimensions
    sides: tuple[str, ...] = ()  # the sides the PCM weights; empty: every side with an expert in `experts`
    reward: str = "offline"  # every side's reward: offline | rm:PATH | module:function
    rewards: dict[str, str] = field(default_factory=dict)  # per-side overrides, e.g. {P3C: rm:runs/rm-P3C}
    offline_scale: float = 4.0  # offline rewards: scale_j = offline_scale x the judge's tie margin of side j
    reward_scales: dict[str, float] = field(default_factory=dict)  # per-side scale overrides
    # > 0: before training, set each side's scale to the spread of its reward between two replies of the
    # prompted base to the same input, over this many instructions per combination (see calibrate_scales)
    calibrate_scales: int = 0
    prompts: str = "builtin:train"
    limit: int | None = None
    # PCM architecture (see personalign.pcm)
    context: bool = True  # False: weights from the preference alone (ablation)
    hidden: int = 64
    proj: int = 32
    # REBEL
    eta: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 200
    batch_prompts: int = 8  # (instruction, preference) pairs per step; two responses each
    epochs: int = 2  # gradient passes over each batch
    minibatch_pairs: int | None = None  # pairs per optimizer step; None: the whole batch
    prior_coef: float = 0.0  # weight of KL(alpha || declared weights); 0 = plain REBEL
    max_grad_norm: float = 1.0
    weighted_fraction: float = 0.5  # share of random weighted preferences (the rest: hard combinations)
    dirichlet_alpha: float = 1.0
    # rollouts. D(y) is measured on the untempered mixture, the policy the PCM parameterises; samples
    # may come from a tempered one (REBEL's regression holds for pairs from any distribution), e.g.
    # the temperature the mixture is served and evaluated with and the references are sampled at.
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # references from the preference-prompted base model (the PP baseline, sampled as `generate` does)
    ref_temperature: float = 0.7
    ref_top_p: float = 0.9
    ref_repetition_penalty: float = 1.1
    ref_batch_size: int = 16
    seed: int = 0
    checkpoint_every: int = 20
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True


# -- validation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What validation found: everything the run needs that does not need a model."""

    cfg: TrainPCMConfig
    space: PreferenceSpace
    sides: tuple[str, ...]  # in the space's order
    experts_dir: Path
    rewards: dict[str, RewardSpec]
    scales: dict[str, float]
    combinations: list[Preference]  # hard combinations with at least two sides
    instructions: list[Instruction]


def validate(cfg: TrainPCMConfig) -> Plan:
    """Check every field, the sides, their experts, rewards and the prompts; load no model."""
    from personalign.compose import check_base, expert_folders, resolve_experts_dir
    from personalign.data import load_prompts
    from personalign.judges.offline import DEFAULT_MARGINS
    from personalign.models import canonical_name, resolve_device, resolve_dtype
    from personalign.preferences import load_space
    from personalign.rewards import parse_reward_spec

    c = cfg
    _require(_finite(c.eta) and c.eta > 0, "eta", c.eta, "a positive number (e.g. eta=1.0)")
    _require(_finite(c.lr) and c.lr > 0, "lr", c.lr, "a positive number (e.g. lr=1e-3)")
    _require(_finite(c.weight_decay) and c.weight_decay >= 0, "weight_decay", c.weight_decay, "a number >= 0")
    _require(c.steps >= 1, "steps", c.steps, "at least 1")
    _require(c.batch_prompts >= 1, "batch_prompts", c.batch_prompts, "at least 1")
    _require(c.epochs >= 1, "epochs", c.epochs, "at least 1")
    _require(c.minibatch_pairs is None or 1 <= c.minibatch_pairs <= c.batch_prompts, "minibatch_pairs",
             c.minibatch_pairs, f"between 1 and batch_prompts ({c.batch_prompts}), or null for all")
    _require(_finite(c.prior_coef) and c.prior_coef >= 0, "prior_coef", c.prior_coef, "a number >= 0")
    _require(_finite(c.max_grad_norm) and c.max_grad_norm > 0, "max_grad_norm", c.max_grad_norm,
             "a positive number")
    _require(_finite(c.weighted_fraction) and 0 <= c.weighted_fraction <= 1, "weighted_fraction",
             c.weighted_fraction, "in [0, 1]")
    _require(_finite(c.dirichlet_alpha) and c.dirichlet_alpha > 0, "dirichlet_alpha", c.dirichlet_alpha,
             "a positive number")
    _require(_finite(c.offline_scale) and c.offline_scale > 0, "offline_scale", c.offline_scale,
             "a positive number")
    _require(c.hidden >= 1, "hidden", c.hidden, "at least 1")
    _require(c.proj >= 1, "proj", c.proj, "at least 1")
    _require(c.max_new_tokens >= 1, "max_new_tokens", c.max_new_tokens, "at least 1")
    _require(_finite(c.temperature) and 0 < c.temperature <= 10, "temperature", c.temperature,
             "in (0, 10] (REBEL needs sampling; 1.0 keeps the samples on-policy)")
    _require(_finite(c.top_p) and 0 < c.top_p <= 1, "top_p", c.top_p, "in (0, 1]")
    _require(c.ref_batch_size >= 1, "ref_batch_size", c.ref_batch_size, "at least 1")
    _require(c.calibrate_scales >= 0, "calibrate_scales", c.calibrate_scales,
             "a number of instructions per combination >= 0 (0: no calibration)")
    _require(c.checkpoint_every >= 1, "checkpoint_every", c.checkpoint_every, "at least 1")
    ref_sampling(c, 0)  # SamplingConfig checks the ref_* fields
    resolve_dtype(c.dtype, resolve_device(c.device))  # raises ModelError naming the value

    space = load_space(c.dimensions)
    experts_dir = resolve_experts_dir(c.experts, canonical_name(c.model))
    folders = expert_folders(experts_dir)
    if c.sides:
        chosen = {space.resolve(s) for s in c.sides}
        missing = [s for s in space.sides if s in chosen and s not in folders]
        if missing:
            raise PreferenceError(f"no expert for side(s) {', '.join(missing)} in {experts_dir} (experts "
                                  f"there: {', '.join(folders) or 'none'}); train one with: personalign "
                                  f"train-expert --side {missing[0]} -o {experts_dir}/{missing[0]}")
    else:
        chosen = set(folders) & set(space.sides)
    sides = tuple(s for s in space.sides if s in chosen)  # the space's order
    if len(sides) < 2:
        raise PreferenceError(f"a PCM weights at least two sides' experts, found {len(sides)} "
                              f"({', '.join(sides) or 'none'}) in {experts_dir}; train more experts or set "
                              "sides")
    for side in sides:  # trained on this base model (their configs only)
        check_base(canonical_name(c.model), folders[side])

    for key, what in ((c.rewards, "rewards"), (c.reward_scales, "reward_scales")):
        for name in key:
            sid = space.resolve(name)
            if sid not in sides:
                raise ConfigError(f"{what} names side {name!r}, which the PCM does not weight (sides: "
                                  f"{', '.join(sides)})")
    overrides = {space.resolve(k): v for k, v in c.rewards.items()}
    rewards = {s: parse_reward_spec(overrides.get(s, c.reward), s) for s in sides}
    scales = {s: c.offline_scale * DEFAULT_MARGINS[s] if rewards[s].kind == "offline" else 1.0
              for s in sides}
    for name, value in c.reward_scales.items():
        _require(_finite(value) and value > 0, f"reward_scales.{name}", value, "a positive number")
        scales[space.resolve(name)] = float(value)

    combos = [p for p in space.combinations(sides) if len(p.sides) >= 2]
    if c.calibrate_scales and not combos:
        raise PreferenceError("calibrate_scales needs combinations of two or more dimensions among the sides "
                              f"{', '.join(sides)}; set calibrate_scales=0 or reward_scales by hand")
    if not combos and c.weighted_fraction < 1:
        raise PreferenceError(f"the sides {', '.join(sides)} form no combination of two or more dimensions; "
                              "set weighted_fraction=1 (weighted preferences only) or add sides")
    instructions = load_prompts(c.prompts, limit=c.limit)
    return Plan(c, space, sides, experts_dir, rewards, scales, combos, instructions)


def ref_sampling(cfg: TrainPCMConfig, seed: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.ref_temperature,
                          top_p=cfg.ref_top_p, repetition_penalty=cfg.ref_repetition_penalty, seed=seed)


def calibrate_scales(plan: Plan, model: Any, tok: Any, rewards: SideRewards, out: Path,
                     dist: Dist | None = None) -> dict[str, float]:
    """Each side's scale, measured once and kept in ``scales.json`` (a resumed run reads it back).

    For ``calibrate_scales`` instructions per combination, the preference-prompted base (the reference
    policy) answers each input twice; a side's scale is the root-mean-square gap of its reward between
    the two replies. Reward models differ in how far apart they put two ordinary replies (a length-driven
    side can put them ten units apart, a style side one): unscaled, the widest side decides nearly every
    pair's utility ordering and the PCM learns to serve it alone. Scaled, a typical gap moves every side's
    ``sigmoid`` alike. ``reward_scales`` still overrides a side, and a side that stays unmeasured keeps its
    default scale. Each reply is drawn from its own generator (seeded by its index); with ``dist`` each
    process answers and scores its slice of the inputs, and the main process writes ``scales.json``.
    """
    c = plan.cfg
    dist = dist or Dist()
    path = out / SCALES
    if path.is_file():
        saved = json.loads(path.read_text())
        measured = {s: float(v) for s, v in saved["scales"].items()}
    else:
        rng = random.Random(c.seed + 7919)
        texts, instr, prefs = [], [], []
        for combo in plan.combinations:
            for i in rng.sample(range(len(plan.instructions)), min(c.calibrate_scales, len(plan.instructions))):
                x = plan.instructions[i].prompt
                texts.append(build_prompts(tok, [x], combo, Method.MOPE)[0])
                instr.append(x)
                prefs.append(preference_vector(combo, plan.sides))
        a, b = dist.shard(len(texts))  # this process's inputs; the two replies of an input stay together
        doubled = [t for t in texts[a:b] for _ in range(2)]
        eos = eos_token_ids(model, tok)
        device = next(model.parameters()).device
        with model.disable_adapter():
            replies = generate_texts(lambda: ModelStep(model), tok, doubled, ref_sampling(c, c.seed + 7919),
                                     eos=eos, device=device, batch_size=c.ref_batch_size,
                                     seeds=[batch_seed(c.seed + 7919, i) for i in range(2 * a, 2 * b)])
        pref = torch.stack(prefs[a:b]) if b > a else torch.zeros(0, len(plan.sides))
        raw, raw_other = score_batch(rewards, plan.sides, instr[a:b], replies[0::2], replies[1::2], pref)
        if dist.active:  # (len(texts), S) each
            raw, raw_other = dist.gather(raw.to(device)).cpu(), dist.gather(raw_other.to(device)).cpu()
        spread = calibration_spread(raw, raw_other)
        measured = {s: float(v) for s, v in zip(plan.sides, spread.tolist()) if math.isfinite(v) and v > 0}
        if dist.is_main:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"scales": measured, "instructions_per_combination": c.calibrate_scales,
                                       "inputs": len(texts)}, indent=2))
            tmp.replace(path)
        dist.barrier()
    scales = dict(plan.scales)
    overridden = {plan.space.resolve(k) for k in c.reward_scales}
    scales.update({s: v for s, v in measured.items() if s not in overridden})
    return scales


# -- the recipe ------------------------------------------------------------------------------------


def _load_experts(base: PreTrainedModel, plan: Plan) -> Experts:
    """Every trained side's expert as an adapter of one peft model, in the PCM's side order."""
    from personalign.adapters import load_adapter, with_adapters
    from personalign.compose import expert_folders
    from personalign.experts import Experts

    folders = expert_folders(plan.experts_dir)
    peft_model = with_adapters(base, {s: load_adapter(folders[s]) for s in plan.sides})
    return Experts.from_adapters(peft_model, plan.sides)


EXPERTS_RECORD = "experts.json"  # side -> SHA-256 of the expert adapter a run trains against


def check_experts(out: Path, plan: Plan, started: bool) -> None:
    """A PCM learns to weigh particular experts: record their digests when a run starts, and refuse a rerun
    (to resume or to extend) whose experts changed since, before any model loads. A run ``started`` before
    digests were recorded cannot be checked and gets a one-line warning instead."""
    from personalign.compose import ADAPTER_FILES, expert_folders, file_digest

    folders = expert_folders(plan.experts_dir)
    current = {s: file_digest(folders[s] / ADAPTER_FILES[1]) for s in plan.sides}
    path = out / EXPERTS_RECORD
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{path} is not valid JSON; restore it or use another output_dir") from None
        changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"{out} holds a PCM run trained against other experts ({', '.join(changed)} "
                              f"changed since in {plan.experts_dir}); give another output_dir to train one "
                              "for these experts")
    elif started:
        print(f"warning: {out} records no digests of its experts (started before they were recorded); if they "
              "changed since, give another output_dir", file=sys.stderr)
    else:
        path.write_text(json.dumps(current, indent=2))


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    return summarize_steps(rows, "train/utility", first=["train/utility"],
                           last=["train/utility", "train/weight_shift", "train/weight_entropy"])


def main(cfg: TrainPCMConfig) -> dict[str, float]:
    plan = validate(cfg)  # before any model loads
    c, sides = plan.cfg, plan.sides
    dist = init_distributed(c.device)  # one process unless a launcher started several
    require_unsharded(dist, "train-pcm")  # FSDP: train-rm and train-expert only
    dist.require_per_process(c.batch_prompts, "batch_prompts", "pair")
    done = trained_steps(Path(cfg.output_dir))
    if done is not None and c.steps < done:
        raise ConfigError(f"{cfg.output_dir} holds a PCM trained for {done} steps; steps={c.steps} would not "
                          f"shorten it: give steps >= {done} (more extends the run) or another output folder")
    out = Path(cfg.output_dir)
    if dist.is_main:
        started = (out / "config.json").exists()
        prepare_run_dir(cfg.output_dir, cfg, resumable=frozenset({"steps"}))  # constant lr: a run extends
        check_experts(out, plan, started)
    dist.barrier()
    logger = MetricsLogger(out)
    if done is not None and c.steps == done:
        return json.loads((out / PCM_CONFIG).read_text()).get("metrics", {})
    device_name = dist.resolve_device(c.device)

    # -- models: the experts (frozen adapters on one base), the rewards, a fresh PCM
    from personalign.mixing import MixRule
    from personalign.mixture import MixtureStep
    from personalign.models import load_model
    from personalign.reward_model import base_fingerprint

    base, tok = load_model(c.model, device=device_name, dtype=c.dtype)
    fingerprint = base_fingerprint(base)
    embeddings = base.get_input_embeddings().weight.detach()  # (V, H), read by the PCM's features
    experts = _load_experts(base, plan)
    peft_model = experts.models[0]
    for p in peft_model.parameters():
        p.requires_grad_(False)
    device = experts.device
    eos = eos_token_ids(base, tok)
    pad = pad_token_id(tok, eos)
    rewards = SideRewards(plan.rewards, device_name, c.dtype)
    scale_of = calibrate_scales(plan, peft_model, tok, rewards, out, dist) if c.calibrate_scales else plan.scales
    scales = torch.tensor([scale_of[s] for s in sides])  # (S,)

    torch.manual_seed(c.seed)
    pcm = PreferenceControlModel(PCMConfig(sides, int(embeddings.shape[1]), c.context, c.hidden, c.proj),
                                 base=fingerprint).to(device)
    params = list(pcm.parameters())
    dist.broadcast(params)  # equal on every process from the start (they are seeded alike)
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    index = torch.arange(len(sides), device=device)  # expert k is side k

    # -- resume
    step = 0
    ckpt = out / "checkpoint"
    restored = load_checkpoint(ckpt, opt)
    if restored is not None:
        state, progress = restored
        pcm.load_state_dict(state)
        step = int(progress["step"])
        if step > c.steps:
            raise ConfigError(f"the checkpoint in {ckpt} is at step {step}, past steps={c.steps}; give steps >= "
                              f"{step}")
    elif done is not None:
        raise ConfigError(f"{out} holds a PCM trained for {done} steps but no checkpoint/ to extend it from; "
                          "train in another output folder")
    if dist.is_main:
        logger.truncate(step)
    refs = ReferenceCache(out / REFERENCES, write=dist.is_main)

    bar = None
    if c.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=step, desc=f"train-pcm ({len(sides)} sides)", unit="step")

    n_pairs = c.batch_prompts  # over every process
    mb = c.minibatch_pairs or n_pairs
    first, stop = dist.shard(n_pairs)  # this process's pairs of each step: rows 2 * first .. 2 * stop
    while step < c.steps:
        t0 = time.perf_counter()
        seed = batch_seed(c.seed, step)

        # -- preferences and inputs (the whole batch's): pair i is rows 2i (y) and 2i + 1 (y')
        rng = random.Random(seed)
        prompt_ids = step_prompt_indices(len(plan.instructions), n_pairs, step, c.seed)
        prefs = [sample_preference(plan.space, sides, plan.combinations, rng, c.weighted_fraction,
                                   c.dirichlet_alpha) for _ in range(n_pairs)]
        instr = [plan.instructions[i].prompt for i in prompt_ids]
        texts = [build_prompts(tok, [x], p, Method.MOPE)[0] for x, p in zip(instr, prefs)]
        pref_pairs = torch.stack([preference_vector(p, sides) for p in prefs])  # (P, S)
        pref_rows = pref_pairs[first:stop].repeat_interleave(2, 0)  # (2p, S): this process's rows

        # -- references: the preference-prompted base model, once per input text; the j-th of the step's
        # missing ones seeded by 2P + j (past the rollout rows), split over the processes and gathered
        todo = refs.missing(texts)
        if todo:
            a, b = dist.shard(len(todo))
            with peft_model.disable_adapter():
                made = generate_texts(lambda: ModelStep(peft_model), tok, todo[a:b], ref_sampling(c, seed % (2**31)),
                                      eos=eos, device=device, batch_size=c.ref_batch_size,
                                      seeds=[batch_seed(seed, 2 * n_pairs + j) for j in range(a, b)])
            refs.add(todo, dist.gather_objects(made))
        y_ref = [refs.get(t) for t in texts[first:stop]]

        # -- rollout: two samples per pair from the current mixture, features recorded; each row drawn
        # from its own generator, seeded by its index in the step's batch
        rows_text = [t for t in texts[first:stop] for _ in range(2)]
        ids, prompt_mask = encode_batch(tok, rows_text, device)
        provider = PCMWeights(pcm, experts, embeddings, pref_rows, record=True)
        sampling = SamplingConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                  repetition_penalty=1.0, seed=seed % (2**31))
        generators = [seeded_generator(batch_seed(seed, 2 * first + j), device) for j in range(len(rows_text))]
        pcm.eval()
        mixture = MixtureStep(experts, provider, MixRule.PROB)
        decoded = decode(mixture, ids, prompt_mask, sampling, eos=eos, pad=pad, generator=generators)
        gen = mixture.result(decoded.tokens, decoded.mask)
        inputs = provider.recorded(len(rows_text))
        mask = gen.mask.float()  # (2p, T)
        responses = decode_responses(tok, gen.tokens, gen.mask, eos)

        # -- score and utility
        row_instr = [x for x in instr[first:stop] for _ in range(2)]
        row_ref = [y for y in y_ref for _ in range(2)]
        raw, raw_ref = score_batch(rewards, sides, row_instr, responses, row_ref, pref_rows)
        utility = preference_utility(raw, raw_ref, pref_rows, scales).to(device)  # (2p,)
        with torch.no_grad():
            old_logp = gen.sequence_logprob(gen.weights)  # (2p,) pi_old: the weights used when sampling

        # -- loss and step: REBEL over pairs, the PCM's parameters only; minibatches drawn over the whole
        # batch, each process's loss its share of the minibatch's (the REBEL mean over pairs, the prior's
        # token mean), the gradients summed over processes
        pcm.train()
        g = torch.Generator().manual_seed(seed)
        sums = {"loss": 0.0, "rebel_loss": 0.0, "prior_kl": 0.0}
        updates = 0
        for _ in range(c.epochs):
            for global_sel in torch.randperm(n_pairs, generator=g).split(mb):
                sel = global_sel[(global_sel >= first) & (global_sel < stop)] - first
                rows = torch.stack([2 * sel, 2 * sel + 1], 1).flatten().to(device)  # y, y' of each pair
                pair_share = len(sel) / len(global_sel)
                tokens = mask[rows].sum()
                token_share = tokens / dist.all_sum(tokens).clamp_min(1) if dist.active else 1.0
                opt.zero_grad(set_to_none=True)
                if len(sel) > 0:
                    logp, alpha = pcm_sequence_logprob(pcm, inputs.select(rows), gen.expert_logprobs[rows], index,
                                                       mask[rows])
                    rl = rebel_loss(logp[0::2], old_logp[rows][0::2], logp[1::2], old_logp[rows][1::2],
                                    utility[rows][0::2], utility[rows][1::2], c.eta)
                    prior = inputs.pref[rows].to(alpha.device)
                    if c.prior_coef > 0:
                        kl = weight_kl(alpha, prior, mask[rows])
                        loss = rl * pair_share + c.prior_coef * kl * token_share
                    else:
                        with torch.no_grad():
                            kl = weight_kl(alpha, prior, mask[rows])
                        loss = rl * pair_share
                    loss.backward()
                    parts = torch.stack([rl.detach() * pair_share, kl.detach() * token_share])
                else:  # none of this process's pairs in the minibatch: it adds zero gradients
                    parts = torch.zeros(2, device=device)
                dist.sum_grads(params)
                torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                opt.step()
                rl_value, kl_value = (float(x) for x in dist.all_sum(parts))  # the minibatch's, every process's
                sums["loss"] += rl_value + c.prior_coef * kl_value if c.prior_coef > 0 else rl_value
                sums["rebel_loss"] += rl_value
                sums["prior_kl"] += kl_value
                updates += 1
        step += 1

        # -- log: weights as sampled, log-ratio after the update; per-row sums gathered, so that the
        # numbers are the whole batch's
        with torch.no_grad():
            new_logp, _ = pcm_sequence_logprob(pcm, inputs, gen.expert_logprobs, index, mask)
            w = gen.weights  # (2p, T, S)
            pref_d = pref_rows.to(device)
            ent = -(torch.xlogy(w, w)).sum(-1)  # (2p, T)
            shift = (w - pref_d[:, None]).abs().sum(-1)  # (2p, T)
            diff = torch.where(torch.isnan(raw), 0.0, raw - raw_ref)
            wins = ((diff > 0).float() + 0.5 * (diff == 0).float()) * (pref_rows > 0)  # (2p, S)
            per_row = torch.cat([
                torch.stack([utility, (new_logp - old_logp).abs(), mask.sum(1), (ent * mask).sum(1),
                             (shift * mask).sum(1), wins.sum(1).to(device)], 1),
                (w * mask[..., None]).sum(1),  # (2p, S) each side's weight summed over the row's tokens
                raw.to(device),  # (2p, S) raw rewards, NaN on inactive sides
            ], 1)
            every = dist.gather(per_row)  # (2P, 6 + 2S)
        every_pref = pref_pairs.repeat_interleave(2, 0).to(device)  # (2P, S)
        active = every_pref > 0
        u, length = every[:, 0], every[:, 2]
        n_tok = length.sum().clamp_min(1)
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = {
            **{f"train/{k}": v / updates for k, v in sums.items()},
            "train/utility": float(u.mean()),
            "train/utility_gap": float((u[0::2] - u[1::2]).abs().mean()),
            "train/win_vs_ref": float(every[:, 5].sum() / active.sum()),
            "train/weight_entropy": float(every[:, 3].sum() / n_tok),
            "train/weight_shift": float(every[:, 4].sum() / n_tok),
            "train/log_ratio": float(every[:, 1].mean()),
            "train/response_length": float(length.mean()),
            "train/lr": c.lr,
            "time/step_seconds": seconds,
        }
        s_count = len(sides)
        for j, side in enumerate(sides):
            on = active[:, j]
            if bool(on.any()):
                metrics[f"train/weight/{side}"] = float(every[on, 6 + j].sum() / length[on].sum().clamp_min(1))
                metrics[f"train/reward/{side}"] = float(every[on, 6 + s_count + j].mean())
        if dist.is_main:
            logger.log(step, metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(utility=f"{metrics['train/utility']:.3f}", loss=f"{metrics['train/loss']:.4f}")

        # -- checkpoint
        if step % c.checkpoint_every == 0 and step < c.steps:
            if dist.is_main:
                save_checkpoint(ckpt, pcm.state_dict(), opt, {"step": step})
            dist.barrier()
    if bar is not None:
        bar.close()

    # -- save: the checkpoint (kept, so a rerun with more steps extends the run), pcm.safetensors, then
    # pcm.json (last)
    dist.barrier()  # every metrics line is written
    final = _summary(logger.read())
    if dist.is_main:
        save_checkpoint(ckpt, pcm.state_dict(), opt, {"step": step})
        pcm.save(out, extra={"experts": str(plan.experts_dir),
                             "rewards": {s: str(plan.rewards[s]) for s in sides},
                             "scales": scale_of, "config": to_dict(c), "steps": step, "metrics": final})
    dist.barrier()
    return final


def trained_steps(folder: Path) -> int | None:
    """The steps a finished run in ``folder`` trained its PCM for, or None when it holds no PCM."""
    if not ((folder / PCM_CONFIG).is_file() and (folder / PCM_WEIGHTS).is_file()):
        return None
    meta = json.loads((folder / PCM_CONFIG).read_text())
    steps = meta.get("steps", meta.get("config", {}).get("steps"))  # PCMs saved before "steps": the config
    return int(steps) if steps is not None else None
