"""The server's continuous-batching engine on the tiny random llama: every method's rows in one shared batch
give what the entry point gives alone; rows join a running batch and leave it; cancelled and timed-out rows
free their place; a full queue refuses; the PCM weights each row of a mixed batch for its own preference."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from personalign.generation import SamplingConfig
from personalign.personalize import MethodOptions, personalize, resolve
from personalign.serve import create_app
from personalign.serve.batching import ApiError, Models
from personalign.serve.engine import Engine, Job

SIDES = ("P1A", "P1B", "P2A", "P2B", "P3A")
GREEDY = {"max_tokens": 10, "temperature": 0, "repetition_penalty": 1.1}
QUESTION = "Explain rain."

# (method, preferences, extra fields): every method the shared batch computes
CASES = [
    ("vanilla", None, {}),
    ("prompt", "1A,2A,3A", {}),
    ("expert", "P2A", {}),
    ("soup", "1A,2A,3A", {"merge": "exact"}),
    ("soup", "P1A=1,P2B=-0.5,P3A=0.3", {"merge": "exact"}),  # continuous and negative
    ("mope", "1B,2A,3A", {"mix": "prob"}),
    ("mope", "P1A=0.2,P2B=0.8", {"mix": "logit"}),
    ("mope", "1A,2B,3A", {"mix": "uniform"}),
    ("mope", "1B,2B,3A", {"mix": "prob", "pcm": "default"}),  # the server's PCM
    ("soup", "1A,2B,3A", {"merge": "exact", "strength": 2.5}),  # preference strength, per row
    ("mope", "1B,2A,3A", {"mix": "extrapolate", "strength": 2.0}),  # with a base lane
    ("mope", "P1A=0.3,P2B=0.7", {"mix": "extrapolate"}),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    import torch
    from conftest import save_side_experts

    from personalign.models import load_model
    from personalign.pcm import PCMConfig, PreferenceControlModel

    root = tmp_path_factory.mktemp("engine")
    experts = save_side_experts(tiny_model_dir, root / "experts", SIDES)
    model, tok = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    torch.manual_seed(0)
    pcm = PreferenceControlModel(PCMConfig(SIDES, model.config.hidden_size, True, hidden=16, proj=8))
    with torch.no_grad():
        for p in pcm.parameters():
            p.add_(torch.randn_like(p))  # far from uniform weights, so that a wrong row would show
    pcm.save(root / "pcm")
    return model, tok, experts, root / "pcm", tiny_model_dir


def body(method, prefs, extra, **more):
    b = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "method": method, **GREEDY, **more}
    if prefs is not None:
        b["preferences"] = prefs
    b.update({k: v for k, v in extra.items() if k != "pcm"})
    return b


def entry_point(setup, method, prefs, extra):
    model, tok, experts, pcm, model_dir = setup
    options = {k: v for k, v in extra.items() if k in ("merge", "mix", "strength")}
    if extra.get("pcm"):
        options["pcm"] = str(pcm)
    spec = resolve(prefs, MethodOptions(method=method, experts=None if method in ("vanilla", "prompt") else str(experts),
                                        **options), model=str(model_dir))
    sampling = SamplingConfig(max_new_tokens=GREEDY["max_tokens"], temperature=0, repetition_penalty=1.1)
    return personalize(model, tok, spec).generate([QUESTION], sampling)[0]


@pytest.fixture(scope="module")
def client(setup):
    model, tok, experts, pcm, _ = setup
    app = create_app(model, tok, "tiny", defaults=MethodOptions(experts=str(experts), pcm=str(pcm)))
    with TestClient(app) as c:
        yield c


def answer(client, b):
    r = client.post("/v1/chat/completions", json=b)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("method", "prefs", "extra"), CASES, ids=[f"{m}-{p}-{e}" for m, p, e in CASES])
def test_each_method_in_the_shared_batch_equals_the_entry_point(setup, client, method, prefs, extra):
    b = body(method, prefs, extra)
    if method == "mope" and not extra.get("pcm"):
        b["pcm"] = "none"  # the server's default PCM weights prob mixtures; this case is fixed weights
    assert answer(client, b) == entry_point(setup, method, prefs, extra)


def test_people_with_different_methods_and_weights_share_one_batch_and_each_gets_their_own_answer(client):
    bodies = [body(m, p, e, **({"pcm": "none"} if m == "mope" and not e.get("pcm") else {})) for m, p, e in CASES]
    alone = [answer(client, b) for b in bodies]
    steps_before = client.get("/health").json()["steps"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: answer(client, b), bodies * 2))
    assert together == alone * 2
    health = client.get("/health").json()
    assert health["models_built"] == 0  # no merge on the request path: every row ran in the shared batch
    # 18 requests of 10 tokens took far fewer than 180 steps: they decoded together
    assert health["steps"] - steps_before < 120


def engine(setup, **kw):
    model, tok, experts, _, model_dir = setup
    return Engine(Models(model, tok), max_batch=kw.pop("max_batch", 8), max_queue=kw.pop("max_queue", 8),
                  experts_dir=experts, model_name=str(model_dir), **kw)


def job(setup, method, prefs, tokens, **kw):
    _, tok, experts, _, model_dir = setup
    spec = resolve(prefs, MethodOptions(method=method, experts=None if method in ("vanilla", "prompt") else str(experts),
                                        **kw.pop("options", {})), model=str(model_dir))
    from personalign.personalize import chat_text

    text = chat_text(tok, [{"role": "user", "content": QUESTION}], spec)
    sampling = SamplingConfig(max_new_tokens=tokens, temperature=0, repetition_penalty=1.1)
    return Job([text], 1, sampling, (), False, True, spec, **kw)


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_request_joins_a_running_batch_and_leaves_before_the_long_one_ends(setup):
    eng = engine(setup)
    long_alone = eng.submit(job(setup, "prompt", "1A,2A,3A", 60)).result(60)
    short_alone = eng.submit(job(setup, "soup", "1B,2A,3A", 5, options={"merge": "exact"})).result(60)
    long_job = job(setup, "prompt", "1A,2A,3A", 60)
    eng.submit(long_job)
    wait_for(lambda: eng.tokens >= len(long_alone[0][0]) // 100 + 70)  # well into the long answer
    short_job = job(setup, "soup", "1B,2A,3A", 5, options={"merge": "exact"})
    short = eng.submit(short_job).result(60)
    assert not long_job.future.done()  # the short request did not wait for the long one
    assert short == short_alone and long_job.future.result(60) == long_alone
    eng.close()


def test_cancelled_and_timed_out_rows_leave_the_batch(setup):
    eng = engine(setup)
    gone = job(setup, "mope", "1A,2A,3A", 500)
    eng.submit(gone)
    wait_for(lambda: eng.batch_rows == 1)
    gone.cancel()
    assert gone.future.result(20)[0][1] == "cancelled"
    wait_for(lambda: eng.batch_rows == 0)
    late = job(setup, "prompt", "1A", 500, timeout=0.05)
    text, reason, count = eng.submit(late).result(20)[0]
    assert reason == "time_limit" and 0 < count < 500
    eng.close()


def test_a_full_queue_refuses_instead_of_growing(setup):
    eng = engine(setup, max_batch=1, max_queue=2)
    running = job(setup, "prompt", "1A", 500)
    eng.submit(running)
    wait_for(lambda: eng.batch_rows == 1)
    eng.submit(job(setup, "prompt", "1A", 2))
    eng.submit(job(setup, "prompt", "1A", 2))
    with pytest.raises(ApiError) as err:
        eng.submit(job(setup, "prompt", "1A", 2))
    assert err.value.status == 429 and "busy" in str(err.value)
    running.cancel()
    eng.close()


def test_the_pcm_weights_each_row_for_its_own_preference(setup, client):
    """Two preferences through one PCM in one batch: each row equals the PCM mixture of its own preference
    alone (the PCM's per-row inputs: preference, step, prompt and generated embeddings)."""
    cases = [("mope", p, {"mix": "prob", "pcm": "default"}) for p in ("1A,2A,3A", "1B,2B,3A", "P1A=0.7,P3A=0.3")]
    want = [entry_point(setup, *c) for c in cases]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda c: answer(client, body(*c)), cases))
    assert got == want


