"""An OpenAI-compatible server: ``/v1/chat/completions``, ``/v1/completions`` (both with streaming),
``/v1/models``, ``/v1/preferences``, ``/health`` and ``/metrics`` (Prometheus).

Extra body fields carry a person's preference and how to honour it (the OpenAI client sends them with
``extra_body``): ``preferences`` (``"1A,2A,3A"``, ``"concise=0.7,informative=0.3"`` or a side -> weight
object) and ``method``: ``vanilla``, ``prompt`` (the default), ``expert``, ``soup`` (with ``merge``:
psoups, exact, ties, dare, dare_ties) or ``mope`` (with ``mix``: prob, logit, uniform, and ``pcm``:
shipped or none). The server's own defaults for each come from ``personalign serve --method ... --merge
... --mix ... --pcm ... --experts ...``. Every method but vanilla appends the preference prompt to the
last user message after one space, exactly as ``personalign generate`` does; a request without
``preferences`` is answered as vanilla by the prompt method and refused by the others. Each request is
resolved by the same entry point the CLI uses (:mod:`personalign.personalize`), so a seeded request
gives the text ``personalign generate`` gives for the same instruction, preference and method.

Defaults are personalign's, not OpenAI's, so that the server and the CLI give the same text for the
same seed: ``max_tokens`` 256, ``temperature`` 0.7, ``top_p`` 0.9, ``repetition_penalty`` 1.1 (an
extra field; small models loop without it). ``ignore_eos`` (as vLLM's) decodes up to ``max_tokens`` past
the end of sequence, for load tests.

Generation runs in one worker thread with continuous batching (:mod:`personalign.serve.engine`): rows of
every person, preference and method (vanilla, prompt, expert, exact soups, MoPE with fixed or PCM
weights) decode together in one batch, join it at the next token and leave it when they end; soups of
the other rules run on merged models from a bounded cache. A request with a ``seed`` runs alone, seeded
as :func:`generate_texts` seeds a batch, so the same request gives the same text whatever else the server
is doing; requests without a seed share batches, and their text then depends on their batch mates
(sampling draws from one random stream, and padding can flip a greedy near-tie), as with any batching
server.

Limits: a bounded queue (``max_queue`` waiting requests; more get HTTP 429), a per-request time limit
(the rows end with ``finish_reason`` ``"time_limit"`` and keep their text), body and prompt sizes (413,
400), and bearer-token auth when an API key is set (401). A client that disconnects frees its rows.
Every bad request gets a 4xx with an OpenAI error object whose message is one line and names the field;
nothing a client sends can stop the server or another client's request.
"""

import asyncio
import collections
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.errors import ConfigError, PersonalignError, PreferenceError
from personalign.extras import install_hint
from personalign.generation import SamplingConfig
from personalign.personalize import Method, MethodOptions, chat_text, default_strengths, plain_text, resolve
from personalign.profiles import PROFILE_PREFIX, Profiles, check_name
from personalign.preferences import PreferenceSpace, default_space
from personalign.serve.batching import ApiError, Models
from personalign.serve.engine import Engine, Job
from personalign.words import read_preference

if TYPE_CHECKING:
    from fastapi import FastAPI
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["INSTALL_HINT", "SERVED_METHODS", "Limits", "ServeConfig", "create_app", "run_server", "running_server"]

INSTALL_HINT = install_hint("serve")
API_KEY_ENV = "PERSONALIGN_API_KEY"
log = logging.getLogger("personalign.serve")

_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop",
           "stream", "stream_options", "preferences", "method", "merge", "mix", "pcm", "repetition_penalty",
           "ignore_eos", "preferences_text", "prompt_missing", "user", "strength"}
# OpenAI fields we do not implement, each with its neutral values (null always is one). A client may send
# a neutral value; any other value is refused, because ignoring it would silently give the client
# something it did not ask for.
_NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "logprobs": (False,),
    "top_logprobs": (0,), "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),  # without tools there is nothing to call in parallel
    "echo": (False,), "suffix": ("",), "best_of": (1,),
}


def _neutral(key: str, value: Any) -> bool:
    """Whether ``value`` of the unimplemented field ``key`` asks for nothing (kinds compared too: False is
    not 0 and "none" is not a number; 0.0 is 0)."""
    def kind(v: Any) -> type:
        return float if type(v) in (int, float) else type(v)

    return value is None or any(kind(value) is kind(n) and value == n for n in _NEUTRAL_ONLY[key])
_ROLES = ("system", "user", "assistant")


# Every method but adapter: a client never names a folder on the server (experts and the PCM are the
# server's, set when it starts).
SERVED_METHODS = (Method.VANILLA, Method.PROMPT, Method.EXPERT, Method.SOUP, Method.MOPE)
PCM_CHOICES = ("shipped", "none")


def served_method(name: str) -> Method:
    """The method a request or the server default names, among those the server generates with."""
    method = Method.parse(name) if name in {m.value for m in SERVED_METHODS} else None
    if method is None:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(m.value for m in SERVED_METHODS)}")
    return method


