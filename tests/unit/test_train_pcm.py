"""train-pcm on the tiny random llama with random LoRA experts: the training preferences, a run that saves
a PCM usable by generation, learning a toy utility, exact resumption, and bad input refused before any
model loads."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import save_side_experts

from personalign.config import load_config
from personalign.errors import ConfigError, PersonalignError
from personalign.preferences import default_space
from personalign.recipes import train_pcm as tp

SIDES = ("P1A", "P2A", "P3C")  # P3C: a side the offline judge cannot score


def _make_experts(model_dir, folder, sides=SIDES):
    return save_side_experts(model_dir, folder, sides)


@pytest.fixture(scope="module")
def experts_dir(tiny_model_dir, tmp_path_factory):
    return _make_experts(tiny_model_dir, tmp_path_factory.mktemp("experts"))


# Toy rewards, imported by the recipe as module:function (this module's own name).
_LIKES: dict[str, object] = {}


def likes_p1a(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Mean per-token log-likelihood ratio of expert P1A over expert P2A given the policy's prompt (the
    combination 1A,2A): high for text that P1A would write, measured on the text alone."""
    from personalign.experts import score_responses
    from personalign.personalize import Method, build_prompts
    from personalign.preferences import parse_preference

    experts, tok = _LIKES["experts"], _LIKES["tok"]
    inputs = build_prompts(tok, prompts, parse_preference("1A,2A"), Method.MOPE)
    tok.padding_side = "left"
    enc = tok(inputs, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    resp = tok([r or "." for r in responses], return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "left"
    lp = score_responses(experts, enc["input_ids"], enc["attention_mask"], resp["input_ids"],
                         resp["attention_mask"])  # (N, T, 2)
    m = resp["attention_mask"].float()
    return _LIKES.get("sign", 1.0) * ((lp[..., 0] - lp[..., 1]) * m).sum(1) / m.sum(1)


def _mixture(base, sides, experts_dir):
    """The experts of ``sides`` as adapters of one peft model, as MoPE runs them."""
    from personalign.adapters import load_adapter, with_adapters
    from personalign.compose import expert_folders
    from personalign.experts import Experts

    folders = expert_folders(experts_dir)
    return Experts.from_adapters(with_adapters(base, {s: load_adapter(folders[s]) for s in sides}), list(sides))


def zero(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * len(responses)


def length(prompts: list[str], responses: list[str]) -> list[float]:
    return [len(r) / 20 for r in responses]


def _cfg(tmp_path, tiny_model_dir, experts_dir, name: str = "run", **kw) -> tp.TrainPCMConfig:
    base = {"output_dir": str(tmp_path / name), "experts": str(experts_dir), "model": str(tiny_model_dir),
            "rewards": {"P3C": f"{__name__}:length"}, "steps": 3, "batch_prompts": 3, "max_new_tokens": 5,
            "hidden": 16, "proj": 8, "progress": False, "device": "cpu", "dtype": "float32", "limit": 8,
            "checkpoint_every": 2, "ref_batch_size": 4}
    return tp.TrainPCMConfig(**{**base, **kw})


def _rows(folder) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


# -- pieces ----------------------------------------------------------------------------------------


def test_training_preferences_are_combinations_or_weighted_over_two_sides_or_more():
    space = default_space()
    sides = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
    combos = space.combinations(sides)
    rng = random.Random(0)
    prefs = [tp.sample_preference(space, sides, combos, rng, 0.5, 1.0) for _ in range(400)]
    hard = [p for p in prefs if p.hard]
    assert 150 < len(hard) < 250 and {p.spec() for p in hard} == {p.spec() for p in combos}  # all 8 appear
    for p in prefs:
        w = p.normalized()
        assert len(w) >= 2 and set(w) <= set(sides) and sum(w.values()) == pytest.approx(1)
        assert all(v > 0 for v in w.values())
    weighted = [p for p in prefs if not p.hard]
    assert {len(p.sides) for p in weighted} == {2, 3}
    # One dimension only: both of its sides, weighted (concise=0.7,informative=0.3 style).
    one = [tp.sample_preference(space, ("P2A", "P2B"), [], rng, 0.0, 1.0) for _ in range(5)]
    assert all(set(p.sides) == {"P2A", "P2B"} and not p.hard for p in one)


def test_reference_cache_round_trip(tmp_path):
    cache = tp.ReferenceCache(tmp_path / "refs.jsonl")
    assert cache.missing(["a", "b", "a"]) == ["a", "b"]
    cache.add(["a", "b"], ["ra", "rb"])
    with (tmp_path / "refs.jsonl").open("a") as fh:
        fh.write('{"key": "cut')  # an interrupted write
    again = tp.ReferenceCache(tmp_path / "refs.jsonl")
    assert again.missing(["a", "b", "c"]) == ["c"] and again.get("b") == "rb"


def test_calibration_spread_is_the_rms_gap_over_scored_rows():
    nan = float("nan")
    raw = torch.tensor([[1.0, nan, nan], [3.0, 2.0, nan], [nan, -1.0, nan]])
    other = torch.tensor([[0.0, nan, nan], [0.0, 0.0, nan], [nan, 1.0, nan]])
    spread = tp.calibration_spread(raw, other)
    assert spread[0] == pytest.approx((10 / 2) ** 0.5) and spread[1] == pytest.approx((8 / 2) ** 0.5)
    assert torch.isnan(spread[2])  # never scored: unmeasured


def huge_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [100.0 * len(r) for r in responses]


def test_calibrated_scales_are_measured_once_kept_and_overridable(tmp_path, tiny_model_dir, experts_dir,
                                                                  monkeypatch):
    rewards = {"P1A": f"{__name__}:huge_length", "P2A": f"{__name__}:length", "P3C": f"{__name__}:length"}
    cfg = _cfg(tmp_path, tiny_model_dir, experts_dir, rewards=rewards, calibrate_scales=3, steps=2,
               reward_scales={"P3C": 0.25})
    tp.main(cfg)
    out = tmp_path / "run"
    saved = json.loads((out / "scales.json").read_text())
    assert saved["inputs"] == 3  # 3 instructions for the one combination (1A,2A,3C) of these sides
    measured = saved["scales"]
    # Same responses, rewards 100 x len vs len / 20: the scales keep that ratio (2000), so both sides
    # count alike in the utility.
    assert measured["P1A"] / measured["P2A"] == pytest.approx(2000, rel=1e-5)
    scales = json.loads((out / "pcm.json").read_text())["scales"]
    assert scales["P1A"] == pytest.approx(measured["P1A"]) and scales["P3C"] == 0.25  # the override wins
    # An extension reads scales.json back instead of measuring again.
    real = tp.generate_texts
    calls = []
    monkeypatch.setattr(tp, "generate_texts",
                        lambda m, t, texts, *a, **k: calls.append(len(texts)) or real(m, t, texts, *a, **k))
    tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, rewards=rewards, calibrate_scales=3, steps=3,
                 reward_scales={"P3C": 0.25}))
    assert 6 not in calls  # no calibration batch (3 inputs, twice each) was generated again
    assert json.loads((out / "pcm.json").read_text())["scales"]["P1A"] == pytest.approx(measured["P1A"])


# -- the recipe ------------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [True, False])
def test_run_logs_saves_and_the_pcm_drives_generation(tmp_path, tiny_model_dir, experts_dir, context):
    from personalign.generation import SamplingConfig
    from personalign.models import load_model
    from personalign.pcm import PCMWeights, PreferenceControlModel
    from personalign.personalize import MethodOptions, personalize, resolve
    from personalign.preferences import parse_preference

    cfg = _cfg(tmp_path, tiny_model_dir, experts_dir, weighted_fraction=0.5, context=context)
    result = tp.main(cfg)
    out = tmp_path / "run"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("train/loss", "train/utility", "train/utility_gap", "train/weight_entropy",
                "train/weight_shift", "train/win_vs_ref", "train/log_ratio", "train/response_length",
                "time/step_seconds"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert any(k.startswith("train/weight/P") for k in rows[0])
    assert rows[0]["train/weight_shift"] < 1e-5  # step 1 samples with the declared weights exactly
    assert all(0 <= r["train/utility"] <= 1 for r in rows)
    assert (out / "pcm.safetensors").is_file() and (out / "checkpoint").is_dir()  # kept: a rerun can extend it
    refs = [json.loads(x) for x in (out / "references.jsonl").read_text().splitlines()]
    assert len(refs) == len({r["key"] for r in refs}) >= 3  # one reference per input text, never twice
    doc = json.loads((out / "pcm.json").read_text())
    assert doc["sides"] == list(SIDES) and doc["metrics"] == result and result["steps"] == 3
    assert doc["architecture"]["context"] is context
    assert doc["scales"]["P1A"] == pytest.approx(4.0) and doc["scales"]["P3C"] == 1.0  # 4 x judge margin
    assert tp.main(cfg) == result and len(_rows(out)) == 3  # a finished run is not redone

    # What `generate --method mope --pcm FOLDER` does: load the PCM for the base and the preference.
    base, tok = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    pref = parse_preference("1A,3C")
    spec = resolve(pref, MethodOptions(method="mope", pcm=str(out), experts=str(experts_dir)),
                   model=str(tiny_model_dir))
    texts = personalize(base, tok, spec).generate(["Hi", "Explain photosynthesis to me."],
                                                  SamplingConfig(max_new_tokens=4, seed=1))
    assert len(texts) == 2
    # Through the generate recipe: the same PCM, its rows labelled, and --pcm refused with other mixes.
    from personalign.errors import PersonalignError
    from personalign.recipes import generate as gen_recipe

    gcfg = gen_recipe.GenerateConfig(prefs="1A,3C", method="mope", model=str(tiny_model_dir), pcm=str(out),
                                     experts=str(experts_dir), instructions=("Hi",), progress=False,
                                     sampling=SamplingConfig(max_new_tokens=4, seed=1))
    assert gen_recipe.main(gcfg)[0]["method"] == "mope-pcm-run"
    with pytest.raises(PersonalignError, match="pcm goes with mix 'prob'"):
        gen_recipe.main(gen_recipe.GenerateConfig(**{**gcfg.__dict__, "mix": "uniform"}))
    if not context:  # the ablation's weights depend on the preference alone
        from personalign.mixture import generate_mixed

        experts = _mixture(base, pref.sides, experts_dir)
        pcm = PreferenceControlModel.load(out, base_model=base, sides=pref.sides)
        provider = PCMWeights(pcm, experts, base.get_input_embeddings(), pref)
        ids = tok(["Hi"], return_tensors="pt")
        gen = generate_mixed(experts, ids["input_ids"], ids["attention_mask"], provider,
                             eos_token_ids=[len(tok) + 1], sampling=SamplingConfig(max_new_tokens=4))
        assert torch.allclose(gen.weights, gen.weights[:, :1].expand_as(gen.weights))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_toy_utility_moves_weight_toward_the_rewarded_expert(tmp_path, tiny_model_dir, experts_dir, sign):
    """P1A's reward is the likelihood ratio of expert P1A over P2A (or its negative), P2A's is constant:
    within 16 REBEL steps the PCM's weight for the combination 1A,2A leaves 0.5 toward the expert whose
    text is rewarded (both signs, so it is the reward that moves it, not a drift)."""
    from personalign.models import load_model

    base, tok = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    _LIKES["experts"] = _mixture(base, ("P1A", "P2A"), experts_dir)
    _LIKES["tok"], _LIKES["sign"] = tok, sign
    cfg = _cfg(tmp_path, tiny_model_dir, experts_dir, sides=("P1A", "P2A"), weighted_fraction=0.0,
               rewards={"P1A": f"{__name__}:likes_p1a", "P2A": f"{__name__}:zero"}, steps=16, batch_prompts=4,
               max_new_tokens=6, lr=2e-2, eta=4.0, epochs=2, checkpoint_every=100)
    tp.main(cfg)
    rows = _rows(tmp_path / "run")
    assert rows[0]["train/weight/P1A"] == pytest.approx(0.5)  # the fresh PCM is the declared mix
    favoured = [r["train/weight/P1A"] if sign > 0 else 1 - r["train/weight/P1A"] for r in rows]
    assert sum(favoured[-3:]) / 3 > 0.75, favoured
    reward = [r["train/reward/P1A"] for r in rows]
    assert sum(reward[-5:]) / 5 > sum(reward[:3]) / 3, reward  # the rewarded text became more frequent


def test_resume_after_interruption_is_exact(tmp_path, tiny_model_dir, experts_dir, monkeypatch):
    from safetensors.torch import load_file

    common = {"steps": 5, "checkpoint_every": 2, "epochs": 1, "lr": 5e-2, "weighted_fraction": 0.5}
    tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "full", **common))

    # Fail in the optimizer step of step 4: step 3 is logged but only step 2 is checkpointed, and step 4's
    # references are already in the cache.
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "resumed", **common))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = tmp_path / "resumed"
    assert (resumed / "checkpoint").exists() and [r["step"] for r in _rows(resumed)] == [1, 2, 3]
    tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "resumed", **common))

    full_rows, resumed_rows = _rows(tmp_path / "full"), _rows(resumed)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5]
    for a, b in zip(full_rows, resumed_rows):
        assert {k: v for k, v in a.items() if k.startswith("train/")} == \
               {k: v for k, v in b.items() if k.startswith("train/")}
    fa = load_file(str(tmp_path / "full" / "pcm.safetensors"))
    fb = load_file(str(resumed / "pcm.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert any(float(v.abs().sum()) > 0 for k, v in fa.items() if k.startswith("mlp.4"))  # it did train


def test_a_finished_run_extends_to_more_steps_exactly(tmp_path, tiny_model_dir, experts_dir):
    from safetensors.torch import load_file

    common = {"checkpoint_every": 10, "epochs": 1, "lr": 5e-2, "weighted_fraction": 0.5}
    tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "straight", steps=4, **common))
    tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "extended", steps=2, **common))
    ext = tmp_path / "extended"
    assert tp.trained_steps(ext) == 2 and (ext / "checkpoint").is_dir()  # kept for an extension
    assert tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "extended", steps=2, **common))  # done: no work
    tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "extended", steps=4, **common))
    assert tp.trained_steps(ext) == 4 and json.loads((ext / "pcm.json").read_text())["steps"] == 4
    assert [r["step"] for r in _rows(ext)] == [1, 2, 3, 4]
    for a, b in zip(_rows(tmp_path / "straight"), _rows(ext)):
        assert {k: v for k, v in a.items() if k.startswith("train/")} == \
               {k: v for k, v in b.items() if k.startswith("train/")}
    fa, fb = load_file(str(tmp_path / "straight" / "pcm.safetensors")), load_file(str(ext / "pcm.safetensors"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    with pytest.raises(ConfigError, match="trained for 4 steps; steps=3 would not shorten it"):
        tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "extended", steps=3, **common))
    assert json.loads((ext / "config.json").read_text())["steps"] == 4  # the refusal changed nothing
    with pytest.raises(ConfigError, match="different config \\(lr differ\\)"):  # other fields still guard
        tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, "extended", steps=5, **{**common, "lr": 1e-2}))


