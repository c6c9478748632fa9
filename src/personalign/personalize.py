"""The one way into a personalized model: (base model, preference, method and its options) -> something
that generates. The CLI, the Python API, the evaluation harness and the server all come through here.

Two calls, so that everything checkable is checked before any model is loaded::

    spec = resolve("1A,2B,3A", MethodOptions(method="soup", merge="exact"))   # validation only
    pm = personalize(model, tokenizer, spec)                                    # builds the model
    pm.generate(["Explain photosynthesis."], SamplingConfig(temperature=0))

or both at once, loading the base model too: ``load_personalized("1A,2B,3A", method="mope")``.

:func:`resolve` parses the method and the preference, finds the experts of the preference's sides
(and that they were trained on this base model, from their configs), checks the weights (MoPE needs
non-negative ones, ``expert`` one side), the merge or mixing rule and its options, the PCM and the
adapter. :func:`personalize` then builds, by method:

* ``vanilla``, ``prompt`` - the base model (``prompt`` appends the preference prompt to the instruction);
* ``expert`` / ``adapter`` - the base with one adapter merged into its weights;
* ``soup`` - the base with the experts merged into one adapter (in memory; cached on disk as a side
  effect) and that merged into its weights;
* ``mope`` - the experts as adapters of one peft model, mixed token by token with fixed weights, or the
  PCM's per-token weights; the extrapolate rule runs the base model too and moves ``strength`` times
  the experts' weighted difference away from it.

``strength`` (soups, and MoPE's extrapolate rule) scales how strongly the preference speaks: 1 is the
experts' weighted average, 0 the base model.

Every method gives a :class:`PersonalizedModel` with the same calls: ``generate`` (instructions ->
responses, in seeded batches), ``complete`` (formatted texts -> token ids, texts and finish reasons,
with stop strings), ``stream`` (one text, token by token). All run the one decode loop of
:mod:`personalign.generation`.

Why one file of 500 lines: the entry point reads in one place, from the request and every check on it to
the object each method builds; the pieces it builds from (adapters, soups, experts, the decode loop) are
in their own modules.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.errors import ConfigError, PreferenceError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from personalign.generation import SamplingConfig, Step
    from personalign.mixing import MixRule
    from personalign.preferences import Preference, PreferenceSpace

__all__ = [
    "STRENGTH_FILE",
    "Completion",
    "Method",
    "MethodOptions",
    "Personalization",
    "PersonalizedModel",
    "build_prompts",
    "chat_text",
    "check_strength",
    "default_strength",
    "default_strengths",
    "load_personalized",
    "personalize",
    "plain_text",
    "resolve",
    "strength_suffix",
]


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

    @property
    def changes_weights(self) -> bool:
        return self not in (Method.VANILLA, Method.PROMPT)

    @classmethod
    def parse(cls, value: str | Method) -> Method:
        if isinstance(value, Method):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"unknown method {value!r}; choose one of {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class MethodOptions:
    """A method and its options, as every face takes them (CLI flags, Python keywords, request fields).

    Options that do not apply to the method must keep their defaults: a ``--mix`` given with a soup is
    refused, never ignored.
    """

    method: str = "prompt"
    experts: str | None = None  # folder of <SIDE>/ adapters; None: the experts shipped for the model
    merge: str = "psoups"  # soup: psoups | exact | ties | dare | dare_ties
    merge_rank: int | None = None  # soup exact/ties/dare: compress to this rank by SVD
    merge_density: float | None = None  # soup ties/dare: fraction kept (default 0.5)
    merge_seed: int | None = None  # soup dare: random pruning seed (default 0)
    mix: str = "prob"  # mope: prob | logit | uniform | extrapolate
    # soup: the merged delta is strength x the weighted sum of the experts' deltas; mope with mix
    # extrapolate: base + strength x the weighted sum of each expert's difference from the base. None: the
    # measured default of the rule for these experts (their strength.json, else 1); :func:`resolve` fills it in.
    strength: float | None = None
    pcm: str | None = None  # mope: a train-pcm folder, or "shipped"
    adapter: str | None = None  # adapter: a peft adapter folder
    # expert/soup/mope: sides of the preference that have no expert are only prompted (their prompt is in
    # the preference prompt every method appends) instead of refused; the experts of the others compose.
    prompt_missing: bool = False


@dataclass(frozen=True)
class Personalization:
    """A validated request for a personalized model: what :func:`personalize` builds. No model is loaded."""

    method: Method
    preference: Preference | None
    model_name: str  # the base model's canonical name (adapters must have been trained on it)
    options: MethodOptions
    experts_dir: Path | None = None
    experts: Mapping[str, Path] = field(default_factory=dict)  # side -> adapter folder, the sides used
    weights: Mapping[str, float] = field(default_factory=dict)  # side -> normalised weight, the sides used
    merge_density: float | None = None  # resolved defaults
    merge_seed: int | None = None
    pcm_dir: Path | None = None
    adapter_dir: Path | None = None
    mix_rule: MixRule | None = None  # mope: the parsed mixing rule
    prompted_only: tuple[str, ...] = ()  # sides with no expert, prompted only (options.prompt_missing)

    @property
    def label(self) -> str:
        """The method as recorded in output rows: variants are distinct (``soup-exact``, ``mope-uniform``)."""
        return self._label(strength_suffix(self.options.strength))

    @property
    def family(self) -> str:
        """The label without the strength (``soup-exact`` at any strength): a bounded name, for counters."""
        return self._label("")

    def _label(self, strength: str) -> str:
        o = self.options
        if self.method is Method.SOUP:
            return f"soup-{o.merge}{strength}"
        if self.method is Method.MOPE:
            rule = "-extrapolate" if o.mix == "extrapolate" else ""
            if o.pcm == "shipped":
                return f"mope-pcm{rule}{strength}"
            if o.pcm:
                return f"mope-pcm-{Path(o.pcm).resolve().name}{rule}{strength}"
            return f"mope-{o.mix}{strength}"
        if self.method is Method.ADAPTER:
            return f"adapter-{Path(o.adapter).resolve().name}"  # type: ignore[arg-type]
        return self.method.value

    @property
    def prompt_suffix(self) -> str:
        """What is appended to each instruction: the preference prompt, except for vanilla."""
        if self.preference is None or self.method is Method.VANILLA:
            return ""
        return self.preference.prompt()

    def key(self) -> tuple[Any, ...]:
        """Equal for requests that generate with the same model (the server batches and caches by it):
        vanilla and prompt share the base model whatever the preference, which is in their text."""
        if not self.method.changes_weights:
            return ("base", self.model_name)
        return (self.method, self.model_name, self.options, tuple(sorted(self.weights.items())),
                self.preference.spec() if self.preference is not None else None)


# The preference strength a request without one gets depends on the experts: how far their combination
# can be pushed before answers leave the question is a property of the experts, so a folder of experts
# may carry the defaults measured for it (bench/strength.py choose, then defaults), per rule:
#   strength.json: {"default_strength": {"soup-exact": 3.0}, "measured": {"soup-exact": {where, how}}}
# A rule the file does not name, or a folder without the file, defaults to 1 (the experts' weighted average).
STRENGTH_FILE = "strength.json"


def strength_key(method: Method, merge: str = "psoups", mix: str = "prob", pcm: str | None = None) -> str | None:
    """The rule a default strength is given for (``soup-exact``, ``mope-extrapolate``, ``mope-pcm-extrapolate``),
    or None where the method takes no strength (a probability or logit mixture cannot go beyond its experts)."""
    if method is Method.SOUP:
        return f"soup-{merge}"
    if method is Method.MOPE and mix == "extrapolate":
        return "mope-pcm-extrapolate" if pcm else "mope-extrapolate"
    return None


def strength_keys() -> tuple[str, ...]:
    """Every rule that takes a strength: the keys a ``strength.json`` may name."""
    from personalign.merging import METHODS

    return (*(f"soup-{m}" for m in METHODS), "mope-extrapolate", "mope-pcm-extrapolate")


def default_strengths(experts_dir: Path | str | None) -> dict[str, float]:
    """Every rule's default strength for the experts in ``experts_dir`` (1 where its ``strength.json`` names
    none); a malformed file is one error naming it and the problem."""
    out = dict.fromkeys(strength_keys(), 1.0)
    path = Path(experts_dir) / STRENGTH_FILE if experts_dir is not None else None
    if path is None or not path.is_file():
        return out
    st = path.stat()
    out.update(_read_strengths(str(path.resolve()), st.st_size, st.st_mtime_ns))
    return out


@functools.lru_cache(maxsize=32)
def _read_strengths(path: str, size: int, mtime_ns: int) -> dict[str, float]:
    import json

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable JSON file: {e}") from None
    if isinstance(doc, dict) and set(doc) - {"default_strength", "measured"}:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(set(doc) - {'default_strength', 'measured'}))}; "
                          "a strength file holds default_strength and measured")
    table = doc.get("default_strength") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f"{path} needs an object \"default_strength\" of rule -> strength, e.g. "
                          '{"default_strength": {"soup-exact": 3}}')
    keys = strength_keys()
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{path}: unknown rule {key!r} in default_strength; choose from {', '.join(keys)}")
        try:
            check_strength(value)
        except ConfigError as e:
            raise ConfigError(f"{path}: default_strength {key!r}: {e}") from None
    return {k: float(v) for k, v in table.items()}


def default_strength(method: Method, options: MethodOptions | None = None,
                     experts_dir: Path | str | None = None) -> float | None:
    """The default strength of a method and its rule for the experts in ``experts_dir``, or None where the
    method takes no strength."""
    o = options or MethodOptions()
    key = strength_key(method, o.merge, o.mix, o.pcm)
    return None if key is None else default_strengths(experts_dir)[key]


def strength_suffix(strength: float) -> str:
    """``""`` at strength 1, else ``-x<strength>`` (``soup-exact-x2``, ``mope-extrapolate-x1.5``): labels of
    generation files and table rows, parsed back by :func:`personalign.generations.parse_method`."""
    return "" if strength == 1 else f"-x{strength:g}"


def check_strength(strength: Any) -> float:
    """A preference strength: a finite number >= 0 (0 is the base model, 1 today's soup)."""
    import math

    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ConfigError(f"strength must be a finite number >= 0 (1 = the experts' weighted average, 2 = "
                          f"twice as strong, 0 = the base model), got {strength!r}")
    return float(strength)


def build_prompts(tokenizer: PreTrainedTokenizerBase, instructions: Sequence[str], preference: Preference | None,
                  method: Method) -> list[str]:
    """Chat-formatted model inputs for each instruction: the preference prompt is appended to the
    instruction for every method but vanilla (experts and soups are prompted as they were trained)."""
    from personalign.data import build_user_message, format_chat

    suffix = preference.prompt() if (preference is not None and method is not Method.VANILLA) else ""
    return [format_chat(tokenizer, build_user_message(text, suffix)) for text in instructions]


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
              spec: Personalization) -> str:
    """The model input for a conversation under ``spec``: its preference prompt joins the last user message
    after one space, as :func:`build_prompts` adds it to an instruction."""
    from personalign.data import build_user_message

    convo = [dict(m) for m in messages]
    users = [i for i, m in enumerate(convo) if m.get("role") == "user"]
    if spec.prompt_suffix:
        if not users:
            raise PreferenceError("a preference prompt needs a user message to append to")
        convo[users[-1]]["content"] = build_user_message(convo[users[-1]]["content"], spec.prompt_suffix)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this model has no chat template; give plain text instead of messages")
    return tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)


