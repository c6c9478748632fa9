"""The pipeline's units on a local Ray instance (2 CPUs, tiny models): the same outputs as one process,
a failing unit reported while the others finish, a rerun that does only what is missing."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personalign.config import from_dict, to_dict
from personalign.errors import ConfigError
from personalign.executors import (
    ExecutorConfig,
    LocalExecutor,
    RayExecutor,
    Resources,
    Unit,
    UnitsFailed,
    read_log,
)
from personalign.recipes import pipeline, rollout

ray = pytest.importorskip("ray", reason="the 'ray' extra (make test installs it)")

SHORT = ["Rain is water.", "It is wet.", "Clouds drop water.", "Water falls."]
LONG = [
    "Rain forms when water vapour condenses into droplets around dust; heavy droplets fall, feeding rivers.",
    "Warm air rises, cools, and its moisture condenses; the droplets merge until gravity wins and they fall.",
    "Evaporation lifts water from oceans; condensation builds clouds; precipitation returns it to the ground.",
    "Droplets collide and coalesce inside clouds; once updrafts cannot hold them, they fall, cooling the air.",
]


@pytest.fixture(scope="module")
def local_ray():
    """One local instance for the module (starting one takes about 9 s): two CPUs, two workers."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(root: Path, model: Path, executor: dict | None = None, **extra):
    prompts = root / "prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": f"Why does it rain, case {i}?"}) + "\n" for i in range(8)))
    gen = {"limit": 2, "batch_size": 2, "device": "cpu", "dtype": "float32", "progress": False,
           "prompts": str(prompts), "sampling": {"max_new_tokens": 4}}
    data = {
        "run_dir": str(root / "run"), "model": str(model), "sides": ["P2A", "P2B"], "multihead": False,
        "rollout": {"prompts": str(prompts), "batch_size": 4, "device": "cpu", "progress": False},
        "reward": {"epochs": 1, "batch_size": 4, "lr": 5e-3, "device": "cpu", "progress": False,
                   "autocast_bf16": False, "eval_fraction": 0.25},
        "expert": {"steps": 2, "batch_prompts": 2, "group_size": 2, "max_new_tokens": 4, "device": "cpu",
                   "progress": False, "prompts": str(prompts)},
        "eval": {**gen, "single_sides": True, "combinations": ["P2A", "P2B"], "methods": ["expert-1"],
                 "ontopic": False, "bootstrap_resamples": 50},
        "pareto": {**gen, "weights": [0.0, 1.0]},
        "stages": ["label", "reward", "expert", "eval", "pareto"],
        "executor": executor or {},
        **extra,
    }
    cfg = from_dict(pipeline.PipelineConfig, data)
    _fake_rollouts(cfg)
    return cfg


def _fake_rollouts(cfg) -> None:
    """A complete rollouts file (what stage 1 writes), so no test time goes to sampling it."""
    roll, _, _ = pipeline.build_stage_configs(cfg)
    rows = [{**r, "response": (SHORT if r["sample"] == 0 else LONG)[i % 4], "model": roll.model}
            for i, r in enumerate(rollout.plan(roll))]
    Path(roll.output).parent.mkdir(parents=True, exist_ok=True)
    Path(roll.output).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _outputs(run: Path) -> dict[str, object]:
    """Every tensor and generated text the fan-out stages wrote, by path in the run folder."""
    out: dict[str, object] = {}
    for f in sorted(run.glob("rm/*/reward_model.safetensors")) + sorted(run.glob("experts/*/adapter/*.safetensors")):
        out[f.relative_to(run).as_posix()] = load_file(str(f))
    for f in sorted(run.glob("*/generations/**/*.jsonl")):
        out[f.relative_to(run).as_posix()] = [json.loads(x)["response"] for x in f.read_text().splitlines()]
    return out


def _ran(run: Path, since: int = 0) -> dict[str, set[str]]:
    events = read_log(run / "executor.jsonl")[since:]
    by: dict[str, set[str]] = {}
    for e in events:
        by.setdefault(e["event"], set()).add(e["unit"])
    return by


