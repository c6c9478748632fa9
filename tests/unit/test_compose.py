"""Composing experts: experts folders, cached soups, single experts, token mixtures, and the generate
and merge commands with --method expert|soup|mope, on a tiny random llama with random LoRA experts."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from personalign import compose
from personalign.cli import app
from personalign.errors import ModelError, PersonalignError, PreferenceError
from personalign.generation import SamplingConfig
from personalign.models import load_model
from personalign.personalize import MethodOptions, personalize, resolve
from personalign.preferences import parse_preference
from personalign.recipes import generate as gen_recipe
from personalign.recipes import merge as merge_recipe

runner = CliRunner()
SIDES = ("P1A", "P2A", "P3A")


def _make_experts(model_dir, folder, sides=SIDES, base_name=None):
    from peft import LoraConfig, get_peft_model

    for i, side in enumerate(sides):
        base, _ = load_model(str(model_dir), device="cpu", dtype="float32")
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        out = folder / side / "adapter"
        peft_model.save_pretrained(out)
        if base_name is not None:
            cfg = json.loads((out / "adapter_config.json").read_text())
            cfg["base_model_name_or_path"] = base_name
            (out / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture()
def experts_dir(tiny_model_dir, tmp_path):
    return _make_experts(tiny_model_dir, tmp_path / "experts")


def _logits(model, tok, text="Explain photosynthesis to me."):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_expert_folders_and_missing_side(experts_dir, tmp_path):
    found = compose.expert_folders(experts_dir)
    assert set(found) == set(SIDES) and all(p.name == "adapter" for p in found.values())
    (experts_dir / "P1B").mkdir()  # an empty folder is not an expert
    assert "P1B" not in compose.expert_folders(experts_dir)
    with pytest.raises(PreferenceError, match="no expert for side.*P1B"):
        compose.require_experts(parse_preference("1B,2A,3A"), compose.expert_folders(experts_dir), experts_dir)
    with pytest.raises(PersonalignError, match="does not exist"):
        compose.resolve_experts_dir(tmp_path / "nowhere", "whatever")
    with pytest.raises(PersonalignError, match="no experts are shipped"):
        compose.resolve_experts_dir(None, "some-other-model")


def test_expert_weights_hard_and_weighted():
    assert compose.expert_weights(parse_preference("1A,2A,3A")) == pytest.approx({s: 1 / 3 for s in SIDES})
    w = compose.expert_weights(parse_preference("concise=0.6,informative=0.2,friendly=0"))
    assert w == pytest.approx({"P2A": 0.75, "P2B": 0.25})


def test_soup_is_merged_in_memory_cached_and_equals_merge(experts_dir, tmp_path, monkeypatch):
    from personalign import adapters as io
    from personalign import merging

    weights = {s: 1 / 3 for s in SIDES}
    folders = compose.expert_folders(experts_dir)
    adapter, report, folder = compose.soup_adapter(weights, folders, method="exact", cache=tmp_path / "c")
    assert report["method"] == "exact" and set(report["sides"]) == set(SIDES)
    adapters = [io.load_adapter(experts_dir / s / "adapter") for s in SIDES]
    want = io.delta_weights(merging.merge_adapters(adapters, [1 / 3] * 3, method="exact")[0])
    got = io.delta_weights(adapter)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    cached = io.delta_weights(io.load_adapter(folder))  # the cache holds the same soup
    assert all(torch.equal(cached[k], got[k]) for k in want)

    def boom(*a, **k):
        raise AssertionError("merged again")

    monkeypatch.setattr(merging, "merge_adapters", boom)
    _, _, again = compose.soup_adapter(weights, folders, method="exact", cache=tmp_path / "c")
    assert again == folder
    with pytest.raises(AssertionError, match="merged again"):  # new weights: a new merge
        compose.soup_adapter({"P1A": 0.5, "P2A": 0.5}, folders, method="exact", cache=tmp_path / "c")


def test_an_unwritable_cache_only_skips_caching(experts_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not be cached"):
        adapter, _, _ = compose.soup_adapter({"P1A": 1.0}, compose.expert_folders(experts_dir), method="exact",
                                             cache=blocker)
    assert adapter.r == 4


def test_single_expert_merged_equals_peft(tiny_model_dir, experts_dir):
    from peft import PeftModel

    base, tok = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    spec = resolve("P2A", MethodOptions(method="expert", experts=str(experts_dir)), model=str(tiny_model_dir))
    merged = personalize(base, tok, spec).model
    base2, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    ref = PeftModel.from_pretrained(base2, str(experts_dir / "P2A" / "adapter"))
    assert torch.allclose(_logits(merged, tok), _logits(ref, tok), atol=1e-5)


def test_adapter_of_another_base_is_refused_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    import personalign.models

    folder = _make_experts(tiny_model_dir, tmp_path / "other", sides=("P1A",), base_name="some/other-model")
    monkeypatch.setattr(personalign.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ModelError, match="trained on base model 'some/other-model'"):
        resolve("P1A", MethodOptions(method="expert", experts=str(folder)), model=str(tiny_model_dir))
    with pytest.raises(ModelError, match="trained on base model 'some/other-model'"):
        gen_recipe.main(gen_recipe.GenerateConfig(prefs="P1A", method="expert", model=str(tiny_model_dir),
                                                  experts=str(folder), instructions=("Hi",)))


def _gen(tiny_model_dir, experts_dir, method, prefs, out=None, **kw):
    cfg = gen_recipe.GenerateConfig(
        prefs=prefs, method=method, model=str(tiny_model_dir), instructions=("Explain photosynthesis.", "Bake bread?"),
        experts=str(experts_dir) if experts_dir else None, progress=False, batch_size=2, output=str(out) if out else None,
        input=None, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0, repetition_penalty=1.0), **kw)
    return gen_recipe.main(cfg)


def test_mope_with_all_weight_on_one_expert_equals_that_expert(tiny_model_dir, experts_dir):
    expert = _gen(tiny_model_dir, experts_dir, "expert", "P2A")
    mixed = _gen(tiny_model_dir, experts_dir, "mope", "P2A=1,P1A=0")
    assert [r["response"] for r in mixed] == [r["response"] for r in expert]
    assert mixed[0]["method"] == "mope-prob" and expert[0]["method"] == "expert"


def test_soup_and_mope_methods_run_and_label_rows(tiny_model_dir, experts_dir):
    for method, kw, label in [("soup", {"merge": "psoups"}, "soup-psoups"), ("soup", {"merge": "exact"}, "soup-exact"),
                              ("mope", {"mix": "uniform"}, "mope-uniform"), ("mope", {"mix": "logit"}, "mope-logit")]:
        rows = _gen(tiny_model_dir, experts_dir, method, "1A,2A,3A", **kw)
        assert len(rows) == 2 and all(r["method"] == label for r in rows)


def test_expert_method_needs_one_side_and_mope_non_negative(tiny_model_dir, experts_dir):
    with pytest.raises(PersonalignError, match="names 3"):
        _gen(tiny_model_dir, experts_dir, "expert", "1A,2A,3A")
    with pytest.raises(PersonalignError, match="unknown merge 'average'"):
        _gen(tiny_model_dir, experts_dir, "soup", "1A,2A,3A", merge="average")
    with pytest.raises(PersonalignError, match="non-negative"):
        _gen(tiny_model_dir, experts_dir, "mope", "P1A=1,P2A=-0.5")


def test_merge_command_adapter_and_full_model(tiny_model_dir, experts_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = runner.invoke(app, ["merge", "--prefs", "1A,2A,3A", "--experts", str(experts_dir), "--method", "exact",
                              "--model", str(tiny_model_dir), "-o", str(tmp_path / "soup")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "soup" / "adapter_model.safetensors").is_file()
    assert json.loads(res.stdout)["method"] == "exact"
    report = merge_recipe.main(merge_recipe.MergeConfig(
        prefs="1A,2A,3A", output=str(tmp_path / "full"), experts=str(experts_dir), method="exact", full_model=True,
        model=str(tiny_model_dir), device="cpu", dtype="float32"))
    assert report["method"] == "exact"
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    base, tok = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    ref = PeftModel.from_pretrained(base, str(tmp_path / "soup"))
    assert torch.allclose(_logits(full, tok), _logits(ref, tok), atol=1e-5)
    again = runner.invoke(app, ["merge", "--prefs", "1A", "--experts", str(experts_dir), "--model",
                                str(tiny_model_dir), "-o", str(tmp_path / "soup")])
    assert again.exit_code == 2 and "not empty" in again.output


def test_generate_cli_soup_without_experts_is_one_line(tiny_model_dir, tmp_path):
    res = runner.invoke(app, ["generate", "--method", "soup", "--prefs", "1A,2A,3A", "--model", str(tiny_model_dir),
                              "--experts", str(tmp_path / "missing"), "Hello"])
    assert res.exit_code == 2
    assert "does not exist" in res.output and len(res.output.strip().splitlines()) == 1


def test_adapter_method_uses_the_given_adapter(tiny_model_dir, experts_dir, tmp_path):
    expert = _gen(tiny_model_dir, experts_dir, "expert", "P3A")
    given = _gen(tiny_model_dir, None, "adapter", "P3A", adapter=str(experts_dir / "P3A"))
    assert [r["response"] for r in given] == [r["response"] for r in expert]
    assert given[0]["method"] == "adapter-P3A"
    with pytest.raises(PersonalignError, match="holds no adapter"):
        _gen(tiny_model_dir, None, "adapter", "P3A", adapter=str(tmp_path))
    with pytest.raises(PersonalignError, match="goes with method adapter"):
        _gen(tiny_model_dir, None, "prompt", "P3A", adapter=str(experts_dir / "P3A"))


def test_demo_composes_experts_next_to_prompting(tiny_model_dir, experts_dir):
    from personalign.recipes import demo

    cfg = demo.DemoConfig(model=str(tiny_model_dir), combinations=("P1A,P2A,P3A",), instructions=("Bake bread?",),
                          experts=str(experts_dir), device="cpu", dtype="float32",
                          sampling=SamplingConfig(max_new_tokens=4, temperature=0.0))
    rows = demo.main(cfg, show=True)
    assert [r["method"] for r in rows] == ["prompt", "soup-exact", "mope-prob"]
    only = demo.main(demo.DemoConfig(**{**cfg.__dict__, "compose": ()}), show=False)
    assert [r["method"] for r in only] == ["prompt"]


def test_generate_reports_the_error_of_a_compressed_soup(tiny_model_dir, experts_dir):
    args = ["generate", "--method", "soup", "--merge", "exact", "--prefs", "1A,2A,3A", "--model", str(tiny_model_dir),
            "--experts", str(experts_dir), "--max-new-tokens", "2", "Hello"]
    res = runner.invoke(app, [*args, "--merge-rank", "1"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("soup compressed to rank 1"))
    error = float(line.split(" max ")[1].split(",")[0])
    assert 0 < error < 1  # three experts' deltas do not fit in rank 1
    assert "compressed" not in runner.invoke(app, args).stderr  # an exact soup is not compressed
