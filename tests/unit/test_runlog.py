from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from personalign.errors import ConfigError
from personalign.runlog import MetricsLogger, prepare_run_dir


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
