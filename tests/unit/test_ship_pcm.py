"""scripts/ship_pcm.py: a finished train-pcm run lands in the weights distribution, with how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def ship(ship_script):
    return lambda *args: ship_script("ship_pcm.py", *args)


def fake_run(folder: Path, *, base: str = MODEL, finished: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"steps": 3}')
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "references.jsonl").write_text("{}\n")  # training material: not shipped
    (folder / "checkpoint").mkdir()
    if finished:
        (folder / "pcm.safetensors").write_bytes(b"weights")
        (folder / "pcm.json").write_text(json.dumps({"kind": "pcm", "sides": ["P1A", "P1B"], "steps": 3,
                                                     "base": {"name": base}}))
    return folder


def test_ships_a_finished_pcm_with_its_provenance(ship, tmp_path, capsys):
    assert ship(str(fake_run(tmp_path / "run"))) == 0
    out = tmp_path / "repo" / "weights" / MODEL / "src" / "personalign_smollm2" / "pcm"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "pcm.json", "pcm.safetensors"]
    assert (out / "pcm.safetensors").read_bytes() == b"weights"
    doc = json.loads((out / "pcm.json").read_text())
    assert doc["label_judges"] == ["unknown"]  # the fake run names no reward: read, never guessed
    assert doc["made_by"]["run"] == "run" and doc["experts"].startswith("../experts")
    assert "sides P1A, P1B, 3 steps" in capsys.readouterr().out
    assert doc["made_by"]["command"] == "personalign train-pcm, then scripts/ship_pcm.py"
    # Reshipping replaces the old copy, and says what made it when told.
    (tmp_path / "run" / "pcm.safetensors").write_bytes(b"new")
    assert ship(str(tmp_path / "run"), "--made-by", "make pcm") == 0
    assert (out / "pcm.safetensors").read_bytes() == b"new"
    assert json.loads((out / "pcm.json").read_text())["made_by"]["command"] == "make pcm"


def test_refuses_unfinished_runs_and_other_base_models(ship, tmp_path, capsys):
    assert ship(str(fake_run(tmp_path / "half", finished=False))) == 1
    assert "holds no finished PCM" in capsys.readouterr().err
    assert ship(str(fake_run(tmp_path / "other", base="llama-7b"))) == 1
    assert "trained on base model 'llama-7b', not smollm2-135m-instruct" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "weights" / MODEL / "src" / "personalign_smollm2" / "pcm").exists()


def test_paths_into_runs_become_relative(ship, tmp_path):
    run = fake_run(tmp_path / "run")
    doc = json.loads((run / "pcm.json").read_text())
    doc["rewards"] = {"P1A": "rm:runs/psoups/rm/P1A", "P1B": "offline"}
    (run / "pcm.json").write_text(json.dumps(doc))
    (run / "config.json").write_text('{"output_dir": "runs/pcm-x", "experts": "./runs/psoups/experts"}')
    assert ship(str(run)) == 0
    out = tmp_path / "repo" / "weights" / MODEL / "src" / "personalign_smollm2" / "pcm"
    shipped = json.loads((out / "pcm.json").read_text())
    assert shipped["rewards"] == {"P1A": "rm:psoups/rm/P1A", "P1B": "offline"}
    assert json.loads((out / "config.json").read_text()) == {"output_dir": "pcm-x", "experts": "psoups/experts"}
    assert "runs/" not in (out / "pcm.json").read_text() + (out / "config.json").read_text()


def test_records_which_run_made_each_expert_it_weights_and_the_card_says_when_one_is_replaced(ship, ship_script,
                                                                                             tmp_path):
    package = tmp_path / "repo" / "weights" / MODEL / "src" / "personalign_smollm2"
    for side in ("P1A", "P1B"):
        (package / "experts" / side).mkdir(parents=True)
        (package / "experts" / side / "expert.json").write_text(json.dumps({"side": side, "made_by": {"run": "first"}}))
    assert ship(str(fake_run(tmp_path / "run"))) == 0
    doc = json.loads((package / "pcm" / "pcm.json").read_text())
    assert doc["experts_runs"] == {"P1A": "first", "P1B": "first"}

    cards = _cards()
    assert cards.replaced_note(package / "pcm", doc) == []
    (package / "experts" / "P1B" / "expert.json").write_text(json.dumps({"side": "P1B", "made_by": {"run": "second"}}))
    note = " ".join(cards.replaced_note(package / "pcm", doc))
    assert "Trained with earlier versions of P1B** (run `first`)" in note and "run `second`" in note


def _cards():
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "model_cards.py"
    spec = importlib.util.spec_from_file_location("model_cards", script)
    cards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cards)
    return cards


def _eval_run(folder: Path, digests: dict[str, str]) -> Path:
    """An eval run whose methods' generations were made with the given PCM digests, judged offline."""
    (folder / "generations").mkdir(parents=True)
    (folder / "generations" / "sources.json").write_text(json.dumps(
        {f"generations/{m}/{c}.jsonl": {"expert/P1A": "e", "pcm": d}
         for m, d in digests.items() for c in ("P1A+P2A", "P1B+P2A")}))
    rate = {"value": 0.61, "low": 0.55, "high": 0.66}
    (folder / "judgments" / "offline").mkdir(parents=True)
    (folder / "judgments" / "offline" / "results.json").write_text(json.dumps({
        "judge": "offline", "reference": "prompt", "instructions": 143, "methods": list(digests),
        "win_rates": {m: {"avg": rate, "by_combination": {"P1A+P2A": rate, "P1B+P2A": rate}} for m in digests},
        "paired": {m: {o: {"value": 0.021, "low": -0.004, "high": 0.047} for o in digests if o != m}
                   for m in digests}}))
    return folder


def test_the_pcm_card_shows_only_numbers_measured_with_that_very_file(tmp_path):
    import hashlib

    cards = _cards()
    pcm = tmp_path / "pcm"
    pcm.mkdir()
    (pcm / "pcm.safetensors").write_bytes(b"these weights")
    mine = hashlib.sha256(b"these weights").hexdigest()
    run = _eval_run(tmp_path / "eval", {"mope-pcm-new": mine, "mope-pcm": "0" * 64})
    lines = cards.pcm_evaluation(pcm, [tmp_path / "missing", run])
    text = "\n".join(lines)
    assert "`mope-pcm-new` in `eval`" in text and mine[:12] in text
    rows = [row for row in lines if row.startswith("| the offline judge")]
    assert rows == [("| the offline judge, which also labelled the training data (not independent) | prompt "
                     "| 61.0% [55.0, 66.0] | 143 x 2 | mope-pcm (another PCM, 000000000000) +2.1 [-0.4, +4.7] |")]
    # Another file (a retrained PCM shipped since): the run's numbers are not its own.
    (pcm / "pcm.safetensors").write_bytes(b"retrained weights, another file")
    assert cards.pcm_evaluation(pcm, [run])[0].startswith("Not evaluated with this file yet")
