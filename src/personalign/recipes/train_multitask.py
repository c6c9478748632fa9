"""Recipe: the Multitask (MT) baseline of Personalized Soups: one LoRA adapter fine-tuned, by supervised
learning, on the judge-chosen responses of every side at once.

config -> main(cfg) -> validate (pairs, sides, fields; before any model loads) -> load base + LoRA ->
build examples -> resume -> per step: batch -> loss -> step -> log -> checkpoint -> save the adapter and
``expert.json``.

Each example is the chosen response of one pair, trained as the answer to the pair's instruction with
that side's policy prompt appended: ``format_chat(build_user_message(prompt, side.prompt))`` + response
+ end-of-sequence, the very text the expert policies see in their rollouts. Prompt and response are
tokenised separately (the prompt as a rollout tokenises it, the response as generated tokens follow
it) and the loss covers the response tokens and the end-of-sequence only: :func:`build_example` sets
every prompt label to -100 from the prompt's length, never by comparing ids with the pad id (the
embedded tokenizer pads with its end-of-sequence token, which the loss must see). Responses longer than
``max_length`` lose their end (and then carry no end-of-sequence: the model is not taught to stop
mid-answer). A chosen response that appears in several pairs of a side and instruction (``label
pairing=all``) is trained once.

The loop: every epoch is a seeded shuffle of the examples; an optimizer step takes the next
``batch_size x grad_accum`` of them, ``grad_accum`` forward passes of ``batch_size``, padded on the
right by TRL's collator (-100 labels on padding). The loss is the summed cross-entropy of the step's
response tokens divided by their count over the whole step (the token mean of the step, as
transformers' trainer normalises accumulated batches); AdamW, transformers' linear schedule with
warm-up, gradient clipping. torch is reseeded from (seed, step) for each step (LoRA dropout), so a
step does the same work whether or not the run was interrupted.

Why a loop of its own rather than TRL's ``SFTTrainer``: under a launcher the trainer's batch is per
process and accelerate pads an epoch's last batch with repeated examples, so several processes would
not train the one-process adapter. Here, as in every training recipe (see docs/distributed.md), each
forward pass of ``batch_size`` examples is cut into contiguous slices, one per process; each process's
loss is its tokens' share of the step's token mean, and the gradients are summed over processes
(:class:`personalign.distributed.Dist`), so the step is the one-process step. Only the main process
writes the run folder.

Run folder: ``config.json``, ``metrics.jsonl`` (every ``log_every`` steps ``train/loss``, ``train/lr``,
``train/grad_norm``, ``train/token_accuracy`` and ``train/entropy`` over the response tokens,
``train/tokens`` (input tokens so far), ``train/epoch``; at the end ``time/train_seconds``),
``checkpoint/`` while training (the LoRA tensors, AdamW's state and the step, in safetensors + JSON);
at the end ``adapter/`` (a standard peft folder) and ``expert.json`` (``kind: multitask``, sides, base
model, config, metrics), written last.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personalign.checkpoint import load_checkpoint, save_checkpoint
from personalign.config import to_dict
from personalign.data import build_user_message, format_chat, iter_jsonl
from personalign.distributed import init as init_distributed
from personalign.distributed import require_unsharded
from personalign.errors import ConfigError, DataError, ModelError, PreferenceError
from personalign.generation import batch_seed
from personalign.reward_model import LoraSpec
from personalign.runlog import MetricsLogger, check_run_data, data_digest, prepare_run_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from personalign.preferences import PreferenceSpace

ADAPTER_DIR = "adapter"
EXPERT_JSON = "expert.json"
CHECKPOINT = "checkpoint"
IGNORE = -100  # the label that the loss skips


@dataclass(frozen=True)
class TrainMultitaskConfig:
    pairs: str  # JSONL of prompt, chosen, side (+ rejected), as `personalign label` writes
    output_dir: str
    sides: tuple[str, ...] = ()  # empty: every side in the pairs file
    model: str | None = None  # None: the embedded default
    dimensions: str | None = None  # a YAML file of extra dimensions
    lora: LoraSpec = field(default_factory=lambda: LoraSpec(r=16, alpha=32, dropout=0.05))  # as the experts
    lr: float = 1e-4  # supervised LoRA commonly uses 1e-4 to 2e-4
    epochs: int = 2
    max_steps: int | None = None  # stop after this many optimizer steps (None: the epochs decide)
    batch_size: int = 8  # examples per forward pass
    grad_accum: int = 1  # forward passes per optimizer step
    max_length: int = 512  # prompt + response tokens; longer responses lose their end
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps
    log_every: int = 5  # optimizer steps
    device: str = "auto"
    autocast_bf16: bool = False  # bf16 autocast: for CUDA or a CPU with native bf16; slower elsewhere
    progress: bool = True


@dataclass(frozen=True)
class Example:
    """One training example: a chosen response to an instruction under one side."""

    prompt: str  # the instruction, without preference prompt
    response: str
    side: str  # side id
    line: int  # line of the pairs file, for error messages


@dataclass(frozen=True)
class Plan:
    cfg: TrainMultitaskConfig
    space: PreferenceSpace
    sides: tuple[str, ...]
    examples: list[Example]


# -- validation (no model) -------------------------------------------------------------------------


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def read_examples(path: str | Path, space: PreferenceSpace) -> list[Example]:
    """The chosen responses of a pairs file; any bad line is an error naming the file and line.

    Exact repeats of (side, instruction, response) are kept once.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"pairs file {path} does not exist (write one with personalign label)")
    out: list[Example] = []
    seen: set[tuple[str, str, str]] = set()
    for lineno, row in iter_jsonl(path, "pairs file"):
        bad = [k for k in ("prompt", "chosen", "side") if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad:
            raise DataError(f"{path}:{lineno}: field(s) {', '.join(bad)} missing or empty (each line needs "
                            "prompt, chosen, rejected and side, as personalign label writes)")
        try:
            side = space.resolve(row["side"])
        except PreferenceError:
            raise DataError(f"{path}:{lineno}: unknown side {row['side']!r}; valid sides: "
                            f"{space.valid_sides_text()} (declare your own with dimensions=FILE)") from None
        key = (side, row["prompt"].strip(), row["chosen"].strip())
        if key not in seen:
            seen.add(key)
            out.append(Example(key[1], key[2], side, lineno))
    if not out:
        raise DataError(f"pairs file {path} is empty")
    return out


def validate(cfg: TrainMultitaskConfig) -> Plan:
    """Check every field, the pairs file and the sides; load no model."""
    from personalign.models import resolve_device
    from personalign.preferences import load_space

    _require(_finite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "a positive number (e.g. lr=1e-4)")
    _require(cfg.epochs >= 1, "epochs", cfg.epochs, "at least 1")
    _require(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", cfg.max_steps, "at least 1, or null")
    _require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "at least 1")
    _require(cfg.grad_accum >= 1, "grad_accum", cfg.grad_accum, "at least 1")
    _require(cfg.max_length >= 8, "max_length", cfg.max_length, "at least 8 tokens")
    _require(_finite(cfg.warmup_fraction) and 0 <= cfg.warmup_fraction < 1, "warmup_fraction",
             cfg.warmup_fraction, "in [0, 1)")
    _require(_finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "a number >= 0")
    _require(_finite(cfg.max_grad_norm) and cfg.max_grad_norm > 0, "max_grad_norm", cfg.max_grad_norm,
             "a positive number")
    _require(cfg.checkpoint_every >= 1, "checkpoint_every", cfg.checkpoint_every, "at least 1")
    _require(cfg.log_every >= 1, "log_every", cfg.log_every, "at least 1")
    _require(_finite(cfg.lora.alpha) and cfg.lora.alpha > 0, "lora.alpha", cfg.lora.alpha, "a positive number")
    _require(_finite(cfg.lora.dropout) and 0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "in [0, 1)")
    _require(len(cfg.lora.target_modules) > 0, "lora.target_modules", list(cfg.lora.target_modules),
             "a non-empty list such as q_proj,v_proj")
    _require(cfg.lora.top_layers is None, "lora.top_layers", cfg.lora.top_layers,
             "null for a policy adapter (it applies to reward models only)")
    resolve_device(cfg.device)  # raises ModelError naming the value

    space = load_space(cfg.dimensions)
    wanted = tuple(dict.fromkeys(space.resolve(s) for s in cfg.sides))
    examples = read_examples(cfg.pairs, space)
    present = tuple(dict.fromkeys(e.side for e in examples))
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DataError(f"{cfg.pairs} has no pairs for side(s) {', '.join(missing)} (it has "
                        f"{', '.join(present)}); label rollouts of that side or drop it from sides")
    sides = wanted or present
    return Plan(cfg, space, sides, [e for e in examples if e.side in sides])


# -- examples ------------------------------------------------------------------------------------


def build_example(tokenizer: PreTrainedTokenizerBase, instruction: str, side_prompt: str, response: str,
                  max_length: int) -> dict[str, list[int]]:
    """``input_ids`` (chat prompt + response + end-of-sequence) and ``labels`` (-100 on the prompt).

    The prompt is tokenised as rollouts tokenise it (special tokens come from the chat template only);
    the response on its own, so no token straddles the boundary. A response cut by ``max_length``
    loses its end-of-sequence with it.
    """
    text = format_chat(tokenizer, build_user_message(instruction, side_prompt))
    add_special = not getattr(tokenizer, "chat_template", None)
    prompt_ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if len(prompt_ids) >= max_length:
        raise DataError(f"the prompt {instruction[:40]!r}... is {len(prompt_ids)} tokens, no room for a response "
                        f"within max_length={max_length}; raise max_length")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer defines no end-of-sequence token; the model could not learn to stop")
    response_ids = tokenizer(response.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE] * len(prompt_ids) + response_ids}


