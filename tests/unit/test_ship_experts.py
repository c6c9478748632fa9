"""scripts/ship_experts.py: what a pipeline run trained lands in the package, with how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def ship(ship_script):
    return lambda *args: ship_script("ship_experts.py", *args)


def fake_expert(run: Path, side: str, *, finished: bool = True, doc_side: str | None = None,
                reward: str | None = None) -> None:
    folder = run / "experts" / side
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "config.json").write_text("{}")
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    if finished:
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        doc = {"side": doc_side or side, **({"reward": reward} if reward else {})}
        (folder / "expert.json").write_text(json.dumps(doc))


def test_ships_finished_experts_with_their_provenance(ship, tmp_path, capsys):
    run = tmp_path / "run"
    fake_expert(run, "P1A")
    fake_expert(run, "P2A", finished=False)  # half-trained: not shipped
    (run / "pipeline.json").write_text('{"stages": []}')
    assert ship(str(run)) == 0
    out = tmp_path / "repo" / "weights" / "smollm2-135m-instruct" / "src" / "personalign_smollm2" / "experts"
    assert sorted(p.name for p in out.iterdir()) == ["P1A"]
    shipped = out / "P1A"
    assert (shipped / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    doc = json.loads((shipped / "expert.json").read_text())
    assert doc["side"] == "P1A" and doc["label_judges"] == ["unknown"] and doc["made_by"]["run"] == "run"
    assert (shipped / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (shipped / "pipeline.json").is_file()
    assert "not yet trained: P1B, P2A, P2B, P3A, P3B" in capsys.readouterr().out
    assert ship(str(run), "--command", "personalign train-expert --config p1a.yaml") == 0  # made another way
    assert json.loads((shipped / "expert.json").read_text())["made_by"] == {
        "run": "run", "command": "personalign train-expert --config p1a.yaml"}


def test_reshipping_replaces_the_old_copy(ship, tmp_path):
    run = tmp_path / "run"
    fake_expert(run, "P1A")
    assert ship(str(run)) == 0
    (run / "experts" / "P1A" / "adapter" / "adapter_model.safetensors").write_bytes(b"new")
    assert ship(str(run)) == 0
    out = tmp_path / "repo" / "weights" / "smollm2-135m-instruct" / "src" / "personalign_smollm2" / "experts"
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


def test_label_source_and_run_paths(ship, tmp_path):
    run = tmp_path / "run"
    fake_expert(run, "P2A", reward="offline")
    (run / "pipeline.json").write_text(json.dumps({"run_dir": "runs/psoups", "rm": {"pairs": "runs/psoups/p.jsonl"}}))
    assert ship(str(run)) == 0
    out = tmp_path / "repo" / "weights" / "smollm2-135m-instruct" / "src" / "personalign_smollm2" / "experts" / "P2A"
    assert json.loads((out / "expert.json").read_text())["label_judges"] == ["offline"]
    assert json.loads((out / "pipeline.json").read_text()) == {"run_dir": "psoups", "rm": {"pairs": "psoups/p.jsonl"}}


def test_refuses_without_a_weights_distribution(ship, tmp_path, capsys):
    import shutil

    shutil.rmtree(tmp_path / "repo" / "weights")
    fake_expert(tmp_path / "run", "P1A")
    assert ship(str(tmp_path / "run")) == 1
    assert "holds no package; create the weights distribution first" in capsys.readouterr().err
