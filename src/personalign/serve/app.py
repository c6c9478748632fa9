"""An OpenAI-compatible server: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/health``.

Extra body fields carry a person's preference and how to honour it (the OpenAI client sends them with
``extra_body``): ``preferences`` (``"1A,2A,3A"``, ``"concise=0.7,informative=0.3"`` or a side -> weight
object) and ``method``: ``vanilla``, ``prompt`` (the default), ``expert``, ``soup`` (with ``merge``:
psoups, exact, ties, dare, dare_ties) or ``mope`` (with ``mix``: prob, logit, uniform, and ``pcm``:
shipped or none). The server's own defaults for each come from ``personalign serve --method ... --merge
... --mix ... --pcm ... --experts ...``. Every method but vanilla appends the preference prompt to the
last user message after one space, exactly as ``personalign generate`` does; a request without
``preferences`` is answered as vanilla by the prompt method and refused by the others. Each request's
model is built by the same entry point the CLI uses (:mod:`personalign.personalize`), so a seeded
request gives the text ``personalign generate`` gives for the same instruction, preference and method.

Defaults are personalign's, not OpenAI's, so that the server and the CLI give the same text for the
same seed: ``max_tokens`` 256, ``temperature`` 0.7, ``top_p`` 0.9, ``repetition_penalty`` 1.1 (an
extra field; small models loop without it).

Generation runs in one worker thread (the model is not thread-safe) that groups requests waiting
with the same personalized model and settings into one batch, up to ``max_batch`` rows: with one torch
thread, four concurrent 32-token answers from the embedded model take 4.1 s batched against 8.4 s
one by one (``max_batch=1``). A request with a ``seed`` always runs alone, seeded as :func:`generate_texts` seeds a batch, so
the same request gives the same text whatever else the server is doing. Requests without a seed may
share a batch; their text then depends on their batch mates (sampling draws from one random stream,
and padding can flip a greedy near-tie), as with any batching server.

Every bad request gets HTTP 400 (404 for an unknown model) with an OpenAI error object whose message
is one line; nothing a client sends can stop the server.
"""

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from personalign.errors import ConfigError, PersonalignError
from personalign.generation import SamplingConfig
from personalign.personalize import Method, MethodOptions, chat_text, plain_text, resolve
from personalign.preferences import PreferenceSpace, default_space
from personalign.serve.batching import ApiError, Models, _Job, new_batcher

if TYPE_CHECKING:
    from fastapi import FastAPI
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["INSTALL_HINT", "SERVED_METHODS", "ServeConfig", "create_app", "run_server", "running_server"]

INSTALL_HINT = "the server needs the 'serve' extra: pip install 'personalign[serve]'"
log = logging.getLogger("personalign.serve")

_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n", "stop",
           "stream", "preferences", "method", "merge", "mix", "pcm", "repetition_penalty", "user"}
# OpenAI fields we do not implement. A client may send them with their neutral value; any other value
# is refused, because ignoring it would silently give the client something it did not ask for.
_NEUTRAL_ONLY = {"frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
                 "stream_options", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                 "echo", "suffix", "best_of"}
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
    return MethodOptions(
        method=method.value,
        experts=defaults.experts if method.uses_experts else None,
        merge=(body.get("merge") or defaults.merge) if soup else body.get("merge") or "psoups",
        merge_rank=defaults.merge_rank if soup else None,
        merge_density=defaults.merge_density if soup else None,
        mix=mix,
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


class _Service:
    """Turns request bodies into generation jobs and results into OpenAI response objects."""

    def __init__(self, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", model_name: str,
                 max_batch: int, defaults: MethodOptions, space: PreferenceSpace, max_models: int = 4):
        self.tokenizer, self.model_name, self.max_batch = tokenizer, model_name, max_batch
        self.defaults, self.space = defaults, space
        self.base_name = getattr(model.config, "personalign_base", None) or model.name_or_path
        self.models = Models(model, tokenizer, max_models)
        self.batcher = new_batcher(self.models, max_batch)

    def _parse(self, body: Mapping[str, Any], fields: set[str], chat: bool) -> _Job:
        """The settings every endpoint shares, as a job without inputs, and the parsed preference."""
        for key, value in body.items():
            if key in _NEUTRAL_ONLY:
                if value and value not in ({"type": "text"}, "none", "auto"):
                    raise ApiError(f"{key} is not supported by this server", key)
            elif key not in fields:
                raise ApiError(f"unknown field {key!r}; this endpoint accepts {', '.join(sorted(fields))}", key)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError("model is required: the name from GET /v1/models", "model")
        if model != self.model_name:
            raise ApiError(f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           "model", status=404, code="model_not_found")
        if body.get("stream"):
            raise ApiError("stream is not supported by this server; send stream=false", "stream")
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise ApiError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        key = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
        max_tokens = _number(body, key, SamplingConfig.max_new_tokens, integer=True)
        if max_tokens < 1:
            raise ApiError(f"{key} must be at least 1, got {max_tokens}", key)
        n = _number(body, "n", 1, integer=True)
        if not 1 <= n <= self.max_batch:
            raise ApiError(f"n must be between 1 and {self.max_batch}, got {n}", "n")
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
        method_name = body.get("method", self.defaults.method)
        if not isinstance(method_name, str):
            raise ApiError(f"method must be a string, got {_short(method_name)}", "method")
        try:
            method = served_method(method_name)
        except ConfigError as exc:  # "unknown method 'x'; choose one of vanilla, prompt, ..."
            raise ApiError(str(exc), "method") from None
        prefs = body.get("preferences")
        if prefs is not None and not isinstance(prefs, (str, dict)):
            raise ApiError("preferences must be a string such as '1A,2A,3A' or an object of side weights",
                           "preferences")
        try:
            preference = self.space.parse(prefs) if prefs is not None else None
        except PersonalignError as exc:  # names the bad side and lists the valid ones
            raise ApiError(str(exc), "preferences") from None
        if preference is None and method is Method.PROMPT:
            method = Method.VANILLA  # nothing to prompt with: the request is answered as it is
        options = request_options(method, body, self.defaults)
        try:  # the entry point's checks: experts present, same base, weights legal, options that apply
            spec = resolve(preference, options, model=self.base_name, space=self.space)
        except PersonalignError as exc:
            param = "preferences" if preference is None or "weight" in str(exc) else "method"
            raise ApiError(str(exc), param) from None
        return _Job([], n, sampling, tuple(stop), seed is not None, chat, spec)

    def chat_job(self, body: Mapping[str, Any]) -> _Job:
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
        try:
            job.texts = [chat_text(self.tokenizer, convo, job.spec)]
        except Exception as exc:  # noqa: BLE001 - e.g. a template that demands alternating roles
            raise ApiError(f"the model's chat template rejected the messages: {exc}", "messages") from None
        return job

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

    def completion_job(self, body: Mapping[str, Any]) -> _Job:
        job = self._parse(body, _COMMON | {"prompt"}, chat=False)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ApiError("prompt is required: a non-empty string or list of strings", "prompt")
        job.texts = [plain_text(p, job.spec) for p in prompts]
        if job.rows > self.max_batch:
            raise ApiError(f"this request asks for {job.rows} completions; the server generates at "
                           f"most {self.max_batch} per request", "prompt")
        return job

    def respond(self, job: _Job, choices: list[tuple[str, str, int]]) -> dict[str, Any]:
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
            "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                      "total_tokens": job.prompt_tokens + completion},
        }


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
    if defaults.adapter is not None:
        raise ConfigError("the server takes no adapter; serve an adapter's merged model with --model instead")
    if model_name is not None:
        if defaults.experts is not None or method.uses_experts:
            resolve_experts_dir(defaults.experts, model_name)
        if defaults.pcm is not None:
            from personalign.pcm import read_pcm_config, resolve_pcm_dir

            read_pcm_config(resolve_pcm_dir(defaults.pcm, model_name))
    return defaults