def request_options(method: Method, body: Mapping[str, Any], defaults: MethodOptions) -> MethodOptions:
    """The method's options: the request's ``merge``, ``mix`` and ``pcm``, else the server's defaults
    (only those of the method asked for, so a server default for soups never reaches a mixture)."""
    for key in ("merge", "mix", "pcm"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise ApiError(f"{key} must be a string, got {_short(body[key])}", key)
    if body.get("pcm") is not None and body["pcm"] not in PCM_CHOICES:
        raise ApiError(f"pcm must be one of {', '.join(PCM_CHOICES)}, got {_short(body['pcm'])}", "pcm")
    soup, mope = method is Method.SOUP, method is Method.MOPE
    mix = (body.get("mix") or defaults.mix) if mope else body.get("mix") or "prob"
    if body.get("pcm") is not None:
        pcm = None if body["pcm"] == "none" else body["pcm"]
    else:  # the server's PCM weights a probability mixture only
        pcm = defaults.pcm if mope and mix == "prob" else None
    # strength: the request's, else the server's default where it applies (soups, the extrapolate rule)
    stretches = soup or (mope and mix == "extrapolate")
    strength = _number(body, "strength", defaults.strength if stretches else None)
    if strength is not None and strength < 0:
        raise ApiError(f"strength must be a finite number >= 0, got {_short(strength)}", "strength")
    if body.get("strength") is not None and not stretches and strength != 1:
        raise ApiError(f"strength applies to method soup and to method mope with mix 'extrapolate', not "
                       f"{method.value}{' with mix ' + repr(mix) if mope else ''} (a probability or logit mixture "
                       "cannot go beyond its experts)", "strength")
    missing = body.get("prompt_missing")
    if missing is not None and not isinstance(missing, bool):
        raise ApiError(f"prompt_missing must be true or false, got {_short(missing)}", "prompt_missing")
    if missing and not method.uses_experts:
        raise ApiError(f"prompt_missing applies to methods expert, soup and mope, not {method.value}", "prompt_missing")
    return MethodOptions(
        method=method.value,
        prompt_missing=bool(missing),
        experts=defaults.experts if method.uses_experts else None,
        merge=(body.get("merge") or defaults.merge) if soup else body.get("merge") or "psoups",
        merge_rank=defaults.merge_rank if soup else None,
        merge_density=defaults.merge_density if soup else None,
        mix=mix,
        strength=float(strength) if stretches and strength is not None else None,  # None: the measured default
        pcm=pcm if mope or body.get("pcm") is None else body["pcm"],
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(body: Mapping[str, Any], key: str, default: Any, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok) or not math.isfinite(value):  # JSON may say NaN
        raise ApiError(f"{key} must be {'an integer' if integer else 'a finite number'}, got {_short(value)}", key)
    return value


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts and holds at once (``personalign serve`` flags of the same names)."""

    max_batch: int = 32  # rows decoding at once (a MoPE row runs one lane per expert)
    max_queue: int = 64  # requests waiting to start; more are answered 429
    max_models: int = 4  # merged soups (psoups, ties, dare) kept built
    max_model_mb: float | None = None  # and at most this much memory of them (None: no bound but the count)
    request_timeout: float | None = 600.0  # seconds; the rows then end with finish_reason "time_limit"
    max_body_bytes: int = 1_000_000  # a larger request body is answered 413
    max_prompt_tokens: int | None = None  # None: the model's context less max_tokens
    api_key: str | None = None  # clients must send Authorization: Bearer <key> (all but /health)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_models", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_model_mb", "request_timeout", "max_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; give a key or none")


class _Service:
    """Turns request bodies into generation jobs and results into OpenAI response objects."""

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", model_name: str,
                 limits: Limits, defaults: MethodOptions, space: PreferenceSpace, continuous: bool = True,
                 db: str | Path | None = None):
        # The event loop's own tokenizer: a fast tokenizer is not safe to share with the worker thread.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.model_name, self.limits, self.defaults, self.space = model_name, limits, defaults, space
        self.base_name = getattr(model.config, "personalign_base", None) or model.name_or_path
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.models = Models(model, tokenizer, limits.max_models, limits.max_model_mb)
        self.experts_dir = _experts_dir(defaults, self.base_name)
        default_strengths(self.experts_dir)  # a malformed strength.json is refused before serving
        self.engine = Engine(self.models, max_batch=limits.max_batch, max_queue=limits.max_queue,
                             experts_dir=self.experts_dir, model_name=self.base_name, continuous=continuous)
        self.db, self._profiles = db, None
        from personalign.serve.elicitation import Sessions

        self.sessions = Sessions()
        self.requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.prompt_tokens = 0
        self.started = time.time()

    def _parse(self, body: Mapping[str, Any], fields: set[str], chat: bool) -> Job:
        """The settings every endpoint shares, as a job without inputs, and the parsed preference."""
        for key, value in body.items():
            if key in _NEUTRAL_ONLY:
                if not _neutral(key, value):
                    neutral = " or ".join(json.dumps(n) for n in _NEUTRAL_ONLY[key])
                    raise ApiError(f"{key} is not supported by this server: give null or {neutral}, "
                                   f"got {_short(value)}", key)
            elif key not in fields:
                raise ApiError(f"unknown field {key!r}; this endpoint accepts {', '.join(sorted(fields))}", key)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError("model is required: the name from GET /v1/models", "model")
        if model != self.model_name:
            raise ApiError(f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           "model", status=404, code="model_not_found")
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise ApiError(f"stream must be true or false, got {_short(body['stream'])}", "stream")
        options = body.get("stream_options")
        if options is not None:
            if not body.get("stream"):
                raise ApiError("stream_options goes with stream=true", "stream_options")
            if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
                    options.get("include_usage", False), bool):
                raise ApiError("stream_options must be an object with one boolean field include_usage",
                               "stream_options")
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise ApiError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        key = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
        max_tokens = _number(body, key, SamplingConfig.max_new_tokens, integer=True)
        if max_tokens < 1:
            raise ApiError(f"{key} must be at least 1, got {max_tokens}", key)
        n = _number(body, "n", 1, integer=True)
        if not 1 <= n <= self.limits.max_batch:
            raise ApiError(f"n must be between 1 and {self.limits.max_batch}, got {n}", "n")
        seed = _number(body, "seed", None, integer=True)
        try:
            sampling = SamplingConfig(
                max_new_tokens=max_tokens,
                temperature=float(_number(body, "temperature", SamplingConfig.temperature)),
                top_p=float(_number(body, "top_p", SamplingConfig.top_p)),
                repetition_penalty=float(_number(body, "repetition_penalty", SamplingConfig.repetition_penalty)),
                seed=seed or 0,
            )
        except ConfigError as exc:
            raise ApiError(str(exc), str(exc).split(" ", 1)[0]) from None
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError("stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
        prefs = body.get("preferences")
        profile = None
        if isinstance(prefs, str) and prefs.strip().startswith(PROFILE_PREFIX):
            profile = self.profile(prefs.strip()[len(PROFILE_PREFIX):])
            prefs = profile.weights
            if body.get("method") is None:  # the profile's method and options, unless the request names a method
                body = {**{k: v for k, v in profile.options.items() if k in ("merge", "mix", "pcm", "strength")},
                        **body,
                        "method": profile.method}
        if prefs is not None and not isinstance(prefs, (str, dict)):
            raise ApiError("preferences must be a string such as '1A,2A,3A' or an object of side weights",
                           "preferences")
        rest = ""
        if body.get("preferences_text") is not None:
            text = body["preferences_text"]
            if prefs is not None:
                raise ApiError("give preferences or preferences_text, not both", "preferences_text")
            read = self._read(text, "preferences_text")
            prefs, rest = read.weights, read.rest
        method_name = body.get("method", self.defaults.method)
        if not isinstance(method_name, str):
            raise ApiError(f"method must be a string, got {_short(method_name)}", "method")
        try:
            method = served_method(method_name)
        except ConfigError as exc:  # "unknown method 'x'; choose one of vanilla, prompt, ..."
            raise ApiError(str(exc), "method") from None
        try:
            preference = self.space.parse(prefs) if prefs is not None else None
        except PersonalignError as exc:  # names the bad side and lists the valid ones
            raise ApiError(str(exc), "preferences") from None
        if preference is None and method is Method.PROMPT:
            method = Method.VANILLA  # nothing to prompt with: the request is answered as it is
        if body.get("preferences_text") is not None and method.uses_experts:
            body = {"prompt_missing": True, **body}  # sides without an expert are prompted, not refused
        options = request_options(method, body, self.defaults)
        try:  # the entry point's checks: experts present, same base, weights legal, options that apply
            spec = resolve(preference, options, model=self.base_name, space=self.space)
        except PersonalignError as exc:
            param = exc.field or ("preferences" if isinstance(exc, PreferenceError) else "method")
            raise ApiError(str(exc), param) from None
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(f"ignore_eos must be true or false, got {_short(ignore_eos)}", "ignore_eos")
        job = Job([], n, sampling, tuple(stop), seed is not None, chat, spec, timeout=self.limits.request_timeout,
                  ignore_eos=ignore_eos)
        job.extra_prompt = rest if spec.prompt_suffix else ""  # vanilla: no preference prompt at all
        return job

    def chat_job(self, body: Mapping[str, Any]) -> Job:
        job = self._parse(body, _COMMON | {"messages"}, chat=True)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages is required: a non-empty list of {role, content} objects", "messages")
        convo = [self._message(i, m) for i, m in enumerate(messages)]
        if job.spec.prompt_suffix and not any(m["role"] == "user" for m in convo):
            raise ApiError(f"preferences with method {job.spec.method.value!r} need a user message to append "
                           "their prompt to", "messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(f"model {self.model_name!r} has no chat template; use /v1/completions", "messages")
        if job.extra_prompt:  # what the described preference says that no side covers, as a prompt
            last = max(i for i, m in enumerate(convo) if m["role"] == "user")
            convo[last] = {**convo[last], "content": f"{convo[last]['content']} {_sentence(job.extra_prompt)}"}
        try:
            job.texts = [chat_text(self.tokenizer, convo, job.spec)]
        except Exception as exc:  # noqa: BLE001 - e.g. a template that demands alternating roles
            raise ApiError(f"the model's chat template rejected the messages: {exc}", "messages") from None
        return self._measure(job, "messages")

    @staticmethod
    def _message(i: int, m: object) -> dict[str, str]:
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(f"messages[{i}] must be an object with role one of {', '.join(_ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts; only text can reach a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(f"messages[{i}].content parts must all be of type 'text'", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string", "messages")
        return {"role": m["role"], "content": content}

    def completion_job(self, body: Mapping[str, Any]) -> Job:
        job = self._parse(body, _COMMON | {"prompt"}, chat=False)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ApiError("prompt is required: a non-empty string or list of strings", "prompt")
        extra = f" {_sentence(job.extra_prompt)}" if job.extra_prompt else ""
        job.texts = [plain_text(p + extra, job.spec) for p in prompts]
        if job.rows > self.limits.max_batch:
            raise ApiError(f"this request asks for {job.rows} completions; the server generates at "
                           f"most {self.limits.max_batch} per request", "prompt")
        return self._measure(job, "prompt")

    @property
    def profiles(self) -> Profiles:
        if self._profiles is None:  # created on first use
            self._profiles = Profiles(self.db)
        return self._profiles

    def profile(self, name: str, param: str = "preferences") -> Any:
        """The saved profile ``name``: a 404 when there is none, a 400 on ``param`` for a malformed name."""
        try:
            return self.profiles.get(check_name(name))
        except PreferenceError as exc:
            raise ApiError(str(exc), param, status=404, code="profile_not_found") from None
        except ConfigError as exc:
            raise ApiError(str(exc), param) from None

    def save_profile(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace a profile from ``preferences`` and optional ``method``, ``merge``, ``mix``, ``pcm``,
        ``strength``, checked as a request would be."""
        allowed = {"preferences", "method", "merge", "mix", "pcm", "strength"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(f"unknown field {unknown[0]!r}; a profile takes {', '.join(sorted(allowed))}", unknown[0])
        try:
            check_name(name)
        except ConfigError as exc:
            raise ApiError(str(exc), "name") from None
        prefs = body.get("preferences")
        if not isinstance(prefs, (str, dict)) or (isinstance(prefs, str) and prefs.startswith(PROFILE_PREFIX)):
            raise ApiError("preferences is required: a spec such as '1A,2B,3A' or an object of side weights",
                           "preferences")
        job = self._parse({"model": self.model_name, **body}, _COMMON, chat=True)  # every check of a request
        options = {k: body[k] for k in ("merge", "mix", "pcm", "strength") if body.get(k) is not None}
        assert job.spec.preference is not None
        saved = self.profiles.save(name, job.spec.preference.weight_dict(), job.spec.method.value, options)
        return self.profile_doc(saved)

    def profile_doc(self, profile: Any) -> dict[str, Any]:
        return {"object": "profile", "name": profile.name, "weights": profile.weights, "preferences": profile.spec(),
                "method": profile.method, **profile.options, "picks": len(self.profiles.picks(profile.name))}

    def add_pick(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        allowed = {"question", "answer_a", "answer_b", "choice", "side", "features_a", "features_b", "weights_a",
                   "weights_b"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(f"unknown field {unknown[0]!r}; a pick takes {', '.join(sorted(allowed))}", unknown[0])
        self.profile(name)
        side = body.get("side")
        if side is not None:
            try:
                side = self.space.resolve(side) if isinstance(side, str) else None
            except PreferenceError as exc:
                raise ApiError(str(exc), "side") from None
            if side is None:
                raise ApiError("side must be a side name or id", "side")
        for key in ("features_a", "features_b"):
            value = body.get(key)
            if value is not None and not (isinstance(value, list) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
                raise ApiError(f"{key} must be a list of finite numbers", key)
        for key in ("weights_a", "weights_b"):
            value = body.get(key)
            if value is not None and not isinstance(value, dict):
                raise ApiError(f"{key} must be an object of side weights", key)
        try:
            pick = self.profiles.add_pick(name, body.get("question"), body.get("answer_a"), body.get("answer_b"),
                                          body.get("choice"), side=side, features_a=body.get("features_a"),
                                          features_b=body.get("features_b"), weights_a=body.get("weights_a"),
                                          weights_b=body.get("weights_b"))
        except ConfigError as exc:  # "choice must be one of a, b, equal", "a pick needs a non-empty answer_a"
            words = str(exc).split()
            param = next((w for w in ("choice", "question", "answer_a", "answer_b") if w in words or f"{w}," in words),
                         None)
            raise ApiError(str(exc), param) from None
        return {"object": "pick", "id": pick, "profile": name}

    # -- the playground's calls ------------------------------------------------------------------------------

    def _read(self, text: object, param: str) -> Any:
        """A preference described in words (:func:`personalign.words.read_preference`), or a 400 on ``param``."""
        if not isinstance(text, str):
            raise ApiError(f"{param} must be a sentence describing the answers wanted", param)
        try:
            return read_preference(text, self.space)
        except PreferenceError as exc:
            raise ApiError(str(exc), param) from None

    def read_words(self, body: Mapping[str, Any]) -> dict[str, Any]:
        text = body.get("text")
        if set(body) - {"text"}:
            raise ApiError("this call takes one field, text", sorted(set(body) - {"text"})[0])
        read = self._read(text, "text")
        return {"object": "preference", "preferences": read.spec(), "weights": read.weights,
                "evidence": read.evidence, "rest": read.rest}

    def elicitation_pairs(self) -> list[tuple[str, str]]:
        """The slider pairs the offline judge measures on both sides (the dimensions a session estimates)."""
        from personalign.judges.offline import SUPPORTED_SIDES

        out = []
        for dim in self.space.dimensions.values():
            for a, b in zip(dim.sides[0::2], dim.sides[1::2]):
                if a in SUPPORTED_SIDES and b in SUPPORTED_SIDES:
                    out.append((a, b))
        return out

    async def elicit(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Start a session: answers to ``question`` under contrasting weights, and the first pair to pick from."""
        from personalign.serve.elicitation import Session, candidate_weights, features

        allowed = {"question", "profile", "method", "max_tokens"}
        if set(body) - allowed:
            raise ApiError(f"unknown field {sorted(set(body) - allowed)[0]!r}; this call takes "
                           f"{', '.join(sorted(allowed))}", sorted(set(body) - allowed)[0])
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError("question is required: the question both answers respond to", "question")
        profile = body.get("profile")
        if profile is not None:
            await asyncio.to_thread(self.profile, profile, "profile")  # an unknown profile: 404 before any generation
        try:
            from personalign.judges import offline

            pairs = self.elicitation_pairs()
            offline.analyze("A check that the judge's libraries load.")  # before any answer is written
        except ImportError:
            raise ApiError(install_hint("judges", what="finding a preference (answers are scored by the offline judge)"),
                           status=501) from None
        candidates = candidate_weights(pairs)
        method = body.get("method")
        if method is None:  # soups' answers differ more clearly than prompted ones (bench/RESULTS.md)
            from personalign.compose import expert_folders

            have = set(expert_folders(self.experts_dir)) if self.experts_dir is not None else set()
            method = "soup" if all(side in have for pair in pairs for side in pair) else "prompt"
        futures = []
        for weights in candidates:
            request = {"model": self.model_name, "messages": [{"role": "user", "content": question}],
                       "max_tokens": body.get("max_tokens", 128), "method": method}
            if method == "soup":
                request["merge"] = "exact"  # linear in the weights: decoded per row, nothing merged
            if weights:
                request["preferences"] = weights
            else:  # neutral: no preference at all
                request = {k: v for k, v in request.items() if k != "merge"} | {"method": "vanilla"}
            job = self.chat_job(request)
            futures.append(asyncio.wrap_future(self.engine.submit(job)))
        answers = [choices[0][0] for choices in await asyncio.gather(*futures)]
        feats = await asyncio.to_thread(features, question, answers, pairs)
        session = Session(question, pairs, candidates, answers, feats, profile, method=method)
        return session.doc(self.sessions.add(session))

    def pick(self, sid: str, body: Mapping[str, Any]) -> dict[str, Any]:
        from personalign.elicit import CHOICES

        session = self.sessions.get(sid)
        if session is None:
            raise ApiError(f"no elicitation session {sid!r} (it ended or the server restarted); start a new one",
                           "session", status=404, code="session_not_found")
        choice = body.get("choice")
        if set(body) - {"choice"} or choice not in CHOICES:
            raise ApiError(f"choice must be one of {', '.join(CHOICES)}, got {_short(choice)}", "choice")
        with session.lock:  # one pick at a time per session; any number of sessions at once
            i, j = session.current
            if session.profile is not None:  # on disk before the pick is acknowledged
                self.profiles.add_pick(session.profile, session.question, session.answers[i], session.answers[j],
                                       choice, features_a=list(session.feats[i]), features_b=list(session.feats[j]),
                                       weights_a=session.candidates[i], weights_b=session.candidates[j])
            session.pick(choice)
            session.next_pair()
            return session.doc(sid)

    def _measure(self, job: Job, field: str) -> Job:
        """Count the prompt tokens, and refuse prompts over the limit or beyond the model's context."""
        add_special = not getattr(self.tokenizer, "chat_template", None)  # as encode_batch tokenises
        lengths = [len(ids) for ids in self.tokenizer(job.texts, add_special_tokens=add_special)["input_ids"]]
        job.prompt_tokens = sum(lengths)  # once per prompt, whatever n (as OpenAI counts)
        longest, limit = max(lengths), self.limits.max_prompt_tokens
        if limit is not None and longest > limit:
            raise ApiError(f"the prompt has {longest} tokens; this server accepts at most {limit}", field,
                           code="prompt_too_long")
        if self.context and longest + job.sampling.max_new_tokens > self.context:
            raise ApiError(f"the prompt has {longest} tokens; with max_tokens {job.sampling.max_new_tokens} that "
                           f"exceeds the model's context of {self.context} tokens; shorten the prompt or lower "
                           "max_tokens", "max_tokens")
        return job

    def respond(self, job: Job, choices: list[tuple[str, str, int]]) -> dict[str, Any]:
        chat = job.chat
        if chat:
            items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason} for i, (text, reason, _) in enumerate(choices)]
        else:
            items = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                     for i, (text, reason, _) in enumerate(choices)]
        completion = sum(c for _, _, c in choices)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": items,
            "usage": self._usage(job, completion),
            "personalign": self.resolved(job),
        }

    @staticmethod
    def resolved(job: Job) -> dict[str, Any]:
        """What the request was answered with: the method and the weights (as a spec), and any prompt
        added for what a described preference says beyond the known sides."""
        pref = job.spec.preference
        out = {"method": job.spec.label, "preferences": pref.spec() if pref is not None else None,
               "weights": pref.weight_dict() if pref is not None else {}, "prompt_extra": job.extra_prompt}
        if job.spec.method.uses_experts:  # the experts composed, and the sides only prompted
            out.update(experts=dict(job.spec.weights), prompted_only=list(job.spec.prompted_only))
        return out

    @staticmethod
    def _usage(job: Job, completion: int) -> dict[str, int]:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion}

    async def stream(self, job: Job, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text piece of any choice, a last chunk per choice with its
        finish reason, the usage if asked for, then ``[DONE]``. Leaving early cancels the job's rows."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str, str | None]] = asyncio.Queue()
        job.on_event = lambda *e: loop.call_soon_threadsafe(events.put_nowait, e)
        future = self.engine.submit(job)  # a full queue answers 429 before any byte is sent
        ident = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "object": "chat.completion.chunk" if job.chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        first = [True]  # the first chunk also says what the request was answered with

        def _sse_first(obj: dict[str, Any]) -> str:
            if first[0]:
                first[0] = False
                obj = {**obj, "personalign": self.resolved(job)}
            return _sse(obj)

        def chunk(index: int, piece: str | None, reason: str | None) -> str:
            if job.chat:
                delta = {} if piece is None else {"content": piece}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": index, "text": piece or "", "logprobs": None, "finish_reason": reason}
            return _sse_first({**head, "choices": [choice]})

        async def body() -> AsyncIterator[str]:
            try:
                if job.chat:
                    for i in range(job.rows):
                        yield _sse_first({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                               "logprobs": None, "finish_reason": None}]})
                left = job.rows
                while left:
                    index, piece, reason = await events.get()
                    if reason == "error":
                        yield _sse(ApiError(piece, status=500).body())
                        return
                    if piece:
                        yield chunk(index, piece, None)
                    if reason is not None:
                        left -= 1
                        yield chunk(index, None, reason)
                if include_usage:
                    choices = await asyncio.wrap_future(future)
                    yield _sse({**head, "choices": [], "usage": self._usage(job, sum(c for _, _, c in choices))})
                yield "data: [DONE]\n\n"
            finally:
                if not future.done():  # the client went away: free its rows
                    job.cancel()

        return body()

    def preferences(self) -> dict[str, Any]:
        """What this server can do: methods, rules, dimensions and sides, which sides have experts, PCMs."""
        from personalign import compose
        from personalign.merging import METHODS
        from personalign.mixing import MixRule

        experts = sorted(compose.expert_folders(self.experts_dir)) if self.experts_dir is not None else []
        try:
            from personalign.pcm import resolve_pcm_dir

            shipped_pcm = resolve_pcm_dir("shipped", self.base_name).is_dir()
        except PersonalignError:
            shipped_pcm = False
        d = self.defaults
        return {
            "object": "preferences",
            "model": self.model_name,
            "methods": [m.value for m in SERVED_METHODS],
            "merge": list(METHODS),
            "mix": [r.value for r in MixRule],
            "pcm": (["shipped"] if shipped_pcm else []) + ["none"],
            "per_row": {"soup": ["exact"], "mope": [r.value for r in MixRule]},
            "defaults": {"method": d.method, "merge": d.merge, "mix": d.mix, "pcm": d.pcm, "strength": d.strength},
            # per rule, the default a request without a strength gets: measured for these experts (their
            # strength.json), else 1; the server's own default (defaults.strength), when set, overrides them
            "default_strength": default_strengths(self.experts_dir),
            "dimensions": [{"name": dim.name, "sides": [
                {"id": sid, "name": self.space.sides[sid].name, "aliases": list(self.space.sides[sid].aliases),
                 "prompt": self.space.sides[sid].prompt, "expert": sid in experts} for sid in dim.sides]}
                for dim in self.space.dimensions.values()],
        }


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[:1].upper() + text[1:]).rstrip(".") + "."


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _experts_dir(defaults: MethodOptions, model_name: str) -> Path | None:
    """The server's experts folder: the one given, else the shipped one for the model, else none."""
    from personalign.compose import resolve_experts_dir

    try:
        return resolve_experts_dir(defaults.experts, model_name)
    except ConfigError:
        if defaults.experts is not None:
            raise
        return None