def test_a_rerun_against_changed_experts_is_refused_before_any_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    """experts.json holds the digests of the experts a run trains against; rerunning the finished run after one
    expert was retrained fails, naming it, before a model loads. A run started before digests were recorded
    is only warned about."""
    import io
    import sys

    from safetensors.torch import load_file, save_file

    import personalign.models

    experts = _make_experts(tiny_model_dir, tmp_path / "experts")
    cfg = _cfg(tmp_path, tiny_model_dir, experts, steps=1)
    tp.main(cfg)
    recorded = json.loads((tmp_path / "run" / "experts.json").read_text())
    assert sorted(recorded) == sorted(SIDES) and all(len(d) == 64 for d in recorded.values())
    assert tp.main(cfg)  # unchanged experts: the finished run is done
    weights = experts / "P2A" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 2 for k, v in tensors.items()}, str(weights))  # P2A retrained

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the experts were checked")

    monkeypatch.setattr(personalign.models, "load_model", no_load)
    with pytest.raises(ConfigError, match=r"trained against other experts \(P2A changed since"):
        tp.main(cfg)
    # a run folder from before digests were recorded: warned, then treated as the run it is
    (tmp_path / "run" / "experts.json").unlink()
    monkeypatch.undo()
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert tp.main(cfg)
    assert "records no digests of its experts" in err.getvalue()
    assert not (tmp_path / "run" / "experts.json").exists()  # nothing certified that it cannot know


