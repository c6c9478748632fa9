"""The one entry point (``personalign.personalize``) on a tiny llama with random LoRA experts: every check
before a model loads, the same object for every method, soups merged in memory equal to the merged
adapter on disk, the caller's model left alone, and the Python API, the command and the server giving
the same text for the same request."""

from __future__ import annotations

import pytest
import torch

import personalign
from personalign.errors import ConfigError, PersonalignError, PreferenceError
from personalign.generation import SamplingConfig
from personalign.models import load_model
from personalign.personalize import Method, MethodOptions, PersonalizedModel, personalize, resolve

SIDES = ("P1A", "P1B", "P2A", "P2B", "P3A")
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
SAMPLED = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
QUESTIONS = ["Explain photosynthesis to me.", "Bake bread?"]


@pytest.fixture()
def experts(tiny_model_dir, tmp_path):
    from conftest import save_side_experts

    return save_side_experts(tiny_model_dir, tmp_path / "experts", SIDES)


def spec(tiny_model_dir, experts, prefs, method, **options):
    uses = method in ("expert", "soup", "mope")
    return resolve(prefs, MethodOptions(method=method, experts=str(experts) if uses else None, **options),
                   model=str(tiny_model_dir))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- resolve: every check, no model ------------------------------------------------------------------


@pytest.mark.parametrize(("prefs", "options", "error", "message"), [
    (None, {"method": "soup"}, PreferenceError, "a preference is required with method soup"),
    ("1A,2A", {"method": "prompt", "merge": "exact"}, ConfigError, "merge='exact' applies only to method soup"),
    ("1A,2A", {"method": "soup", "mix": "logit"}, ConfigError, "mix='logit' applies only to method mope"),
    ("1A,2A", {"method": "mope", "pcm": "shipped", "mix": "uniform"}, ConfigError, "pcm goes with mix 'prob'"),
    ("1A,2A", {"method": "soup", "merge": "average"}, ConfigError, "unknown merge 'average'"),
    ("1A,2A", {"method": "soup", "merge": "exact", "merge_density": 0.5}, ConfigError,
     "density applies only to ties, dare and dare_ties"),
    ("1A,2A", {"method": "soup", "merge": "ties", "merge_density": 1.5}, ConfigError, "must be in (0, 1]"),
    ("1A,2A", {"method": "soup", "merge": "psoups", "merge_rank": 4}, ConfigError, "rank does not apply to psoups"),
    ("1A,2A", {"method": "expert"}, PreferenceError, "names 2"),
    ("concise=-1", {"method": "expert"}, PreferenceError, "asks to move away from it; use method soup"),
    ("P1A=1,P2A=-0.5", {"method": "mope"}, PreferenceError, "non-negative"),
    ("1A,2A,3B", {"method": "soup"}, PreferenceError, "no expert for side(s) P3B"),
    ("1A", {"method": "mope", "mix": "fast"}, ConfigError, "unknown mixing rule 'fast'"),
    ("1A", {"method": "prompt", "adapter": "x"}, ConfigError, "goes with method adapter"),
    ("1A", {"method": "teleport"}, ConfigError, "unknown method 'teleport'"),
    ("1Z", {"method": "prompt"}, PreferenceError, "unknown preference side '1Z'"),
])
def test_resolve_refuses_bad_requests_before_any_model_loads(tiny_model_dir, experts, monkeypatch, prefs, options,
                                                              error, message):
    import personalign.models

    monkeypatch.setattr(personalign.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    if options.get("method") in ("expert", "soup", "mope"):
        options = {**options, "experts": str(experts)}
    with pytest.raises(error, match=__import__("re").escape(message)):
        resolve(prefs, MethodOptions(**options), model=str(tiny_model_dir))


def test_resolve_fills_the_merge_defaults_in_one_place(tiny_model_dir, experts):
    assert spec(tiny_model_dir, experts, "1A,2A", "soup", merge="ties").merge_density == 0.5
    dare = spec(tiny_model_dir, experts, "1A,2A", "soup", merge="dare")
    assert (dare.merge_density, dare.merge_seed) == (0.5, 0)
    assert spec(tiny_model_dir, experts, "1A,2A", "soup", merge="exact").merge_density is None
    s = spec(tiny_model_dir, experts, "concise=0.6,informative=0.2,friendly=0", "soup")
    assert dict(s.weights) == pytest.approx({"P2A": 0.75, "P2B": 0.25}) and set(s.experts) == {"P2A", "P2B"}


def test_labels_name_each_variant():
    assert resolve("1A", MethodOptions(method="prompt")).label == "prompt"
    assert resolve(None, MethodOptions(method="vanilla")).label == "vanilla"


# -- personalize: one object, every method ----------------------------------------------------------------


@pytest.mark.parametrize(("prefs", "method", "options"), [
    (None, "vanilla", {}), ("1A,2A", "prompt", {}), ("P2A", "expert", {}),
    ("1A,2A,3A", "soup", {"merge": "psoups"}), ("1A,2A,3A", "soup", {"merge": "exact"}),
    ("1A,2A,3A", "soup", {"merge": "ties"}), ("1A,2A,3A", "soup", {"merge": "dare"}),
    ("1A,2A,3A", "mope", {"mix": "prob"}), ("1A,2A,3A", "mope", {"mix": "logit"}),
    ("1A,2A,3A", "mope", {"mix": "uniform"}),
])
def test_every_method_is_the_same_kind_of_object_and_leaves_the_callers_model_alone(tiny, tiny_model_dir, experts,
                                                                                    prefs, method, options):
    model, tok = tiny
    before = _weights(model)
    pm = personalize(model, tok, spec(tiny_model_dir, experts, prefs, method, **options))
    assert isinstance(pm, PersonalizedModel) and pm.method is Method(method)
    out = pm.generate(QUESTIONS, SAMPLED, batch_size=2)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert pm.generate(QUESTIONS, SAMPLED, batch_size=2) == out  # seeded: the same again
    (done,) = pm.complete([pm.format(QUESTIONS[0])], SAMPLED)
    assert "".join(pm.stream(pm.format(QUESTIONS[0]), SAMPLED)) == done.text
    after = _weights(model)
    assert type(model).__name__ == "LlamaForCausalLM" and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_composed_methods_change_the_text(tiny, tiny_model_dir, experts):
    model, tok = tiny
    texts = {m: personalize(model, tok, spec(tiny_model_dir, experts, "1A,2A,3A", m)).generate(QUESTIONS, GREEDY)
             for m in ("prompt", "soup", "mope")}
    assert texts["soup"] != texts["prompt"] and texts["mope"] != texts["prompt"]


def test_inplace_uses_the_given_model(tiny, tiny_model_dir, experts):
    model, tok = tiny
    before = _weights(model)
    pm = personalize(model, tok, spec(tiny_model_dir, experts, "1A,2A", "soup", merge="exact"), inplace=True)
    assert pm.model is model  # merged into it: no copy
    assert any(not torch.equal(before[k], v) for k, v in _weights(model).items())


def test_soup_in_memory_equals_the_merged_adapter_loaded_by_peft(tiny, tiny_model_dir, experts, tmp_path):
    """The in-memory soup gives exactly the weights of loading its cached folder with peft and merging."""
    from peft import PeftModel

    model, tok = tiny
    s = spec(tiny_model_dir, experts, "concise=0.7,informative=0.3,friendly=1", "soup", merge="exact")
    pm = personalize(model, tok, s, cache=tmp_path / "cache")
    (folder,) = (tmp_path / "cache" / "soups").iterdir()
    base, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    ref = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    got, want = _weights(pm.model), _weights(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert pm.merge_report["method"] == "exact"


def test_a_model_of_another_base_is_refused(tiny, experts, tmp_path):
    model, tok = tiny
    s = resolve("1A,2A", MethodOptions(method="soup", experts=str(experts)), model=model.name_or_path)
    model.config.personalign_base = "some/other-model"
    with pytest.raises(PersonalignError, match="resolved for base model"):
        personalize(model, tok, s)


# -- the faces give the same text -------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "options"), [("soup", {"merge": "exact"}), ("mope", {"mix": "prob"}),
                                                 ("prompt", {})])
