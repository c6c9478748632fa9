"""The weights shipped for the embedded default: found through the entry point, stored in half precision
only because their answers do not change (regenerated here against the float32 answers recorded when
they were halved), with model cards and no paths into the training machine's run folders."""

from __future__ import annotations

import json

import pytest

from personalign.compose import shipped_experts_dir
from personalign.models import EMBEDDED_DEFAULT, load_model
from personalign.pcm import shipped_pcm_dir
from personalign.weights import HALF_CHECK, half_precision_check

pytestmark = pytest.mark.integration


def test_shipped_weights_come_from_their_own_distribution():
    from importlib.metadata import distribution

    experts, pcm = shipped_experts_dir(EMBEDDED_DEFAULT), shipped_pcm_dir(EMBEDDED_DEFAULT)
    assert experts is not None and pcm is not None
    assert "personalign_smollm2" in experts.parts and "personalign_smollm2" in pcm.parts
    assert distribution("personalign-smollm2").entry_points.select(group="personalign.weights")
    for folder in [*(p for p in experts.iterdir() if p.is_dir()), pcm]:
        card = (folder / "README.md").read_text()
        assert "Training labels from: offline" in card and "[More Information Needed]" not in card
        for meta in folder.glob("*.json"):
            text = meta.read_text()
            assert "runs/" not in text and "/work/" not in text, meta
    for side in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B"):
        assert not (experts / side / "adapter" / "README.md").exists()  # peft's empty template
        assert json.loads((experts / side / "expert.json").read_text())["label_judges"] == ["offline"]


def test_half_precision_experts_answer_as_the_float32_ones_did():
    experts = shipped_experts_dir(EMBEDDED_DEFAULT)
    check = json.loads((experts.parent / HALF_CHECK).read_text())
    assert check["all_same"] and len(check["cases"]) >= 10
    import torch
    from safetensors import safe_open

    with safe_open(str(experts / "P1A" / "adapter" / "adapter_model.safetensors"), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}
    model, tok = load_model(EMBEDDED_DEFAULT)
    cases = [(c["method"], c["variant"], c["prefs"]) for c in check["cases"]]
    now = half_precision_check(model, tok, {"shipped": experts}, check["prompts"], cases,
                               max_new_tokens=check["max_new_tokens"], model_name=EMBEDDED_DEFAULT)
    for recorded, regenerated in zip(check["cases"], now["cases"]):
        assert regenerated["shipped"] == recorded["float32"], (recorded["method"], recorded["prefs"])