@pytest.fixture
def one_thread():
    """Torch in this process on one thread, as in each one-CPU Ray task: the same float arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fan_out_equals_one_process(tmp_path, tiny_model_dir, local_ray, one_thread):
    one = _cfg(tmp_path / "local", tiny_model_dir)
    fan = _cfg(tmp_path / "ray", tiny_model_dir, executor={"kind": "ray"})
    local_summary = pipeline.main(one)
    ray_summary = pipeline.main(fan)

    a, b = _outputs(Path(one.run_dir)), _outputs(Path(fan.run_dir))
    assert len([k for k in a if k.startswith("rm/")]) == 2 and len([k for k in a if k.startswith("experts/")]) == 2
    assert len([k for k in a if k.startswith("eval/")]) == 4 and len([k for k in a if k.startswith("pareto/")]) == 2
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert value.keys() == b[key].keys(), key
            for name, t in value.items():
                assert torch.equal(t, b[key][name]), f"{key}:{name}"
        else:
            assert value == b[key], key
    timeless = lambda m: {k: v for k, v in m.items() if "second" not in k and "time" not in k}
    for side in ("P2A", "P2B"):
        assert timeless(ray_summary["stages"]["reward"][side]) == timeless(local_summary["stages"]["reward"][side])
    assert ray_summary["stages"]["eval"]["win_rate"] == local_summary["stages"]["eval"]["win_rate"]
    assert ray_summary["stages"]["pareto"]["hypervolume"] == local_summary["stages"]["pareto"]["hypervolume"]

    # Every unit of the Ray run went to Ray, the local run's stayed in the driver.
    ran = [e for e in read_log(Path(fan.run_dir) / "executor.jsonl") if e["event"] == "started"]
    assert {e["unit"] for e in ran} == {"reward/P2A", "reward/P2B", "expert/P2A", "expert/P2B",
                                        "generate/eval/prompt/P2A", "generate/eval/prompt/P2B",
                                        "generate/eval/expert/P2A", "generate/eval/expert/P2B",
                                        "generate/pareto/soup-psoups/w0", "generate/pareto/soup-psoups/w1"}
    assert all(e["where"] == "ray" and e["num_cpus"] == 1 for e in ran)
    assert {e["where"] for e in read_log(Path(one.run_dir) / "executor.jsonl") if e["event"] == "started"} == {"driver"}
    # An expert starts only once its own reward model has finished.
    log = read_log(Path(fan.run_dir) / "executor.jsonl")
    when = {(e["unit"], e["event"]): i for i, e in enumerate(log)}
    for side in ("P2A", "P2B"):
        assert when[(f"reward/{side}", "finished")] < when[(f"expert/{side}", "started")]

    # A generation file made with other weights (as after retraining an expert in place) is moved aside
    # and made again by one Ray task, once: the ledger then records today's weights.
    ledger = Path(fan.run_dir) / "eval" / "generations" / "sources.json"
    table = json.loads(ledger.read_text())
    assert set(table["generations/expert/P2A.jsonl"]) == {"expert/P2A"}
    table["generations/expert/P2A.jsonl"] = {"expert/P2A": "0" * 64}
    ledger.write_text(json.dumps(table))
    before = len(read_log(Path(fan.run_dir) / "executor.jsonl"))
    pipeline.main(fan)
    rerun = _ran(Path(fan.run_dir), before)
    assert rerun["started"] == {"generate/eval/expert/P2A"}
    folder = Path(fan.run_dir) / "eval" / "generations" / "expert"
    assert sorted(p.name for p in folder.iterdir()) == ["P2A.jsonl", "P2A.stale-1.jsonl", "P2B.jsonl"]
    assert _outputs(Path(fan.run_dir))["eval/generations/expert/P2A.jsonl"] == b["eval/generations/expert/P2A.jsonl"]
    assert json.loads(ledger.read_text())["generations/expert/P2A.jsonl"] != {"expert/P2A": "0" * 64}


def test_failing_unit_is_reported_others_finish_and_rerun_does_only_the_rest(tmp_path, tiny_model_dir,
                                                                             local_ray, capsys):
    cfg = _cfg(tmp_path, tiny_model_dir, executor={"kind": "ray"}, stages=["label", "reward", "expert"])
    run = Path(cfg.run_dir)
    blocker = run / "rm" / "P2B"  # a file where P2B's reward model must write its folder
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")

    with pytest.raises(UnitsFailed) as caught:
        pipeline.main(cfg)
    assert set(caught.value.failures) == {"reward/P2B", "expert/P2B"}
    assert caught.value.failures["reward/P2B"].error.startswith("FileExistsError")
    assert caught.value.failures["expert/P2B"].error == "not run: reward/P2B failed"
    assert "2 unit(s) failed: reward/P2B (FileExistsError" in str(caught.value)
    err = capsys.readouterr().err
    assert "unit reward/P2B failed: FileExistsError" in err
    assert "Traceback (most recent call last)" in err and "prepare_run_dir" in err  # the worker's traceback
    # The other side finished: its reward model and expert are there, and the summary says what failed.
    assert (run / "rm" / "P2A" / "reward_model.safetensors").is_file()
    assert (run / "experts" / "P2A" / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"]["reward"]) == {"P2A"} and set(summary["failed"]) == {"reward/P2B", "expert/P2B"}
    first = _ran(run)
    assert first["finished"] == {"reward/P2A", "expert/P2A"} and first["not_run"] == {"expert/P2B"}

    # Fixed, the same command does only what is missing; the finished side is checked in the driver.
    blocker.unlink()
    before = len(read_log(run / "executor.jsonl"))
    expert_a = (run / "experts" / "P2A" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = pipeline.main(cfg)
    rerun = _ran(run, before)
    assert rerun["started"] == {"reward/P2B", "expert/P2B"} and rerun["finished"] == {"reward/P2B", "expert/P2B"}
    assert rerun["reused"] == {"reward/P2A", "expert/P2A"} and "failed" not in rerun
    assert set(again["stages"]["expert"]) == {"P2A", "P2B"} and "failed" not in again
    assert (run / "experts" / "P2A" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == expert_a

    # A third run finds everything done: nothing goes to Ray.
    before = len(read_log(run / "executor.jsonl"))
    pipeline.main(cfg)
    assert _ran(run, before) == {"reused": {"reward/P2A", "reward/P2B", "expert/P2A", "expert/P2B"}}


def test_executors_run_units_and_report_failures(tmp_path, local_ray, capsys):
    # Functions a worker can import (a Ray task pickles its function by reference): str succeeds, int("x") fails.
    units = [Unit("a", str, 1, "generate"), Unit("b", int, "x", "generate"),
             Unit("c", str, 3, "generate", after=("b",)), Unit("d", str, 4, "generate", after=("a",))]
    report = RayExecutor(log=tmp_path / "log.jsonl").run(units)
    assert report.results == {"a": "1", "d": "4"} and report.ran == ["a", "d"]
    assert report.failures["b"].error == "ValueError: invalid literal for int() with base 10: 'x'"
    assert "Traceback (most recent call last)" in report.failures["b"].traceback
    assert report.failures["c"].error == "not run: b failed"
    assert "unit b failed: ValueError: invalid literal" in capsys.readouterr().err
    with pytest.raises(UnitsFailed, match=r"2 unit\(s\) failed: b \(ValueError: invalid literal.*c \(not run: b failed\)"):
        report.raise_failures()
    # In one process, as before executors: in order, and the first error stops the run.
    with pytest.raises(ValueError, match="invalid literal"):
        LocalExecutor().run(units)
    with pytest.raises(ConfigError, match="runs after d, which is listed after it"):
        LocalExecutor().run([Unit("c", str, 0, "generate", after=("d",)), Unit("d", str, 0, "generate")])


def test_executor_settings_are_checked(tmp_path, tiny_model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="executor 'dask' is not one of local, ray"):
        from_dict(ExecutorConfig, {"kind": "dask"})
    with pytest.raises(ConfigError, match="cpus must be a number >= 0"):
        from_dict(ExecutorConfig, {"kind": "ray", "resources": {"expert": {"cpus": -1}}})
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(ExecutorConfig, {"kind": "ray", "resources": {"experts": {"cpus": 1}}})
    with pytest.raises(ConfigError, match="add --executor ray"):
        from_dict(ExecutorConfig, {"address": "auto"})
    assert Resources(cpus=2, gpus=1, memory_gb=16).ray_options() == {"num_cpus": 2, "num_gpus": 1,
                                                                       "memory": 16 * 2**30}
    # Without the extra: one line naming it.
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"needs the 'ray' extra \(ray is not installed\): pip install 'personalign\[ray\]'"):
        RayExecutor()


def test_cli_pipeline_takes_executor_flags(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from personalign.cli import app

    cfg = _cfg(tmp_path, tiny_model_dir, stages=["label"])
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(to_dict(cfg)))  # JSON is YAML
    result = CliRunner().invoke(app, ["pipeline", "--config", str(path), "--address", "auto"])
    assert result.exit_code == 2 and "address and num_cpus are Ray settings; add --executor ray" in result.output
    result = CliRunner().invoke(app, ["pipeline", "--config", str(path), "--executor", "spark"])
    assert result.exit_code == 2 and "executor 'spark' is not one of local, ray" in result.output
    shutil.rmtree(cfg.run_dir, ignore_errors=True)