def test_per_row_pcm_inputs_equal_those_of_each_rows_own_experts(setup):
    """The shared batch's PCM inputs (each row's experts at their side slots, padding ignored) equal the
    inputs a mixture of only that row's experts gives (PCMWeights' layout), row by row."""
    import torch

    from personalign.pcm import PreferenceControlModel, preference_vector, step_inputs
    from personalign.preferences import parse_preference

    pcm = PreferenceControlModel.load(setup[3])
    prefs = [parse_preference(p) for p in ("1A,2A,3A", "P1B=0.7,P3A=0.3")]
    torch.manual_seed(1)
    logp = torch.randn(2, 3, 400).log_softmax(-1)  # row 1 has 2 experts and a padding slot
    slots = torch.tensor([[0, 2, 4], [1, 4, -1]])
    pref = torch.stack([preference_vector(p, pcm.sides) for p in prefs])
    emb, gen = torch.randn(2, 32), torch.randn(2, 32)
    together = step_inputs(pcm, pref, slots, logp, [0, 5], emb, gen)
    for row, k in ((0, 3), (1, 2)):
        alone = step_inputs(pcm, pref[row:row + 1], slots[row, :k], logp[row:row + 1, :k], [[0, 5][row]],
                            emb[row:row + 1], gen[row:row + 1])
        assert torch.allclose(together.scalars[row], alone.scalars[0], atol=1e-6)
        assert torch.allclose(together.gen_emb[row], alone.gen_emb[0])
    assert not torch.allclose(together.scalars[0], together.scalars[1])


