"""Recipe: train a Bradley-Terry reward model on preference pairs (stage 3 of Personalized Soups).

One side gives a single-head model; several sides give a multi-head model (one shared LoRA backbone,
one head per side, every side's reward from one forward pass).

config -> main(cfg) -> phases: read pairs -> split (by instruction, 90/10) -> load base -> build model
-> resume -> for each step: encode -> score -> loss -> step -> log -> checkpoint -> evaluate -> save.

Data parallel (under ``torchrun`` or ``accelerate launch``, see docs/distributed.md): each process
takes a contiguous slice of every batch of pairs (``batch_size`` is the global count), its loss is
its share of the batch's mean, the gradients are summed over processes, and the probe features and
evaluation pairs are split the same way and gathered, so the model equals the one-process model.
Only the main process writes the run folder. Under FSDP (an accelerate FSDP config) the frozen base
weights are sharded over the processes and every process runs the same passes (one with weight 0 when
a batch has no pair for it); ``prefix_cache`` with ``lora.top_layers`` is refused there, since each
process would skip the cached layers for its own texts.

Run folder: ``config.json``, ``data.json`` (the pairs it trains on: counts per side and a digest, so a
model is never silently reused, or resumed, on pairs that have since changed), ``metrics.jsonl`` (``train/loss``, ``train/accuracy``, ``eval/loss``,
``eval/accuracy`` and per side ``eval/accuracy/P2A``), ``checkpoint/`` while training, and the final
``reward_model.safetensors`` + ``reward_config.json``.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalign.checkpoint import load_checkpoint, save_checkpoint
from personalign.data import read_pairs, split_by_prompt
from personalign.distributed import Dist
from personalign.distributed import init as init_distributed
from personalign.errors import ConfigError, DataError
from personalign.losses import bradley_terry_loss, fit_bradley_terry_head, pairwise_accuracy, select_l2_by_cv
from personalign.preferences import load_space
from personalign.profiles import PROFILE_PREFIX
from personalign.reward_model import CONFIG, POOLINGS, WEIGHTS, LoraSpec, PrefixCache, RewardModel
from personalign.runlog import MetricsLogger, check_run_data, data_digest, prepare_run_dir


@dataclass(frozen=True)
class TrainRMConfig:
    pairs: str
    output_dir: str
    sides: tuple[str, ...] = ()  # empty: every side present in the pairs file
    model: str | None = None
    dimensions: str | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    # Read the reward from the output of the first N decoder layers (the layers above do not run);
    # None: the last layer. See docs/pipeline.md for why the pipeline reads an inner layer.
    readout_layer: int | None = None
    # What the head reads: "last" (the last real token's state, the paper's) or "mean" (the mean of every
    # real token's state, for sides whose property is spread over the text; see docs/pipeline.md).
    pooling: str = "last"
    # "probe": before fine-tuning, fit each head by L-BFGS on the frozen features of the training pairs
    # (a linear probe, then fine-tuning: LP-FT); "random": a random head. With few hundred pairs the
    # head barely moves at a LoRA learning rate, and LoRA then fits the training pairs instead.
    head_init: str = "probe"
    probe_l2: float = 1e-2
    # Candidates for probe_l2, chosen per side by 5-fold cross-validation over the training pairs'
    # instructions (losses.select_l2_by_cv; the held-out pairs are not used); empty: probe_l2 as given.
    probe_l2_grid: tuple[float, ...] = ()
    lr: float = 2e-4
    epochs: int = 2
    batch_size: int = 8  # pairs per step
    max_length: int = 320
    eval_fraction: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_pairs_per_side: int | None = None
    side_prompt_in_input: bool | None = None  # None: True for one side, False for a multi-head model
    seed: int = 0
    checkpoint_every: int = 25
    # bf16 autocast (float32 master weights): for CUDA and CPUs with native bf16 (AVX512-BF16/AMX); on
    # an AVX2-only CPU it is slower than float32.
    autocast_bf16: bool = False
    # With lora.top_layers, run the frozen layers below once per distinct text and keep their output
    # (see reward_model.PrefixCache); ignored when every layer is adapted.
    prefix_cache: bool = True
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.head_init not in ("probe", "random"):
            raise ConfigError(f"head_init must be probe or random, got {self.head_init!r}")
        if any(not x > 0 for x in (self.probe_l2, *self.probe_l2_grid)):
            raise ConfigError("probe_l2 and probe_l2_grid values must be positive, e.g. [0.01, 0.1, 1, 10]")


def data_fingerprint(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairs per side and an order-independent digest of the pairs' text."""
    keys = sorted((r["side"], r["prompt"], r["chosen"], r["rejected"]) for r in rows)
    digest = data_digest(keys)
    counts: dict[str, int] = defaultdict(int)
    for side, *_ in keys:
        counts[side] += 1
    return {"pairs": dict(sorted(counts.items())), "sha256": digest}


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _pair_losses(model: RewardModel, batch: list[dict[str, Any]], autocast: bool,
                 cache: PrefixCache | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    texts = [model.format(r["prompt"], r["chosen"], r["side"]) for r in batch] + \
            [model.format(r["prompt"], r["rejected"], r["side"]) for r in batch]
    dev = model.head.weight.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        rewards = (cache.rewards(texts) if cache is not None else model(**model.encode(texts))).float()  # (2B, K)
    cols = torch.tensor([model.side_index(r["side"]) for r in batch], device=rewards.device)
    n = len(batch)
    chosen = rewards[:n].gather(1, cols[:, None]).squeeze(1)
    rejected = rewards[n:].gather(1, cols[:, None]).squeeze(1)
    return bradley_terry_loss(chosen, rejected), chosen.detach(), rejected.detach()


@torch.no_grad()
def fit_probe_heads(model: RewardModel, rows: list[dict[str, Any]], batch_size: int,
                    cache: PrefixCache | None, l2: float, l2_grid: tuple[float, ...] = (),
                    progress: bool = False, dist: Dist | None = None) -> dict[str, float]:
    """Set each side's head to the Bradley-Terry linear probe of the frozen features (the LoRA is still
    the identity) of that side's training pairs; with ``l2_grid``, each side's penalty is chosen by
    cross-validation over its training instructions. Returns the probes' training accuracies (and the
    cross-validated accuracy per candidate). With ``dist`` each process computes the features of its
    slice of ``rows`` and every process fits the same heads on all of them."""
    dist = dist or Dist()
    was = model.training
    model.eval()
    a, b = dist.shard(len(rows))
    mine = rows[a:b]
    local: list[torch.Tensor] = []
    batches = range(dist.lockstep_batches(len(rows), batch_size))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="probe features", unit="batch")
    for k in batches:
        batch = mine[k * batch_size:(k + 1) * batch_size]
        extra = not batch  # FSDP's lockstep: a pass on another pair, its features discarded
        batch = batch or rows[:1]
        texts = [model.format(r["prompt"], r["chosen"], r["side"]) for r in batch] + \
                [model.format(r["prompt"], r["rejected"], r["side"]) for r in batch]
        feats = (cache.features(texts) if cache is not None else model.features(**model.encode(texts))).float()
        if not extra:
            local.append(feats[: len(batch)] - feats[len(batch):])  # (b, H)
    model.train(was)
    width = model.head.weight.shape[1]
    device = model.head.weight.device
    every = dist.gather(torch.cat(local) if local else torch.zeros(0, width, device=device))  # (len(rows), H)
    diffs: dict[str, list[torch.Tensor]] = defaultdict(list)
    groups: dict[str, list[str]] = defaultdict(list)
    for j, r in enumerate(rows):
        diffs[r["side"]].append(every[j])
        groups[r["side"]].append(r["prompt"])
    out = {}
    for side, d in diffs.items():
        x = torch.stack(d)  # (N, H)
        side_l2 = l2
        if l2_grid:
            side_l2, cv = select_l2_by_cv(x.cpu(), groups[side], list(l2_grid))
            out.update({f"probe/cv_accuracy/{side}/l2={k:g}": v for k, v in cv.items()})
            out[f"probe/l2/{side}"] = side_l2
        w = fit_bradley_terry_head(x.cpu(), side_l2)
        k = model.side_index(side)
        model.head.weight[k] = w.to(model.head.weight)
        model.head.bias[k] = 0.0
        out[f"probe/train_accuracy/{side}"] = float((x.cpu() @ w > 0).float().mean())
    return out


