"""Batched, seeded text generation that stops at end-of-sequence.

Seeding is per batch, derived from the user's seed and the index of the batch's first item, so a
file run that is interrupted and resumed (at a batch boundary, with the same batch size) produces the
same text as an uninterrupted one, and the same seed always gives the same output.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from personalign.data import batched, build_user_message, format_chat
from personalign.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from personalign.preferences import Preference

__all__ = ["Method", "SamplingConfig", "generate_texts", "build_prompts", "eos_token_ids"]


class Method(str, enum.Enum):
    """How a preference is honoured at generation time."""

    VANILLA = "vanilla"  # base model, no preference prompt
    PROMPT = "prompt"  # base model, preference prompt appended (the PP baseline)
    EXPERT = "expert"  # one side's expert adapter, with that side's prompt
    SOUP = "soup"  # the chosen sides' experts merged into one adapter (Personalized Soups)
    MOPE = "mope"  # the chosen sides' experts mixed token by token (MoPE)
    ADAPTER = "adapter"  # one given adapter (multitask, P-MORL, RLHF), with the preference prompt

    @property
    def uses_experts(self) -> bool:
        return self in (Method.EXPERT, Method.SOUP, Method.MOPE)

    @classmethod
    def parse(cls, value: str) -> Method:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown method {value!r}; choose one of {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.1  # small models loop when sampling without one
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise ConfigError(f"temperature must be in [0, 10], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    def generate_kwargs(self) -> dict[str, object]:
        kw: dict[str, object] = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kw


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's and the tokenizer's end-of-sequence."""
    ids: list[int] = []
    cfg = getattr(model.generation_config, "eos_token_id", None)
    for v in (cfg if isinstance(cfg, list) else [cfg]) + [tokenizer.eos_token_id]:
        if v is not None and v not in ids:
            ids.append(int(v))
    if not ids:
        raise ConfigError("the tokenizer defines no end-of-sequence token; generation would never stop")
    return ids


def build_prompts(
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    preference: Preference | None,
    method: Method,
) -> list[str]:
    """Chat-formatted model inputs for each instruction under a preference and method."""
    suffix = preference.prompt() if (preference is not None and method is not Method.VANILLA) else ""
    return [format_chat(tokenizer, build_user_message(text, suffix)) for text in instructions]


def batch_seed(seed: int, first_index: int) -> int:
    # A fixed odd multiplier spreads nearby seeds; the result stays within torch's seed range.
    return (seed * 1_000_003 + first_index) % (2**63 - 1)


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    batch_size: int = 8,
    first_index: int = 0,
    on_batch: Callable[[int, list[str]], None] | None = None,
) -> list[str]:
    """Generate a response for each already formatted input text.

    ``first_index`` is the position of ``texts[0]`` in a larger run (it seeds the batches);
    ``on_batch(start, responses)`` is called after each batch, e.g. to write results durably.
    """
    import torch

    from personalign.kernels import fast_decode

    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    kwargs = sampling.generate_kwargs()
    device = next(model.parameters()).device
    outputs: list[str] = []
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"  # decoder-only batches must be left-padded
    # Chat-formatted texts already hold their special tokens; plain ones need the tokenizer's.
    add_special = not getattr(tokenizer, "chat_template", None)
    for start, chunk in batched(list(texts), batch_size):
        enc = tokenizer(list(chunk), return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
        torch.manual_seed(batch_seed(sampling.seed, first_index + start))
        with torch.inference_mode(), fast_decode(model):
            out = model.generate(**enc, eos_token_id=eos, pad_token_id=pad_id, **kwargs)
        new_tokens = out[:, enc["input_ids"].shape[1] :]  # (B, T_new)
        responses = [r.strip() for r in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        outputs.extend(responses)
        if on_batch is not None:
            on_batch(first_index + start, responses)
    return outputs
