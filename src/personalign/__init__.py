"""personalign: align a language model to one person's declared preferences.

The public API is small::

    from personalign import load_model, parse_preference, load_prompts, generate

"""

from __future__ import annotations

from personalign.data import Instruction, load_builtin, load_prompts
from personalign.errors import ConfigError, DataError, ModelError, PersonalignError, PreferenceError
from personalign.generation import Method, SamplingConfig
from personalign.models import EMBEDDED_DEFAULT, load_model
from personalign.preferences import Preference, PreferenceSpace, parse_preference

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_DEFAULT",
    "ConfigError",
    "DataError",
    "Instruction",
    "Method",
    "ModelError",
    "PersonalignError",
    "Preference",
    "PreferenceError",
    "PreferenceSpace",
    "SamplingConfig",
    "generate",
    "load_builtin",
    "load_model",
    "load_prompts",
    "parse_preference",
]


def generate(
    model,  # noqa: ANN001 - a transformers causal LM
    tokenizer,  # noqa: ANN001
    instructions: list[str] | str,
    prefs: str | Preference | None = None,
    method: str = "prompt",
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
) -> list[str] | str:
    """Answer one instruction (returns a string) or several (returns a list) under a preference."""
    from personalign.generation import build_prompts, generate_texts

    single = isinstance(instructions, str)
    items = [instructions] if single else list(instructions)
    m = Method.parse(method)
    pref = parse_preference(prefs) if prefs is not None else None
    if pref is None and m is not Method.VANILLA:
        raise PreferenceError("prefs is required unless method='vanilla'")
    texts = build_prompts(tokenizer, items, pref, m)
    out = generate_texts(model, tokenizer, texts, sampling or SamplingConfig(), batch_size=batch_size)
    return out[0] if single else out