@pytest.mark.parametrize(("change", "match"), [
    ({"sides": ("P9Z", "P1A")}, "unknown preference side 'P9Z'"),
    ({"sides": ("P1A", "P1B")}, "no expert for side.*P1B.*train-expert --side P1B"),
    ({"sides": ("P1A",)}, "at least two sides"),
    ({"rewards": {}}, "cannot score side P3C"),
    ({"rewards": {"P3C": f"{__name__}:length", "P3A": "offline"}}, "names side 'P3A'.*does not weight"),
    ({"rewards": {"P3C": "no_such_module_xyz:fn"}}, "cannot import module 'no_such_module_xyz'"),
    ({"reward_scales": {"P1A": 0.0}}, "reward_scales.P1A must be a positive number"),
    ({"calibrate_scales": -1}, "calibrate_scales must be a number of instructions per combination"),
    ({"eta": 0.0}, "eta must be a positive number"),
    ({"eta": float("nan")}, "eta must be a positive number"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"weighted_fraction": 1.5}, r"weighted_fraction must be in \[0, 1\]"),
    ({"minibatch_pairs": 9}, "minibatch_pairs must be between 1 and batch_prompts"),
    ({"temperature": 0.0}, "temperature must be in"),
    ({"ref_top_p": 0.0}, "top_p must be in"),
    ({"experts": "/no/such/experts"}, "does not exist"),
    ({"prompts": "/no/such/prompts.jsonl"}, "does not exist"),
])
def test_bad_input_fails_before_any_model_loads(tmp_path, tiny_model_dir, experts_dir, monkeypatch, change,
                                                match):
    import personalign.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(personalign.models, "load_model", no_load)
    with pytest.raises(PersonalignError, match=match):
        tp.main(_cfg(tmp_path, tiny_model_dir, experts_dir, **change))
    assert not (tmp_path / "run").exists()


