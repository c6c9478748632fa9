"""scripts/ship_experts.py: what a pipeline run trained lands in the package, with how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def ship(ship_script):
    return lambda *args: ship_script("ship_experts.py", *args)


def fake_expert(run: Path, side: str, *, finished: bool = True, doc_side: str | None = None) -> None:
    folder = run / "experts" / side
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    if finished:
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        (folder / "expert.json").write_text(json.dumps({"side": doc_side or side}))


def test_ships_finished_experts_with_their_provenance(ship, tmp_path, capsys):
    run = tmp_path / "run"
    fake_expert(run, "P1A")
    fake_expert(run, "P2A", finished=False)  # half-trained: not shipped
    (run / "pipeline.json").write_text('{"stages": []}')
    assert ship(str(run)) == 0
    out = tmp_path / "repo" / "src" / "personalign" / "data" / "experts" / "smollm2-135m-instruct"
    assert sorted(p.name for p in out.iterdir()) == ["P1A"]
    shipped = out / "P1A"
    assert (shipped / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads((shipped / "expert.json").read_text()) == {"side": "P1A"}
    assert (shipped / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (shipped / "pipeline.json").is_file()
    assert "not yet trained: P1B, P2A, P2B, P3A, P3B" in capsys.readouterr().out


def test_reshipping_replaces_the_old_copy(ship, tmp_path):
    run = tmp_path / "run"
    fake_expert(run, "P1A")
    assert ship(str(run)) == 0
    (run / "experts" / "P1A" / "adapter" / "adapter_model.safetensors").write_bytes(b"new")
    assert ship(str(run)) == 0
    out = tmp_path / "repo" / "src" / "personalign" / "data" / "experts" / "smollm2-135m-instruct"
    assert (out / "P1A" / "adapter" / "adapter_model.safetensors").read_bytes() == b"new"
    assert not list(out.glob(".*.tmp"))


def test_refuses_a_missing_run_or_a_mislabelled_expert(ship, tmp_path, capsys):
    assert ship(str(tmp_path / "nowhere")) == 1
    assert "run personalign pipeline first" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "experts").mkdir(parents=True)
    assert ship(str(run)) == 1
    assert "no finished expert" in capsys.readouterr().err
    fake_expert(run, "P1A", doc_side="P1B")
    assert ship(str(run)) == 1
    assert "is for side 'P1B', not P1A" in capsys.readouterr().err
