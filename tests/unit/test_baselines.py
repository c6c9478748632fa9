"""The paper's trained baselines on the tiny random llama: Multitask (supervised, TRL's SFTTrainer),
P-MORL (one RL policy over combinations, each response scored on its own combination's sides) and
RLHF (train-expert with a user-declared general side). Bad input fails before any model loads."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import record_rl_scores

from personalign.errors import PersonalignError
from personalign import rl
from personalign.recipes import train_expert as te
from personalign.recipes import train_multitask as mt
from personalign.recipes import train_pmorl as pm
from personalign.reward_model import LoraSpec

DOCS = Path(__file__).resolve().parents[2] / "docs" / "baselines.md"
SMALL_LORA = LoraSpec(r=4, alpha=8, dropout=0.05, target_modules=("q_proj", "v_proj"))

# -- rewards the recipes import as module:function ---------------------------------------------------

CALLS: list[tuple[str, list[str], list[str]]] = []  # (side, prompts, responses) of every reward call
LETTERS = {"P1A": "a", "P1B": "e", "P2A": "i", "P2B": "o", "P3A": "s", "P3B": "t"}


def _letter_reward(side: str):
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        """Depends on the response only: a letter's share plus a little length."""
        CALLS.append((side, list(prompts), list(responses)))
        return [r.count(LETTERS[side]) / max(1, len(r)) + 0.01 * len(r) for r in responses]

    return reward


r_P1A, r_P1B, r_P2A, r_P2B, r_P3A, r_P3B = (_letter_reward(s) for s in LETTERS)
SIDE_REWARDS = {s: f"{__name__}:r_{s}" for s in LETTERS}


def general_quality(prompts: list[str], responses: list[str]) -> list[float]:
    """Stands in for a general "better response" reward model: prefers answers of about 20 characters."""
    return [-abs(len(r) - 20) / 20 for r in responses]


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _loads_with_peft(tiny_model_dir: Path, folder: Path) -> None:
    from peft import PeftModel

    from personalign.models import load_model

    base, _ = load_model(str(tiny_model_dir), device="cpu")
    peft = PeftModel.from_pretrained(base, str(folder / "adapter"))
    assert any(float(p.abs().sum()) > 0 for n, p in peft.named_parameters() if "lora_B" in n)


@pytest.fixture()
def no_model_load(monkeypatch):
    """Any model load fails the test: validation must raise first."""

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("personalign.models.load_model", boom)


def _interrupt_at_optimizer_step(monkeypatch, n: int) -> Callable[[], None]:
    """Make the n-th AdamW step raise KeyboardInterrupt; returns the undo function."""
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    return lambda: monkeypatch.setattr(torch.optim.AdamW, "step", real_step)


# -- Multitask ---------------------------------------------------------------------------------------

PAIRS = [
    {"prompt": "Explain photosynthesis to me.", "chosen": "Plants use sunlight to make sugar.",
     "rejected": "No idea.", "side": "P1A"},
    {"prompt": "Explain photosynthesis to me.", "chosen": "Plants make sugar.", "rejected": "Long text.",
     "side": "P2A"},
    {"prompt": "How do I bake bread at home?", "chosen": "Mix flour, water and yeast, then bake it.",
     "rejected": "Buy it.", "side": "P2B"},
    {"prompt": "Compare stocks and bonds.", "chosen": "Stocks are shares; bonds are loans.", "rejected": "Eh.",
     "side": "P3A"},
    {"prompt": "Compare stocks and bonds.", "chosen": "Stocks are shares; bonds are loans.", "rejected": "Hm.",
     "side": "P3A"},  # a repeat of the line above: trained once
]