async def _read_json(request: Any, limit: int) -> Any:
    """The request body as JSON, refused (413) as soon as it grows past ``limit`` bytes."""
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(f"the request body is larger than this server's limit of {limit} bytes", status=413,
                           code="body_too_large")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(f"the request body is not valid JSON: {exc}") from None


class _Guard:
    """ASGI middleware in front of every route: the API key (all but ``/health`` and the playground page, whose
    own calls carry the key) and a declared body size
    over the limit, refused before the body is read."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        headers = dict(scope.get("headers") or [])
        error = None
        if self.expected is not None and scope["path"] not in ("/health", "/", "/playground"):
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.expected):
                error = ApiError("missing or wrong API key; send the header Authorization: Bearer <key>", status=401,
                                 code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if error is None and (not length.isdigit() or int(length) > self.max_body):
            error = ApiError(f"the request body is larger than this server's limit of {self.max_body} bytes",
                             status=413, code="body_too_large")
        if error is not None:
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        return await self.app(scope, receive, send)


class _Metrics:
    """A Prometheus collector reading the service's counters when scraped."""

    def __init__(self, service: _Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s, e = self.service, self.service.engine
        requests = CounterMetricFamily("personalign_requests", "Requests answered, by endpoint, method and HTTP status",
                                       labels=["endpoint", "method", "status"])
        for (endpoint, method, status), count in sorted(s.requests.items()):
            requests.add_metric([endpoint, method, str(status)], count)
        yield requests
        tokens = CounterMetricFamily("personalign_tokens", "Tokens read and generated", labels=["kind"])
        tokens.add_metric(["prompt"], s.prompt_tokens)
        tokens.add_metric(["completion"], e.tokens)
        yield tokens
        ended = CounterMetricFamily("personalign_rows_finished", "Generated sequences ended, by finish reason",
                                    labels=["reason"])
        for reason, count in sorted(e.finished.items()):
            ended.add_metric([reason], count)
        yield ended
        yield GaugeMetricFamily("personalign_queue_depth", "Requests waiting to start", value=e.pending())
        yield GaugeMetricFamily("personalign_batch_rows", "Rows decoding now", value=e.batch_rows)
        hist = sorted(e.batch_hist.items())
        buckets, total = [], 0
        for bound in (1, 2, 4, 8, 16, 32, 64, 128):
            buckets.append((str(bound), sum(n for rows, n in hist if rows <= bound)))
        total = sum(n for _, n in hist)
        buckets.append(("+Inf", total))
        yield HistogramMetricFamily("personalign_batch_size", "Rows decoding together, per step", buckets=buckets,
                                    sum_value=sum(rows * n for rows, n in hist))
        cache = CounterMetricFamily("personalign_soup_cache", "Merged-model cache look-ups", labels=["result"])
        cache.add_metric(["hit"], s.models.hits)
        cache.add_metric(["miss"], s.models.built)
        yield cache
        yield GaugeMetricFamily("personalign_models_kept", "Merged models kept built", value=len(s.models))


def check_defaults(defaults: MethodOptions, model_name: str | None = None) -> MethodOptions:
    """The server's default method options, checked as far as they can be without a preference."""
    from personalign.compose import resolve_experts_dir
    from personalign.merging import METHODS, check_merge_options, merge_defaults
    from personalign.mixing import MixRule

    method = served_method(defaults.method)
    if defaults.merge not in METHODS:
        raise ConfigError(f"unknown merge {defaults.merge!r}; choose one of {', '.join(METHODS)}")
    density, seed = merge_defaults(defaults.merge, defaults.merge_density, defaults.merge_seed)
    check_merge_options(defaults.merge, defaults.merge_rank, density, seed)
    MixRule.parse(defaults.mix)
    from personalign.personalize import check_strength

    if defaults.strength is not None:
        check_strength(defaults.strength)
    if defaults.adapter is not None:
        raise ConfigError("the server takes no adapter; serve an adapter's merged model with --model instead")
    if model_name is not None:
        if defaults.experts is not None or method.uses_experts:
            default_strengths(resolve_experts_dir(defaults.experts, model_name))  # a malformed strength.json
        if defaults.pcm is not None:
            from personalign.pcm import read_pcm_config, resolve_pcm_dir

            read_pcm_config(resolve_pcm_dir(defaults.pcm, model_name))
    return defaults


def create_app(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", model_name: str, *,
               max_batch: int = 32, default_method: str = "prompt", space: PreferenceSpace | None = None,
               defaults: MethodOptions | None = None, max_models: int = 4, limits: Limits | None = None,
               continuous: bool = True, db: str | Path | None = None) -> "FastAPI":
    """The FastAPI app serving ``model`` under the name ``model_name`` (see the module docstring).

    ``defaults`` are the method options a request does not give (its ``method`` wins over
    ``default_method``); ``limits`` what the server accepts and holds (``max_batch`` and ``max_models``
    are shorthands for the same fields). ``continuous=False`` runs every request on its own merged model
    in fixed batches, without the shared batch (:class:`personalign.serve.engine.Engine`; a baseline).
    ``db`` is the profile store (default: ``profiles.sqlite`` in the cache folder).
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise PersonalignError(INSTALL_HINT) from None
    if limits is None:
        limits = Limits(max_batch=max_batch, max_models=max_models)
    defaults = check_defaults(defaults or MethodOptions(method=default_method))
    service = _Service(model, tokenizer, model_name, limits, defaults, space or default_space(), continuous, db)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        await asyncio.to_thread(service.engine.close)

    app = FastAPI(title="personalign", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_Guard, api_key=limits.api_key, max_body=limits.max_body_bytes)

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong verb
        return error(ApiError(f"{exc.detail}", status=exc.status_code))

    async def finished(request: Request, job: Job) -> list[tuple[str, str, int]] | None:
        """The job's choices, or None when the client disconnected first (its rows are then freed)."""
        future = asyncio.wrap_future(service.engine.submit(job))
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if await request.is_disconnected():
                job.cancel()
                return None

    async def handle(request: Request, chat: bool) -> Any:
        endpoint, label, status = "chat" if chat else "completions", "-", 200
        try:
            body = await _read_json(request, limits.max_body_bytes)
            if not isinstance(body, dict):
                raise ApiError("the request body must be a JSON object")
            job = service.chat_job(body) if chat else service.completion_job(body)
            label = job.spec.family  # the strength is free-form: one series per method and rule
            service.prompt_tokens += job.prompt_tokens
            if body.get("stream"):
                events = await service.stream(job, bool((body.get("stream_options") or {}).get("include_usage")))
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            choices = await finished(request, job)
            if choices is None:
                status = 499  # client closed the request; nobody reads this
                return Response(status_code=status)
            return service.respond(job, choices)
        except ApiError as exc:
            status = exc.status
            return error(exc)
        except PersonalignError as exc:
            status = 400
            return error(ApiError(str(exc)))
        except Exception as exc:  # a bug answers 500 and the server stays up
            log.exception("request failed")
            status = 500
            return error(ApiError(f"internal error: {type(exc).__name__}: {exc}", status=500))
        finally:
            service.requests[(endpoint, label, status)] += 1

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    def model_doc() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": int(service.started), "owned_by": "personalign",
                "methods": [m.value for m in SERVED_METHODS], "preferences": "/v1/preferences"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_doc()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Any:
        if model_id != model_name:
            return error(ApiError(f"model {model_id!r} is not served here; this server serves {model_name!r}",
                                  "model", status=404, code="model_not_found"))
        return model_doc()

    @app.get("/v1/preferences")
    async def preferences() -> dict[str, Any]:
        return service.preferences()

    async def guarded(work: Any) -> Any:
        """A profile call: its work off the event loop (SQLite waits on the disk), errors as OpenAI objects."""
        try:
            return await asyncio.to_thread(work)
        except ApiError as exc:
            return error(exc)
        except PersonalignError as exc:
            return error(ApiError(str(exc)))

    async def json_body(request: Request) -> dict[str, Any]:
        body = await _read_json(request, limits.max_body_bytes)
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        return body

    async def with_body(request: Request, work: Any) -> Any:
        """``work(body)`` off the event loop, for a call whose body is a JSON object."""
        try:
            body = await json_body(request)
        except ApiError as exc:
            return error(exc)
        return await guarded(lambda: work(body))

    @app.get("/", include_in_schema=False)
    async def root() -> Any:
        from fastapi.responses import RedirectResponse

        return RedirectResponse("/playground")

    @app.get("/playground", include_in_schema=False)
    async def playground() -> Any:
        from importlib import resources

        from fastapi.responses import HTMLResponse

        return HTMLResponse((resources.files("personalign.serve") / "playground.html").read_text(encoding="utf-8"))

    @app.post("/v1/preferences/read")
    async def read_words(request: Request) -> Any:
        try:
            return service.read_words(await json_body(request))
        except ApiError as exc:
            return error(exc)

    @app.post("/v1/elicit")
    async def elicit(request: Request) -> Any:
        try:
            return await service.elicit(await json_body(request))
        except ApiError as exc:
            return error(exc)
        except PersonalignError as exc:
            return error(ApiError(str(exc)))

    @app.post("/v1/elicit/{sid}/picks")
    async def elicit_pick(sid: str, request: Request) -> Any:
        return await with_body(request, lambda body: service.pick(sid, body))

    @app.get("/v1/profiles")
    async def list_profiles() -> Any:
        return await guarded(lambda: {"object": "list", "data": service.profiles.names()})

    @app.get("/v1/profiles/{name}")
    async def get_profile(name: str) -> Any:
        return await guarded(lambda: service.profile_doc(service.profile(name)))

    @app.put("/v1/profiles/{name}")
    async def put_profile(name: str, request: Request) -> Any:
        return await with_body(request, lambda body: service.save_profile(name, body))

    @app.post("/v1/profiles/{name}/picks")
    async def post_pick(name: str, request: Request) -> Any:
        return await with_body(request, lambda body: service.add_pick(name, body))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        e = service.engine
        return {"status": "ok", "model": model_name, "queued": e.pending(), "rows": e.batch_rows, "steps": e.ticks,
                "jobs": e.jobs_started, "tokens": e.tokens, "models_built": service.models.built,
                "models_kept": len(service.models), "experts_loaded": list(e.shared.sides)}

    @app.get("/metrics")
    async def metrics() -> Any:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        except ImportError:
            return error(ApiError(f"metrics need prometheus-client; {INSTALL_HINT}", status=501))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Metrics(service))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yield its root URL (``http://host:port``).

    ``port=0`` takes a free port. The server stops, after its in-flight requests, when the block exits.
    """
    try:
        import uvicorn
    except ImportError:
        raise PersonalignError(INSTALL_HINT) from None
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="personalign-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"the server could not start on {host}:{port} (is the port in use?)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """``personalign serve``'s settings (``--config``/``--set`` like every command)."""

    model: str | None = None  # None: the embedded default
    model_name: str | None = None  # the id clients send (default: the embedded model's name, or the id/path)
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    # Defaults for requests that do not name them (personalign.personalize.MethodOptions).
    method: str = "prompt"
    experts: str | None = None
    merge: str = "psoups"
    mix: str = "prob"
    # default for soups and the extrapolate rule (a request may give its own); None: the measured default
    strength: float | None = None
    pcm: str | None = None
    dimensions: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    log_level: str = "info"
    # Limits (see Limits).
    max_batch: int = 32
    max_queue: int = 64
    max_models: int = 4
    max_model_mb: float | None = None
    request_timeout: float | None = 600.0
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None
    api_key: str | None = None  # default: the PERSONALIGN_API_KEY environment variable
    continuous: bool = True  # False: no shared batch; every request on its own merged model (a baseline)
    db: str | None = None  # the profile store; None: profiles.sqlite in the cache folder

    def defaults(self) -> MethodOptions:
        return MethodOptions(method=self.method, experts=self.experts, merge=self.merge, mix=self.mix, pcm=self.pcm,
                             strength=self.strength)

    def limits(self) -> Limits:
        return Limits(max_batch=self.max_batch, max_queue=self.max_queue, max_models=self.max_models,
                      max_model_mb=self.max_model_mb, request_timeout=self.request_timeout,
                      max_body_bytes=self.max_body_bytes, max_prompt_tokens=self.max_prompt_tokens,
                      api_key=self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV) or None)


