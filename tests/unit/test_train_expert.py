"""train-expert on the tiny random llama: every algorithm runs and saves, the reference is the base,
rollouts stop at end-of-sequence, resumption is exact, bad input fails before any model loads, and
a strong reward is learned."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import record_rl_scores

from personalign.config import load_config
from personalign.errors import ConfigError, PersonalignError
from personalign import rl
from personalign.recipes import train_expert as te
from personalign.reward_model import LoraSpec


# Toy rewards, imported by the recipe as module:function (this module's own name).
def e_share(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the characters that are the letter e: dense, so a tiny model can climb it."""
    return [r.count("e") / max(1, len(r)) for r in responses]


def short(prompts: list[str], responses: list[str]) -> torch.Tensor:
    return torch.tensor([-len(r) / 40 for r in responses])


NOT_CALLABLE = 3


def _cfg(tmp_path, tiny_model_dir, name: str = "run", **kw) -> te.TrainExpertConfig:
    base = {"side": "P2A", "output_dir": str(tmp_path / name), "model": str(tiny_model_dir),
            "reward": f"{__name__}:short", "steps": 3, "batch_prompts": 2, "group_size": 2,
            "max_new_tokens": 6, "progress": False, "device": "cpu", "limit": 8, "checkpoint_every": 2}
    return te.TrainExpertConfig(**{**base, **kw})


def _rows(folder) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


# -- pieces ----------------------------------------------------------------------------------------


def test_response_mask_ends_at_first_eos():
    eos = [9, 7]
    tokens = torch.tensor([[1, 2, 9, 9, 9],  # eos at 2, then padding with the eos id
                           [7, 3, 3, 9, 9],  # the other eos id first
                           [1, 2, 3, 4, 5],  # no eos: all real (truncated)
                           [1, 9, 4, 4, 9]])  # tokens after the first eos are never real
    assert rl.response_mask(tokens, eos).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1],
                                                       [1, 1, 0, 0, 0]]


def test_step_prompt_indices_cover_each_pass_and_need_no_replay():
    stream = [i for s in range(6) for i in rl.step_prompt_indices(5, 3, s, seed=1)]  # 18 = 3 passes + 3
    for p in range(3):
        assert sorted(stream[5 * p : 5 * p + 5]) == list(range(5))
    assert stream[:5] != stream[5:10] or stream[5:10] != stream[10:15]  # reshuffled per pass
    assert rl.step_prompt_indices(5, 3, 4, seed=1) == stream[12:15]
    assert rl.step_prompt_indices(5, 5, 0, seed=2) != rl.step_prompt_indices(5, 5, 0, seed=1)


def test_rollout_stops_at_eos_and_masks_after_it(tiny):
    model, tok = tiny
    # Half the vocabulary ends a response, so every row stops within a few tokens.
    eos = list(range(0, len(tok), 2))
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nTell me more<|im_end|>\n"]
    torch.manual_seed(0)
    ro = rl.rollout(model, tok, texts, eos, max_new_tokens=40, temperature=1.0)
    assert ro.response.shape[1] < 40  # generation stopped once every row had ended
    assert ro.finished.all()
    for i in range(2):
        row = ro.response[i].tolist()
        first = next(j for j, t in enumerate(row) if t in eos)
        assert ro.mask[i].tolist() == [1.0] * (first + 1) + [0.0] * (len(row) - first - 1)
        assert ro.texts[i] == tok.decode(row[:first], skip_special_tokens=True).strip()
    n_prompt = ro.input_ids.shape[1] - ro.response.shape[1]
    assert torch.equal(ro.attention_mask[:, n_prompt:], ro.mask.long())