def plain_text(text: str, spec: Personalization) -> str:
    """A raw completion prompt under ``spec``: the preference prompt appended (no chat template)."""
    from personalign.data import build_user_message

    return build_user_message(text, spec.prompt_suffix) if spec.prompt_suffix else text


def resolve(prefs: str | Preference | Mapping[str, float] | None, options: MethodOptions | None = None, *,
            model: str | None = None, space: PreferenceSpace | None = None,
            dimensions: str | None = None, profiles: Any = None) -> Personalization:
    """Check a request completely without loading a model; raise one precise error on the first problem.

    ``prefs`` may name a saved profile, ``"profile:NAME"``: its weights are the preference (read from
    ``profiles``, a :class:`personalign.profiles.Profiles`, default the store in the cache folder).
    """
    from personalign import compose
    from personalign.merging import METHODS, check_merge_options, merge_defaults
    from personalign.mixing import MixRule
    from personalign.models import canonical_name
    from personalign.preferences import Preference, load_space

    o = options or MethodOptions()
    method = Method.parse(o.method)
    space = space if space is not None else load_space(dimensions)
    if prefs is None:
        if method is not Method.VANILLA:
            raise PreferenceError(f"a preference is required with method {method.value}; e.g. --prefs 1A,2A,3A "
                                  "(prefs='1A,2A,3A' in Python, preferences in a request)")
        pref = None
    else:
        if isinstance(prefs, str) and prefs.strip().startswith("profile:"):
            from personalign.profiles import find_profile

            prefs = find_profile(prefs.strip()[len("profile:"):], profiles).weights
        pref = prefs if isinstance(prefs, Preference) else space.parse(prefs)
        if method is Method.VANILLA:  # a preference it would not follow is refused, not ignored
            raise PreferenceError(f"method vanilla answers with no preference, and {pref.spec()!r} was given; drop "
                                  "it, or use method prompt to ask for it", field="preferences")
        if method in (Method.PROMPT, Method.ADAPTER) and not pref.prompt_sides():
            raise PreferenceError(f"preference {pref.spec()!r} has no side with a positive weight, and method "
                                  f"{method.value} can only prompt for a side, not away from one; give a "
                                  "positive weight, or use method soup for negative weights")
    name = canonical_name(model)
    defaults = MethodOptions()

    def refuse(option: str, applies: str) -> None:
        if getattr(o, option) != getattr(defaults, option):
            raise ConfigError(f"{option}={getattr(o, option)!r} applies only to {applies}, not to method "
                              f"{method.value}; drop it", field=option)

    if method is not Method.SOUP:
        for opt in ("merge", "merge_rank", "merge_density", "merge_seed"):
            refuse(opt, "method soup")
    if method is not Method.MOPE:
        for opt in ("mix", "pcm"):
            refuse(opt, "method mope")
    takes_strength = strength_key(method, o.merge, o.mix, o.pcm) is not None
    if not takes_strength:
        refuse("strength", "method soup and method mope with mix 'extrapolate' (a probability or logit "
                           "mixture cannot go beyond its experts)")
        o = dataclasses.replace(o, strength=1.0)
    elif o.strength is not None:
        try:
            o = dataclasses.replace(o, strength=check_strength(o.strength))
        except ConfigError as exc:
            raise ConfigError(str(exc), field="strength") from None
    if not method.uses_experts:
        refuse("experts", "methods expert, soup and mope")
        refuse("prompt_missing", "methods expert, soup and mope")
    if (method is Method.ADAPTER) != (o.adapter is not None):
        raise ConfigError("adapter=FOLDER goes with method adapter (and method adapter needs adapter=FOLDER)")

    density = seed = None
    if method is Method.SOUP:
        if o.merge not in METHODS:
            raise ConfigError(f"unknown merge {o.merge!r}; choose one of {', '.join(METHODS)}", field="merge")
        density, seed = merge_defaults(o.merge, o.merge_density, o.merge_seed)
        check_merge_options(o.merge, o.merge_rank, density, seed)
    try:
        rule = MixRule.parse(o.mix) if method is Method.MOPE else None
    except ConfigError as exc:
        raise ConfigError(str(exc), field="mix") from None
    if o.pcm is not None and rule not in (MixRule.PROB, MixRule.EXTRAPOLATE):
        raise ConfigError("pcm goes with mix 'prob' (the PCM weights a probability mixture) or 'extrapolate'",
                          field="pcm")

    spec: dict[str, Any] = {"merge_density": density, "merge_seed": seed, "mix_rule": rule}
    if method.uses_experts:
        assert pref is not None
        weights = compose.expert_weights(pref)
        if method is Method.EXPERT and len(weights) != 1:
            raise PreferenceError(f"method expert uses one side's expert, but {pref.spec()!r} names "
                                  f"{len(weights)}; use method soup or mope to combine experts")
        if method is Method.EXPERT and any(w < 0 for w in weights.values()):
            raise PreferenceError(f"method expert applies one side's expert as trained, and {pref.spec()!r} asks to "
                                  "move away from it; use method soup for negative weights")
        if method is Method.MOPE and any(w < 0 for w in weights.values()):
            raise PreferenceError(f"token-level mixing needs non-negative weights, got {pref.spec()!r}; "
                                  "use method soup for negative weights")
        folder = compose.resolve_experts_dir(o.experts, name)
        folders = compose.expert_folders(folder)
        if o.prompt_missing:  # compose the sides that have experts; the preference prompt carries the rest
            missing = tuple(s for s in weights if s not in folders)
            kept = {s: w for s, w in weights.items() if s in folders}
            if not kept:
                raise PreferenceError(f"no side of {pref.spec()!r} has an expert in {folder} (experts there: "
                                      f"{', '.join(folders) or 'none'}); use method prompt")
            total = sum(abs(w) for w in kept.values())
            weights = {s: w / total for s, w in kept.items()}
            spec["prompted_only"] = missing
        else:
            compose.require_experts(pref, folders, folder)
        for side in weights:  # the configs only: no tensor is read here
            compose.check_base(name, folders[side])
        spec.update(experts_dir=folder, experts={s: folders[s] for s in weights}, weights=weights)
        if o.strength is None:  # soups and the extrapolate rule: the default measured for these experts
            o = dataclasses.replace(o, strength=default_strength(method, o, folder))
    if o.pcm is not None:
        from personalign.pcm import read_pcm_config, resolve_pcm_dir

        pcm_dir = resolve_pcm_dir(o.pcm, name)
        read_pcm_config(pcm_dir, list(spec["weights"]))
        spec["pcm_dir"] = pcm_dir
    if o.adapter is not None:
        found = compose.adapter_folder(Path(o.adapter))
        if found is None:
            raise ConfigError(f"{o.adapter} holds no adapter ({' and '.join(compose.ADAPTER_FILES)}, directly or "
                              "in adapter/)")
        compose.check_base(name, found)
        spec["adapter_dir"] = found
    return Personalization(method, pref, name, o, **spec)