def tokenize_examples(plan: Plan, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, list[int]]]:
    """Every example's ``input_ids`` and ``labels`` (:func:`build_example`); a bad one names its line."""
    rows = []
    for e in plan.examples:
        try:
            rows.append(build_example(tokenizer, e.prompt, plan.space.sides[e.side].prompt, e.response,
                                      plan.cfg.max_length))
        except DataError as exc:
            raise DataError(f"{plan.cfg.pairs}:{e.line}: {exc}") from None
    return rows


def examples_fingerprint(plan: Plan) -> dict[str, Any]:
    """Examples per side and an order-independent digest of their text (``data.json``)."""
    counts: dict[str, int] = {}
    for e in plan.examples:
        counts[e.side] = counts.get(e.side, 0) + 1
    return {"examples": dict(sorted(counts.items())),
            "sha256": data_digest([(e.side, e.prompt, e.response) for e in plan.examples])}


def steps_per_epoch(cfg: TrainMultitaskConfig, n_examples: int) -> int:
    """Optimizer steps per pass over the examples (the last one may take fewer)."""
    return math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))


def total_steps(cfg: TrainMultitaskConfig, n_examples: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` passes over the examples."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return steps_per_epoch(cfg, n_examples) * cfg.epochs


def step_examples(cfg: TrainMultitaskConfig, n_examples: int, step: int) -> list[int]:
    """The examples of optimizer step ``step``: the next ``batch_size x grad_accum`` of its epoch's seeded
    shuffle, so any step's examples are known without replaying the earlier ones (resumption)."""
    per_epoch = steps_per_epoch(cfg, n_examples)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n_examples))
    random.Random(batch_seed(cfg.seed, epoch)).shuffle(order)
    per_step = cfg.batch_size * cfg.grad_accum
    return order[k * per_step:(k + 1) * per_step]


def _summary(rows: list[dict[str, Any]], n_examples: int) -> dict[str, float]:
    steps = [r for r in rows if "train/loss" in r]
    out: dict[str, float] = {"data/examples": n_examples}
    if steps:
        out.update({"steps": steps[-1]["step"], "train/loss_first": steps[0]["train/loss"],
                    "train/loss_last": steps[-1]["train/loss"]})
    seconds = [r["time/train_seconds"] for r in rows if "time/train_seconds" in r]
    if seconds:
        out["time/train_seconds"] = sum(seconds)  # one entry per (resumed) session
    return out


# -- the recipe ------------------------------------------------------------------------------------


def main(cfg: TrainMultitaskConfig) -> dict[str, float]:
    plan = validate(cfg)  # before any model loads
    dist = init_distributed(cfg.device)  # one process unless a launcher started several
    require_unsharded(dist, "train-multitask")  # FSDP: train-rm and train-expert only
    if dist.is_main:
        prepare_run_dir(cfg.output_dir, cfg)
    dist.barrier()
    out = Path(cfg.output_dir)
    logger = MetricsLogger(out)
    finished = (out / EXPERT_JSON).is_file() and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    if dist.is_main:  # never resumed, nor returned, on examples that have changed since
        check_run_data(out, examples_fingerprint(plan), finished, what="examples")
    dist.barrier()
    if finished:
        return json.loads((out / EXPERT_JSON).read_text()).get("metrics", {})

    # -- model: the base with a fresh LoRA adapter, as the experts are built
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from personalign.models import load_model
    from personalign.reward_model import base_fingerprint
    from personalign.rl import build_policy, save_adapter

    base, tok = load_model(cfg.model, device=dist.resolve_device(cfg.device), dtype="float32")  # float32 master
    fingerprint = base_fingerprint(base)
    model = build_policy(base, cfg.lora, cfg.seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    dist.broadcast(params)  # equal on every process from the start (they are seeded alike)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # -- examples, and what each one's loss covers: its labels after the first (a token predicts the next)
    examples = tokenize_examples(plan, tok)
    targets = [sum(1 for x in ex["labels"][1:] if x != IGNORE) for ex in examples]
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    total = total_steps(cfg, len(examples))
    per_epoch = steps_per_epoch(cfg, len(examples))
    # transformers' linear schedule with warm-up, as a function of the step (nothing to checkpoint)
    schedule = get_linear_schedule_with_warmup(opt, int(total * cfg.warmup_fraction), total).lr_lambdas[0]

    # -- resume: the last checkpoint; metrics logged after it are redone
    ckpt = out / CHECKPOINT
    step, tokens_seen = 0, 0
    restored = load_checkpoint(ckpt, opt)
    if restored is not None:
        state, progress = restored
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", []):
            raise ModelError(f"checkpoint {ckpt} holds LoRA tensors of another adapter; delete it to start over")
        step, tokens_seen = int(progress["step"]), int(progress["tokens"])
    if dist.is_main:
        logger.truncate(step)

    bar = None
    if cfg.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"train-multitask {len(plan.sides)} sides", unit="step")
    t0 = time.perf_counter()
    first_step, examples_done = step, 0
    window = torch.zeros(4, dtype=torch.float64)  # summed since the last log: loss, correct, entropy, tokens
    window_steps = 0
    model.train()
    while step < total:
        # -- batch: the step's examples (every process's), then this process's slice of each forward pass
        chosen = step_examples(cfg, len(examples), step)
        examples_done += len(chosen)
        count = max(1, sum(targets[i] for i in chosen))  # the step's loss tokens, over every process
        lr = cfg.lr * schedule(step)
        for group in opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(batch_seed(cfg.seed, step))  # LoRA dropout: the same draws on a rerun of the step
        opt.zero_grad(set_to_none=True)
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, correct, entropy, targets, input tokens
        for start in range(0, len(chosen), cfg.batch_size):
            micro = chosen[start:start + cfg.batch_size]
            a, b = dist.shard(len(micro))
            if b == a:  # fewer examples than processes in this pass: this one adds zero gradients
                continue
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in micro[a:b]]).items()}
            labels = batch["labels"][:, 1:]  # (B, L - 1): position j predicts token j + 1
            valid = labels != IGNORE
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1][valid].float()  # (n, V) at the response tokens
            target = labels[valid]
            # -- loss: this process's summed cross-entropy over the step's token count (its share of the mean)
            loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            (loss / count).backward()
            with torch.no_grad():
                logp = logits.log_softmax(-1)
                sums += torch.stack([loss.detach().double(), (logits.argmax(-1) == target).sum().double(),
                                     -(logp.exp() * logp).sum().double(), torch.tensor(float(len(target)), device=device),
                                     batch["attention_mask"].sum().double()])
        # -- step: gradients summed over processes, then every process clips and steps alike
        dist.sum_grads(params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        opt.step()
        step += 1
        sums = dist.all_sum(sums).cpu()
        tokens_seen += int(sums[4])
        window += torch.stack([sums[0] / count, sums[1], sums[2], sums[3]])
        window_steps += 1

        # -- log: means over the steps since the last log (of this session)
        if step % cfg.log_every == 0 or step == total:
            if dist.is_main:
                logger.log(step, {"train/loss": float(window[0] / window_steps), "train/lr": lr,
                                  "train/grad_norm": grad_norm,
                                  "train/token_accuracy": float(window[1] / window[3].clamp(min=1)),
                                  "train/entropy": float(window[2] / window[3].clamp(min=1)),
                                  "train/tokens": tokens_seen, "train/epoch": step / per_epoch})
            window.zero_()
            window_steps = 0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(sums[0] / count):.3f}")

        # -- checkpoint
        if step % cfg.checkpoint_every == 0 and step < total:
            if dist.is_main:
                save_checkpoint(ckpt, get_peft_model_state_dict(model), opt, {"step": step, "tokens": tokens_seen})
            dist.barrier()
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    if dist.is_main and step > first_step:
        logger.log(step, {"time/train_seconds": seconds, "time/samples_per_second": examples_done / seconds,
                          "time/steps_per_second": (step - first_step) / seconds})

    # -- save: a standard peft adapter folder, then expert.json last
    dist.barrier()  # every metrics line is written
    final = _summary(logger.read(), len(examples))
    if not dist.is_main:
        dist.barrier()
        return final
    save_adapter(model, out / ADAPTER_DIR)
    doc = {
        "kind": "multitask",
        "sides": list(plan.sides),
        "side_names": [plan.space.sides[s].name for s in plan.sides],
        "base": fingerprint,
        "adapter": ADAPTER_DIR,
        "config": to_dict(cfg),
        "metrics": final,
    }
    (out / EXPERT_JSON).write_text(json.dumps(doc, indent=2))
    shutil.rmtree(ckpt, ignore_errors=True)
    dist.barrier()
    return final
