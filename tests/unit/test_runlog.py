from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from personalign.errors import ConfigError
from personalign.runlog import MetricsLogger, prepare_run_dir, summarize_steps


@dataclass(frozen=True)
class _Cfg:
    lr: float = 1e-4
    pooling: str = "last"
    sides: tuple[str, ...] = field(default_factory=lambda: ("P1A",))
    progress: bool = True


def test_prepare_run_dir_refuses_another_run(tmp_path):
    prepare_run_dir(tmp_path, _Cfg())
    prepare_run_dir(tmp_path, _Cfg(progress=False))  # resumable fields may change
    with pytest.raises(ConfigError, match="different config \\(lr differ\\)"):
        prepare_run_dir(tmp_path, _Cfg(lr=1e-3))
    prepare_run_dir(tmp_path, _Cfg(lr=1e-3), resumable=frozenset({"lr"}))  # a recipe frees a field


def test_prepare_run_dir_accepts_a_run_saved_before_a_field_existed(tmp_path):
    """A config written before ``pooling`` and ``sides`` existed ran with their defaults."""
    (tmp_path / "config.json").write_text(json.dumps({"lr": 1e-4, "progress": True}))
    prepare_run_dir(tmp_path, _Cfg())
    assert json.loads((tmp_path / "config.json").read_text())["pooling"] == "last"
    (tmp_path / "config.json").write_text(json.dumps({"lr": 1e-4, "progress": True}))
    with pytest.raises(ConfigError, match="pooling differ"):  # a non-default new value is another run
        prepare_run_dir(tmp_path, _Cfg(pooling="mean"))


def test_metrics_logger_appends_and_reads(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log(1, {"train/loss": 0.5})
    log.log(2, {"train/loss": 0.25})
    assert [r["train/loss"] for r in log.read()] == [0.5, 0.25]


def test_metrics_logger_truncate_drops_the_steps_after_a_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (0, 1, 2, 3):
        log.log(step, {"train/loss": float(step)})
    log.truncate(1)
    assert [r["step"] for r in log.read()] == [0, 1]
    log.truncate(5)  # nothing after it: unchanged
    assert [r["step"] for r in log.read()] == [0, 1]
    assert not list(tmp_path.glob("*.tmp"))


def test_summarize_steps_windows_and_time():
    rows = [{"step": 0, "eval/accuracy": 0.5}]  # not a step line: no marker
    rows += [{"step": i, "train/r": float(i), "train/kl": 10.0 * i, "time/step_seconds": 2.0} for i in range(1, 9)]
    out = summarize_steps(rows, "train/r", first=["train/r"], last=["train/r", "train/kl"])
    # 8 steps: windows of 8 // 4 = 2 steps
    assert out == {"steps": 8, "train/r_first": 1.5, "train/r_last": 7.5, "train/kl_last": 75.0,
                   "time/train_seconds": 16.0}
    one = summarize_steps(rows[:2], "train/r", first=["train/r"], last=["train/missing"])
    assert one["train/r_first"] == 1.0 and one["steps"] == 1
    assert one["train/missing_last"] != one["train/missing_last"]  # nan: no such metric
    assert summarize_steps(rows[:1], "train/r") == {}
