from __future__ import annotations

import json
from dataclasses import replace

import pytest

from personalign.config import from_dict
from personalign.errors import ConfigError, PreferenceError
from personalign.recipes import pipeline, rollout

SHORT = ["Rain is water.", "It is wet.", "Clouds drop water.", "Water falls."]
LONG = [
    "Rain forms when water vapour condenses into droplets around dust; heavy droplets fall, feeding rivers and lakes.",
    "Warm air rises, cools, and its moisture condenses; the droplets merge until gravity wins and they fall as rain.",
    "Evaporation lifts water from oceans; condensation builds clouds; precipitation returns it, completing the cycle.",
    "Droplets collide and coalesce inside clouds; once updrafts cannot hold them, they fall, often cooling the air.",
]


def _cfg(tmp_path, tiny_model_dir, **extra):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Why does it rain, case {i}?"}) + "\n" for i in range(8)))
    data = {
        "run_dir": str(tmp_path / "run"), "model": str(tiny_model_dir), "sides": ["P2A", "P2B"],
        "rollout": {"prompts": str(prompts), "batch_size": 4, "device": "cpu", "progress": False},
        "reward": {"epochs": 1, "batch_size": 4, "lr": 5e-3, "device": "cpu", "progress": False,
                   "autocast_bf16": False, "eval_fraction": 0.25},
        "expert": {"steps": 2, "batch_prompts": 2, "group_size": 2, "max_new_tokens": 4, "device": "cpu",
                   "progress": False, "prompts": str(prompts)},
        **extra,
    }
    return from_dict(pipeline.PipelineConfig, data)


def _fake_rollouts(cfg):
    """Write a complete rollouts file (what stage 1 would produce), so the test needs no sampling."""
    roll, _, _ = pipeline.build_stage_configs(cfg)
    rows = []
    for i, r in enumerate(rollout.plan(roll)):
        text = (SHORT if r["sample"] == 0 else LONG)[i % 4]
        rows.append({**r, "response": text, "model": roll.model})  # the model that rollout.main would record
    out = roll.output
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pipeline_runs_stages_and_skips_done_ones(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model_dir)
    _fake_rollouts(cfg)
    summary = pipeline.main(cfg)
    assert summary["stages"]["label"]["sides"]["P2A"]["kept"] == 8
    assert set(summary["stages"]["reward"]) == {"P2A", "P2B", "multihead"}
    for name in ("P2A", "P2B", "multihead"):
        assert (tmp_path / "run" / "rm" / name / "reward_model.safetensors").exists()
    for side in ("P2A", "P2B"):  # stage 4: an expert per side, trained against that side's reward model
        doc = json.loads((tmp_path / "run" / "experts" / side / "expert.json").read_text())
        assert doc["reward"].endswith(f"rm/{side}") and doc["metrics"]["steps"] == 2
    assert set(summary["stages"]["expert"]) == {"P2A", "P2B"}

    # A second run trains nothing and labels nothing: every stage is complete.
    from personalign.recipes import label, train_rm

    monkeypatch.setattr(label, "main", lambda *a, **k: pytest.fail("label ran again"))
    real = train_rm.main

    def no_training(c):
        assert (tmp_path / "run" / "rm").exists()
        return real(c)

    monkeypatch.setattr(train_rm, "main", no_training)
    real_step = train_rm.torch.optim.AdamW.step
    monkeypatch.setattr(train_rm.torch.optim.AdamW, "step", lambda *a, **k: pytest.fail("trained again"))
    from personalign.recipes import train_expert

    real_rollout = train_expert.rollout
    monkeypatch.setattr(train_expert, "rollout", lambda *a, **k: pytest.fail("expert trained again"))
    again = pipeline.main(cfg)
    assert again["stages"]["reward"]["P2A"]["eval/accuracy"] == summary["stages"]["reward"]["P2A"]["eval/accuracy"]

    # The baseline stages train from the same run folder: multitask on its pairs, P-MORL against its
    # reward models.
    monkeypatch.setattr(train_expert, "rollout", real_rollout)
    monkeypatch.setattr(train_rm.torch.optim.AdamW, "step", real_step)
    base = replace(cfg, stages=("multitask", "pmorl"),
                   multitask={"max_steps": 2, "batch_size": 4, "device": "cpu", "progress": False},
                   pmorl={k: v for k, v in cfg.expert.items()})
    baselines = pipeline.main(base)
    for name in ("multitask", "pmorl"):
        doc = json.loads((tmp_path / "run" / "baselines" / name / "expert.json").read_text())
        assert doc["kind"] == name and (tmp_path / "run" / "baselines" / name / "adapter").is_dir()
    assert baselines["stages"]["pmorl"]["steps"] == 2
    pm_cfg = json.loads((tmp_path / "run" / "baselines" / "pmorl" / "config.json").read_text())
    assert pm_cfg["rewards"] == {s: str(tmp_path / "run" / "rm" / s).join(("rm:", "")) for s in ("P2A", "P2B")}

    # Other labelling settings (here a wider tie margin) relabel: the old pairs no longer apply.
    class Relabelled(Exception):
        pass

    def relabel(c):
        assert c.judges[0].margins == {"P2A": 0.5}
        raise Relabelled

    monkeypatch.setattr(label, "main", relabel)
    wider = replace(cfg, label={"judges": [{"kind": "offline", "margins": {"P2A": 0.5}}]})
    with pytest.raises(Relabelled):
        pipeline.main(wider)


