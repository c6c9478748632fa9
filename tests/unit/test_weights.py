"""Shipped weights: found through the entry point, stored in half precision only where the answers do not
change, and shipped metadata without paths into the machine that trained them."""

from __future__ import annotations

import json
import shutil

import pytest

from personalign.errors import ConfigError

SIDES = ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
ADAPTER = "adapter/adapter_model.safetensors"


def test_experts_are_found_through_the_entry_point(tmp_path, shipped_weights):
    from personalign.compose import resolve_experts_dir, shipped_experts_dir

    shipped_weights({})
    assert shipped_experts_dir("smollm2-135m-instruct") is None
    with pytest.raises(ConfigError, match="no experts are shipped"):
        resolve_experts_dir(None, "smollm2-135m-instruct")
    (tmp_path / "experts" / "P1A").mkdir(parents=True)
    shipped_weights({"org/other-model": {"experts": tmp_path / "experts", "pcm": None}})
    assert shipped_experts_dir("org/other-model") == tmp_path / "experts"  # any base model can ship experts
    assert shipped_experts_dir("smollm2-135m-instruct") is None


def test_a_broken_weights_distribution_is_one_line(shipped_weights):
    from personalign.weights import shipped_folder

    shipped_weights({"m": RuntimeError("data folder missing")})
    with pytest.raises(ConfigError, match="weights distribution .* is broken .*data folder missing.*reinstall"):
        shipped_folder("m", "experts")


def test_the_library_wheel_carries_no_weights(tmp_path):
    """Build personalign's wheel: it holds the code and the instructions, no weights of any kind."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import shutil

    root = Path(__file__).resolve().parents[2]
    tree = tmp_path / "tree"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(root / "src", tree / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "wheel"), str(tree)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("personalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "personalign/data/instructions/eval.jsonl" in names
    assert "personalign/judges/data/contrast_pairs.jsonl" in names
    assert [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".gguf"))] == []
    assert wheel.stat().st_size < 1_000_000


def test_to_half_keeps_keys_and_metadata(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from personalign.weights import to_half

    save_file({"w": torch.randn(3, 2), "i": torch.arange(3)}, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    to_half(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert fh.get_tensor("w").dtype == torch.float16 and fh.get_tensor("i").dtype == torch.int64


def test_portable_paths():
    from personalign.weights import portable

    doc = {"reward": "rm:runs/psoups/rm/P1A", "out": "./runs/x", "list": ["runs/a", "myruns/b", "/abs/runs/c"], "n": 3}
    assert portable(doc) == {"reward": "rm:psoups/rm/P1A", "out": "x", "list": ["a", "myruns/b", "/abs/runs/c"],
                             "n": 3}


def test_half_precision_check_finds_changed_answers(tmp_path, tiny_model_dir, tiny):
    """float16 copies of the adapters answer like the float32 ones; adapters that really differ are caught."""
    from conftest import save_side_experts

    from personalign.weights import check_cases, half_precision_check, to_half

    full = save_side_experts(tiny_model_dir, tmp_path / "float32", SIDES)
    half, other = tmp_path / "float16", tmp_path / "other"
    shutil.copytree(full, half)
    shutil.copytree(full, other)
    for side in SIDES:
        to_half(full / side / ADAPTER, half / side / ADAPTER)
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(other / "P1A" / ADAPTER))
    save_file({k: v * 3 if "lora_B" in k else v for k, v in tensors.items()}, str(other / "P1A" / ADAPTER))
    model, tok = tiny
    cases = check_cases(SIDES[:2], ["P1A,P2A,P3A"])
    assert [c[:2] for c in cases] == [("expert", None), ("expert", None), ("soup", "psoups"), ("soup", "exact"),
                                      ("mope", "prob")]
    result = half_precision_check(model, tok, {"float32": full, "float16": half, "other": other},
                                  ["hello there", "tell me"], cases, max_new_tokens=8, model_name=str(tiny_model_dir))
    assert all(c["same"]["float16"] for c in result["cases"])
    assert not result["cases"][0]["same"]["other"]  # P1A alone changed
    assert result["cases"][1]["same"]["other"]  # P1B untouched
    assert not result["all_same"]
    assert json.dumps(result)  # recorded as JSON
    assert torch.float16 == load_file(str(half / "P1A" / ADAPTER))["base_model.model.lm_head.lora_B.weight"].dtype
