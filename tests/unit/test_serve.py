"""The OpenAI-compatible server on the tiny random llama: shapes, preferences, seeds, errors, batching."""

from __future__ import annotations

import subprocess
import time
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from personalign.data import build_user_message
from personalign.generation import SamplingConfig
from personalign.personalize import MethodOptions, personalize, resolve
from personalign.preferences import parse_preference
from personalign.serve import create_app, running_server

USER = [{"role": "user", "content": "Explain rain."}]


@pytest.fixture()
def client(tiny):
    model, tok = tiny
    with TestClient(create_app(model, tok, "tiny")) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, **body})


def test_models_and_health(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json() == client.get("/v1/models").json()["data"][0]
    r = client.get("/v1/models/org/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/health").json()["status"] == "ok"


def test_chat_completion_shape_and_usage(client, tiny):
    _, tok = tiny
    r = chat(client, max_tokens=6, seed=1, method="vanilla")
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "tiny" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    prompt = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert usage["prompt_tokens"] == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def spy_messages(monkeypatch, tok) -> list:
    """Record the conversations rendered by the chat template: exactly what the model is given."""
    seen: list = []
    original = tok.apply_chat_template

    def spy(messages, *args, **kwargs):
        seen.append([dict(m) for m in messages])
        return original(messages, *args, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    return seen


@pytest.mark.parametrize(
    ("prefs", "method", "suffix"),
    [
        ("1A,2A,3A", "prompt", parse_preference("1A,2A,3A").prompt()),
        ("concise=0.7,informative=0.3", "prompt", parse_preference("P2A").prompt()),  # dominant side
        (None, "vanilla", ""),
        (None, "prompt", ""),
    ],
)
def test_preferences_are_appended_to_the_last_user_message(client, tiny, monkeypatch, prefs, method, suffix):
    _, tok = tiny
    seen = spy_messages(monkeypatch, client.app.state.service.tokenizer)  # the handlers' own copy
    convo = [{"role": "system", "content": "Be brief."}, *USER, {"role": "assistant", "content": "Rain is water."},
             {"role": "user", "content": "And snow? "}]
    body = {"messages": convo, "max_tokens": 2, "method": method}
    if prefs is not None:
        body["preferences"] = prefs
    assert chat(client, **body).status_code == 200
    (sent,) = seen
    assert sent[:3] == convo[:3]  # earlier turns untouched
    # With a preference prompt: one space after the stripped instruction, as build_user_message does;
    # without one the message is passed through untouched.
    assert sent[3]["content"] == (f"And snow? {suffix}" if suffix else "And snow? ")


def test_seeded_request_equals_the_entry_points_text_and_repeats(client, tiny):
    model, tok = tiny
    body = {"max_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 7, "preferences": "1B,2B,3B"}
    first = chat(client, **body).json()
    assert chat(client, **body).json()["choices"] == first["choices"]
    pm = personalize(model, tok, resolve("1B,2B,3B", MethodOptions(method="prompt")))
    text = pm.format("Explain rain.")
    (ref,) = pm.generate(["Explain rain."], SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=7))
    assert first["choices"][0]["message"]["content"] == ref
    assert first["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
    other = chat(client, **{**body, "seed": 8}).json()
    assert other["choices"][0]["message"]["content"] != ref


def test_n_choices_are_distinct_and_reproducible(client):
    body = {"max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "seed": 3, "n": 3}
    a, b = chat(client, **body).json(), chat(client, **body).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2] and a["choices"] == b["choices"]
    assert len(set(texts)) > 1
    assert a["usage"]["completion_tokens"] <= 30  # summed over the choices
    assert a["usage"]["prompt_tokens"] == chat(client, max_tokens=1).json()["usage"]["prompt_tokens"]  # counted once


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_is_respected(client, max_tokens):
    out = chat(client, max_tokens=max_tokens, temperature=0).json()
    (choice,) = out["choices"]
    assert out["usage"]["completion_tokens"] <= max_tokens
    if choice["finish_reason"] == "length":
        assert out["usage"]["completion_tokens"] == max_tokens


def test_stop_strings_cut_the_text(client):
    body = {"model": "tiny", "prompt": "Explain rain.", "max_tokens": 24, "temperature": 1.0, "top_p": 1.0,
            "seed": 11}
    unstopped = client.post("/v1/completions", json=body).json()
    full = unstopped["choices"][0]["text"]
    # A stop string taken from the middle of the unstopped text (the same seed gives the same prefix).
    start = next(i for i in range(3, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isalnum())
    stop = full[start : start + 2]
    out = client.post("/v1/completions", json={**body, "stop": ["\x00never", stop]}).json()
    (choice,) = out["choices"]
    assert choice["text"] == full[: full.index(stop)]
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < unstopped["usage"]["completion_tokens"]  # stopped early


def test_completions_endpoint(client, tiny):
    _, tok = tiny
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["Hello", "The heart"], "n": 2,
                                             "max_tokens": 4, "seed": 0, "method": "vanilla"})
    out = r.json()
    assert r.status_code == 200 and out["object"] == "text_completion"
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length") for c in out["choices"])
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in ("Hello", "The heart")]
    assert out["usage"]["prompt_tokens"] == sum(lengths)


def test_completions_with_prompt_method_appends_preference(client, tiny):
    _, tok = tiny
    body = {"model": "tiny", "prompt": "Explain rain.", "max_tokens": 6, "temperature": 1.0, "top_p": 1.0,
            "seed": 2, "preferences": "P3B"}
    out = client.post("/v1/completions", json=body).json()
    text = build_user_message("Explain rain.", parse_preference("P3B").prompt())
    assert out["usage"]["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])


BAD = [
    ({"messages": None}, "messages", "messages is required"),
    ({"messages": []}, "messages", "messages is required"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "messages[0] must be an object with role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", "messages[0].content must be a string"),
    ({"preferences": "1A,9Z"}, "preferences", "unknown preference side '9Z'; valid sides: P1A"),
    ({"preferences": "1A,1B"}, "preferences", "are both sides of 'expertise'"),
    ({"preferences": "concise=lots"}, "preferences", "malformed weight"),
    ({"preferences": 5}, "preferences", "preferences must be a string"),
    ({"method": "adapter"}, "method", "unknown method 'adapter'; choose one of vanilla, prompt, expert, soup, mope"),
    ({"method": "vanilla", "preferences": "1A"}, "preferences", "method vanilla answers with no preference"),
    ({"method": "soup"}, "preferences", "a preference is required with method soup"),
    ({"method": "soup", "preferences": "1A", "mix": "logit"}, "mix", "mix='logit' applies only to method mope"),
    ({"method": "soup", "preferences": "1A", "merge": "avg"}, "merge", "unknown merge 'avg'"),
    ({"method": "mope", "preferences": "1A", "mix": "max"}, "mix", "unknown mixing rule 'max'"),
    ({"preferences": "1A", "merge": "exact"}, "merge", "merge='exact' applies only to method soup"),
    ({"method": "soup", "preferences": "1A", "pcm": "shipped"}, "pcm", "pcm='shipped' applies only to method mope"),
    ({"method": "mope", "preferences": "1A", "mix": "logit", "pcm": "shipped"}, "pcm", "pcm goes with mix 'prob'"),
    ({"method": "mope", "preferences": "1A", "pcm": "/etc"}, "pcm", "pcm must be one of shipped, none"),
    ({"method": "soup", "preferences": "1A", "merge": 3}, "merge", "merge must be a string"),
    ({"max_tokens": -3}, "max_tokens", "max_tokens must be at least 1, got -3"),
    ({"max_tokens": "ten"}, "max_tokens", "max_tokens must be an integer"),
    ({"max_tokens": 5000}, "max_tokens", "exceeds the model's context of 1024 tokens"),
    ({"temperature": -1}, "temperature", "temperature must be in"),
    ({"top_p": 0}, "top_p", "top_p must be in"),
    ({"n": 0}, "n", "n must be between 1 and 32"),
    ({"n": 33}, "n", "n must be between 1 and 32"),
    ({"seed": 1.5}, "seed", "seed must be an integer"),
    ({"stop": ""}, "stop", "stop must be"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop must be"),
    ({"stream": "yes"}, "stream", "stream must be true or false"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "goes with stream=true"),
    ({"stream": True, "stream_options": {"usage": 1}}, "stream_options", "one boolean field include_usage"),
    ({"logprobs": True}, "logprobs", "logprobs is not supported"),
    ({"frequency_penalty": "auto"}, "frequency_penalty", "give null or 0, got 'auto'"),
    ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice is not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "response_format is not supported"),
    ({"preference": "1A"}, "preference", "unknown field 'preference'"),
    ({"max_tokens": 3, "max_completion_tokens": 3}, "max_completion_tokens", "not both"),
    ({"model": None}, "model", "model is required"),
    ({"messages": [{"role": "system", "content": "x"}], "preferences": "1A"}, "messages", "need a user message"),
]


@pytest.mark.parametrize(("patch", "param", "message"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_malformed_chat_requests_get_400(client, patch, param, message):
    r = chat(client, **patch)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and "\n" not in err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["code"] is None


def test_neutral_values_of_unimplemented_fields_are_accepted(client):
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "logprobs": False,
               "top_logprobs": None, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
               "parallel_tool_calls": True}
    assert chat(client, max_tokens=2, **neutral).status_code == 200
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "best_of": 1, "echo": False, "suffix": None}
    assert client.post("/v1/completions", json=body).status_code == 200
    for bad in ({"best_of": 2}, {"echo": "none"}, {"logprobs": 0}, {"suffix": "!"}):
        r = client.post("/v1/completions", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"), (b"\xff\xfe", "not valid JSON")],
)
def test_unparseable_bodies_get_400(client, content, message):
    r = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_nan_is_refused(client):
    # Python's JSON parser accepts NaN; a NaN penalty would reach the sampler.
    content = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": NaN}'
    r = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "repetition_penalty must be a finite number, got nan"


def test_other_errors_keep_the_openai_shape(client):
    r = chat(client, model="gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"


def test_a_failing_generation_answers_500_and_the_server_keeps_serving(tiny, monkeypatch):
    model, tok = tiny
    original = model.forward
    calls = iter([RuntimeError("boom\nsecond line")])

    def flaky(*args, **kwargs):
        exc = next(calls, None)
        if exc is not None:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    with TestClient(create_app(model, tok, "tiny")) as c:
        r = chat(c, max_tokens=2)
        assert r.status_code == 500 and r.json()["error"]["message"] == "generation failed: RuntimeError: boom second line"
        assert chat(c, max_tokens=2).status_code == 200


def test_seeded_requests_ignore_concurrent_traffic(tiny):
    model, tok = tiny
    app = create_app(model, tok, "tiny", max_batch=4)
    seeded = [{"max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": s} for s in range(4)]
    with TestClient(app) as c:
        alone = [chat(c, **b).json()["choices"] for b in seeded]
        noise = [{"max_tokens": 8, "temperature": 1.0}] * 6
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda b: chat(c, **b).json()["choices"], noise + seeded + noise))
        assert results[6:10] == alone
        assert c.get("/health").json()["jobs"] == 4 + 16


def test_openai_client_over_http(tiny):
    openai = pytest.importorskip("openai")
    model, tok = tiny
    with running_server(create_app(model, tok, "tiny")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, seed=1,
                                           extra_body={"preferences": "1A,2A,3A"})
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 3
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).choices[0].text is not None
        assert [m.id for m in client.models.list()] == ["tiny"] and client.models.retrieve("tiny").id == "tiny"
        with pytest.raises(openai.BadRequestError, match="unknown preference side 'zz'"):
            client.chat.completions.create(model="tiny", messages=USER, extra_body={"preferences": "zz"})