def create_app(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", model_name: str, *,
               max_batch: int = 8, default_method: str = "prompt", space: PreferenceSpace | None = None,
               defaults: MethodOptions | None = None, max_models: int = 4) -> "FastAPI":
    """The FastAPI app serving ``model`` under the name ``model_name`` (see the module docstring).

    ``defaults`` are the method options a request does not give (its ``method`` wins over
    ``default_method``); ``max_models`` bounds the personalized copies (soups, mixtures) kept built.
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise PersonalignError(INSTALL_HINT) from None
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if max_models < 1:
        raise ConfigError(f"max_models must be at least 1, got {max_models}")
    defaults = check_defaults(defaults or MethodOptions(method=default_method))
    service = _Service(model, tokenizer, model_name, max_batch, defaults, space or default_space(), max_models)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        await asyncio.to_thread(service.batcher.close)

    app = FastAPI(title="personalign", lifespan=lifespan)
    app.state.service = service

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong verb
        return error(ApiError(f"{exc.detail}", status=exc.status_code))

    async def handle(request: Request, chat: bool) -> Any:
        try:
            try:
                body = await request.json()
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise ApiError(f"the request body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise ApiError("the request body must be a JSON object")
            job = service.chat_job(body) if chat else service.completion_job(body)
            choices = await asyncio.wrap_future(service.batcher.submit(job))
            return service.respond(job, choices)
        except ApiError as exc:
            return error(exc)
        except PersonalignError as exc:
            return error(ApiError(str(exc)))
        except Exception as exc:  # a bug answers 500 and the server stays up
            log.exception("request failed")
            return error(ApiError(f"internal error: {type(exc).__name__}: {exc}", status=500))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "personalign"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        b = service.batcher
        return {"status": "ok", "model": model_name, "queued": b.pending(), "batches": b.batches, "jobs": b.jobs,
                "models_built": service.models.built, "models_kept": len(service.models)}

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
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_models: int = 4  # personalized copies of the base kept built (soups, mixtures)
    # Defaults for requests that do not name them (personalign.personalize.MethodOptions).
    method: str = "prompt"
    experts: str | None = None
    merge: str = "psoups"
    mix: str = "prob"
    pcm: str | None = None
    dimensions: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    log_level: str = "info"

    def defaults(self) -> MethodOptions:
        return MethodOptions(method=self.method, experts=self.experts, merge=self.merge, mix=self.mix, pcm=self.pcm)


def run_server(model_name_or_path: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               device: str = "auto", dtype: str = "auto", *, model_name: str | None = None, max_batch: int = 8,
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

    if config is not None:
        model_name_or_path, host, port, device, dtype = config.model, config.host, config.port, config.device, config.dtype
        model_name, max_batch, dimensions, log_level = config.model_name, config.max_batch, config.dimensions, config.log_level
        defaults, max_models = config.defaults(), config.max_models
    space = load_space(dimensions)  # a bad dimensions file or default fails before the model loads
    defaults = check_defaults(defaults or MethodOptions(method=default_method), canonical_name(model_name_or_path))
    model, tokenizer = load_model(model_name_or_path, device=device, dtype=dtype)
    name = model_name or canonical_name(model_name_or_path)
    app = create_app(model, tokenizer, name, max_batch=max_batch, space=space, defaults=defaults,
                     max_models=max_models)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