def test_pipeline_validates_every_stage_first(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="reward: unknown field"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, reward={"learning_rate": 1}))
    with pytest.raises(ConfigError, match="set by the pipeline itself"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, label={"output": "x"}))
    with pytest.raises(ConfigError, match="steps"):  # an expert setting is checked before any stage runs
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, expert={"steps": 0}))
    with pytest.raises(ConfigError, match="set by the pipeline itself"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, expert={"side": "P1A"}))
    with pytest.raises(ConfigError, match="unknown stage"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, stages=["rollout", "ppo"]))
    with pytest.raises(ConfigError, match="multitask: unknown field"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, stages=["multitask"], multitask={"lrate": 1}))
    with pytest.raises(ConfigError, match="multitask: .*set by the pipeline itself"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, stages=["multitask"], multitask={"pairs": "p"}))
    with pytest.raises(ConfigError, match="steps"):  # reward models still pending: the rest is checked
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, stages=["pmorl"], pmorl={"steps": 0}))
    for section in ("expert", "pmorl", "multitask"):  # a section's fields, even when its stage does not run
        with pytest.raises(ConfigError, match=f"{section}: unknown field"):
            pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, stages=["label"], **{section: {"bogus": 1}}))
    for section, key in (("eval", "methods"), ("pareto", "methods"), ("eval", "reference")):  # before training
        value = ["soup-bogus"] if key == "methods" else "soup-bogus"
        with pytest.raises(ConfigError, match=f"{section}: unknown method 'soup-bogus'"):
            pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, stages=["multitask", section],
                                              **{section: {key: value}}))
    assert not (tmp_path / "run").exists()


def test_shipped_pipeline_config_is_valid(tmp_path, monkeypatch):
    from importlib import resources

    # Its run_dir is relative: away from the checkout's runs/, whose reward-model folders keep their
    # records but not their weights, the reward models are still to be trained.
    monkeypatch.chdir(tmp_path)

    from personalign.config import load_config

    path = resources.files("personalign") / "configs" / "psoups-smollm2.yaml"
    cfg = load_config(pipeline.PipelineConfig, str(path))
    roll, lab, rms = pipeline.build_stage_configs(cfg)
    assert roll.samples == 3 and lab.pairing == "all" and set(rms) == {"P1A", "P1B", "P2A", "P2B", "P3A", "P3B", "multihead"}
    experts = pipeline.build_expert_configs(cfg)
    assert experts["P2A"].reward == "rm:runs/psoups-smollm2/rm/P2A"
    mt, pm = pipeline.build_baseline_configs(cfg)
    assert mt.pairs == "runs/psoups-smollm2/pairs.jsonl" and mt.lora == experts["P2A"].lora.__class__(
        **{**vars(experts["P2A"].lora), "dropout": 0.05})
    assert pm.rewards["P3B"] == "rm:runs/psoups-smollm2/rm/P3B" and pm.output_dir.endswith("baselines/pmorl")