def test_logprobs_match_generation_and_ignore_padding(tiny):
    """The training forward numbers left-padded positions as generate does: same log-probs."""
    model, tok = tiny
    tok.padding_side = "left"
    texts = ["Explain photosynthesis to me.", "Hi"]
    enc = tok(texts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=5, eos_token_id=[10**6],
                         pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
    gen_logp = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1)  # (B, T, V)
    resp = out.sequences[:, enc["input_ids"].shape[1]:]
    want = gen_logp.gather(-1, resp[..., None]).squeeze(-1)
    am = torch.cat([enc["attention_mask"], torch.ones_like(resp)], 1)
    with torch.no_grad():
        got, _, _ = rl.response_logprobs(model, out.sequences, am, resp.shape[1])
        # The short prompt alone, without padding, gives the same log-probs.
        pad = int((enc["attention_mask"][1] == 0).sum())
        alone, _, _ = rl.response_logprobs(model, out.sequences[1:, pad:], am[1:, pad:], resp.shape[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], got[1], atol=1e-5, rtol=1e-5)


def test_reference_is_base_model_with_adapter_disabled(tiny_model_dir):
    from personalign.models import load_model

    plain, tok = load_model(str(tiny_model_dir), device="cpu")
    base, _ = load_model(str(tiny_model_dir), device="cpu")
    policy = rl.build_policy(base, LoraSpec(r=4, alpha=8, dropout=0.0), seed=0)
    policy.eval()
    enc = tok(["Compare stocks and bonds. Write a short poem"], return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        want, _, _ = rl.response_logprobs(plain, ids, am, 4)
        fresh, _, _ = rl.response_logprobs(policy, ids, am, 4)
        assert torch.equal(fresh, want)  # lora_B starts at zero: the policy is the base, exactly
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        trained, _, _ = rl.response_logprobs(policy, ids, am, 4)
        with policy.disable_adapter():
            ref, _, _ = rl.response_logprobs(policy, ids, am, 4)
    assert not torch.allclose(trained, want)
    assert torch.equal(ref, want)


def test_single_pass_update_equals_three_pass_update(tiny_model_dir, monkeypatch):
    """rloo/grpo with one update on the whole batch reuse the gradient pass for the old log-probs:
    the update and the metrics equal those of the separate no-grad pass."""
    from personalign.generation import eos_token_ids
    from personalign.models import load_model

    def run(single: bool):
        monkeypatch.setattr(rl, "single_pass", lambda *a: single)
        base, tok = load_model(str(tiny_model_dir), device="cpu")
        policy = rl.build_policy(base, LoraSpec(r=4, alpha=8, dropout=0.0), seed=0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        torch.manual_seed(0)
        ro = rl.rollout(policy, tok, ["Explain photosynthesis to me."] * 2 + ["How do I bake bread at home?"] * 2,
                        eos_token_ids(base, tok), max_new_tokens=5, temperature=1.0)
        c = rl.resolve_defaults(te.TrainExpertConfig(side="P2A", output_dir="unused", group_size=2, batch_prompts=2))
        state = rl.RLState(policy, dataclasses.replace(c, lr=1e-2))
        metrics = rl.rl_update(state, ro, torch.tensor([1.0, -1.0, 0.5, -0.5]), c)
        return metrics, [p.detach().clone() for p in state.params]

    m3, p3 = run(False)
    m1, p1 = run(True)
    for a, b in zip(p1, p3):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for key in ("train/kl", "train/loss", "train/entropy", "train/reward_total"):
        assert m1[key] == pytest.approx(m3[key], rel=1e-4, abs=1e-6), key


def test_single_pass_only_where_it_is_exact():
    from torch import nn

    c = rl.resolve_defaults(te.TrainExpertConfig(side="P2A", output_dir="unused"))
    plain = nn.Sequential(nn.Linear(2, 2))
    assert rl.single_pass(plain, c, 16)
    assert not rl.single_pass(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)), c, 16)
    assert not rl.single_pass(plain, rl.resolve_defaults(te.TrainExpertConfig(side="P2A", output_dir="u",
                                                                               minibatch_size=8)), 16)
    assert not rl.single_pass(plain, rl.resolve_defaults(te.TrainExpertConfig(side="P2A", output_dir="u",
                                                                               algorithm="ppo")), 16)