def check_address(host: str, port: int) -> None:
    """Refuse a port out of range, a host that does not resolve, or an address that cannot be listened on
    (in use, not this machine's, a privileged port): before the model loads, not after."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, got {port!r}")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"host must be an address such as 127.0.0.1 or 0.0.0.0, got {host!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise ConfigError(f"cannot listen on host {host!r}: {getattr(exc, 'strerror', None) or exc}; give an address "
                          "such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
            sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run_server(model_name_or_path: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               device: str = "auto", dtype: str = "auto", *, model_name: str | None = None, max_batch: int = 32,
               default_method: str = "prompt", dimensions: str | None = None, log_level: str = "info",
               defaults: MethodOptions | None = None, max_models: int = 4, config: ServeConfig | None = None) -> None:
    """Load a model with :func:`personalign.models.load_model` and serve it until interrupted.

    ``model_name`` is the id clients send (default: the embedded model's name, or the id/path given).
    ``config`` (what ``personalign serve`` passes) replaces every other argument.
    """
    try:
        import uvicorn
    except ImportError:
        raise PersonalignError(INSTALL_HINT) from None
    from personalign.models import canonical_name, load_model
    from personalign.preferences import load_space

    if config is None:
        config = ServeConfig(model=model_name_or_path, model_name=model_name, host=host, port=port, device=device,
                             dtype=dtype, max_batch=max_batch, dimensions=dimensions, log_level=log_level,
                             max_models=max_models, **_option_fields(defaults or MethodOptions(method=default_method)))
    limits = config.limits()  # bad limits, dimensions or defaults fail before the model loads
    check_address(config.host, config.port)
    space = load_space(config.dimensions)
    defaults = check_defaults(config.defaults(), canonical_name(config.model))
    if config.db is not None:  # a store that cannot be opened fails now, not on the first request
        from personalign.profiles import Profiles

        Profiles(config.db)
    model, tokenizer = load_model(config.model, device=config.device, dtype=config.dtype)
    name = config.model_name or canonical_name(config.model)
    app = create_app(model, tokenizer, name, space=space, defaults=defaults, limits=limits,
                     continuous=config.continuous, db=config.db)
    if limits.api_key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it (set --api-key or %s)",
                    config.host, API_KEY_ENV)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)


def _option_fields(options: MethodOptions) -> dict[str, Any]:
    if options.merge_rank is not None or options.merge_density is not None or options.merge_seed is not None or \
            options.adapter is not None:
        raise ConfigError("the server takes merge, mix, strength, pcm and experts defaults only")
    return {"method": options.method, "experts": options.experts, "merge": options.merge, "mix": options.mix,
            "pcm": options.pcm, "strength": options.strength}