def test_import_needs_no_fastapi_and_building_the_app_gives_the_install_hint():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn'): raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import personalign.serve as s\n"
        "try:\n"
        "    s.create_app(None, None, 'x')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PersonalignError the server needs the 'serve' extra: pip install 'personalign[serve]'"


def test_run_server_checks_its_arguments_before_loading_a_model(tmp_path):
    from personalign.errors import ConfigError, PreferenceError
    from personalign.serve import run_server

    with pytest.raises(PreferenceError, match="does not exist"):
        run_server(dimensions=str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown method 'adapter'"):
        run_server(default_method="adapter")
    with pytest.raises(ConfigError, match="unknown merge 'soupy'"):
        run_server(defaults=MethodOptions(method="soup", merge="soupy"))
    with pytest.raises(ConfigError, match="does not exist"):
        run_server(defaults=MethodOptions(method="soup", experts=str(tmp_path / "nowhere")))


def test_run_server_serves_a_model_folder(tiny_model_dir):
    import socket
    import time

    import httpx2

    with socket.socket() as s:  # a free port (released just before the server takes it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from personalign.serve import run_server; run_server({str(tiny_model_dir)!r}, port={port}, device='cpu')"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180  # a loaded machine can take a minute to import torch
        while True:
            try:
                models = httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()
                break
            except httpx2.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the server did not start within 180 s"
                time.sleep(0.2)
        assert models["data"][0]["id"] == str(tiny_model_dir)
        body = {"model": str(tiny_model_dir), "messages": USER, "max_tokens": 2, "preferences": "P2A"}
        r = httpx2.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- composed methods per request ---------------------------------------------------------------------


@pytest.fixture()
def composed(tiny, tiny_model_dir, tmp_path):
    from conftest import save_side_experts

    model, tok = tiny
    experts = save_side_experts(tiny_model_dir, tmp_path / "experts", ("P1A", "P1B", "P2A", "P3A"))
    app = create_app(model, tok, "tiny", defaults=MethodOptions(experts=str(experts)), max_models=2)
    with TestClient(app) as c:
        yield c, model, tok, experts, tiny_model_dir


SEEDED = {"max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 5, "preferences": "1A,2A,3A"}


@pytest.mark.parametrize(("method", "extra"), [("soup", {"merge": "exact"}), ("soup", {}), ("mope", {"mix": "prob"}),
                                               ("mope", {"mix": "uniform"}), ("expert", {"preferences": "P2A"})])
def test_soup_mope_and_expert_per_request_equal_the_entry_point(composed, method, extra):
    c, model, tok, experts, model_dir = composed
    body = {**SEEDED, "method": method, **extra}
    r = chat(c, **body)
    assert r.status_code == 200, r.text
    options = {k: v for k, v in extra.items() if k in ("merge", "mix")}
    spec = resolve(body["preferences"], MethodOptions(method=method, experts=str(experts), **options),
                   model=str(model_dir))
    want = personalize(model, tok, spec).generate(["Explain rain."], SamplingConfig(max_new_tokens=8,
                                                   temperature=1.0, top_p=0.9, seed=5))
    assert r.json()["choices"][0]["message"]["content"] == want[0]
    prompted = chat(c, **{**body, "method": "prompt", "merge": None, "mix": None}).json()
    assert prompted["choices"][0]["message"]["content"] != want[0]


def test_built_models_are_reused_and_bounded(composed):
    c = composed[0]
    for method, prefs in [("soup", "1A,2A,3A"), ("soup", "1A,2A,3A"), ("mope", "1A,2A,3A"), ("soup", "1B,2A,3A"),
                          ("soup", "1A,2A,3A")]:
        assert chat(c, **{**SEEDED, "method": method, "preferences": prefs}).status_code == 200
    health = c.get("/health").json()
    # soup 1A,2A,3A built once, then mope, then soup 1B (evicting the first), then 1A again: 4 builds, 2 kept
    assert health["models_built"] == 4 and health["models_kept"] == 2


def test_concurrent_people_with_different_methods_get_their_own_answers(composed):
    c = composed[0]
    bodies = [{**SEEDED, "method": m, "preferences": p, "seed": s}
              for s, (m, p) in enumerate([("soup", "1A,2A,3A"), ("mope", "1B,2A,3A"), ("prompt", "1A,2A,3A"),
                                          ("vanilla", None), ("soup", "1B,2A,3A")])]
    alone = [chat(c, **b).json()["choices"] for b in bodies]
    with ThreadPoolExecutor(5) as pool:
        together = list(pool.map(lambda b: chat(c, **b).json()["choices"], bodies))
    assert together == alone


def test_a_default_method_and_options_apply_when_a_request_names_none(tiny, tiny_model_dir, tmp_path):
    from conftest import save_side_experts

    model, tok = tiny
    experts = save_side_experts(tiny_model_dir, tmp_path / "experts", ("P1A", "P2A", "P3A"))
    app = create_app(model, tok, "tiny", defaults=MethodOptions(method="soup", experts=str(experts), merge="exact"))
    with TestClient(app) as c:
        by_default = chat(c, **SEEDED).json()["choices"]
        assert by_default == chat(c, **{**SEEDED, "method": "soup", "merge": "exact"}).json()["choices"]
        assert by_default != chat(c, **{**SEEDED, "method": "soup", "merge": "psoups"}).json()["choices"]
        r = chat(c, **{**SEEDED, "method": "mope"})  # the soup default's merge never reaches a mixture
        assert r.status_code == 200, r.text


def test_serve_command_builds_its_config_like_every_command(tmp_path, monkeypatch):
    import personalign.serve.app as serve_app
    from personalign.cli import _load
    from personalign.serve import ServeConfig

    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("method: soup\nmerge: ties\nport: 9000\n")
    cfg = _load(ServeConfig, cfg_file, {"port": 9100, "mix": None}, ["merge=exact"])
    assert (cfg.method, cfg.merge, cfg.port, cfg.mix, cfg.host) == ("soup", "exact", 9100, "prob", "127.0.0.1")
    assert cfg.defaults() == MethodOptions(method="soup", merge="exact")
    seen = []
    monkeypatch.setattr(serve_app, "check_defaults", lambda d, name=None: seen.append(d) or (_ for _ in ()).throw(
        RuntimeError("stop before the model loads")))
    with pytest.raises(RuntimeError, match="stop before"):
        serve_app.run_server(config=cfg)
    assert seen == [cfg.defaults()]  # the config's defaults, not run_server's keyword defaults


# -- streaming, limits, auth, metrics -------------------------------------------------------------------------


def sse(response) -> list:
    """The JSON events of a server-sent-event body, and a final "[DONE]"."""
    import json

    events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


@pytest.mark.parametrize("seed", [5, None])  # a fixed batch, and the shared batch
def test_streamed_chat_pieces_join_to_the_whole_answer(client, seed):
    body = {"max_tokens": 12, "temperature": 0 if seed is None else 1.0, "preferences": "1A,2A,3A", "n": 2,
            **({"seed": seed} if seed is not None else {})}
    whole = chat(client, **body).json()
    r = chat(client, **body, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    texts, reasons = ["", ""], [None, None]
    for e in events[:-2]:
        (c,) = e["choices"]
        texts[c["index"]] += c["delta"].get("content", "")
        reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    assert texts == [c["message"]["content"] for c in whole["choices"]]
    assert reasons == [c["finish_reason"] for c in whole["choices"]]
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]


def test_streamed_completions_with_a_stop_string(client):
    body = {"model": "tiny", "prompt": "Rain is", "max_tokens": 16, "temperature": 1.0, "seed": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    stop = whole["text"][3:5]
    cut = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
    events = sse(client.post("/v1/completions", json={**body, "stop": stop, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut["text"] == whole["text"][: whole["text"].find(stop)]
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and all(e["object"] == "text_completion" for e in events[:-1])


def test_api_key_body_and_prompt_limits(tiny):
    from personalign.serve import Limits

    model, tok = tiny
    app = create_app(model, tok, "tiny", limits=Limits(api_key="s3cret", max_body_bytes=2000, max_prompt_tokens=30))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200  # open: a load balancer's probe has no key
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": USER}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 2},
                      headers=ok).status_code == 200
        big = {"model": "tiny", "messages": [{"role": "user", "content": "rain " * 1000}]}
        r = c.post("/v1/chat/completions", json=big, headers=ok)
        assert r.status_code == 413 and "limit of 2000 bytes" in r.json()["error"]["message"]
        long = {"model": "tiny", "messages": [{"role": "user", "content": "rain " * 100}]}
        r = c.post("/v1/chat/completions", json=long, headers=ok)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "at most 30" in r.text


def test_metrics_and_the_preferences_endpoint(composed):
    c = composed[0]
    assert chat(c, max_tokens=3, method="soup", preferences="1A,2A,3A").status_code == 200  # psoups: merged
    assert chat(c, max_tokens=3, method="soup", preferences="1A,2A,3A", merge="exact").status_code == 200
    assert chat(c, max_tokens=3, method="mope", preferences="nope").status_code == 400
    for strength in (2.5, 0.123456789):  # a free-form strength is one series with its method and rule
        assert chat(c, max_tokens=3, method="soup", preferences="1A,2A,3A", merge="exact",
                    strength=strength).status_code == 200
    text = c.get("/metrics").text
    assert 'personalign_requests_total{endpoint="chat",method="soup-exact",status="200"} 3.0' in text
    assert "-x" not in text
    assert 'personalign_requests_total{endpoint="chat",method="soup-psoups",status="200"} 1.0' in text
    assert 'personalign_requests_total{endpoint="chat",method="-",status="400"} 1.0' in text
    assert 'personalign_soup_cache_total{result="miss"} 1.0' in text
    assert "personalign_queue_depth 0.0" in text and "personalign_batch_size_bucket" in text
    assert 'personalign_tokens_total{kind="completion"}' in text
    prefs = c.get("/v1/preferences").json()
    assert prefs["methods"] == ["vanilla", "prompt", "expert", "soup", "mope"] and "exact" in prefs["merge"]
    sides = {s["id"]: s["expert"] for d in prefs["dimensions"] for s in d["sides"]}
    assert sides["P1A"] and sides["P2A"] and not sides["P2B"]
    assert c.get("/v1/models").json()["data"][0]["preferences"] == "/v1/preferences"


def test_openai_client_streams_and_a_disconnect_frees_the_rows(tiny):
    openai = pytest.importorskip("openai")

    model, tok = tiny
    app = create_app(model, tok, "tiny")
    with running_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        stream = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, stream=True,
                                                extra_body={"preferences": "1A,2A,3A", "method": "prompt"})
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        # ignore_eos: a random tiny model may sample its end of sequence first, and this checks streaming
        done = client.completions.create(model="tiny", prompt="Rain", max_tokens=4, stream=True,
                                         extra_body={"ignore_eos": True})
        assert len(list(done)) >= 2
        # A client that goes away mid-stream: its row leaves the batch long before max_tokens.
        greedy = {"model": "tiny", "messages": USER, "temperature": 0}
        assert client.chat.completions.create(**greedy, max_tokens=300).choices[0].finish_reason == "length"
        service = app.state.service
        assert service.engine.finished["cancelled"] == 0
        gone = client.chat.completions.create(**greedy, max_tokens=1000, stream=True)
        next(iter(gone))
        gone.close()
        deadline = time.monotonic() + 10
        # the row is counted as finished inside a step and leaves the batch at the step's end: wait for both
        while (sum(service.engine.finished.values()) < 4 or service.engine.batch_rows) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.engine.batch_rows == 0 and service.engine.finished["cancelled"] == 1, service.engine.finished


def test_serve_limits_are_checked_before_the_model_loads_and_the_key_comes_from_the_environment(monkeypatch):
    from personalign.errors import ConfigError
    from personalign.serve import ServeConfig, run_server

    for bad, message in [({"max_queue": 0}, "max_queue must be at least 1"),
                         ({"request_timeout": -1}, "request_timeout must be positive"),
                         ({"api_key": " "}, "api_key is empty")]:
        with pytest.raises(ConfigError, match=message):
            run_server(config=ServeConfig(model="/nonexistent/model", **bad))
    monkeypatch.setenv("PERSONALIGN_API_KEY", "from-env")
    assert ServeConfig().limits().api_key == "from-env"
    assert ServeConfig(api_key="given").limits().api_key == "given"
    monkeypatch.delenv("PERSONALIGN_API_KEY")
    assert ServeConfig().limits().api_key is None


def test_openai_client_every_method_with_a_key(tiny, tiny_model_dir, tmp_path):
    openai = pytest.importorskip("openai")
    from conftest import save_side_experts

    from personalign.serve import Limits

    model, tok = tiny
    experts = save_side_experts(tiny_model_dir, tmp_path / "experts", ("P1A", "P2A", "P2B", "P3A"))
    app = create_app(model, tok, "tiny", defaults=MethodOptions(experts=str(experts)), limits=Limits(api_key="k"))
    with running_server(app) as url:
        refused = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="wrong API key"):
            refused.models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        answers = {}
        for extra in ({"method": "vanilla"}, {"method": "prompt"}, {"method": "expert", "preferences": "P2B"},
                      {"method": "soup", "merge": "exact"}, {"method": "soup", "merge": "ties"},
                      {"method": "mope", "mix": "logit"}, {"method": "mope", "mix": "uniform"}):
            body = {**({} if extra["method"] == "vanilla" else {"preferences": "P1A=0.5,P2A=0.3,P3A=0.2"}), **extra}
            r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0,
                                               extra_body=body)
            streamed = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0,
                                                      extra_body=body, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            assert text == r.choices[0].message.content
            answers[str(extra)] = text
        assert len(set(answers.values())) >= 5  # the methods give different answers
        with pytest.raises(openai.BadRequestError, match="unknown method"):
            client.chat.completions.create(model="tiny", messages=USER, extra_body={"method": "magic"})


@pytest.mark.parametrize("seed", [None, 4])  # the shared batch, and a fixed batch
def test_ignore_eos_decodes_up_to_max_tokens(client, seed):
    body = {"max_tokens": 450, "temperature": 0, **({"seed": seed} if seed is not None else {})}
    plain = chat(client, **body).json()
    forced = chat(client, **body, ignore_eos=True).json()
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 450
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 450
    assert forced["choices"][0]["message"]["content"].startswith(plain["choices"][0]["message"]["content"])
    assert chat(client, ignore_eos="yes").json()["error"]["param"] == "ignore_eos"


def test_profiles_through_the_api_survive_a_restart(composed, tmp_path):
    c, model, tok, experts, _ = composed
    db = tmp_path / "profiles.sqlite"
    app = create_app(model, tok, "tiny", defaults=MethodOptions(experts=str(experts)), db=db)
    with TestClient(app) as s:
        r = s.put("/v1/profiles/ana", json={"preferences": "P1A=0.6,P2A=0.4", "method": "soup", "merge": "exact"})
        assert r.status_code == 200, r.text
        assert r.json()["weights"] == {"P1A": 0.6, "P2A": 0.4} and r.json()["method"] == "soup"
        by_name = chat(s, **{**SEEDED, "preferences": "profile:ana"}).json()["choices"]
        spelled = chat(s, **{**SEEDED, "preferences": "P1A=0.6,P2A=0.4", "method": "soup", "merge": "exact"})
        assert by_name == spelled.json()["choices"]
        prompted = chat(s, **{**SEEDED, "preferences": "profile:ana", "method": "prompt"}).json()["choices"]
        assert prompted != by_name  # a method in the request wins over the profile's
        r = chat(s, **{**SEEDED, "preferences": "profile:nobody"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "profile_not_found"
        assert "known profiles: ana" in r.json()["error"]["message"]
        pick = {"question": "Explain rain.", "answer_a": "Rain falls.", "answer_b": "Water vapour condenses...",
                "choice": "a", "features_a": [0.1, -0.2, 0.0], "features_b": [0.3, 0.4, 0.0]}
        assert s.post("/v1/profiles/ana/picks", json=pick).json()["id"] == 1
        assert s.post("/v1/profiles/ana/picks", json={**pick, "choice": "b", "side": "concise"}).status_code == 200
        bad = s.post("/v1/profiles/ana/picks", json={**pick, "choice": "left"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "choice"
        assert s.post("/v1/profiles/ana/picks", json={**pick, "features_a": ["x"]}).json()["error"]["param"] == "features_a"
        assert s.post("/v1/profiles/bob/picks", json=pick).status_code == 404
        assert s.put("/v1/profiles/bad name", json={"preferences": "1A"}).status_code == 400
        assert s.put("/v1/profiles/x", json={"preferences": "1Z"}).json()["error"]["param"] == "preferences"
    with TestClient(create_app(model, tok, "tiny", defaults=MethodOptions(experts=str(experts)), db=db)) as again:
        assert again.get("/v1/profiles").json()["data"] == ["ana"]
        doc = again.get("/v1/profiles/ana").json()
        assert doc["picks"] == 2 and doc["merge"] == "exact"
    from personalign.profiles import Profiles

    pairs = Profiles(db).pairs("ana")
    assert [p["side"] for p in pairs] == ["profile:ana", "P2A"] and pairs[1]["chosen"].startswith("Water")
    spec = resolve("profile:ana", MethodOptions(method="prompt"), profiles=Profiles(db))
    assert spec.preference.weight_dict() == {"P1A": 0.6, "P2A": 0.4}


def test_a_preference_in_words_and_the_resolved_weights_in_the_response(client):
    said = chat(client, preferences_text="short and friendly. Cite a source", max_tokens=4, temperature=0).json()
    assert said["personalign"] == {"method": "prompt", "preferences": "P2A=1,P3A=1", "weights": {"P2A": 1.0, "P3A": 1.0},
                                   "prompt_extra": "cite a source"}
    spelled = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Explain rain. Cite a source."}],
        "preferences": "P2A=1,P3A=1", "max_tokens": 4, "temperature": 0}).json()
    assert said["choices"] == spelled["choices"]
    r = chat(client, preferences_text="the weather in Paris")
    assert r.status_code == 400 and r.json()["error"]["param"] == "preferences_text"
    assert chat(client, preferences_text="short", preferences="1A").json()["error"]["param"] == "preferences_text"
    events = sse(chat(client, preferences_text="short", max_tokens=2, stream=True))
    assert events[0]["personalign"]["preferences"] == "P2A=1" and "personalign" not in events[1]


def test_acknowledged_picks_survive_a_killed_server_and_concurrent_picks_are_all_kept(tiny_model_dir, tmp_path):
    import json
    import os
    import signal
    import socket
    from urllib.request import Request, urlopen

    from personalign.profiles import Profiles

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "p.sqlite"
    exe = os.path.join(os.path.dirname(sys.executable), "personalign")
    proc = subprocess.Popen([exe, "serve", "--model", str(tiny_model_dir), "--port", str(port), "--db", str(db),
                             "--set", "log_level=warning"], start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def call(method, path, body):
        req = Request(url + path, data=json.dumps(body).encode(), method=method,
                      headers={"Content-Type": "application/json"})
        with urlopen(req, timeout=30) as r:
            return json.load(r)

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        call("PUT", "/v1/profiles/ana", {"preferences": "1A"})
        pick = {"question": "q", "answer_a": "x", "answer_b": "y", "choice": "a"}
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda i: call("POST", "/v1/profiles/ana/picks", {**pick, "question": f"q{i}"})["id"],
                                range(24)))
        assert sorted(ids) == list(range(1, 25))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no shutdown: only what was on disk remains
        proc.wait(30)
    assert sorted(p.question for p in Profiles(db).picks("ana")) == sorted(f"q{i}" for i in range(24))


def test_sides_without_an_expert_are_prompted_when_asked_and_for_described_preferences(composed):
    c = composed[0]  # experts for P1A, P1B, P2A, P3A only
    body = {**SEEDED, "method": "soup", "merge": "exact", "preferences": "1A,2B,3A"}
    refused = chat(c, **body)
    assert refused.status_code == 400 and "no expert for side(s) P2B" in refused.json()["error"]["message"]
    r = chat(c, **body, prompt_missing=True).json()
    assert r["personalign"]["experts"] == {"P1A": 0.5, "P3A": 0.5} and r["personalign"]["prompted_only"] == ["P2B"]
    words = chat(c, **{**body, "preferences": None}, preferences_text="simple, detailed and friendly").json()
    assert words["personalign"]["prompted_only"] == ["P2B"] and words["choices"] == r["choices"]
    assert chat(c, **SEEDED, prompt_missing=True).json()["error"]["param"] == "prompt_missing"  # prompt method