def test_python_api_and_the_generate_command_agree(tiny, tiny_model_dir, experts, method, options):
    from personalign.recipes import generate

    model, tok = tiny
    extra = {"experts": str(experts)} if method != "prompt" else {}
    api = personalign.generate(model, tok, QUESTIONS, prefs="1A,2A,3A", method=method, sampling=SAMPLED,
                               batch_size=2, **options, **extra)
    rows = generate.main(generate.GenerateConfig(prefs="1A,2A,3A", method=method, model=str(tiny_model_dir),
                                                 instructions=tuple(QUESTIONS), batch_size=2, progress=False,
                                                 sampling=SAMPLED, **options, **extra))
    assert api == [r["response"] for r in rows]
    if method != "prompt":  # a soup or mixture, not the prompted base under another name
        prompted = personalign.generate(model, tok, QUESTIONS, prefs="1A,2A,3A", sampling=SAMPLED, batch_size=2)
        assert api != prompted


def test_python_api_refuses_unknown_options(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match="unknown field.*mixx"):
        personalign.generate(model, tok, "Hi", prefs="1A", method="mope", mixx="prob")


def test_load_personalized_loads_the_base_and_builds(tiny_model_dir, experts):
    pm = personalign.load_personalized("1A,2A", method="soup", model=str(tiny_model_dir), experts=str(experts),
                                       device="cpu", merge="exact")
    assert pm.label == "soup-exact" and len(pm.generate("Hi", GREEDY)) == 1


