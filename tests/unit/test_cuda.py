"""The same workflows on a CUDA device, on the tiny random llama: mixing agrees with the CPU, merging and
soups run there, and every trainer (expert, reward model, multitask, P-MORL, PCM) trains on the GPU and
saves something the CPU loads back. Skipped where no CUDA device is present."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_experts, build_tiny_tokenizer, save_side_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIDES = ("P1A", "P2A", "P3A")
NAMES = ["p1a", "p2a", "p3a"]


def letters(prompts: list[str], responses: list[str]) -> list[float]:
    """Toy reward imported by the recipes as module:function."""
    return [r.count("e") / max(1, len(r)) - len(r) / 200 for r in responses]


SIDE_REWARDS = {s: f"{__name__}:letters" for s in ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")}


def _finite_rows(folder) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)
    return rows


@pytest.fixture(scope="module")
def experts_dir(tiny_model_dir, tmp_path_factory):
    """Three side experts saved as adapters (random B), the layout `generate --experts` reads."""
    return save_side_experts(tiny_model_dir, tmp_path_factory.mktemp("experts"), SIDES)


# -- mixing ------------------------------------------------------------------------------------------


def test_mixture_scores_on_cuda_equal_the_cpu_and_weight_one_is_the_expert():
    from personalign.generation import SamplingConfig
    from personalign.experts import Experts, score_responses
    from personalign.mixture import FixedWeights, generate_mixed

    tok = build_tiny_tokenizer()
    tok.padding_side = "left"
    cpu = build_tiny_experts(tok, NAMES)
    gpu = build_tiny_experts(tok, NAMES).to("cuda")
    enc = tok(["Explain photosynthesis to me.", "List five painters."], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    response = torch.randint(3, len(tok), (2, 6))
    rmask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    want = score_responses(Experts.from_adapters(cpu, NAMES), ids, mask, response, rmask)
    got = score_responses(
        Experts.from_adapters(gpu, NAMES), ids.cuda(), mask.cuda(), response.cuda(), rmask.cuda()
    )
    assert got.device.type == "cuda"
    assert torch.allclose(got.cpu(), want, atol=1e-4)

    greedy = SamplingConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    experts = Experts.from_adapters(gpu, NAMES)
    for j, name in enumerate(NAMES):
        w = [0.0] * 3
        w[j] = 1.0
        out = generate_mixed(
            experts,
            ids.cuda(),
            mask.cuda(),
            FixedWeights(w),
            eos_token_ids=[tok.eos_token_id],
            sampling=greedy,
        )
        gpu.set_adapter(name)
        with torch.no_grad():
            ref = gpu.generate(
                input_ids=ids.cuda(),
                attention_mask=mask.cuda(),
                do_sample=False,
                max_new_tokens=8,
                eos_token_id=[tok.eos_token_id],
                pad_token_id=tok.pad_token_id,
            )
        assert torch.equal(out.tokens, ref[:, ids.shape[1] :])
    sampled = generate_mixed(
        experts,
        ids.cuda(),
        mask.cuda(),
        FixedWeights([0.2, 0.5, 0.3]),
        eos_token_ids=[0],
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, seed=3),
    )
    probs = sampled.expert_logprobs.exp()
    assert torch.isfinite(sampled.sequence_logprob()).all() and (probs <= 1 + 1e-5).all()


@pytest.mark.parametrize("method", ["prompt", "soup", "mope"])
def test_generate_recipe_runs_on_cuda_in_bf16(tiny_model_dir, experts_dir, method):
    from personalign.generation import SamplingConfig
    from personalign.recipes import generate as gen_recipe

    rows = gen_recipe.main(
        gen_recipe.GenerateConfig(
            prefs="1A,2A,3A",
            method=method,
            model=str(tiny_model_dir),
            experts=str(experts_dir),
            device="cuda",
            instructions=("Hi", "Explain photosynthesis to me."),
            progress=False,
            sampling=SamplingConfig(max_new_tokens=5, seed=1),
        )
    )
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)


def test_merges_of_cuda_adapters_equal_the_cpu_merges(experts_dir):
    """Adapters held on the GPU merge exactly as on the CPU: the math runs in float32 on the CPU (a merge
    runs once per weight vector and its result is cached), so even DARE's seeded masks agree."""
    import dataclasses

    from personalign.adapters import delta_weights, load_adapter
    from personalign.merging import merge_adapters

    cpu = [load_adapter(experts_dir / s / "adapter") for s in SIDES]
    gpu = [dataclasses.replace(a, tensors={k: v.cuda() for k, v in a.tensors.items()}) for a in cpu]
    w = [0.5, 0.3, -0.2]
    exact, _ = merge_adapters(gpu, w, method="exact")
    for key, value in delta_weights(exact).items():
        want = sum(wi * delta_weights(a)[key] for wi, a in zip(w, cpu))
        assert torch.allclose(value.cpu(), want, atol=1e-5)
    for method, options in (("psoups", {}), ("ties", {"density": 0.5}), ("dare", {"density": 0.5, "seed": 3})):
        want, _ = merge_adapters(cpu, w, method=method, **options)
        got, _ = merge_adapters(gpu, w, method=method, **options)
        for key, value in got.tensors.items():
            assert torch.equal(value.cpu(), want.tensors[key]), (method, key)


