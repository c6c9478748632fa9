"""Recipe: the Multitask (MT) baseline of Personalized Soups: one LoRA adapter fine-tuned, by supervised
learning, on the judge-chosen responses of every side at once.

config -> main(cfg) -> validate (pairs, sides, fields; before any model loads) -> load base + LoRA ->
build examples -> train with TRL's ``SFTTrainer`` (resumes from its last checkpoint) -> save the adapter
and ``expert.json``.

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

Why TRL: the supervised loop (batching, right padding with -100 labels, AdamW with warm-up and linear
decay, gradient clipping, checkpoints with optimizer, scheduler and RNG state, resumption mid-epoch)
is exactly what ``SFTTrainer`` does, so this recipe hands it pre-tokenised ``input_ids`` + ``labels``
and keeps no loop of its own. Its checkpoints (``checkpoints/checkpoint-N``) use torch's format for the
optimizer and RNG state; they are deleted once the final adapter (safetensors) is written.

Run folder: ``config.json``, ``metrics.jsonl`` (``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/token_accuracy``, ``train/entropy``, ``train/tokens``, ``train/epoch``, and at the end
``time/train_seconds``), ``checkpoints/`` while training; at the end ``adapter/`` (a standard peft
folder) and ``expert.json`` (``kind: multitask``, sides, base model, config, metrics), written last.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.config import to_dict
from personalign.data import build_user_message, format_chat, iter_jsonl
from personalign.distributed import require_one_process
from personalign.errors import ConfigError, DataError, ModelError, PreferenceError
from personalign.reward_model import LoraSpec
from personalign.runlog import MetricsLogger, prepare_run_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from personalign.preferences import PreferenceSpace

ADAPTER_DIR = "adapter"
EXPERT_JSON = "expert.json"
CHECKPOINTS = "checkpoints"
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


def build_dataset(plan: Plan, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The examples as a ``datasets.Dataset`` of ``input_ids`` and ``labels`` (TRL uses them as given)."""
    from datasets import Dataset

    rows = []
    for e in plan.examples:
        try:
            rows.append(build_example(tokenizer, e.prompt, plan.space.sides[e.side].prompt, e.response,
                                      plan.cfg.max_length))
        except DataError as exc:
            raise DataError(f"{plan.cfg.pairs}:{e.line}: {exc}") from None
    return Dataset.from_list(rows)


# -- TRL glue ------------------------------------------------------------------------------------

# TRL's log keys -> our metric names.
METRIC_NAMES = {
    "loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm", "entropy": "train/entropy",
    "mean_token_accuracy": "train/token_accuracy", "num_tokens": "train/tokens", "epoch": "train/epoch",
    "train_runtime": "time/train_seconds", "train_samples_per_second": "time/samples_per_second",
    "train_steps_per_second": "time/steps_per_second", "train_loss": "train/mean_loss",
}


def _metrics_callback(logger: MetricsLogger) -> Any:
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        """Append each of the trainer's logs to ``metrics.jsonl`` with slash names."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            row = {METRIC_NAMES[k]: float(v) for k, v in (logs or {}).items()
                   if k in METRIC_NAMES and isinstance(v, (int, float))}
            if row:
                logger.log(state.global_step, row)

    return MetricsToJsonl()


def total_steps(cfg: TrainMultitaskConfig, n_examples: int) -> int:
    """Optimizer steps of the run (as the trainer counts them)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = max(1, math.ceil(n_examples / cfg.batch_size) // cfg.grad_accum)
    return per_epoch * cfg.epochs


def sft_config(cfg: TrainMultitaskConfig, folder: Path, n_examples: int) -> Any:
    from trl import SFTConfig

    from personalign.models import resolve_device

    return SFTConfig(
        output_dir=str(folder),
        use_cpu=resolve_device(cfg.device).type == "cpu",
        bf16=cfg.autocast_bf16,
        gradient_checkpointing=False,  # TRL turns it on by default: ~20% slower, and LoRA on a small model fits
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="linear",
        warmup_steps=int(total_steps(cfg, n_examples) * cfg.warmup_fraction),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        max_length=None,  # build_example already truncated
        logging_steps=cfg.log_every,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=1,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
    )


def _checkpoint_step(folder: Path) -> tuple[str | None, int]:
    """The trainer's last checkpoint folder and its step (None, 0 when there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    if not folder.is_dir():
        return None, 0
    last = get_last_checkpoint(str(folder))
    if last is None:
        return None, 0
    try:
        step = int(json.loads((Path(last) / "trainer_state.json").read_text())["global_step"])
    except (OSError, KeyError, ValueError, json.JSONDecodeError):
        raise ModelError(f"checkpoint {last} is unreadable; delete {folder} to start over") from None
    return last, step


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
    require_one_process("train-multitask")  # not data parallel yet
    out = prepare_run_dir(cfg.output_dir, cfg)
    logger = MetricsLogger(out)
    if (out / EXPERT_JSON).is_file() and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file():
        return json.loads((out / EXPERT_JSON).read_text()).get("metrics", {})

    # -- model: the base with a fresh LoRA adapter, as the experts are built
    from personalign.models import load_model, quiet_transformers
    from personalign.reward_model import base_fingerprint
    from personalign.rl import build_policy, save_adapter

    base, tok = load_model(cfg.model, device=cfg.device, dtype="float32")  # float32 master weights
    fingerprint = base_fingerprint(base)
    model = build_policy(base, cfg.lora, cfg.seed)

    # -- examples
    dataset = build_dataset(plan, tok)

    # -- resume: the trainer's last checkpoint; metrics logged after it are redone
    ckpt_dir = out / CHECKPOINTS
    last, done = _checkpoint_step(ckpt_dir)
    logger.truncate(done)

    # -- train
    from trl import SFTTrainer

    with quiet_transformers(progress=cfg.progress):
        trainer = SFTTrainer(model=model, args=sft_config(cfg, ckpt_dir, len(dataset)), train_dataset=dataset,
                             processing_class=tok, callbacks=[_metrics_callback(logger)])
        trainer.train(resume_from_checkpoint=last)

    # -- save: a standard peft adapter folder, then expert.json last
    final = _summary(logger.read(), len(dataset))
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
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return final