def test_shipped_pipeline_config_trains_the_shipped_experts_as_they_were_trained(tmp_path, monkeypatch):
    """Each shipped expert's recorded training settings are what the shipped config gives its side (P1A and
    P2A with the on-topic reward included), so `make experts` remakes what ships."""
    import dataclasses
    import json
    from importlib import resources

    from personalign.compose import shipped_experts_dir
    from personalign.config import load_config

    shipped = shipped_experts_dir("smollm2-135m-instruct")
    if shipped is None:
        pytest.skip("the weights distribution is not installed")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(pipeline.PipelineConfig, str(resources.files("personalign") / "configs" / "psoups-smollm2.yaml"))
    built = pipeline.build_expert_configs(cfg)
    keys = ("algorithm", "lora", "lr", "steps", "batch_prompts", "group_size", "kl_coef", "kl_stop", "ontopic_coef",
            "repeat_coef", "max_new_tokens", "temperature", "top_p", "seed", "prompts", "limit")
    # settings added after some experts were trained, at their defaults
    later = {"ontopic_coef": 0.0, "repeat_coef": 0.0, "kl_stop": None}
    for side, config in built.items():
        recorded = json.loads((shipped / side / "expert.json").read_text())["config"]
        mine = json.loads(json.dumps(dataclasses.asdict(config)))
        assert {k: recorded.get(k, later.get(k)) for k in keys} == {k: mine[k] for k in keys}, side
    assert built["P1A"].ontopic_coef == built["P2A"].ontopic_coef == 2.0 and built["P1B"].ontopic_coef == 0.0


def test_reward_sides_override_one_sides_recipe(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, reward_sides={"informative": {"pooling": "mean", "lora": {"r": 4}}},
               reward={"epochs": 1, "lr": 5e-3, "lora": {"r": 8, "dropout": 0.0}, "device": "cpu"})
    _, _, rms = pipeline.build_stage_configs(cfg)
    assert rms["P2B"].pooling == "mean" and rms["P2B"].lora.r == 4 and rms["P2B"].lora.dropout == 0.0
    assert rms["P2B"].lr == 5e-3  # everything else from `reward`
    assert rms["P2A"].pooling == "last" and rms["P2A"].lora.r == 8
    assert rms["multihead"].pooling == "last" and rms["multihead"].sides == ("P2A", "P2B")
    _, _, rms = pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, reward_sides={"multihead": {"pooling": "mean"}}))
    assert rms["multihead"].pooling == "mean" and rms["P2B"].pooling == "last"
    with pytest.raises(ConfigError, match="reward_sides names 'P1A', which is not one of"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, reward_sides={"P1A": {"pooling": "mean"}}))
    with pytest.raises(ConfigError, match="reward_sides.P2B: pooling must be one of"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, reward_sides={"P2B": {"pooling": "max"}}))
    with pytest.raises(ConfigError, match="set by the pipeline itself"):
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, reward_sides={"P2B": {"sides": ["P2A"]}}))
    assert not (tmp_path / "run").exists()


def test_expert_sides_override_one_sides_expert(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, expert_sides={"informative": {"steps": 5, "lora": {"r": 2}}})
    experts = pipeline.build_expert_configs(cfg)
    assert experts["P2B"].steps == 5 and experts["P2B"].lora.r == 2 and experts["P2B"].max_new_tokens == 4
    assert experts["P2A"].steps == 2 and experts["P2A"].lora.r == cfg.expert.get("lora", {}).get("r", 16)
    with pytest.raises(ConfigError, match="expert_sides names 'P1A', which is not one of this pipeline's sides"):
        pipeline.build_expert_configs(_cfg(tmp_path, tiny_model_dir, expert_sides={"P1A": {"steps": 5}}))
    with pytest.raises(ConfigError, match="expert_sides.P2B: output_dir set by the pipeline itself"):
        pipeline.build_expert_configs(_cfg(tmp_path, tiny_model_dir, expert_sides={"P2B": {"output_dir": "x"}}))
    with pytest.raises(ConfigError, match="expert_sides.P2B.*steps"):  # checked before any stage runs
        pipeline.build_stage_configs(_cfg(tmp_path, tiny_model_dir, expert_sides={"P2B": {"steps": 0}}))
    with pytest.raises(PreferenceError, match="unknown preference side 'multihead'"):
        pipeline.build_expert_configs(_cfg(tmp_path, tiny_model_dir, expert_sides={"multihead": {"steps": 5}}))