@torch.no_grad()
def evaluate(model: RewardModel, rows: list[dict[str, Any]], batch_size: int, autocast: bool,
             cache: PrefixCache | None = None, dist: Dist | None = None) -> dict[str, float]:
    """Accuracy and loss on ``rows``, overall and per side (each process scores its slice of them)."""
    dist = dist or Dist()
    model.eval()
    a, b = dist.shard(len(rows))
    scores = [torch.zeros(0, 2, device=model.head.weight.device)]
    for k in range(dist.lockstep_batches(len(rows), batch_size)):
        batch = rows[a + k * batch_size:min(a + (k + 1) * batch_size, b)]
        _, c, r = _pair_losses(model, batch or rows[:1], autocast, cache)  # FSDP's lockstep: a discarded pass
        if batch:
            scores.append(torch.stack([c, r], 1))
    every = dist.gather(torch.cat(scores))  # (len(rows), 2): chosen, rejected
    by_side: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for j, row in enumerate(rows):
        by_side[row["side"]].append((every[j:j + 1, 0], every[j:j + 1, 1]))
    model.train()
    out: dict[str, float] = {}
    all_c, all_r = [], []
    for side, vals in sorted(by_side.items()):
        c = torch.cat([v[0] for v in vals])
        r = torch.cat([v[1] for v in vals])
        all_c.append(c)
        all_r.append(r)
        out[f"eval/accuracy/{side}"] = pairwise_accuracy(c, r)
        out[f"eval/loss/{side}"] = float(bradley_terry_loss(c, r))
        out[f"eval/pairs/{side}"] = len(vals)
    if all_c:
        c, r = torch.cat(all_c), torch.cat(all_r)
        out["eval/accuracy"] = pairwise_accuracy(c, r)
        out["eval/loss"] = float(bradley_terry_loss(c, r))
    return out