# -- the recipe ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "ppo"])
def test_each_algorithm_trains_logs_and_saves(tmp_path, tiny_model_dir, algorithm):
    # ppo also runs under bf16 autocast: the value head and returns must stay float32 there.
    extra = {"ppo_epochs": 2, "minibatch_size": 2, "autocast_bf16": True} if algorithm == "ppo" else {}
    cfg = _cfg(tmp_path, tiny_model_dir, algorithm=algorithm, **extra)
    result = te.main(cfg)
    out = tmp_path / "run"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("train/reward", "train/reward_raw", "train/kl", "train/loss", "train/response_length",
                "train/entropy", "time/step_seconds", "time/samples_per_second"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert rows[0]["train/kl"] == 0.0  # step 1 samples from the untouched policy (lora_B = 0)
    assert ("train/value_loss" in rows[0]) == (algorithm == "ppo")
    assert rows[0]["train/kl_coef"] == (0.2 if algorithm == "ppo" else 0.05)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "value_head.safetensors").is_file() == (algorithm == "ppo")
    assert not (out / "checkpoint").exists()
    doc = json.loads((out / "expert.json").read_text())
    assert doc["side"] == "P2A" and doc["algorithm"] == algorithm and doc["kind"] == "expert"
    assert doc["base"]["model_type"] == "llama" and doc["metrics"] == result
    assert doc["config"]["lr"] == rl.DEFAULT_LR[algorithm]
    assert result["steps"] == 3
    # The adapter loads back with peft onto the base and changes it.
    from peft import PeftModel

    from personalign.models import load_model

    base, _ = load_model(str(tiny_model_dir), device="cpu")
    peft = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert any(float(p.abs().sum()) > 0 for n, p in peft.named_parameters() if "lora_B" in n)
    # Running the finished command again returns its result without training.
    assert te.main(cfg) == result
    assert len(_rows(out)) == 3


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_resume_after_interruption_is_exact(tmp_path, tiny_model_dir, monkeypatch, algorithm):
    from safetensors.torch import load_file

    common = {"algorithm": algorithm, "steps": 5, "checkpoint_every": 2, "reward": f"{__name__}:e_share",
              "lora": LoraSpec(r=4, alpha=8, dropout=0.05), "lr": 1e-2}
    if algorithm == "ppo":
        common.update(ppo_epochs=1, kl_coef=0.5)
    te.main(_cfg(tmp_path, tiny_model_dir, "full", **common))

    # Fail in the optimizer step of step 4: step 3 is logged but only step 2 is checkpointed.
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        te.main(_cfg(tmp_path, tiny_model_dir, "resumed", **common))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed_dir = tmp_path / "resumed"
    assert (resumed_dir / "checkpoint").exists() and [r["step"] for r in _rows(resumed_dir)] == [1, 2, 3]
    te.main(_cfg(tmp_path, tiny_model_dir, "resumed", **common))

    full_rows, resumed_rows = _rows(tmp_path / "full"), _rows(resumed_dir)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5]  # step 3 redone, not duplicated
    for a, b in zip(full_rows, resumed_rows):
        assert {k: v for k, v in a.items() if k.startswith("train/")} == \
               {k: v for k, v in b.items() if k.startswith("train/")}
    fa = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    fb = load_file(str(resumed_dir / "adapter" / "adapter_model.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_changed_config_is_refused(tmp_path, tiny_model_dir):
    te.main(_cfg(tmp_path, tiny_model_dir, steps=1))
    with pytest.raises(ConfigError, match="different config.*lr"):
        te.main(_cfg(tmp_path, tiny_model_dir, steps=1, lr=1e-3))


def test_kl_stop_keeps_the_last_policy_within_the_limit(tmp_path, tiny_model_dir):
    # Step 1 samples from the untouched policy (KL exactly 0); its update moves the policy, so step 2's
    # samples are more than 1e-6 nats away (k3, never negative): the run stops there and keeps step 1's
    # policy (lora_B = 0).
    cfg = _cfg(tmp_path, tiny_model_dir, steps=5, lr=1e-2, kl_stop=1e-6, kl_estimator="k3")  # k3 >= 0
    result = te.main(cfg)
    out = tmp_path / "run"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["train/kl"] > 1e-6
    doc = json.loads((out / "expert.json").read_text())
    assert doc["stopped"] == {"step": 2, "kl": rows[1]["train/kl"], "kl_stop": 1e-6, "kept_step": 1}
    assert result["steps"] == 1 and result["train/kl_last"] == 0.0  # the kept policy's numbers
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().sum()) == 0 for v in lora_b)
    assert not (out / "checkpoint").exists()

    # Without the guard the same run goes on to the end.
    te.main(dataclasses.replace(cfg, output_dir=str(tmp_path / "free"), kl_stop=None, steps=3))
    assert [r["step"] for r in _rows(tmp_path / "free")] == [1, 2, 3]


