"""personalign: align a language model to one person's declared preferences.

The public API is small; every method goes through one entry point::

    from personalign import load_personalized, SamplingConfig

    pm = load_personalized("1A,2B,3A", method="soup")          # or "prompt", "mope", ...
    pm.generate(["Explain photosynthesis."], SamplingConfig(temperature=0))

    from personalign import load_model, generate
    model, tok = load_model()
    generate(model, tok, "Explain photosynthesis.", prefs="1A,2B,3A", method="mope", mix="prob")

"""

from __future__ import annotations

from typing import Any

from personalign.data import Instruction, load_builtin, load_prompts
from personalign.errors import ConfigError, DataError, ModelError, PersonalignError, PreferenceError
from personalign.generation import SamplingConfig
from personalign.models import EMBEDDED_DEFAULT, load_model
from personalign.personalize import (
    Method,
    MethodOptions,
    Personalization,
    PersonalizedModel,
    load_personalized,
    personalize,
    resolve,
)
from personalign.preferences import Preference, PreferenceSpace, parse_preference

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_DEFAULT",
    "ConfigError",
    "DataError",
    "Instruction",
    "Method",
    "MethodOptions",
    "ModelError",
    "PersonalignError",
    "Personalization",
    "PersonalizedModel",
    "Preference",
    "PreferenceError",
    "PreferenceSpace",
    "SamplingConfig",
    "generate",
    "load_builtin",
    "load_model",
    "load_personalized",
    "load_prompts",
    "parse_preference",
    "personalize",
    "resolve",
]


def generate(
    model,
    tokenizer,
    instructions: list[str] | str,
    prefs: str | Preference | None = None,
    method: str = "prompt",
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    dimensions: str | None = None,
    **options: Any,
) -> list[str] | str:
    """Answer one instruction (returns a string) or several (returns a list) under a preference.

    ``method`` and ``options`` (``experts``, ``merge``, ``merge_rank``, ``merge_density``, ``merge_seed``,
    ``mix``, ``strength``, ``pcm``, ``adapter``) are those of ``personalign generate``; ``model`` is left unchanged
    (methods that change weights work on a copy). To answer many calls under one preference, build the
    model once with :func:`personalize` instead.
    """
    from personalign.models import canonical_name
    from personalign.personalize import _options

    name = getattr(model.config, "personalign_base", None) or model.name_or_path
    spec = resolve(prefs, _options(method, options), model=canonical_name(name), dimensions=dimensions)
    out = personalize(model, tokenizer, spec).generate(instructions, sampling, batch_size=batch_size)
    return out[0] if isinstance(instructions, str) else out