def test_without_the_shared_batch_each_request_gets_its_own_merged_model_and_the_same_answer(setup, client):
    model, tok, experts, pcm, _ = setup
    cases = [("soup", "1A,2A,3A", {"merge": "exact"}), ("soup", "P1A=1,P2B=-0.5,P3A=0.3", {"merge": "exact"}),
             ("mope", "1B,2A,3A", {"mix": "prob"}), ("prompt", "1A,2A,3A", {})]
    bodies = [body(m, p, e, **({"pcm": "none"} if m == "mope" else {})) for m, p, e in cases]
    shared = [answer(client, b) for b in bodies]
    app = create_app(model, tok, "tiny", defaults=MethodOptions(experts=str(experts)), max_models=1, continuous=False)
    with TestClient(app) as merged:
        with ThreadPoolExecutor(len(bodies)) as pool:
            alone = list(pool.map(lambda b: answer(merged, b), bodies))
        health = merged.get("/health").json()
    assert alone == shared
    assert health["models_built"] == 3 and health["experts_loaded"] == []  # one merged model at a time


@pytest.mark.parametrize(("extra", "message"), [
    ({"method": "mope", "mix": "prob", "strength": 2}, "strength applies to method soup and to method mope with mix "
                                                       "'extrapolate', not mope with mix 'prob'"),
    ({"method": "prompt", "strength": 2}, "strength applies to method soup"),
    ({"method": "soup", "merge": "exact", "strength": -1}, "strength must be a finite number >= 0"),
    ({"method": "soup", "merge": "exact", "strength": "strong"}, "strength must be a finite number"),
])
def test_a_strength_the_request_cannot_have_is_refused_naming_the_field(client, extra, message):
    b = body(extra.pop("method"), "1A,2B,3A", {}, pcm="none", **extra)
    r = client.post("/v1/chat/completions", json=b)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "strength" and message in err["message"]


def test_a_profile_keeps_its_strength(client):
    r = client.put("/v1/profiles/strong", json={"preferences": "1A,2B,3A", "method": "soup", "merge": "exact",
                                                "strength": 2.5})
    assert r.status_code == 200, r.text
    assert r.json()["strength"] == 2.5
    b = body("soup", "profile:strong", {})
    del b["method"]  # the profile's method and options
    strong = answer(client, body("soup", "1A,2B,3A", {"merge": "exact", "strength": 2.5}))
    assert answer(client, b) == strong != answer(client, body("soup", "1A,2B,3A", {"merge": "exact"}))


def test_a_request_without_a_strength_gets_the_default_measured_for_the_servers_experts(setup, tmp_path):
    import json
    import shutil

    from personalign.errors import ConfigError
    from personalign.personalize import STRENGTH_FILE

    model, tok, experts, _, _ = setup
    mine = tmp_path / "experts"
    shutil.copytree(experts, mine)
    (mine / STRENGTH_FILE).write_text(json.dumps({"default_strength": {"soup-exact": 2.5}}))
    app = create_app(model, tok, "tiny", defaults=MethodOptions(experts=str(mine)))
    with TestClient(app) as c:
        table = c.get("/v1/preferences").json()["default_strength"]
        assert table["soup-exact"] == 2.5 and table["soup-psoups"] == table["mope-extrapolate"] == 1.0
        measured = answer(c, body("soup", "1A,2B,3A", {"merge": "exact"}))
        assert measured == answer(c, body("soup", "1A,2B,3A", {"merge": "exact", "strength": 2.5}))
        assert measured != answer(c, body("soup", "1A,2B,3A", {"merge": "exact", "strength": 1}))
    (mine / STRENGTH_FILE).write_text('{"default_strength": {"soup-exact": "strong"}}')
    with pytest.raises(ConfigError, match="strength.json: default_strength 'soup-exact'"):
        create_app(model, tok, "tiny", defaults=MethodOptions(method="soup", experts=str(mine)))