def test_config_loads_from_overrides_and_is_strict():
    overrides = ["output_dir=/tmp/x", "eta=2", "sides=P1A,P2A", "context=false", "rewards.P3C=rm:runs/rm",
                 "reward_scales.P1A=0.5"]
    cfg = load_config(tp.TrainPCMConfig, None, overrides)
    assert cfg.eta == 2.0 and cfg.sides == ("P1A", "P2A") and cfg.rewards == {"P3C": "rm:runs/rm"}
    assert cfg.reward_scales == {"P1A": 0.5} and cfg.context is False
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(tp.TrainPCMConfig, None, ["output_dir=x", "learning_rate=1"])


def test_score_batch_scores_a_multihead_models_sides_in_one_pass(tiny):
    """The sides of one multi-head model come from one pass over the rows active on any of them, with
    the same values as scoring side by side; NaN where a side is inactive."""
    from personalign.reward_model import RewardModel
    from personalign.rewards import ModelReward

    base, tok = tiny
    multi = RewardModel(base, tok, ["P1A", "P2A", "P3A"], side_prompt_in_input=False)
    torch.nn.init.normal_(multi.head.weight)
    multi.eval()
    calls = []
    score = multi.score
    multi.score = lambda *a, **k: calls.append(len(a[0])) or score(*a, **k)  # count the passes
    rewards = tp.SideRewards.__new__(tp.SideRewards)
    rewards.fns = {s: ModelReward(multi, s) for s in ("P1A", "P2A", "P3A")}
    rewards.fns["P1B"] = lambda prompts, responses: torch.tensor([float(len(r)) for r in responses])
    sides = ("P1A", "P1B", "P2A", "P3A")
    assert rewards.groups(sides) == [[0, 2, 3], [1]]
    prompts = ["Why rain?", "Why rain?", "Why snow?"]
    responses = ["Water falls.", "Clouds drop water when drops grow.", "Ice."]
    refs = ["Rain is water.", "Rain is water.", "Snow is frozen."]
    pref = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.5]])
    r, r_ref = tp.score_batch(rewards, sides, prompts, responses, refs, pref)
    assert calls == [3 + 2]  # one pass: the 3 active rows and the 2 distinct references
    with torch.no_grad():
        want = score(prompts, responses)  # (3, 3) over P1A, P2A, P3A
        want_ref = score(prompts, refs)
    for i in range(3):
        for j, side in enumerate(sides):
            if pref[i, j] == 0:
                assert torch.isnan(r[i, j]) and torch.isnan(r_ref[i, j])
            elif side == "P1B":
                assert r[i, j] == len(responses[i]) and r_ref[i, j] == len(refs[i])
            else:
                k = multi.side_index(side)
                assert r[i, j] == pytest.approx(float(want[i, k]), abs=1e-5)
                assert r_ref[i, j] == pytest.approx(float(want_ref[i, k]), abs=1e-5)


def test_shipped_pcm_config_is_valid(monkeypatch, tmp_path):
    """The config that reproduces the shipped PCM names the pipeline run's reward model for every side.

    The run folders keep the reward models' configs, not their weights (runs/REMOVED.md): the folders
    are rebuilt here as `personalign pipeline` leaves them, with the recorded configs."""
    import shutil
    from importlib import resources
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    for side in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B"):
        folder = tmp_path / "runs" / "psoups-smollm2" / "rm" / side
        folder.mkdir(parents=True)
        shutil.copy2(repo / "runs" / "psoups-smollm2" / "rm" / side / "reward_config.json", folder)
        (folder / "reward_model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # its reward models are relative to the working folder
    path = resources.files("personalign") / "configs" / "pcm-smollm2.yaml"
    plan = tp.validate(load_config(tp.TrainPCMConfig, str(path)))
    assert plan.sides == ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
    assert {s: (r.kind, r.target) for s, r in plan.rewards.items()} == {
        s: ("rm", f"runs/psoups-smollm2/rm/{s}") for s in plan.sides}
    assert all(v == 1.0 for v in plan.scales.values())  # reward models' defaults, until calibrated
    assert plan.cfg.calibrate_scales > 0
