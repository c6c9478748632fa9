"""Preference strength: soups scale the merged delta, the extrapolate rule moves away from the base model.

Invariances: strength 1 is today's soup exactly; the soup's delta is linear in strength for every merge
rule; the extrapolate rule at strength 1 with weight 1 on one expert is that expert, at strength 0 the base
model; options that cannot honour a strength refuse it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_experts, build_tiny_tokenizer

from personalign.adapters import LoraAdapter, module_delta
from personalign.errors import ConfigError
from personalign.experts import BASE_EXPERT, Experts
from personalign.generation import SamplingConfig
from personalign.merging import METHODS, merge_adapters, merge_defaults
from personalign.mixing import MixRule, mix_extrapolate, mix_logit, mix_logprobs
from personalign.mixture import FixedWeights, MixtureStep, generate_mixed
from personalign.personalize import MethodOptions, personalize, resolve

SIDES = ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
PENALISED = SamplingConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.3)


def _adapter(seed: int, r: int = 4) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in ("layers.0.q_proj", "layers.0.v_proj"):
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, 16, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(12, r, generator=g)
    return LoraAdapter(tensors=tensors, r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], base_model="tiny")


# -- merging ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_strength_one_is_the_plain_merge_and_the_delta_scales_linearly(method):
    adapters, w = [_adapter(1), _adapter(2), _adapter(3)], [0.5, 0.3, 0.2]
    density, seed = merge_defaults(method, None, None)
    plain, _ = merge_adapters(adapters, w, method, density=density, seed=seed)
    same, _ = merge_adapters(adapters, w, method, density=density, seed=seed, strength=1.0)
    assert all(torch.equal(plain.tensors[k], same.tensors[k]) for k in plain.tensors)
    for s in (0.0, 1.5, 3.0):
        scaled, report = merge_adapters(adapters, w, method, density=density, seed=seed, strength=s)
        assert report.strength == s and report.summary()["merge/strength"] == s
        for module in plain.modules:
            torch.testing.assert_close(module_delta(scaled, module), s * module_delta(plain, module),
                                       rtol=1e-5, atol=1e-6)
        if method == "exact":  # the reference of the deviation scales too: still exact
            assert max(report.deviation.values()) < 1e-5


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "2"])
def test_merging_refuses_a_strength_that_is_not_a_finite_non_negative_number(bad):
    with pytest.raises(ConfigError, match="strength"):
        merge_adapters([_adapter(1), _adapter(2)], None, "exact", strength=bad)


# -- the extrapolate rule, pure -------------------------------------------------------------------------------


def test_extrapolate_is_the_base_at_strength_zero_and_the_expert_at_strength_one():
    g = torch.Generator().manual_seed(0)
    logits, base = torch.randn(3, 2, 11, generator=g), torch.randn(3, 11, generator=g)
    one = torch.tensor([[1.0, 0.0]]).expand(3, -1)
    torch.testing.assert_close(mix_extrapolate(logits, base, one, 1.0), F.log_softmax(logits[:, 0], -1))
    torch.testing.assert_close(mix_extrapolate(logits, base, one, 0.0), F.log_softmax(base, -1))
    w = torch.tensor([[0.3, 0.7]]).expand(3, -1)
    # strength 1 with weights summing to 1: the base cancels, the logit (MOD) rule
    torch.testing.assert_close(mix_extrapolate(logits, base, w, 1.0), mix_logit(logits, w))
    # strength 2 is the base plus twice the shift: against a direct formula
    lp, lb = F.log_softmax(logits, -1), F.log_softmax(base, -1)
    direct = F.log_softmax(lb + 2 * (0.3 * (lp[:, 0] - lb) + 0.7 * (lp[:, 1] - lb)), -1)
    torch.testing.assert_close(mix_extrapolate(logits, base, w, 2.0), direct)
    # per-row strengths
    rows = mix_extrapolate(logits, base, w, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(rows[0], F.log_softmax(base[0], -1))
    torch.testing.assert_close(rows[2], direct[2])


def test_strength_beyond_one_sharpens_towards_the_expert():
    """What the expert prefers over the base gains probability faster than under the expert itself."""
    base = torch.zeros(1, 4)
    expert = torch.tensor([[[2.0, 0.0, 0.0, 0.0]]])
    w = torch.ones(1, 1)
    p = [mix_extrapolate(expert, base, w, s).exp()[0, 0].item() for s in (0.0, 1.0, 2.0, 3.0)]
    assert p == sorted(p) and p[0] == pytest.approx(0.25) and p[3] > 0.99


def test_only_the_extrapolate_rule_takes_a_base_or_a_strength():
    logits, w = torch.randn(1, 2, 5), torch.tensor([[0.5, 0.5]])
    for rule in (MixRule.PROB, MixRule.LOGIT, MixRule.UNIFORM):
        with pytest.raises(ConfigError, match="extrapolate"):
            mix_logprobs(logits, w, rule, strength=2.0)
        with pytest.raises(ConfigError, match="extrapolate"):
            mix_logprobs(logits, w, rule, base=torch.randn(1, 5))
    with pytest.raises(ConfigError, match="needs the base model"):
        mix_logprobs(logits, w, MixRule.EXTRAPOLATE)
    with pytest.raises(ConfigError, match="base logits of shape"):
        mix_extrapolate(logits, torch.randn(2, 5), w)


# -- the extrapolate rule in the decode loop -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    t = build_tiny_tokenizer()
    t.padding_side = "left"
    return t


@pytest.fixture(scope="module")
def peft_model(tok):
    return build_tiny_experts(tok, ["a", "b"])


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(["Explain photosynthesis to me.", "List five painters please."], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _run(experts, batch, weights, rule, sampling=GREEDY, strength=1.0, eos=(10**6,)):
    ids, mask = batch
    return generate_mixed(experts, ids, mask, FixedWeights(weights) if weights is not None else None,
                          eos_token_ids=list(eos), pad_token_id=0, rule=rule, sampling=sampling, strength=strength)


@pytest.mark.parametrize("sampling", [GREEDY, PENALISED])
def test_extrapolate_decodes_the_expert_at_strength_one_and_the_base_at_zero(peft_model, batch, sampling):
    with_base = Experts.from_adapters(peft_model, ["a", "b", BASE_EXPERT])
    alone = _run(Experts.from_adapters(peft_model, ["a"]), batch, [1.0], MixRule.PROB, sampling)
    base = _run(Experts.from_adapters(peft_model, [BASE_EXPERT]), batch, [1.0], MixRule.PROB, sampling)
    at_one = _run(with_base, batch, [1.0, 0.0], MixRule.EXTRAPOLATE, sampling, strength=1.0)
    at_zero = _run(with_base, batch, [0.5, 0.5], MixRule.EXTRAPOLATE, sampling, strength=0.0)
    assert torch.equal(at_one.tokens, alone.tokens) and torch.equal(at_zero.tokens, base.tokens)
    at_two = _run(with_base, batch, [0.5, 0.5], MixRule.EXTRAPOLATE, sampling, strength=2.0)
    assert at_two.weights.shape[-1] == 2 and at_two.expert_logprobs.shape[-1] == 2  # the base is not an expert
    logit = _run(Experts.from_adapters(peft_model, ["a", "b"]), batch, [0.5, 0.5], MixRule.LOGIT, sampling)
    half = _run(with_base, batch, [0.5, 0.5], MixRule.EXTRAPOLATE, sampling, strength=1.0)
    assert torch.equal(half.tokens, logit.tokens)
    assert not torch.equal(at_two.tokens, half.tokens)  # the tiny experts differ enough to change greedy text


def test_the_mixture_step_refuses_what_it_cannot_honour(peft_model):
    plain = Experts.from_adapters(peft_model, ["a", "b"])
    with pytest.raises(ConfigError, match="base model as the last expert"):
        MixtureStep(plain, FixedWeights([0.5, 0.5]), MixRule.EXTRAPOLATE)
    with pytest.raises(ConfigError, match="strength goes with the extrapolate rule"):
        MixtureStep(plain, FixedWeights([0.5, 0.5]), MixRule.PROB, strength=2.0)
    with pytest.raises(ConfigError, match="finite number >= 0"):
        MixtureStep(Experts.from_adapters(peft_model, ["a", BASE_EXPERT]), FixedWeights([1.0]),
                    MixRule.EXTRAPOLATE, strength=-1.0)


# -- the entry point ---------------------------------------------------------------------------------------------


@pytest.fixture()
def experts(tiny_model_dir, tmp_path):
    from conftest import save_side_experts

    return save_side_experts(tiny_model_dir, tmp_path / "experts", SIDES)


def _spec(tiny_model_dir, experts, prefs, method, **options):
    return resolve(prefs, MethodOptions(method=method, experts=str(experts), **options), model=str(tiny_model_dir))


@pytest.mark.parametrize(("method", "options", "message"), [
    ("mope", {"strength": 2.0}, "applies only to method soup and method mope with mix 'extrapolate'"),
    ("mope", {"mix": "logit", "strength": 2.0}, "a probability or logit mixture cannot go beyond its experts"),
    ("expert", {"strength": 2.0}, "strength=2.0 applies only to method soup"),
    ("soup", {"strength": -0.5}, "strength must be a finite number >= 0"),
    ("soup", {"strength": float("nan")}, "strength must be a finite number >= 0"),
    ("mope", {"mix": "uniform", "pcm": "shipped"}, "pcm goes with mix 'prob'"),
])
def test_resolve_refuses_a_strength_it_cannot_honour(tiny_model_dir, experts, method, options, message):
    prefs = "P1A" if method == "expert" else "1A,2A"
    with pytest.raises(ConfigError, match=re.escape(message)):
        _spec(tiny_model_dir, experts, prefs, method, **options)
    with pytest.raises(ConfigError, match="strength"):
        resolve("1A", MethodOptions(method="prompt", strength=2.0))


def test_labels_carry_the_strength(tiny_model_dir, experts):
    assert _spec(tiny_model_dir, experts, "1A,2A", "soup", merge="exact", strength=2.0).label == "soup-exact-x2"
    assert _spec(tiny_model_dir, experts, "1A,2A", "soup", strength=1.0).label == "soup-psoups"
    assert _spec(tiny_model_dir, experts, "1A,2A", "mope", mix="extrapolate", strength=1.5).label == \
        "mope-extrapolate-x1.5"
    from personalign.generations import parse_method

    m = parse_method("mope-extrapolate-x1.5")
    assert m.options(str(experts), None).strength == 1.5 and m.options(str(experts), None).mix == "extrapolate"


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("merge", ["psoups", "exact", "ties"])
def test_a_soup_at_strength_s_moves_the_weights_s_times_as_far(tiny, tiny_model_dir, experts, merge):
    model, tok = tiny
    base = _weights(model)
    moved = {}
    for s in (1.0, 2.0):
        pm = personalize(model, tok, _spec(tiny_model_dir, experts, "1A,2B,3A", "soup", merge=merge, strength=s))
        w = _weights(pm.model)
        moved[s] = {k: w[k] - base[k] for k in base if not torch.equal(w[k], base[k])}
    assert moved[1.0] and moved[1.0].keys() == moved[2.0].keys()
    for k in moved[1.0]:
        torch.testing.assert_close(moved[2.0][k], 2 * moved[1.0][k], rtol=1e-4, atol=1e-6)
    zero = personalize(model, tok, _spec(tiny_model_dir, experts, "1A,2B,3A", "soup", merge=merge, strength=0.0))
    assert all(torch.equal(v, base[k]) for k, v in _weights(zero.model).items())


def test_mope_extrapolate_at_strength_one_on_one_side_is_that_expert(tiny, tiny_model_dir, experts):
    model, tok = tiny
    q = ["Explain photosynthesis to me.", "Bake bread?"]
    expert = personalize(model, tok, _spec(tiny_model_dir, experts, "P1A", "expert")).generate(q, GREEDY)
    mixed = personalize(model, tok, _spec(tiny_model_dir, experts, "P1A", "mope", mix="extrapolate"))
    assert mixed.generate(q, GREEDY) == expert
    strong = personalize(model, tok, _spec(tiny_model_dir, experts, "1A,2A", "mope", mix="extrapolate",
                                           strength=3.0))
    assert strong.label == "mope-extrapolate-x3" and len(strong.generate(q, GREEDY)) == 2


def test_a_request_without_a_strength_gets_the_default_measured_for_its_experts(tiny_model_dir, experts):
    from personalign.generations import parse_method
    from personalign.personalize import STRENGTH_FILE

    # without a strength file every rule defaults to 1: the experts' weighted average
    assert _spec(tiny_model_dir, experts, "1A,2A", "soup", merge="exact").label == "soup-exact"
    (experts / STRENGTH_FILE).write_text(json.dumps(
        {"default_strength": {"soup-exact": 3, "mope-extrapolate": 1.5}, "measured": {"soup-exact": {"record": "x"}}}))
    soup = _spec(tiny_model_dir, experts, "1A,2A", "soup", merge="exact")
    assert soup.options.strength == 3.0 and soup.label == "soup-exact-x3"
    assert _spec(tiny_model_dir, experts, "1A,2A", "soup").label == "soup-psoups"  # a rule the file does not name
    assert _spec(tiny_model_dir, experts, "1A,2A", "soup", merge="exact", strength=1.0).label == "soup-exact"
    assert _spec(tiny_model_dir, experts, "1A,2A", "mope", mix="extrapolate").label == "mope-extrapolate-x1.5"
    assert _spec(tiny_model_dir, experts, "1A,2A", "mope").options.strength == 1.0  # prob: none to take
    # an evaluation's method labels name their strength, whatever the default: soup-exact is strength 1
    m = parse_method("soup-exact")
    assert resolve("1A,2A", m.options(str(experts), None), model=str(tiny_model_dir)).label == "soup-exact"
    # another experts folder, another default: the measurement belongs to the experts it was made with
    other = experts.parent / "other"
    other.mkdir()
    for side in ("P1A", "P2A"):
        (other / side).symlink_to(experts / side)
    assert _spec(tiny_model_dir, other, "1A,2A", "soup", merge="exact").options.strength == 1.0


@pytest.mark.parametrize(("text", "message"), [
    ("{", "is not a readable JSON file"),
    ('{"default_strength": 3}', 'needs an object "default_strength"'),
    ('{"default_strength": {"soup-exactly": 3}}', "unknown rule 'soup-exactly' in default_strength"),
    ('{"default_strength": {"soup-exact": -1}}', "default_strength 'soup-exact': strength must be a finite"),
    ('{"default_strength": {"soup-exact": true}}', "strength must be a finite number"),
    ('{"default_strength": {}, "chosen": 3}', "unknown key(s) chosen"),
])
def test_a_malformed_strength_file_is_one_error_naming_it(tiny_model_dir, experts, text, message):
    from personalign.personalize import STRENGTH_FILE

    (experts / STRENGTH_FILE).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        _spec(tiny_model_dir, experts, "1A,2A", "soup", merge="exact")
    assert STRENGTH_FILE in str(e.value) and "\n" not in str(e.value)


def test_the_shipped_experts_default_to_the_strength_measured_for_them():
    """The shipped experts carry their measured defaults; every rule they name was selected on held-out
    instructions where it passed the per-combination gate (bench/strength.py choose)."""
    from personalign.compose import shipped_experts_dir
    from personalign.personalize import STRENGTH_FILE, default_strengths

    shipped = shipped_experts_dir("smollm2-135m-instruct")
    if shipped is None:
        pytest.skip("the weights distribution is not installed")
    doc = json.loads((shipped / STRENGTH_FILE).read_text())
    table = default_strengths(shipped)
    assert table["soup-exact"] == 3.0 and table["soup-psoups"] == 1.0
    for key, value in doc["default_strength"].items():
        assert doc["measured"][key]["any_eligible"] and value in doc["measured"][key]["swept"], key


def test_bench_strength_writes_the_choice_as_the_experts_defaults(tmp_path, monkeypatch):
    """bench/strength.py defaults: the strengths `choose` picked become the folder's strength.json, beside
    the rules already there; a choice with side weights is not a strength and is refused."""
    import importlib.util
    from pathlib import Path

    from personalign.personalize import STRENGTH_FILE, default_strengths

    script = Path(__file__).resolve().parents[2] / "bench" / "strength.py"
    spec = importlib.util.spec_from_file_location("bench_strength", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(bench, "OUT", tmp_path / "bench" / "strength-x.json")
    monkeypatch.setattr(bench, "SELECT", tmp_path / "runs" / "strength-select-x")
    folder = tmp_path / "experts"
    folder.mkdir()
    (folder / STRENGTH_FILE).write_text(json.dumps({"default_strength": {"soup-exact": 2}}))

    def cand(label, strength, weights=None):
        return {"label": label, "strength": strength, "side_weights": weights or {}, "score": 0.6,
                "ontopic_ratio_min": 0.93}

    doc = {"chosen": {"mope": {"chosen": 1.5, "label": "mope-extrapolate-x1.5", "any_eligible": True,
                               "candidates": [cand("mope-extrapolate", 1.0), cand("mope-extrapolate-x1.5", 1.5)]}}}
    assert bench.write_defaults(doc, folder) == 0
    written = json.loads((folder / STRENGTH_FILE).read_text())
    assert written["default_strength"] == {"soup-exact": 2, "mope-extrapolate": 1.5}
    assert written["measured"]["mope-extrapolate"]["swept"] == [1.0, 1.5]
    assert written["measured"]["mope-extrapolate"]["record"] == "bench/strength-x.json"
    assert default_strengths(folder)["mope-extrapolate"] == 1.5
    weighted = {"exact": {"chosen": 2.0, "label": "soup-exact-wP2A=0.5-x2", "any_eligible": True,
                          "candidates": [cand("soup-exact-wP2A=0.5-x2", 2.0, {"P2A": 0.5})]}}
    with pytest.raises(SystemExit, match="has side weights"):
        bench.write_defaults({"chosen": weighted}, folder)
    with pytest.raises(SystemExit, match="run choose first"):
        bench.write_defaults({}, folder)