@pytest.mark.parametrize(("change", "match"), [
    ({"side": "P9Z"}, "unknown preference side 'P9Z'"),
    ({"reward": "no_such_module_xyz:fn"}, "cannot import module 'no_such_module_xyz'"),
    ({"reward": f"{__name__}:missing_fn"}, "has no attribute 'missing_fn'"),
    ({"reward": f"{__name__}:NOT_CALLABLE"}, "not callable"),
    ({"reward": "rm:/no/such/folder"}, "does not exist"),
    ({"reward": "offline", "side": "P3C"}, "cannot score side P3C"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"algorithm": "rloo", "group_size": 1}, "group_size must be at least 2 for rloo"),
    ({"algorithm": "dpo"}, "algorithm must be one of rloo, grpo, ppo"),
    ({"kl_estimator": "k9"}, "kl_estimator must be one of k1, k3"),
    ({"kl_stop": 0.0}, "kl_stop must be a positive number"),
    ({"ontopic_coef": -1.0}, "ontopic_coef must be a finite number >= 0"),
    ({"ontopic_coef": float("nan")}, "ontopic_coef must be a finite number >= 0"),
    ({"repeat_coef": -0.5}, "repeat_coef must be a finite number >= 0"),
    ({"repeat_coef": float("inf")}, "repeat_coef must be a finite number >= 0"),
    ({"temperature": 0.0}, "temperature must be in"),
    ({"minibatch_size": 99}, "minibatch_size must be between 1 and"),
    ({"lora": LoraSpec(r=4, dropout=1.5)}, r"lora.dropout must be in \[0, 1\)"),
    ({"prompts": "/no/such/prompts.jsonl"}, "does not exist"),
    ({"lora": LoraSpec(r=4, top_layers=1)}, "lora.top_layers must be null for a policy adapter"),
    ({"model": "./no-such-model-folder"}, "model folder './no-such-model-folder' does not exist"),
])
def test_bad_input_fails_before_any_model_loads(tmp_path, tiny_model_dir, monkeypatch, change, match):
    import personalign.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(personalign.models, "load_model", no_load)
    with pytest.raises(PersonalignError, match=match):
        te.main(_cfg(tmp_path, tiny_model_dir, **change))
    assert not (tmp_path / "run").exists()


def test_ontopic_coef_adds_coverage_to_the_normalised_score(tmp_path, tiny_model_dir, monkeypatch):
    """The same seeded step with ontopic_coef 0 and 2: the update sees the normalised score plus 2 x each
    sample's question coverage, and the coverage is logged either way."""
    fixed = [0.5, 0.0, 1.0, 0.25]
    seen = record_rl_scores(te, monkeypatch, fixed)
    for name, coef in (("plain", 0.0), ("ontopic", 2.0)):
        te.main(_cfg(tmp_path, tiny_model_dir, name=name, steps=1, ontopic_coef=coef))
        assert _rows(tmp_path / name)[0]["train/coverage"] == pytest.approx(sum(fixed) / 4)
    assert torch.allclose(seen[1], seen[0] + 2.0 * torch.tensor(fixed, dtype=seen[0].dtype))


def test_repeat_coef_subtracts_the_repeated_share_from_the_normalised_score(tmp_path, tiny_model_dir, monkeypatch):
    """The same seeded step with repeat_coef 0 and 3 (on-topic term on in both): the update sees the score
    minus 3 x each sample's share of repeated 3-grams, which is logged either way."""
    coverage, repeats = [0.5, 0.0, 1.0, 0.25], [0.0, 0.8, 0.1, 0.0]
    seen = record_rl_scores(te, monkeypatch, coverage, repeats)
    for name, coef in (("plain", 0.0), ("repeat", 3.0)):
        te.main(_cfg(tmp_path, tiny_model_dir, name=name, steps=1, ontopic_coef=1.0, repeat_coef=coef))
        assert _rows(tmp_path / name)[0]["train/repetition_3"] == pytest.approx(sum(repeats) / 4)
    assert torch.allclose(seen[1], seen[0] - 3.0 * torch.tensor(repeats, dtype=seen[0].dtype))


