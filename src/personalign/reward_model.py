"""Bradley-Terry reward models: a causal-LM backbone with LoRA and a scalar head per side.

The reward is read from the hidden state of the **last real token** (found from the attention mask,
so left or right padding both work and a pad id equal to end-of-sequence cannot mislead it), or, with
``pooling="mean"``, from the mean of every real token's state: properties spread over the whole text
(how many distinct facts it holds, its tone) can be linear in the mean where the last token's state
does not hold them (see docs/pipeline.md); ``"last+mean"`` reads both, side by side (a multi-head
model whose sides want different readouts). A model
has one head (one side) or several heads sharing one backbone (multi-head: every side's reward from a
single forward pass).

Inputs are the chat-formatted instruction, followed by the response and end-of-sequence. A
single-side model (the paper's) also appends the side's preference prompt to the instruction: the
wording the policy saw when it was rolled out. A multi-head model reads the instruction alone, so one
forward pass scores a response on every side whatever prompt produced it (``side_prompt_in_input``
chooses; by default True for one side, False for several).

Saved as ``reward_model.safetensors`` (LoRA and head weights only) plus ``reward_config.json``; the
base model is loaded from its own name and checked against the fingerprint stored at save time.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from personalign.data import build_user_message, format_chat
from personalign.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["LoraSpec", "POOLINGS", "PrefixCache", "RewardModel", "last_token_index", "base_fingerprint", "pool"]

POOLINGS = ("last", "mean", "last+mean")

WEIGHTS = "reward_model.safetensors"
CONFIG = "reward_config.json"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    # LoRA on the last N decoder layers only (None: every layer). Backpropagation then stops at the
    # first adapted layer, so a step costs a full forward pass but only N layers of backward pass.
    top_layers: int | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora r must be at least 1, got {self.r}")
        if self.top_layers is not None and self.top_layers < 1:
            raise ValueError(f"lora top_layers must be at least 1 (or unset for every layer), got {self.top_layers}")

    def module_names(self, model: nn.Module, used_layers: int | None = None) -> list[str]:
        """The modules of ``model`` that get LoRA: every target module, or with ``top_layers`` the target
        modules of the last N numbered layers (full names, so the choice does not depend on how peft
        matches layer patterns). ``used_layers``: only the first that many layers run (a reward model
        read at an inner layer); the layers above get no LoRA and "last" counts from there."""
        names = [n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in self.target_modules)]
        if self.top_layers is None and used_layers is None:
            return names
        layer_of = {n: int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)(?:layers|h|blocks?)\.(\d+)\.", n))}
        if not layer_of:
            raise ModelError("lora top_layers needs numbered decoder layers (layers.N, h.N or blocks.N), "
                             "which this model does not have; leave top_layers unset")
        count = max(layer_of.values()) + 1 if used_layers is None else used_layers
        top = count if self.top_layers is None else self.top_layers
        if top > count:
            raise ConfigError(f"lora top_layers={self.top_layers} but the model has only {count} layers"
                             + ("" if used_layers is None else " in use (readout_layer)"))
        return [n for n, i in layer_of.items() if count - top <= i < count]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row. # (B, T) -> (B,)"""
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.flip(1).long().argmax(dim=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last") -> torch.Tensor:
    """One vector per sequence: the last real token's state, the mean over real tokens, or both side by
    side (``last+mean``). # (B, T, H) -> (B, H) or (B, 2H)"""
    if pooling == "last+mean":
        return torch.cat([pool(hidden, attention_mask, "last"), pool(hidden, attention_mask, "mean")], dim=-1)
    if pooling == "last":
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if pooling == "mean":
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def base_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """What must match for adapters trained on one base to be valid on another."""
    c = model.config
    return {
        "name": getattr(c, "personalign_base", None) or getattr(c, "_name_or_path", None),
        "model_type": c.model_type,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "vocab_size": c.vocab_size,
    }


def check_fingerprint(expected: dict[str, Any], model: PreTrainedModel, what: str) -> None:
    got = base_fingerprint(model)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if expected.get(key) != got.get(key):
            same_name = str(expected.get("name")) == str(got.get("name"))
            fix = (f"the model at {got.get('name')!r} changed since it was trained; train it again on this model"
                   if same_name else f"load it with --model {expected.get('name')}")
            raise ModelError(
                f"{what} was trained on base model {expected.get('name')!r} ({key}={expected.get(key)}), but the "
                f"loaded base is {got.get('name')!r} ({key}={got.get(key)}); {fix}"
            )


def read_reward_config(folder: str | Path) -> dict[str, Any]:
    """A reward model folder's config (its sides, base model, LoRA), read without loading anything; a folder
    that is not a reward model's is one error naming what is missing."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ModelError(f"{folder} is not a reward model folder (needs {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{folder / CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("kind") != "reward_model":
        raise ModelError(f"{folder} holds a {cfg.get('kind') if isinstance(cfg, dict) else cfg!r}, not a reward model")
    return cfg


class RewardModel(nn.Module):
    """Backbone (a causal LM's decoder, with LoRA) + linear heads, one scalar per side."""

    def __init__(self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sides: Sequence[str],
                 lora: LoraSpec = LoraSpec(), max_length: int = 384, side_prompts: dict[str, str] | None = None,
                 side_prompt_in_input: bool | None = None, readout_layer: int | None = None,
                 pooling: str = "last"):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if not sides:
            raise ValueError("a reward model needs at least one side")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.pooling = pooling
        self.sides = tuple(sides)
        self.lora = lora
        self.max_length = max_length
        self.side_prompts = dict(side_prompts or {})
        self.side_prompt_in_input = len(self.sides) == 1 if side_prompt_in_input is None else side_prompt_in_input
        self.fingerprint = base_fingerprint(base)
        self.tokenizer = tokenizer
        # The decoder without its language-model head: the head's 49k-way logits are not needed.
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.base_model
        self.readout_layer = readout_layer
        if readout_layer is not None:
            layers = getattr(decoder, "layers", None)
            if not isinstance(layers, nn.ModuleList) or not isinstance(getattr(decoder, "norm", None), nn.Module):
                raise ModelError("readout_layer needs a decoder with `layers` and `norm` (as llama, mistral, qwen); "
                                 "leave readout_layer unset for this model")
            if not 1 <= readout_layer <= len(layers):
                raise ConfigError(f"readout_layer must be between 1 and {len(layers)} (the model's layers), "
                                 f"got {readout_layer}")
        targets = lora.module_names(decoder, readout_layer)
        if not targets:
            raise ModelError(f"none of the LoRA target modules {list(lora.target_modules)} exist in this base model")
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
        self.backbone = get_peft_model(decoder, cfg)
        hidden = base.config.hidden_size
        if pooling == "last+mean":
            hidden *= 2
        self.head = nn.Linear(hidden, len(self.sides))
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(decoder.parameters()).device)

    # -- inputs -----------------------------------------------------------------------------------
    def format(self, prompt: str, response: str, side: str | None = None, policy_prompt: str | None = None) -> str:
        """Chat-formatted instruction (+ the side's preference prompt) + response + end-of-sequence."""
        if policy_prompt is not None:
            suffix = policy_prompt
        elif self.side_prompt_in_input:
            suffix = self.side_prompts.get(side or "", "")
        else:
            suffix = ""
        eos = self.tokenizer.eos_token or ""
        return format_chat(self.tokenizer, build_user_message(prompt, suffix)) + response.strip() + eos

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            # Truncate from the left of the prompt? No: keep the start (instruction and preference) and
            # cut the end of very long responses; the reward of a cut response is still well defined.
            enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_length,
                      add_special_tokens=False)
        finally:
            tok.padding_side = side
        return {k: v.to(self.head.weight.device) for k, v in enc.items()}

    # -- scoring ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards for every side. # (B, T) -> (B, K)"""
        return self.head(self.features(input_ids, attention_mask))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the head reads: the last real token's state (or the mean, see ``pooling``). # (B, T) -> (B, H)"""
        if self.readout_layer is None:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        else:  # the first readout_layer layers, then the final norm
            with self._decoder_span(0, self.readout_layer, final_norm=True) as decoder:
                hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return pool(hidden, attention_mask, self.pooling).to(self.head.weight.dtype)

    # -- the frozen prefix (LoRA on the top layers only) ---------------------------------------------
    def frozen_prefix(self) -> int:
        """Number of decoder layers before the first adapted one (0 when every layer is adapted or the
        decoder does not expose ``layers`` and ``norm``). Their output never changes during training."""
        from peft.tuners.lora import LoraLayer

        decoder = self.backbone.get_base_model()
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not isinstance(getattr(decoder, "norm", None), nn.Module):
            return 0
        for i, layer in enumerate(layers):
            if any(isinstance(m, LoraLayer) for m in layer.modules()):
                return i
        return 0

    @contextlib.contextmanager
    def _decoder_span(self, start: int, stop: int | None, final_norm: bool) -> Iterator[nn.Module]:
        decoder = self.backbone.get_base_model()
        layers, norm = decoder.layers, decoder.norm
        decoder.layers = nn.ModuleList(list(layers)[start:stop])
        if not final_norm:
            decoder.norm = nn.Identity()
        try:
            yield decoder
        finally:
            decoder.layers, decoder.norm = layers, norm

    @torch.no_grad()
    def prefix_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: int) -> torch.Tensor:
        """Hidden states entering decoder layer ``layers``. # (B, T) -> (B, T, H)"""
        with self._decoder_span(0, layers, final_norm=False) as decoder:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: int) -> torch.Tensor:
        """Rewards from the hidden states entering layer ``layers`` (see :meth:`prefix_hidden`).
        # (B, T, H) -> (B, K)"""
        return self.head(self.features_from(hidden, attention_mask, layers))

    def features_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: int) -> torch.Tensor:
        """:meth:`features` from the hidden states entering layer ``layers``. # (B, T, H) -> (B, H)"""
        with self._decoder_span(layers, self.readout_layer, final_norm=True) as decoder:
            out = decoder(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return pool(out, attention_mask, self.pooling).to(self.head.weight.dtype)

    def side_index(self, side: str) -> int:
        try:
            return self.sides.index(side)
        except ValueError:
            raise ModelError(f"this reward model scores sides {', '.join(self.sides)}, not {side}") from None

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], side: str | None = None,
              batch_size: int = 16) -> torch.Tensor:
        """Rewards of responses to prompts: (N,) for one side (default: the only one), else (N, K)."""
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses differ in length")
        was_training = self.training
        self.eval()
        cols = [self.side_index(side)] if side else list(range(len(self.sides)))
        if self.side_prompt_in_input:
            # The input depends on the side: one pass per side.
            out = [self._score_pass(prompts, responses, self.sides[c], batch_size)[:, c] for c in cols]
            result = torch.stack(out, dim=1)
        else:
            result = self._score_pass(prompts, responses, None, batch_size)[:, cols]  # one pass, every side
        self.train(was_training)
        return result[:, 0] if side or len(self.sides) == 1 else result

    def _score_pass(self, prompts: Sequence[str], responses: Sequence[str], side: str | None,
                    batch_size: int) -> torch.Tensor:
        vals = []
        for i in range(0, len(prompts), batch_size):
            texts = [self.format(p, r, side) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
            vals.append(self(**self.encode(texts)).float().cpu())
        return torch.cat(vals) if vals else torch.empty(0, len(self.sides))

    # -- persistence ------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.backbone).items()}
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
        if not lora or set(head) != {"weight", "bias"}:
            raise ModelError("reward model weights are incomplete (LoRA or head tensors missing)")
        if head["weight"].shape != self.head.weight.shape:
            raise ModelError(f"reward head has shape {tuple(head['weight'].shape)}, expected {tuple(self.head.weight.shape)}")
        result = set_peft_model_state_dict(self.backbone, lora)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ModelError(f"reward model LoRA weights do not fit this base ({len(unexpected)} unexpected tensors)")
        self.head.load_state_dict({k: v.to(self.head.weight.dtype) for k, v in head.items()})

    def config_dict(self) -> dict[str, Any]:
        return {"kind": "reward_model", "sides": list(self.sides), "lora": asdict(self.lora),
                "max_length": self.max_length, "side_prompts": self.side_prompts,
                "side_prompt_in_input": self.side_prompt_in_input, "readout_layer": self.readout_layer,
                "pooling": self.pooling, "base": self.fingerprint}

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (WEIGHTS + ".tmp")
        save_file(self.trainable_state(), str(tmp))
        tmp.replace(folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps({**self.config_dict(), **(extra or {})}, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, base: PreTrainedModel | None = None,
             tokenizer: PreTrainedTokenizerBase | None = None, device: str = "auto", dtype: str = "auto") -> RewardModel:
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = read_reward_config(folder)
        if base is None or tokenizer is None:
            from personalign.models import load_model

            base, tokenizer = load_model(cfg["base"]["name"], device=device, dtype=dtype)
        check_fingerprint(cfg["base"], base, f"reward model {folder}")
        lora = LoraSpec(**{**cfg["lora"], "target_modules": tuple(cfg["lora"]["target_modules"])})
        model = cls(base, tokenizer, cfg["sides"], lora, cfg["max_length"], cfg.get("side_prompts"),
                    cfg.get("side_prompt_in_input"), cfg.get("readout_layer"), cfg.get("pooling", "last"))
        model.load_trainable_state(load_file(str(folder / WEIGHTS)))
        model.eval()
        return model


class PrefixCache:
    """Training-time rewards that run the frozen bottom of the backbone once per distinct text.

    With LoRA on the top N layers only (``lora.top_layers``), the layers below never change, so their
    output for a text is the same in every epoch and in every pair the text appears in (with all-pairs
    labelling each response is in several pairs). The cache keeps, per text, the hidden states entering
    the first adapted layer (float32, unpadded, on the CPU) and each step runs only the top layers.

    Some architectures transform ``inputs_embeds`` inside their forward (Gemma scales them), which would
    make the split differ from the full model. ``check`` compares the two on real texts first and
    :func:`for_model` returns None (caller falls back to the full forward) when they differ.
    """

    def __init__(self, model: RewardModel, layers: int):
        self.model = model
        self.layers = layers
        self.store: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_model(cls, model: RewardModel, probe_texts: Sequence[str]) -> PrefixCache | None:
        layers = model.frozen_prefix()
        if layers == 0:
            return None
        cache = cls(model, layers)
        return cache if cache.check(probe_texts[:2]) else None

    @torch.no_grad()
    def check(self, texts: Sequence[str], tol: float = 1e-4) -> bool:
        was = self.model.training
        self.model.eval()  # no LoRA dropout: the two paths must agree exactly up to rounding
        try:
            enc = self.model.encode(list(texts))
            full = self.model(**enc).float()
            split = self.model.forward_from(self.model.prefix_hidden(enc["input_ids"], enc["attention_mask"],
                                                                     self.layers),
                                            enc["attention_mask"], self.layers).float()
        finally:
            self.model.train(was)
        return bool(torch.allclose(full, split, rtol=tol, atol=tol))

    def _fill(self, texts: Sequence[str], batch_size: int = 16) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self.store))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        for i in range(0, len(missing), batch_size):
            chunk = missing[i:i + batch_size]
            enc = self.model.encode(chunk)
            hidden = self.model.prefix_hidden(enc["input_ids"], enc["attention_mask"], self.layers).float().cpu()
            lengths = enc["attention_mask"].sum(1).tolist()  # right-padded: real tokens come first
            for text, h, n in zip(chunk, hidden, lengths):
                self.store[text] = h[: int(n)].clone()

    def rewards(self, texts: Sequence[str]) -> torch.Tensor:
        """Rewards of ``texts`` on every side, with gradients through the top layers. # -> (B, K)"""
        return self.model.head(self.features(texts))

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """:meth:`RewardModel.features` of ``texts``, from the cache. # -> (B, H)"""
        self._fill(texts)
        rows = [self.store[t] for t in texts]
        width = max(r.shape[0] for r in rows)
        device = self.model.head.weight.device
        hidden = torch.zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            hidden[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        dtype = next(self.model.backbone.parameters()).dtype
        return self.model.features_from(hidden.to(device, dtype), mask.to(device), self.layers)