def main(cfg: TrainRMConfig) -> dict[str, float]:
    # -- validate and read data before loading any model --------------------------------------
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("epochs and batch_size must be at least 1")
    if not 0 <= cfg.eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.readout_layer is not None and cfg.readout_layer < 1:
        raise ConfigError(f"readout_layer must be at least 1 (a decoder layer, counted from 1), got {cfg.readout_layer}")
    space = load_space(cfg.dimensions)
    # A person's own labels (picks exported from a profile) name the side "profile:NAME": a personal
    # reward model, with no side prompt.
    wanted = [s if s.startswith(PROFILE_PREFIX) else space.resolve(s) for s in cfg.sides]
    rows = read_pairs(cfg.pairs, set(wanted) if wanted else None)
    sides = wanted or sorted({r["side"] for r in rows})
    for s in sides:
        if s not in space.sides and not s.startswith(PROFILE_PREFIX):
            raise DataError(f"pairs file names side {s!r}, which is not defined; valid sides: {space.valid_sides_text()}"
                            f" (or {PROFILE_PREFIX}NAME for a person's own picks)")
    counts = {s: sum(r["side"] == s for r in rows) for s in sides}
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"{cfg.pairs} has no pairs for side(s) {', '.join(empty)}")
    if cfg.max_pairs_per_side:
        by_side: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_side[r["side"]].append(r)
        rows = [r for s in sides for r in by_side[s][: cfg.max_pairs_per_side]]
    train_rows, eval_rows = split_by_prompt(rows, cfg.eval_fraction, cfg.seed)
    if not train_rows:
        raise DataError("no training pairs left after the split")

    dist = init_distributed(cfg.device)  # one process unless a launcher started several
    if dist.fsdp is not None and cfg.prefix_cache and cfg.lora.top_layers is not None:
        raise ConfigError("prefix_cache with lora.top_layers skips the frozen layers for texts each process has "
                          "seen, which FSDP's lockstep layers cannot; set prefix_cache=false under FSDP")
    if dist.is_main:
        prepare_run_dir(cfg.output_dir, cfg)
    dist.barrier()
    out = Path(cfg.output_dir)
    logger = MetricsLogger(out)
    finished = (out / WEIGHTS).exists() and (out / CONFIG).exists()
    if dist.is_main:
        check_run_data(out, data_fingerprint(rows), finished)
    dist.barrier()
    if finished:
        done = [m for m in logger.read() if "eval/accuracy" in m]
        return done[-1] if done else {}

    # -- model ---------------------------------------------------------------------------------
    from personalign.models import load_model

    torch.manual_seed(cfg.seed)
    load_device, _ = dist.load_place(cfg.device, "float32")
    base, tok = load_model(cfg.model, device=load_device, dtype="float32")
    model = RewardModel(base, tok, sides, cfg.lora, cfg.max_length,
                        side_prompts={s: space.sides[s].prompt if s in space.sides else "" for s in sides},
                        side_prompt_in_input=cfg.side_prompt_in_input, readout_layer=cfg.readout_layer,
                        pooling=cfg.pooling)
    if dist.fsdp is not None:  # the frozen weights sharded: the decoder runs, the output layer never does
        output = base.get_output_embeddings()
        unused = [output] if output is not None and output.weight is not base.get_input_embeddings().weight else []
        dist.shard_frozen(base, root=model.backbone.get_base_model(), extra=unused)
        model.head.to(dist.resolve_device(cfg.device))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    dist.broadcast(params)  # equal on every process from the start (they are seeded alike)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    lr_at = _lr_lambda(total, max(1, int(total * cfg.warmup_fraction)))
    autocast = cfg.autocast_bf16
    cache = None
    if cfg.prefix_cache:
        probe = [model.format(r["prompt"], r["chosen"], r["side"]) for r in train_rows[:2]]
        cache = PrefixCache.for_model(model, probe)

    step = 0
    ckpt = out / "checkpoint"
    restored = load_checkpoint(ckpt, opt)
    if restored is not None:
        state, progress = restored
        model.load_trainable_state(state)
        step = int(progress["step"])
        if dist.is_main:
            logger.truncate(step)  # the steps logged after the checkpoint are redone
    elif dist.is_main and logger.path.exists():
        logger.path.unlink()  # a run stopped before its first checkpoint starts again from nothing
    if restored is None and cfg.head_init == "probe":
        probe = fit_probe_heads(model, train_rows, cfg.batch_size * 2, cache, cfg.probe_l2, cfg.probe_l2_grid,
                                cfg.progress and dist.is_main, dist)
        if eval_rows:
            probe.update(evaluate(model, eval_rows, cfg.batch_size * 2, autocast, cache, dist))
        if dist.is_main:
            logger.log(0, probe)

    def checkpoint() -> None:
        if dist.is_main:
            save_checkpoint(ckpt, model.trainable_state(), opt, {"step": step})
        dist.barrier()

    bar = None
    if cfg.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"train-rm {'+'.join(sides)}", unit="step")
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        order = list(range(len(train_rows)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)  # same order on resume
        for k in range(step - epoch * steps_per_epoch, steps_per_epoch):
            batch = [train_rows[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
            a, b = dist.shard(len(batch))  # this process's pairs of the batch
            lr = cfg.lr * lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            if b > a or dist.fsdp is not None:  # FSDP's lockstep: no pair here still runs one, weight 0
                loss, c, r = _pair_losses(model, batch[a:b] or batch[:1], autocast, cache)
                if dist.active:  # this process's share of the batch's mean
                    loss = loss * ((b - a) / len(batch))
                loss.backward()
                loss, c, r = loss.detach(), c[:b - a], r[:b - a]
            else:  # fewer pairs than processes in this batch: this one adds zero gradients
                loss = torch.zeros((), device=model.head.weight.device)
                c = r = loss.new_zeros(0)
            dist.sum_grads(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            loss, c, r = dist.all_sum(loss), dist.gather(c), dist.gather(r)
            if dist.is_main:
                logger.log(step, {"train/loss": loss.item(), "train/accuracy": pairwise_accuracy(c, r),
                                  "train/lr": lr, "train/epoch": epoch + (k + 1) / steps_per_epoch})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.checkpoint_every == 0 and step < total:
                checkpoint()
        if eval_rows:
            metrics = evaluate(model, eval_rows, cfg.batch_size * 2, autocast, cache, dist)
            if dist.is_main:
                logger.log(step, {**metrics, "train/epoch": epoch + 1})
        if step < total:
            checkpoint()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    final = {**metrics, "time/train_seconds": seconds, "data/train_pairs": len(train_rows), "data/eval_pairs": len(eval_rows)}
    if cache is not None:
        final.update({"prefix_cache/layers": cache.layers, "prefix_cache/texts": len(cache.store),
                      "prefix_cache/hits": cache.hits})
    if dist.is_main:
        logger.log(step, final)
        model.save(out, extra={"metrics": final})
        shutil.rmtree(ckpt, ignore_errors=True)
    dist.barrier()
    return final