def test_config_loads_from_overrides():
    cfg = load_config(te.TrainExpertConfig, None, ["side=P1A", "output_dir=/tmp/x", "algorithm=ppo",
                                                   "lora.r=8", "reward=rm:runs/rm-P1A", "steps=10"])
    # lora.r=8 changes the rank of train-expert's own LoRA default (alpha 32, no dropout), nothing else
    assert cfg.lora == LoraSpec(r=8, alpha=32, dropout=0.0) and cfg.algorithm == "ppo"
    resolved = rl.resolve_defaults(cfg)
    resolved_fields = (resolved.lr, resolved.kl_coef, resolved.ppo_epochs, resolved.adaptive_kl)
    assert resolved_fields == (1.4e-5, 0.2, 8, True)
    assert rl.resolve_defaults(te.TrainExpertConfig(side="P1A", output_dir="x")).lr == 5e-5
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(te.TrainExpertConfig, None, ["side=P1A", "output_dir=x", "learning_rate=1"])


def test_strong_reward_is_learned(tmp_path, tiny_model_dir):
    """+ the share of e's in the response: with LoRA on the output layer the tiny model can move its
    next-token distribution, and the raw reward rises well above its start within 20 steps. (Seed 1: the
    samples are per-sample seeded; seeds 1 and 2 rise about 6x, seed 0's samples only 1.6x in 20 steps.)"""
    cfg = _cfg(tmp_path, tiny_model_dir, reward=f"{__name__}:e_share", steps=20, batch_prompts=4, seed=1,
               group_size=4, max_new_tokens=10, lr=2e-2, kl_coef=0.0, checkpoint_every=100,
               lora=LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj", "lm_head")))
    result = te.main(cfg)
    rows = _rows(tmp_path / "run")
    first = sum(r["train/reward_raw"] for r in rows[:5]) / 5
    last = sum(r["train/reward_raw"] for r in rows[-5:]) / 5
    assert last > 2 * first and last > 0.25, (first, last)
    assert result["train/reward_raw_last"] > result["train/reward_raw_first"]


def test_rl_prompts_and_unseen_prompts_read_what_each_expert_trained_on(tmp_path):
    from personalign.errors import ConfigError
    from personalign.provenance import rl_prompts, unseen_prompts

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)))
    experts = tmp_path / "experts"
    for side, (steps, seed) in {"P1A": (1, 0), "P1B": (2, 5)}.items():
        (experts / side).mkdir(parents=True)
        (experts / side / "config.json").write_text(json.dumps(
            {"prompts": str(prompts), "steps": steps, "batch_prompts": 2, "seed": seed}))
    seen = set()
    for side, (steps, seed) in {"P1A": (1, 0), "P1B": (2, 5)}.items():
        source, idx = rl_prompts(experts / side)
        want = sorted({i for s in range(steps) for i in rl.step_prompt_indices(10, 2, s, seed)})
        assert source == str(prompts) and idx == want
        seen |= set(want)
    free = sorted(set(range(10)) - seen)
    source, idx = unseen_prompts(experts, len(free), seed=0)
    assert source == str(prompts) and sorted(idx) == free  # every unseen one, none seen
    assert unseen_prompts(experts, 2, seed=0)[1] == idx[:2]  # a prefix of one seeded order
    assert unseen_prompts(experts, len(free), seed=1)[1] != idx
    with pytest.raises(ConfigError, match=f"only {len(free)} instructions"):
        unseen_prompts(experts, len(free) + 1)
    (experts / "P1B" / "config.json").write_text(json.dumps(
        {"prompts": "builtin:train", "steps": 1, "batch_prompts": 2, "seed": 0}))
    with pytest.raises(ConfigError, match="different prompt sources"):
        unseen_prompts(experts, 1)