def test_requests_on_the_base_model_share_a_key_and_composed_ones_do_not(tiny_model_dir, experts):
    keys = {resolve(p, MethodOptions(method=m)).key() for p, m in [("1A,2A", "prompt"), ("1B,2B", "prompt"),
                                                                     (None, "vanilla")]}
    assert len(keys) == 1  # one model: such requests can share a batch
    a = spec(tiny_model_dir, experts, "1A,2A", "soup")
    assert a.key() == spec(tiny_model_dir, experts, "1A,2A", "soup").key()
    assert a.key() != spec(tiny_model_dir, experts, "1B,2A", "soup").key()
    assert a.key() != spec(tiny_model_dir, experts, "1A,2A", "soup", merge="exact").key()


def test_generate_reads_a_preference_in_words_and_prompts_the_rest(tiny_model_dir, capsys):
    from personalign.errors import DataError
    from personalign.recipes import generate

    s = SamplingConfig(max_new_tokens=4, temperature=0)
    said = generate.main(generate.GenerateConfig(prefs_text="short and friendly. Cite a source", model=str(tiny_model_dir),
                                                 instructions=("Explain rain.",), progress=False, sampling=s))
    assert "read from the description: P2A=1,P3A=1; the rest as a prompt: 'cite a source'" in capsys.readouterr().err
    spelled = generate.main(generate.GenerateConfig(prefs="P2A=1,P3A=1", model=str(tiny_model_dir), progress=False,
                                                    instructions=("Explain rain. Cite a source.",), sampling=s))
    assert said[0]["response"] == spelled[0]["response"] and said[0]["prompt"] == "Explain rain. Cite a source."
    with pytest.raises(DataError, match="not both"):
        generate.main(generate.GenerateConfig(prefs="1A", prefs_text="short", instructions=("x",), progress=False))


def test_prompt_missing_composes_the_sides_that_have_experts(tiny_model_dir, tmp_path):
    from conftest import save_side_experts

    experts = save_side_experts(tiny_model_dir, tmp_path / "experts", ("P1A", "P2A"))
    options = MethodOptions(method="soup", experts=str(experts), prompt_missing=True)
    spec = resolve("P1A=0.5,P2A=0.3,P3A=0.2", options, model=str(tiny_model_dir))
    assert dict(spec.weights) == pytest.approx({"P1A": 0.625, "P2A": 0.375}) and spec.prompted_only == ("P3A",)
    assert "friendly" in spec.prompt_suffix  # the prompted side's prompt is still appended
    with pytest.raises(PreferenceError, match="no expert for side"):
        resolve("1A,2A,3A", MethodOptions(method="soup", experts=str(experts)), model=str(tiny_model_dir))
    with pytest.raises(PreferenceError, match="no side of"):
        resolve("3A", options, model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="prompt_missing=True applies only to methods expert, soup and mope"):
        resolve("1A", MethodOptions(method="prompt", prompt_missing=True))


def test_generate_answers_under_a_saved_profile(tiny_model_dir, tmp_path):
    from personalign.errors import DataError
    from personalign.profiles import Profiles, default_db
    from personalign.recipes import generate

    s = SamplingConfig(max_new_tokens=4, temperature=0)

    def run(**kw):
        return generate.main(generate.GenerateConfig(model=str(tiny_model_dir), instructions=("Explain rain.",),
                                                     progress=False, sampling=s, **kw))[0]["response"]

    with pytest.raises(PreferenceError, match="unknown profile 'ben'; no profile is saved yet"):
        run(prefs="profile:ben")
    assert not default_db().exists()  # looking a profile up does not create the store
    Profiles(tmp_path / "p.sqlite").save("ana", {"P2A": 1.0, "P3A": 1.0})
    Profiles().save("ben", {"P2A": 1.0, "P3A": 1.0})  # the default store, in the (test's own) cache folder

    spelled = run(prefs="P2A=1,P3A=1")
    assert run(prefs="profile:ana", db=str(tmp_path / "p.sqlite")) == spelled == run(prefs="profile:ben")
    with pytest.raises(PreferenceError, match="unknown profile 'cy'; known profiles: ben"):
        run(prefs="profile:cy")
    with pytest.raises(DataError, match="does not exist"):
        run(prefs="profile:ana", db=str(tmp_path / "none.sqlite"))


def test_prompting_refuses_a_preference_with_no_positive_weight():
    """A prompt can ask for a side, not away from one: negative-only weights would leave it empty."""
    from personalign.errors import PreferenceError
    from personalign.personalize import MethodOptions, resolve

    with pytest.raises(PreferenceError, match="no side with a positive weight.*method prompt"):
        resolve({"P2A": -1.0}, MethodOptions(method="prompt"))
    assert resolve({"P2A": -1.0, "P3A": 0.5}, MethodOptions(method="prompt")).preference.prompt_sides() == ("P3A",)
