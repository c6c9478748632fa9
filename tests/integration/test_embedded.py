"""Integration tests: the real embedded model (SmolLM2-135M-Instruct) through each command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personalign.cli import app
from personalign.models import EMBEDDED_DEFAULT, embedded_gguf_path, ensure_embedded_cache, load_model

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_cache_matches_gguf_and_is_reused(monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = ensure_embedded_cache(progress=False)
    model, tok = load_model(EMBEDDED_DEFAULT, device="cpu", dtype="float32")
    gguf = embedded_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, ref(**ids).logits, atol=1e-5)

    # Later loads come from the cache: converting again would fail here.
    def no_conversion(*a, **k):
        if "gguf_file" in k:
            raise AssertionError("converted again")
        return original(*a, **k)

    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert ensure_embedded_cache(progress=False) == folder
    load_model(device="cpu")


def test_generate_command_real_model():
    res = runner.invoke(app, ["generate", "--prefs", "1A,2A,3A", "--temperature", "0", "--max-new-tokens", "48",
                              "Explain photosynthesis."], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = res.stdout.strip()
    assert len(text.split()) >= 5
    assert "<|im_end|>" not in text and "<|im_start|>" not in text


def test_generate_file_real_model_resumes(tmp_path):
    out = tmp_path / "out.jsonl"
    args = ["generate", "--prefs", "expert,informative,unfriendly", "--input", "builtin:eval", "--limit", "3",
            "--max-new-tokens", "24", "--batch-size", "2", "--output", str(out)]
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    full = out.read_text()
    rows = [json.loads(x) for x in full.splitlines()]
    assert len(rows) == 3 and all(r["response"] for r in rows)
    out.write_text("".join(full.splitlines(keepends=True)[:2]))
    assert runner.invoke(app, args, catch_exceptions=False).exit_code == 0
    assert out.read_text() == full


def test_demo_command_real_model(tmp_path):
    res = runner.invoke(app, ["demo", "-n", "1", "--max-new-tokens", "32", "--output-dir", str(tmp_path)],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "demo.jsonl").read_text().splitlines()]
    by_method: dict[str, list[str]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["response"])
    # With the shipped experts the demo shows the soup and the token-level mixture next to prompting,
    # the mixture weighted by the shipped PCM where one ships.
    from personalign.compose import shipped_experts_dir
    from personalign.pcm import shipped_pcm_dir
    from personalign.personalize import default_strengths, strength_suffix

    mope = "mope-pcm" if shipped_pcm_dir(EMBEDDED_DEFAULT) is not None else "mope-prob"
    # the exact soup at the strength measured for the shipped experts (their strength.json)
    soup = "soup-exact" + strength_suffix(default_strengths(shipped_experts_dir(EMBEDDED_DEFAULT))["soup-exact"])
    assert soup == "soup-exact-x3"
    assert set(by_method) == {"prompt", soup, mope}, set(by_method)
    assert all(len(v) == 2 for v in by_method.values())
    assert by_method["prompt"][0] != by_method["prompt"][1]


def test_shipped_experts_generate_offline(tmp_path):
    """The six experts ship with the package: each records the embedded base, its side and its
    training metrics, and generate uses them with no --experts."""
    from personalign.compose import expert_folders, shipped_experts_dir

    shipped = shipped_experts_dir(EMBEDDED_DEFAULT)
    assert shipped is not None
    folders = expert_folders(shipped)
    assert sorted(folders) == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
    for side, adapter in folders.items():
        doc = json.loads((adapter.parent / "expert.json").read_text())
        assert doc["side"] == side and doc["base"]["name"] == EMBEDDED_DEFAULT, side
        assert doc["metrics"]["steps"] >= 1 and "train/kl_last" in doc["metrics"]
        assert (adapter.parent / "metrics.jsonl").is_file()
        size = (adapter / "adapter_model.safetensors").stat().st_size
        assert size < 8e6, f"{side}'s adapter is {size / 1e6:.1f} MB"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    out = tmp_path / "out.jsonl"
    for method in ("expert", "soup"):
        prefs = "P2A" if method == "expert" else "1A,2A,3A"
        res = runner.invoke(app, ["generate", "--method", method, "--prefs", prefs, "--max-new-tokens", "16",
                                  "--input", str(prompts), "--output", str(out)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        row = json.loads(out.read_text().splitlines()[-1])
        assert row["method"].split("-")[0] == method and row["response"].strip()
        out.unlink()


def test_shipped_pcm_drives_the_shipped_experts(tmp_path):
    """The PCM ships for the embedded default's six experts, records how it was trained, and
    `generate --method mope --pcm shipped` uses it."""
    from personalign.pcm import PCM_CONFIG, shipped_pcm_dir

    folder = shipped_pcm_dir(EMBEDDED_DEFAULT)
    assert folder is not None
    doc = json.loads((folder / PCM_CONFIG).read_text())
    assert doc["sides"] == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"] and doc["steps"] >= 1
    assert doc["config"]["temperature"] == 0.7 and (folder / "metrics.jsonl").is_file()
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    res = runner.invoke(app, ["generate", "--method", "mope", "--pcm", "shipped", "--prefs", "1B,2A,3B",
                              "--max-new-tokens", "16", "--input", str(prompts), "--output", str(out)],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["method"] == "mope-pcm" and row["response"].strip()


def _readme_commands() -> list[str]:
    head = (ROOT / "README.md").read_text().splitlines()[:30]
    cmds = [ln.split("#")[0].strip().removeprefix("$ ").strip() for ln in head]
    return [c for c in cmds if re.match(r"^make \w", c)]


def test_readme_commands_exist_and_demo_runs():
    """The README's two commands are real Makefile targets; run what `make demo` runs."""
    cmds = _readme_commands()
    assert cmds == ["make demo", "make test"], cmds
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for cmd in cmds:
        dry = subprocess.run(["make", "-n", *cmd.split()[1:]], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "personalign demo" in dry
    assert "pytest tests" in subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True).stdout
    exe = Path(sys.executable).parent / "personalign"
    res = subprocess.run([str(exe), "demo", "-n", "1", "--max-new-tokens", "24"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert "elementary+concise+friendly" in res.stdout


def test_adapters_record_the_embedded_base_by_name(tmp_path):
    """Experts trained on the embedded model must load on any machine, whatever its cache path."""
    from peft import LoraConfig, get_peft_model

    from personalign import compose
    from personalign.adapters import load_adapter

    from personalign.personalize import MethodOptions, personalize, resolve

    base, _ = load_model(EMBEDDED_DEFAULT, device="cpu", dtype="float32")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "P1A")
    assert load_adapter(tmp_path / "P1A").base_model == EMBEDDED_DEFAULT
    compose.check_base(EMBEDDED_DEFAULT, tmp_path / "P1A")  # accepted: same base by name
    fresh, tok = load_model(EMBEDDED_DEFAULT, device="cpu", dtype="float32")
    spec = resolve("P1A", MethodOptions(method="expert", experts=str(tmp_path)))
    assert personalize(fresh, tok, spec).label == "expert"


def test_reward_model_expert_and_single_side_eval_real_model(tmp_path):
    """Stages 3-4 and the expert evaluation on the real model, sized to run in minutes: a reward model
    read at layer 4 with a probe-started head, a 2-step expert against it, then that expert against the
    base prompted with its side."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(x) for x in (ROOT / "runs" / "psoups-smollm2" / "pairs.jsonl").read_text().splitlines()]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["side"] == "P2A"][:24]))
    rm = tmp_path / "rm"
    res = runner.invoke(app, ["train-rm", "--pairs", str(pairs), "--side", "P2A", "-o", str(rm),
                              "--set", "readout_layer=4", "--set", "lora.top_layers=1", "--set", "epochs=1",
                              "--set", "eval_fraction=0.25", "--set", "max_length=160"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    first = json.loads((rm / "metrics.jsonl").read_text().splitlines()[0])
    assert "probe/train_accuracy/P2A" in first and "eval/accuracy" in first  # the head started as a probe
    config = json.loads((rm / "reward_config.json").read_text())
    assert config["readout_layer"] == 4 and config["metrics"]["prefix_cache/layers"] == 3

    experts = tmp_path / "experts"
    res = runner.invoke(app, ["train-expert", "--side", "P2A", "-o", str(experts / "P2A"), "--reward", f"rm:{rm}",
                              "--set", "steps=2", "--set", "batch_prompts=2", "--set", "group_size=2",
                              "--set", "max_new_tokens=12", "--set", "lora.target_modules=[q_proj,v_proj]",
                              "--set", "lora.r=4"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((experts / "P2A" / "expert.json").read_text())
    assert doc["metrics"]["steps"] == 2 and doc["reward"] == f"rm:{rm}"

    res = runner.invoke(app, ["eval", "--single-sides", "-o", str(tmp_path / "eval"), "--experts", str(experts),
                              "--limit", "2", "--set", "combinations=[P2A]", "--set", "sampling.max_new_tokens=12",
                              "--set", "ontopic=false", "--set", "bootstrap_resamples=50"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["combinations"] == ["P2A"] and results["methods"] == ["expert-1"]