def _write_pairs(path: Path, rows: list[dict] = PAIRS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mt_cfg(tmp: Path, tiny_model_dir: Path, name: str, **kw) -> mt.TrainMultitaskConfig:
    base = {"pairs": str(_write_pairs(tmp / "pairs.jsonl")), "output_dir": str(tmp / name),
            "model": str(tiny_model_dir), "device": "cpu", "lora": SMALL_LORA, "lr": 1e-2, "max_steps": 4,
            "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "progress": False}
    return mt.TrainMultitaskConfig(**{**base, **kw})


def test_example_trains_on_the_response_and_eos_only(tiny):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from personalign.data import build_user_message, format_chat

    _, tok = tiny
    side_prompt = "Generate a response in a sassy manner."
    ex = mt.build_example(tok, "Explain photosynthesis to me.", side_prompt, " Plants use sunlight. ", 512)
    prompt_ids = tok(format_chat(tok, build_user_message("Explain photosynthesis to me.", side_prompt)),
                     add_special_tokens=False)["input_ids"]
    response_ids = tok("Plants use sunlight.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == prompt_ids + response_ids
    assert ex["labels"] == [-100] * len(prompt_ids) + response_ids
    # pad == eos here: the prompt's own end-of-turn tokens are masked, the response's final one is trained.
    assert tok.pad_token_id == tok.eos_token_id and tok.eos_token_id in prompt_ids
    assert ex["labels"][-1] == tok.eos_token_id

    # The trainer's collator pads with -100 labels by length, never by comparing ids with the pad id.
    short = mt.build_example(tok, "Hi", "", "Yes.", 512)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([ex, short])
    n = len(short["input_ids"])
    assert batch["labels"][1, :n].tolist() == short["labels"]
    assert (batch["labels"][1, n:] == -100).all() and (batch["attention_mask"][1, n:] == 0).all()
    assert batch["labels"][0].tolist() == ex["labels"]

    # A response cut by max_length loses its end-of-sequence; a prompt filling max_length is an error.
    cut = mt.build_example(tok, "Explain photosynthesis to me.", side_prompt, "Plants use sunlight.",
                           len(prompt_ids) + 2)
    assert cut["labels"] == [-100] * len(prompt_ids) + response_ids[:2]
    with pytest.raises(PersonalignError, match="max_length"):
        mt.build_example(tok, "Explain photosynthesis to me.", side_prompt, "x", len(prompt_ids))


@pytest.fixture(scope="module")
def mt_full(tiny_model_dir, tmp_path_factory):
    """One uninterrupted multitask run, shared by the tests that inspect or compare with it."""
    tmp = tmp_path_factory.mktemp("mt")
    cfg = _mt_cfg(tmp, tiny_model_dir, "full")
    return cfg, mt.main(cfg)


def test_multitask_trains_saves_loads_and_does_not_retrain(mt_full, tiny_model_dir):
    cfg, result = mt_full
    out = Path(cfg.output_dir)
    rows = [r for r in _rows(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["train/loss"] == r["train/loss"] and "train/lr" in r for r in rows)
    assert not (out / "checkpoint").exists()
    doc = json.loads((out / "expert.json").read_text())
    assert doc["kind"] == "multitask" and doc["sides"] == ["P1A", "P2A", "P2B", "P3A"]
    assert doc["metrics"] == result and result["data/examples"] == 4 and result["steps"] == 4
    _loads_with_peft(tiny_model_dir, out)
    n_rows = len(_rows(out))
    assert mt.main(cfg) == result  # finished: returns its result, trains nothing
    assert len(_rows(out)) == n_rows
    assert json.loads((out / "data.json").read_text())["examples"] == {"P1A": 1, "P2A": 1, "P2B": 1, "P3A": 1}


def test_multitask_never_resumes_on_other_pairs(tiny_model_dir, tmp_path, monkeypatch):
    undo = _interrupt_at_optimizer_step(monkeypatch, 4)
    cfg = _mt_cfg(tmp_path, tiny_model_dir, "run")
    with pytest.raises(KeyboardInterrupt):
        mt.main(cfg)
    undo()
    changed = [{**PAIRS[0], "chosen": "Plants turn sunlight into sugar."}, *PAIRS[1:]]
    _write_pairs(tmp_path / "pairs.jsonl", changed)  # the pairs file changed between the two runs
    with pytest.raises(PersonalignError, match=r"was trained on other examples .* move the folder away"):
        mt.main(cfg)


def test_multitask_resumes_from_its_checkpoint(mt_full, tiny_model_dir, tmp_path, monkeypatch):
    full_cfg, _ = mt_full
    undo = _interrupt_at_optimizer_step(monkeypatch, 4)  # step 3 logged, step 2 checkpointed
    cfg = _mt_cfg(tmp_path, tiny_model_dir, "resumed")
    with pytest.raises(KeyboardInterrupt):
        mt.main(cfg)
    undo()
    out = Path(cfg.output_dir)
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["progress"]["step"] == 2
    mt.main(cfg)
    full_rows = [r for r in _rows(Path(full_cfg.output_dir)) if "train/loss" in r]
    rows = [r for r in _rows(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3 redone, not duplicated
    assert [r["train/loss"] for r in rows] == pytest.approx([r["train/loss"] for r in full_rows], abs=1e-5)
    want, got = _adapter(Path(full_cfg.output_dir)), _adapter(out)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("lines, kw, match", [
    ([], {}, "is empty"),
    ([PAIRS[0], "{not json"], {}, r"pairs.jsonl:2: malformed JSON"),
    ([PAIRS[0], {"prompt": "Hi", "chosen": "Yes."}], {}, r"pairs.jsonl:2: field\(s\) side missing"),
    ([PAIRS[0], {**PAIRS[1], "chosen": " "}], {}, r"pairs.jsonl:2: field\(s\) chosen"),
    ([{**PAIRS[0], "side": "P9Z"}], {}, r"pairs.jsonl:1: unknown side 'P9Z'"),
    ([PAIRS[0]], {"sides": ("P1A", "P3B")}, "no pairs for side\\(s\\) P3B"),
    ([PAIRS[0]], {"lr": -1.0}, "lr must be"),
    ([PAIRS[0]], {"lora": LoraSpec(top_layers=1)}, "lora.top_layers"),
])
def test_multitask_bad_input_fails_before_model_loads(tmp_path, no_model_load, lines, kw, match):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    cfg = mt.TrainMultitaskConfig(pairs=str(path), output_dir=str(tmp_path / "run"), **kw)
    with pytest.raises(PersonalignError, match=match):
        mt.main(cfg)
    assert not (tmp_path / "run").exists()


# -- P-MORL ------------------------------------------------------------------------------------------


def _pm_cfg(tmp: Path, tiny_model_dir: Path, name: str, **kw) -> pm.TrainPMORLConfig:
    base = {"output_dir": str(tmp / name), "model": str(tiny_model_dir), "rewards": SIDE_REWARDS, "steps": 3,
            "batch_prompts": 2, "group_size": 2, "max_new_tokens": 6, "progress": False, "device": "cpu",
            "limit": 8, "checkpoint_every": 2, "lora": SMALL_LORA}
    return pm.TrainPMORLConfig(**{**base, **kw})


def test_config_repeats_train_expert_fields_with_its_defaults():
    def default(f: dataclasses.Field):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    ours = {f.name: f for f in dataclasses.fields(pm.TrainPMORLConfig)}
    for f in dataclasses.fields(te.TrainExpertConfig):
        if f.name in ("side", "reward"):
            continue
        assert f.name in ours, f.name
        assert default(ours[f.name]) == default(f), f.name  # the LoRA included: the experts' adapter
    # Both configs carry every RL setting the shared RL code reads.
    shared = set(rl.RLSettings.__annotations__)
    assert shared <= set(ours) and shared <= {f.name for f in dataclasses.fields(te.TrainExpertConfig)}


def test_step_combinations_are_seeded_per_step():
    draws = [pm.step_combinations(8, 4, s, seed=0) for s in range(50)]
    assert all(0 <= k < 8 for d in draws for k in d)
    assert {k for d in draws for k in d} == set(range(8))
    assert pm.step_combinations(8, 4, 7, seed=0) == draws[7]
    assert pm.step_combinations(8, 4, 7, seed=1) != draws[7] or pm.step_combinations(8, 4, 8, seed=1) != draws[8]


def test_each_response_is_scored_on_its_own_combinations_sides():
    from personalign.preferences import default_space

    space = default_space()
    combos = space.combinations()
    fns = {s: getattr(__import__(__name__), f"r_{s}") for s in LETTERS}
    combined, stats = pm.combination_rewards(combos, fns)
    keys = ["P1A,P2A,P3A", "P1A,P2A,P3A", "P1B,P2B,P3B", "P1B,P2B,P3B", "P1A,P2A,P3A"]
    prompts = ["Hi", "Hi", "Why?", "Why?", "Hi"]
    responses = ["aaa ii s", "eee", "tttt oo", "e", "aaa ii s"]
    CALLS.clear()
    scores = pm.score_samples(combined, keys, prompts, responses)

    # Each side's reward saw exactly the responses of the samples whose combination holds that side,
    # with the instructions alone (the preference wording is the reward's business), never a response-less
    # prompt-only call.
    seen = {side: (p, r) for side, p, r in CALLS}
    assert set(seen) == set(LETTERS)
    for side in ("P1A", "P2A", "P3A"):
        assert seen[side] == (["Hi", "Hi", "Hi"], ["aaa ii s", "eee", "aaa ii s"])
    for side in ("P1B", "P2B", "P3B"):
        assert seen[side] == (["Why?", "Why?"], ["tttt oo", "e"])
    # The value: the mean of the sample's own sides' normalised rewards (disjoint sides: each side's
    # statistics were updated once, by this call).
    for i, key in enumerate(keys):
        sides = key.split(",")
        raw = {s: fns[s]([prompts[i]], [responses[i]])[0] for s in sides}
        want = sum(float(stats[s].normalize(torch.tensor(raw[s]))) for s in sides) / 3
        assert float(scores.combined[i]) == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert float(scores.raw[i]) == pytest.approx(sum(raw.values()) / 3, rel=1e-6)
    # Same prompt and combination, different responses: different rewards; same response: same reward.
    assert scores.combined[0] != scores.combined[1] and scores.combined[0] == scores.combined[4]
    assert set(scores.raw_by_side) == set(LETTERS) and scores.raw_by_side["P1B"].shape == (2,)
    # One running normalisation per side, shared by every combination holding it.
    assert combined["P1A,P2A,P3A"].stats["P1A"] is combined["P1A,P2B,P3B"].stats["P1A"] is stats["P1A"]


def test_pmorl_scores_the_sampled_responses_end_to_end(tmp_path, tiny_model_dir, monkeypatch):
    """The reward functions receive exactly the texts the policy sampled, each for the sides whose
    prompts were in what the policy saw, with the instruction alone as the prompt."""
    from personalign.preferences import default_space

    real_rollout = rl.rollout

    def recording(model, tok, texts, *a, **k):
        ro = real_rollout(model, tok, texts, *a, **k)
        CALLS.append(("rollout", list(texts), list(ro.texts)))  # marks the start of a step's calls
        return ro

    monkeypatch.setattr(pm, "rollout", recording)
    CALLS.clear()
    pm.main(_pm_cfg(tmp_path, tiny_model_dir, "run", steps=2))
    marks = [i for i, c in enumerate(CALLS) if c[0] == "rollout"] + [len(CALLS)]
    assert len(marks) == 3
    prompts_of = {s: default_space().sides[s].prompt for s in LETTERS}
    for start, stop in itertools.pairwise(marks):
        _, texts, responses = CALLS[start]
        assert any(responses)  # something was written, so the comparison below means something
        want: dict[str, list[str]] = {s: [] for s in LETTERS}
        for text, response in zip(texts, responses):
            sides = [s for s in LETTERS if prompts_of[s] in text]
            assert len(sides) == 3  # one side per dimension
            for s in sides:
                want[s].append(response)
        got: dict[str, list[str]] = {s: [] for s in LETTERS}
        for side, prompts, resp in CALLS[start + 1 : stop]:
            got[side].extend(resp)
            assert not any(p in x for p in prompts_of.values() for x in prompts)  # instructions only
            assert all(any(x in t for t in texts) for x in prompts)  # ... of this step's prompts
        assert {s: sorted(v) for s, v in got.items()} == {s: sorted(v) for s, v in want.items()}


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_pmorl_trains_logs_and_saves(tmp_path, tiny_model_dir, algorithm):
    extra = {"ppo_epochs": 2, "minibatch_size": 2} if algorithm == "ppo" else {}
    cfg = _pm_cfg(tmp_path, tiny_model_dir, "run", algorithm=algorithm, **extra)
    result = pm.main(cfg)
    out = tmp_path / "run"
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("train/reward", "train/reward_raw", "train/reward_combined", "train/kl", "train/loss",
                "train/entropy", "train/response_length", "time/step_seconds"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert rows[0]["train/kl"] == 0.0  # step 1 samples from the untouched policy
    assert any(k.startswith("train/reward_raw/P") for k in rows[0])
    assert ("train/value_loss" in rows[0]) == (algorithm == "ppo")
    doc = json.loads((out / "expert.json").read_text())
    assert doc["kind"] == "pmorl" and doc["algorithm"] == algorithm
    assert doc["sides"] == list(LETTERS) and len(doc["combinations"]) == 8
    assert doc["rewards"]["P1A"] == SIDE_REWARDS["P1A"] and doc["metrics"] == result
    assert (out / "value_head.safetensors").is_file() == (algorithm == "ppo")
    assert not (out / "checkpoint").exists()
    _loads_with_peft(tiny_model_dir, out)
    assert pm.main(cfg) == result and len(_rows(out)) == 3


def test_pmorl_kl_stop_keeps_the_last_policy_within_the_limit(tmp_path, tiny_model_dir):
    # As train-expert's guard: step 1 samples the untouched policy (k3 KL 0), step 2 a moved one.
    pm.main(_pm_cfg(tmp_path, tiny_model_dir, "run", steps=4, lr=1e-2, kl_stop=1e-6, kl_estimator="k3"))
    doc = json.loads((tmp_path / "run" / "expert.json").read_text())
    assert doc["stopped"]["step"] == 2 and doc["stopped"]["kept_step"] == 1 and doc["metrics"]["steps"] == 1
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(float(v.abs().sum()) == 0 for k, v in weights.items() if "lora_B" in k)


def test_pmorl_resume_after_interruption_is_exact(tmp_path, tiny_model_dir, monkeypatch):
    common = {"steps": 5, "checkpoint_every": 2, "lr": 1e-2}
    pm.main(_pm_cfg(tmp_path, tiny_model_dir, "full", **common))
    undo = _interrupt_at_optimizer_step(monkeypatch, 4)  # step 3 logged, step 2 checkpointed
    with pytest.raises(KeyboardInterrupt):
        pm.main(_pm_cfg(tmp_path, tiny_model_dir, "resumed", **common))
    undo()
    resumed = tmp_path / "resumed"
    assert (resumed / "checkpoint").exists() and [r["step"] for r in _rows(resumed)] == [1, 2, 3]
    pm.main(_pm_cfg(tmp_path, tiny_model_dir, "resumed", **common))
    full_rows, resumed_rows = _rows(tmp_path / "full"), _rows(resumed)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3, 4, 5]
    for a, b in zip(full_rows, resumed_rows):
        assert {k: v for k, v in a.items() if k.startswith("train/")} == \
               {k: v for k, v in b.items() if k.startswith("train/")}
    want, got = _adapter(tmp_path / "full"), _adapter(resumed)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_pmorl_bad_input_fails_before_model_loads(tmp_path, no_model_load):
    def run(**kw):
        cfg = pm.TrainPMORLConfig(output_dir=str(tmp_path / "run"), **kw)
        pm.main(cfg)

    cases = [
        ({"sides": ("P1A", "P9Z")}, "unknown preference side 'P9Z'"),
        ({"rewards": {"sassy": "offline"}}, r"rewards.sassy: side P3C is not in any combination"),
        ({"reward": "no_such_module:fn"}, "cannot import module"),
        ({"rewards": {"P1A": "rm:/no/such/folder"}}, "does not exist"),
        ({"group_size": 1}, "group_size must be at least 2"),
        ({"lr": -1.0}, "lr must be"),
        ({"algorithm": "dpo"}, "algorithm must be one of"),
        ({"prompts": str(tmp_path / "missing.jsonl")}, "does not exist"),
        ({"lora": LoraSpec(top_layers=1)}, "lora.top_layers"),
    ]
    for kw, match in cases:
        with pytest.raises(PersonalignError, match=match):
            run(**kw)
    assert not (tmp_path / "run").exists()


# -- RLHF: train-expert with a user-declared general side -------------------------------------------

QUALITY_YAML = """\
dimensions:
  - name: quality
    sides:
      - name: helpful
        prompt: Generate a helpful, accurate and harmless response.
        criterion: Choose the response that is more helpful, accurate and harmless overall.
      - name: unhelpful
        prompt: Generate an unhelpful response.
        criterion: Choose the response that is less helpful.
"""


def test_rlhf_is_train_expert_on_a_general_side(tmp_path, tiny_model_dir):
    from personalign.config import load_config

    dims = tmp_path / "quality.yaml"
    dims.write_text(QUALITY_YAML)
    out = tmp_path / "rlhf"
    # The documented command's overrides, through the strict config loader the CLI uses.
    cfg = load_config(te.TrainExpertConfig, None, [
        "side=helpful", f"output_dir={out}", f"reward={__name__}:general_quality", f"model={tiny_model_dir}",
        f"dimensions={dims}", "steps=2", "batch_prompts=2", "group_size=2", "max_new_tokens=6", "limit=4",
        "device=cpu", "progress=false", "lora.r=4", "lora.alpha=8", "lora.target_modules=q_proj,v_proj"])
    result = te.main(cfg)
    doc = json.loads((out / "expert.json").read_text())
    assert doc["kind"] == "expert" and doc["side"] == "P4A" and doc["side_name"] == "helpful"
    assert doc["policy_prompt"] == "Generate a helpful, accurate and harmless response."
    assert doc["reward"] == f"{__name__}:general_quality" and result["steps"] == 2
    _loads_with_peft(tiny_model_dir, out)


# -- the documentation ------------------------------------------------------------------------------


def test_documented_commands_use_real_fields_and_the_yaml_parses(tmp_path):
    """Every --set field in docs/baselines.md exists in its recipe's config, and its dimensions YAML
    is the one the RLHF test runs."""
    from personalign.preferences import default_space

    text = DOCS.read_text()
    configs = {"train-multitask": mt.TrainMultitaskConfig, "train-pmorl": pm.TrainPMORLConfig,
               "train-expert": te.TrainExpertConfig}
    commands = re.findall(r"personalign (train-multitask|train-pmorl|train-expert)((?:[^\n]*\\\n)*[^\n]*)", text)
    assert {c for c, _ in commands} == set(configs)
    for name, args in commands:
        fields = {f.name for f in dataclasses.fields(configs[name])}
        for key in re.findall(r"--set ([\w.]+)=", args):
            assert key.split(".")[0] in fields, (name, key)
    block = re.search(r"```yaml\n(dimensions:.*?)```", text, re.DOTALL)
    assert block and block.group(1) == QUALITY_YAML
    dims = tmp_path / "quality.yaml"
    dims.write_text(block.group(1))
    assert default_space().extended_from_yaml(dims).resolve("helpful") == "P4A"


def test_pmorl_ontopic_coef_adds_coverage_to_the_normalised_score(tmp_path, tiny_model_dir, monkeypatch):
    """As in train-expert: the same seeded step with ontopic_coef 0 and 1.5 differs in the update's score by
    1.5 x each sample's question coverage, and the coverage is logged either way."""
    fixed = [0.5, 0.0, 1.0, 0.25]
    seen = record_rl_scores(pm, monkeypatch, fixed)
    for name, coef in (("plain", 0.0), ("ontopic", 1.5)):
        pm.main(_pm_cfg(tmp_path, tiny_model_dir, name, steps=1, ontopic_coef=coef))
        assert _rows(tmp_path / name)[0]["train/coverage"] == pytest.approx(sum(fixed) / 4)
    assert torch.allclose(seen[1], seen[0] + 1.5 * torch.tensor(fixed, dtype=seen[0].dtype))
    with pytest.raises(PersonalignError, match="ontopic_coef must be a finite number >= 0"):
        pm.main(_pm_cfg(tmp_path, tiny_model_dir, "bad", ontopic_coef=-1.0))


def test_pmorl_repeat_coef_subtracts_the_repeated_share(tmp_path, tiny_model_dir, monkeypatch):
    """As in train-expert: repeat_coef 2 lowers the update's score by 2 x each sample's repeated-3-gram share."""
    coverage, repeats = [0.5, 0.0, 1.0, 0.25], [0.3, 0.0, 0.0, 0.6]
    seen = record_rl_scores(pm, monkeypatch, coverage, repeats)
    for name, coef in (("plain", 0.0), ("repeat", 2.0)):
        pm.main(_pm_cfg(tmp_path, tiny_model_dir, name, steps=1, repeat_coef=coef))
        assert _rows(tmp_path / name)[0]["train/repetition_3"] == pytest.approx(sum(repeats) / 4)
    assert torch.allclose(seen[1], seen[0] - 2.0 * torch.tensor(repeats, dtype=seen[0].dtype))
    with pytest.raises(PersonalignError, match="repeat_coef must be a finite number >= 0"):
        pm.main(_pm_cfg(tmp_path, tiny_model_dir, "bad", repeat_coef=float("nan")))