# -- trainers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_train_expert_on_cuda(tmp_path, tiny_model_dir, algorithm):
    from peft import PeftModel

    from personalign.models import load_model
    from personalign.recipes import train_expert as te

    extra = {"ppo_epochs": 2, "minibatch_size": 2} if algorithm == "ppo" else {}
    cfg = te.TrainExpertConfig(
        side="P2A",
        output_dir=str(tmp_path / "run"),
        model=str(tiny_model_dir),
        reward=f"{__name__}:letters",
        steps=3,
        batch_prompts=2,
        group_size=2,
        max_new_tokens=6,
        progress=False,
        device="cuda",
        limit=8,
        checkpoint_every=2,
        algorithm=algorithm,
        **extra,
    )
    result = te.main(cfg)
    assert result["steps"] == 3 and len(_finite_rows(tmp_path / "run")) == 3
    base, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    peft = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    assert any(float(p.abs().sum()) > 0 for n, p in peft.named_parameters() if "lora_B" in n)


def test_train_rm_on_cuda(tmp_path, tiny_model_dir):
    from personalign.recipes import train_rm

    rows = []
    for prompt in [
        "Explain photosynthesis to me.",
        "How do I bake bread at home?",
        "Compare stocks and bonds.",
    ]:
        rows.append(
            {"prompt": prompt, "chosen": "Short.", "rejected": "A much longer answer " * 4, "side": "P2A"}
        )
        rows.append(
            {"prompt": prompt, "chosen": "A much longer answer " * 4, "rejected": "Short.", "side": "P2B"}
        )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    result = train_rm.main(
        train_rm.TrainRMConfig(
            output_dir=str(tmp_path / "rm"),
            pairs=str(pairs),
            model=str(tiny_model_dir),
            lr=5e-3,
            epochs=2,
            batch_size=4,
            progress=False,
            device="cuda",
            checkpoint_every=3,
        )
    )
    assert result["eval/accuracy"] == result["eval/accuracy"] and result["eval/loss"] == result["eval/loss"]
    _finite_rows(tmp_path / "rm")


def test_multitask_and_pmorl_on_cuda(tmp_path, tiny_model_dir):
    from personalign.recipes import train_multitask as mt
    from personalign.recipes import train_pmorl as pm
    from personalign.reward_model import LoraSpec

    lora = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {
                    "prompt": "Explain photosynthesis to me.",
                    "chosen": "Plants make sugar.",
                    "rejected": "No.",
                    "side": "P2A",
                },
                {
                    "prompt": "How do I bake bread at home?",
                    "chosen": "Mix flour and bake.",
                    "rejected": "Buy it.",
                    "side": "P2B",
                },
            ]
        )
    )
    mt.main(
        mt.TrainMultitaskConfig(
            pairs=str(pairs),
            output_dir=str(tmp_path / "mt"),
            model=str(tiny_model_dir),
            device="cuda",
            lora=lora,
            lr=1e-2,
            max_steps=3,
            batch_size=2,
            checkpoint_every=2,
            log_every=1,
            progress=False,
        )
    )
    assert (tmp_path / "mt" / "adapter" / "adapter_model.safetensors").is_file()
    pm.main(
        pm.TrainPMORLConfig(
            output_dir=str(tmp_path / "pm"),
            model=str(tiny_model_dir),
            rewards=SIDE_REWARDS,
            steps=2,
            batch_prompts=2,
            group_size=2,
            max_new_tokens=6,
            progress=False,
            device="cuda",
            limit=8,
            checkpoint_every=2,
            lora=lora,
        )
    )
    assert (tmp_path / "pm" / "adapter" / "adapter_model.safetensors").is_file()
    _finite_rows(tmp_path / "pm")


def test_train_pcm_on_cuda_and_its_pcm_drives_generation(tmp_path, tiny_model_dir, experts_dir):
    from personalign.generation import SamplingConfig
    from personalign.recipes import generate as gen_recipe
    from personalign.recipes import train_pcm as tp

    rewards = {s: f"{__name__}:letters" for s in SIDES}
    result = tp.main(
        tp.TrainPCMConfig(
            output_dir=str(tmp_path / "pcm"),
            experts=str(experts_dir),
            model=str(tiny_model_dir),
            rewards=rewards,
            steps=3,
            batch_prompts=3,
            max_new_tokens=5,
            hidden=16,
            proj=8,
            progress=False,
            device="cuda",
            limit=8,
            checkpoint_every=2,
            ref_batch_size=4,
        )
    )
    assert result["steps"] == 3 and len(_finite_rows(tmp_path / "pcm")) == 3
    for device in ("cuda", "cpu"):  # trained on the GPU, loaded on either
        rows = gen_recipe.main(
            gen_recipe.GenerateConfig(
                prefs="1A,2A,3A",
                method="mope",
                model=str(tiny_model_dir),
                experts=str(experts_dir),
                pcm=str(tmp_path / "pcm"),
                device=device,
                dtype="float32",
                instructions=("Hi",),
                progress=False,
                sampling=SamplingConfig(max_new_tokens=4, seed=1),
            )
        )
        assert rows[0]["method"] == "mope-pcm-pcm"