@dataclass(frozen=True)
class Completion:
    """One generated row: its token ids (end-of-sequence excluded), text and why it ended."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end-of-sequence or a stop string) or "length"
    tokens: int  # generated tokens counted as OpenAI counts them (the end-of-sequence included)


class PersonalizedModel:
    """A base model personalized by one method for one preference; build it with :func:`personalize`."""

    def __init__(self, spec: Personalization, tokenizer: PreTrainedTokenizerBase, make_step: Callable[[], Step],
                 eos: list[int], device: torch.device, seed_range: int | None, *, model: Any = None,
                 merge_report: dict[str, Any] | None = None) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self._make_step, self.eos, self.device, self._seed_range = make_step, eos, device, seed_range
        self.model = model  # the generating model (merged for expert/soup/adapter; the peft model for mope)
        self.merge_report = merge_report

    @property
    def method(self) -> Method:
        return self.spec.method

    @property
    def preference(self) -> Preference | None:
        return self.spec.preference

    @property
    def label(self) -> str:
        return self.spec.label

    # -- inputs ------------------------------------------------------------------------------------------
    def format(self, instruction: str) -> str:
        """The chat-formatted model input for one instruction under this method and preference."""
        return build_prompts(self.tokenizer, [instruction], self.preference, self.method)[0]

    def format_messages(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The model input for a conversation: the preference prompt joins the last user message."""
        return chat_text(self.tokenizer, messages, self.spec)

    def format_plain(self, text: str) -> str:
        """A raw completion prompt with the preference prompt appended (no chat template)."""
        return plain_text(text, self.spec)

    # -- generation ----------------------------------------------------------------------------------------
    def generate(self, instructions: Sequence[str] | str, sampling: SamplingConfig | None = None, *,
                 batch_size: int = 8, first_index: int = 0,
                 on_batch: Callable[[int, list[str]], None] | None = None) -> list[str]:
        """Answer each instruction; batches are seeded by position (``first_index`` is the position of the
        first instruction in a larger run), so a resumed file run gives the same text."""
        items = [instructions] if isinstance(instructions, str) else list(instructions)
        return self.generate_texts([self.format(t) for t in items], sampling, batch_size=batch_size,
                                   first_index=first_index, on_batch=on_batch)

    def generate_texts(self, texts: Sequence[str], sampling: SamplingConfig | None = None, *, batch_size: int = 8,
                       first_index: int = 0, on_batch: Callable[[int, list[str]], None] | None = None) -> list[str]:
        """Like :meth:`generate`, for inputs already formatted (:meth:`format`)."""
        from personalign.generation import SamplingConfig, generate_texts

        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        sampling = sampling or SamplingConfig()
        self.check_prompts(texts, sampling, first_index=first_index)
        return generate_texts(self._make_step, self.tokenizer, texts, sampling, eos=self.eos,
                              device=self.device, batch_size=batch_size, first_index=first_index,
                              seed_range=self._seed_range, on_batch=on_batch)

    def check_prompts(self, texts: Sequence[str], sampling: SamplingConfig, *, first_index: int = 0) -> None:
        """Refuse formatted inputs that, with ``sampling.max_new_tokens``, exceed the model's context: before
        any generation (:meth:`generate_texts` calls it; callers with a progress bar call it first)."""
        from personalign.generation import check_prompt_lengths, context_length

        check_prompt_lengths(self.tokenizer, texts, context_length(self.model), sampling.max_new_tokens, first_index)

    def _batch(self, texts: Sequence[str], seed: int) -> tuple[Any, Any, Any]:
        from personalign.generation import batch_generator, encode_batch

        ids, mask = encode_batch(self.tokenizer, texts, self.device)
        return ids, mask, batch_generator(seed, 0, self.device, self._seed_range)

    def _stopper(self, stop: Sequence[str]) -> Callable[[Any], Any] | None:
        if not stop:
            return None
        import torch

        tail = max(len(s) for s in stop) + 8  # tokens enough to hold any stop string

        def check(generated: torch.Tensor) -> torch.Tensor:
            texts = self.tokenizer.batch_decode(generated[:, -tail:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=generated.device)

        return check

    def decode_steps(self, texts: Sequence[str], sampling: SamplingConfig, *, seed: int | None = None,
                     stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[tuple[Any, Any, Any]]:
        """The decode loop over formatted texts as one batch, step by step: ``(tokens, valid, finished)``
        per step (:func:`personalign.generation.decode_steps`). ``seed`` defaults to ``sampling.seed``;
        ``ignore_eos`` decodes past the end of sequence up to ``max_new_tokens`` (load benchmarks)."""
        from personalign.generation import decode_steps, pad_token_id

        ids, mask, gen = self._batch(texts, sampling.seed if seed is None else seed)
        return decode_steps(self._make_step(), ids, mask, sampling, eos=[-1] if ignore_eos else self.eos,
                            pad=pad_token_id(self.tokenizer, self.eos), generator=gen, stop=self._stopper(stop),
                            inference=True)

    def complete(self, texts: Sequence[str], sampling: SamplingConfig, *, seed: int | None = None,
                 stop: Sequence[str] = ()) -> list[Completion]:
        """Generate for formatted texts as one batch; a row ends at end-of-sequence or at a stop string
        (cut from its text). ``seed`` defaults to ``sampling.seed``: the same call gives the same text."""
        from personalign.generation import decode, pad_token_id

        ids, mask, gen = self._batch(texts, sampling.seed if seed is None else seed)
        out = decode(self._make_step(), ids, mask, sampling, eos=self.eos, pad=pad_token_id(self.tokenizer, self.eos),
                     generator=gen, stop=self._stopper(stop), inference=True)
        results = []
        for row, valid, reason in zip(out.tokens.tolist(), out.mask.tolist(), out.reasons):
            n = sum(valid)
            kept = [t for t in row[:n] if t not in self.eos]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            cuts = [text.find(s) for s in stop if s in text]
            if cuts:
                text = text[: min(cuts)]
            results.append(Completion(kept, text, reason, n))
        return results

    def stream(self, text: str, sampling: SamplingConfig, *, seed: int | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield the answer to one formatted text piece by piece as it is decoded (the pieces join to what
        :meth:`complete` returns for the same text and seed)."""
        from personalign.generation import TextStream

        pieces = TextStream(self.tokenizer, self.eos, stop)
        for nxt, valid, _ in self.decode_steps([text], sampling, seed=seed, stop=stop):
            if bool(valid[0]) and (piece := pieces.push(int(nxt[0]))):
                yield piece
            if pieces.stopped:
                return
        if piece := pieces.finish():
            yield piece


def personalize(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: Personalization, *,
                inplace: bool = False, cache: Path | None = None) -> PersonalizedModel:
    """Build the personalized model ``spec`` describes on ``model``.

    Methods that change weights (expert, soup, adapter, mope) work on a copy of ``model`` unless
    ``inplace`` (the caller hands the model over: no copy, and the model must not be used otherwise).
    ``cache``: the folder soups are cached in (default: personalign's cache folder).
    """
    from personalign import compose
    from personalign.adapters import load_adapter, with_adapters
    from personalign.generation import ModelStep, eos_token_ids
    from personalign.kernels import plain_copy
    from personalign.models import canonical_name

    have = canonical_name(getattr(model.config, "personalign_base", None) or model.name_or_path)
    if spec.method.changes_weights and have != spec.model_name:
        from personalign.errors import ModelError

        raise ModelError(f"this request was resolved for base model {spec.model_name!r}, but the model given is "
                         f"{have!r}; resolve it with model={have!r}")
    eos = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    m = spec.method
    if not m.changes_weights:
        return PersonalizedModel(spec, tokenizer, lambda: ModelStep(model), eos, device, None, model=model)
    base = model if inplace else plain_copy(model)  # the model may be decoding elsewhere (the server)
    report = None
    if m is Method.MOPE:
        return _mixture(spec, tokenizer, base, eos, device)
    if m is Method.SOUP:
        o = spec.options
        adapter, report, _ = compose.soup_adapter(dict(spec.weights), dict(spec.experts), method=o.merge,
                                                  rank=o.merge_rank, density=spec.merge_density,
                                                  seed=spec.merge_seed, preference=spec.preference.spec(),
                                                  cache=cache, strength=o.strength)
    else:  # expert, adapter
        folder = spec.adapter_dir if m is Method.ADAPTER else next(iter(spec.experts.values()))
        adapter = load_adapter(folder)
    merged = with_adapters(base, {"default": adapter}).merge_and_unload()
    merged.eval()
    return PersonalizedModel(spec, tokenizer, lambda: ModelStep(merged), eos, device, None, model=merged,
                             merge_report=report)


# MoPE batches have always been seeded within 31 bits; kept so that their recorded outputs reproduce.
_MIXTURE_SEED_RANGE = 2**31


def _mixture(spec: Personalization, tokenizer: PreTrainedTokenizerBase, base: PreTrainedModel, eos: list[int],
             device: torch.device) -> PersonalizedModel:
    from personalign.adapters import load_adapter, with_adapters
    from personalign.experts import BASE_EXPERT, Experts
    from personalign.mixing import MixRule
    from personalign.mixture import FixedWeights, MixtureStep

    sides, rule = list(spec.weights), spec.mix_rule
    assert rule is not None
    peft_model = with_adapters(base, {s: load_adapter(spec.experts[s]) for s in sides})
    experts = Experts.from_adapters(peft_model, sides)
    # The extrapolate rule also runs the base model (adapters off), as the last expert.
    stepping = Experts.from_adapters(peft_model, [*sides, BASE_EXPERT]) if rule is MixRule.EXTRAPOLATE else experts
    strength = spec.options.strength
    if spec.pcm_dir is not None:
        from personalign.pcm import PCMWeights, PreferenceControlModel

        pcm = PreferenceControlModel.load(spec.pcm_dir, base_model=base, sides=sides, device=experts.device)
        provider: Any = PCMWeights(pcm, experts, base.get_input_embeddings(), spec.preference)
    else:
        provider = None if rule is MixRule.UNIFORM else FixedWeights([spec.weights[s] for s in sides])
    return PersonalizedModel(spec, tokenizer, lambda: MixtureStep(stepping, provider, rule, strength=strength),
                             eos, device, _MIXTURE_SEED_RANGE, model=peft_model)


def load_personalized(prefs: str | Preference | Mapping[str, float] | None = None, method: str = "prompt", *,
                      model: str | None = None, device: str = "auto", dtype: str = "auto",
                      dimensions: str | None = None, **options: Any) -> PersonalizedModel:
    """Resolve, load the base model (the embedded default unless ``model``) and personalize it::

        pm = load_personalized("1A,2B,3A", method="soup", merge="exact")
        print(pm.generate("Explain photosynthesis."))
    """
    from personalign.models import load_model

    spec = resolve(prefs, _options(method, options), model=model, dimensions=dimensions)
    base, tokenizer = load_model(model, device=device, dtype=dtype)
    return personalize(base, tokenizer, spec, inplace=True)


def _options(method: str, options: Mapping[str, Any]) -> MethodOptions:
    from personalign.config import from_dict

    return from_dict(MethodOptions, {"method": method, **{k: v for k, v in options.items()}}, where="options")
