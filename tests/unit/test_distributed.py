"""Data parallelism: every training recipe (train-expert, train-rm, train-pcm, train-multitask,
train-pmorl) started by torchrun as two CPU processes (gloo) on the same global batch gives the
one-process weights, and a two-process run killed after a checkpoint resumes to them.

Under FSDP (the shipped accelerate config, two CPU processes), train-rm and train-expert shard the
frozen base weights and still give the one-process weights.

The runs go through the real CLI: this file is also the launched script (``__main__`` below), which
runs ``personalign.cli`` and, with ``PERSONALIGN_TEST_DIE_AT=N``, kills rank 1 in its N-th optimizer
step (as a killed machine would), after the checkpoint of the step before. Each process reports how
much of the frozen weights it holds after :meth:`Dist.shard_frozen` (``shards: rank R holds X of Y``).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from personalign import distributed

HERE = Path(__file__).resolve()
DIE_AT = "PERSONALIGN_TEST_DIE_AT"


def e_share(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the letter e in each response (a reward that differs between samples)."""
    return [r.count("e") / max(1, len(r)) for r in responses]


def length(prompts: list[str], responses: list[str]) -> list[float]:
    """Characters / 20: a second reward, on another scale."""
    return [len(r) / 20 for r in responses]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int, die_at: int | None = None, accelerate: bool = False, config: str = "multi_cpu"
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           distributed.TIMEOUT_ENV: "2", "OMP_NUM_THREADS": "1"}
    env.pop(DIE_AT, None)
    if die_at is not None:
        env[DIE_AT] = str(die_at)
    if accelerate:  # a shipped config (multi_cpu: two CPU processes; fsdp: two processes, device=cpu)
        path = Path(distributed.__file__).parent / "configs" / "accelerate" / f"{config}.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
               "--num_processes", str(nproc), "--main_process_port", str(_free_port()), str(HERE), *args]
    elif nproc == 1:
        cmd = [sys.executable, str(HERE), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(HERE), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same(a: Path, b: Path) -> float:
    """The two files' tensors agree to float tolerance; returns the largest absolute difference."""
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _expert_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    sets = {"steps": 3, "batch_prompts": 3, "group_size": 2, "max_new_tokens": 6, "limit": 8, "device": "cpu",
            "progress": "false", "lr": "1e-2", "checkpoint_every": 2, "lora.r": 4, "lora.alpha": 8,
            "lora.target_modules": "q_proj,v_proj,lm_head"}
    args = ["train-expert", "--side", "P2A", "--reward", "test_distributed:e_share", "--model", str(model_dir),
            "-o", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


# -- the pieces --------------------------------------------------------------------------------------


def test_shards_cover_the_batch_in_order():
    for n in (1, 5, 8):
        for world in (1, 2, 3):
            slices = [distributed.Dist(rank=r, world=world).shard(n) for r in range(world)]
            assert [i for a, b in slices for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in slices) - min(b - a for a, b in slices) <= 1


def test_one_process_is_the_identity():
    d = distributed.init("cpu")
    assert d == distributed.Dist() and d.is_main and not d.active and d.resolve_device("auto") == "auto"
    x = torch.arange(3.0)
    assert d.all_sum(x) is x and d.gather(x) is x


def test_gather_objects_and_main_process_without_a_launcher(monkeypatch):
    d = distributed.Dist()
    assert d.gather_objects(["a", "b"]) == ["a", "b"]
    assert distributed.is_main_process()
    monkeypatch.setenv("RANK", "1")  # a launcher's second process, before any process group
    assert not distributed.is_main_process()


# -- two processes against one -----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_train_expert_two_processes_match_one(tmp_path, tiny_model_dir, algorithm):
    """3 prompts x 2 samples split 2 + 1 prompts; ppo with minibatches of 4 and 2 samples that fall
    unevenly on the processes (one minibatch may hold none of a process's samples)."""
    extra = ["--algorithm", algorithm]
    if algorithm == "ppo":
        extra += ["--set", "ppo_epochs=2", "--set", "minibatch_size=4", "--set", "kl_coef=0.5"]
    _ok(_run(_expert_args(tiny_model_dir, tmp_path / "two", *extra), nproc=2))
    _ok(_run(_expert_args(tiny_model_dir, tmp_path / "one", *extra), nproc=1))
    names = ["adapter/adapter_model.safetensors"] + (["value_head.safetensors"] if algorithm == "ppo" else [])
    for name in names:
        diff = _assert_same(tmp_path / "two" / name, tmp_path / "one" / name)
        print(f"{algorithm} {name}: max abs difference {diff:.2e}")
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):  # the logged metrics are the global batch's
        for k in ("train/reward_raw", "train/kl", "train/response_length", "train/loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_accelerate_launch_with_the_shipped_cpu_config_runs_two_processes(tmp_path, tiny_model_dir):
    args = _expert_args(tiny_model_dir, tmp_path / "two", "--set", "steps=1")
    proc = _run(args, nproc=2, accelerate=True)
    _ok(proc)
    assert proc.stdout.count('"steps": 1') == 1  # the result is printed once, by the main process
    _ok(_run(_expert_args(tiny_model_dir, tmp_path / "one", "--set", "steps=1"), nproc=1))
    name = "adapter/adapter_model.safetensors"
    _assert_same(tmp_path / "two" / name, tmp_path / "one" / name)


def test_train_expert_killed_after_checkpoint_resumes_exactly(tmp_path, tiny_model_dir):
    args = _expert_args(tiny_model_dir, tmp_path / "two", "--set", "steps=4")
    killed = _run(args, nproc=2, die_at=3)  # rank 1 dies in step 3; step 2 was checkpointed
    assert killed.returncode != 0
    ckpt = json.loads((tmp_path / "two" / "checkpoint" / "trainer.json").read_text())
    assert ckpt["progress"]["step"] == 2 and not (tmp_path / "two" / "adapter").exists()
    _ok(_run(args, nproc=2))
    _ok(_run(_expert_args(tiny_model_dir, tmp_path / "one", "--set", "steps=4"), nproc=1))
    name = "adapter/adapter_model.safetensors"
    diff = _assert_same(tmp_path / "two" / name, tmp_path / "one" / name)
    print(f"resumed expert: max abs difference {diff:.2e}")
    assert [r["step"] for r in _rows(tmp_path / "two")] == [1, 2, 3, 4]


def _pairs(path: Path, n: int = 24) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        short = " ".join(["rain"] * rng.randint(1, 3))
        long = " ".join(["water falls from the clouds"] * rng.randint(2, 4))
        side = "P2A" if i % 2 else "P1A"
        chosen, rejected = (short, long) if side == "P2A" else (long, short)
        rows.append({"prompt": f"Question {i}?", "chosen": chosen, "rejected": rejected, "side": side})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rm_args(model_dir: Path, pairs: Path, out: Path) -> list[str]:
    # batch_size 5 over 2 processes: slices of 3 and 2 pairs (the last batch of 4: 2 and 2)
    sets = {"lr": "5e-3", "epochs": 2, "batch_size": 5, "progress": "false", "device": "cpu", "checkpoint_every": 2,
            "lora.dropout": 0.0, "lora.r": 4, "eval_fraction": 0.2}
    args = ["train-rm", "--pairs", str(pairs), "--side", "P1A", "--side", "P2A", "--model", str(model_dir),
            "-o", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def test_train_rm_multi_head_two_processes_match_one(tmp_path, tiny_model_dir):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    _ok(_run(_rm_args(tiny_model_dir, pairs, tmp_path / "two"), nproc=2))
    _ok(_run(_rm_args(tiny_model_dir, pairs, tmp_path / "one"), nproc=1))
    diff = _assert_same(tmp_path / "two" / "reward_model.safetensors", tmp_path / "one" / "reward_model.safetensors")
    print(f"reward model: max abs difference {diff:.2e}")
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one):
        for k in ("train/loss", "train/accuracy", "eval/accuracy", "eval/loss", "probe/train_accuracy/P1A"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_train_rm_killed_after_checkpoint_resumes_exactly(tmp_path, tiny_model_dir):
    pairs = _pairs(tmp_path / "pairs.jsonl")
    args = _rm_args(tiny_model_dir, pairs, tmp_path / "two")
    killed = _run(args, nproc=2, die_at=3)
    assert killed.returncode != 0
    ckpt = json.loads((tmp_path / "two" / "checkpoint" / "trainer.json").read_text())
    assert ckpt["progress"]["step"] == 2 and not (tmp_path / "two" / "reward_model.safetensors").exists()
    _ok(_run(args, nproc=2))
    _ok(_run(_rm_args(tiny_model_dir, pairs, tmp_path / "one"), nproc=1))
    diff = _assert_same(tmp_path / "two" / "reward_model.safetensors", tmp_path / "one" / "reward_model.safetensors")
    print(f"resumed reward model: max abs difference {diff:.2e}")


# -- train-pcm: 3 pairs split 2 + 1, minibatches of 2 pairs (one may hold none of a process's pairs) ------


@pytest.fixture(scope="module")
def experts_dir(tiny_model_dir, tmp_path_factory):
    from conftest import save_side_experts

    return save_side_experts(tiny_model_dir, tmp_path_factory.mktemp("experts"), ("P1A", "P2A", "P3A"))


def _pcm_args(model_dir: Path, experts: Path, out: Path, *extra: str) -> list[str]:
    sets = {"steps": 3, "batch_prompts": 3, "minibatch_pairs": 2, "epochs": 2, "max_new_tokens": 5, "hidden": 16,
            "proj": 8, "limit": 8, "lr": "1e-3", "checkpoint_every": 2, "ref_batch_size": 2, "ref_temperature": 1.0,
            "device": "cpu", "dtype": "float32", "progress": "false", "rewards.P3A": "test_distributed:length"}
    args = ["train-pcm", "--experts", str(experts), "--model", str(model_dir), "--reward", "test_distributed:e_share",
            "-o", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


PCM_METRICS = ("train/loss", "train/utility", "train/utility_gap", "train/win_vs_ref", "train/weight_entropy",
               "train/log_ratio", "train/response_length", "train/weight/P1A", "train/reward/P3A")


@pytest.mark.parametrize("prior", [0.0, 0.5])
def test_train_pcm_two_processes_match_one(tmp_path, tiny_model_dir, experts_dir, prior):
    """prior 0.5: the prior term's token-mean share as well as REBEL's pair-mean share."""
    extra = ["--set", f"prior_coef={prior}"]
    _ok(_run(_pcm_args(tiny_model_dir, experts_dir, tmp_path / "two", *extra), nproc=2))
    _ok(_run(_pcm_args(tiny_model_dir, experts_dir, tmp_path / "one", *extra), nproc=1))
    diff = _assert_same(tmp_path / "two" / "pcm.safetensors", tmp_path / "one" / "pcm.safetensors")
    print(f"pcm (prior_coef {prior}): max abs difference {diff:.2e}")
    refs = [(tmp_path / d / "references.jsonl").read_text().splitlines() for d in ("two", "one")]
    assert sorted(refs[0]) == sorted(refs[1]) and refs[0]  # the same references, written once
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):  # the logged metrics are the global batch's
        for k in PCM_METRICS:
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_train_pcm_killed_after_checkpoint_resumes_exactly(tmp_path, tiny_model_dir, experts_dir):
    args = _pcm_args(tiny_model_dir, experts_dir, tmp_path / "two", "--set", "steps=4")
    killed = _run(args, nproc=2, die_at=9)  # 4 optimizer steps per step: rank 1 dies in step 3
    assert killed.returncode != 0
    ckpt = json.loads((tmp_path / "two" / "checkpoint" / "trainer.json").read_text())
    assert ckpt["progress"]["step"] == 2 and not (tmp_path / "two" / "pcm.safetensors").exists()
    _ok(_run(args, nproc=2))
    _ok(_run(_pcm_args(tiny_model_dir, experts_dir, tmp_path / "one", "--set", "steps=4"), nproc=1))
    diff = _assert_same(tmp_path / "two" / "pcm.safetensors", tmp_path / "one" / "pcm.safetensors")
    print(f"resumed pcm: max abs difference {diff:.2e}")
    assert [r["step"] for r in _rows(tmp_path / "two")] == [1, 2, 3, 4]


# -- train-multitask: 7 examples, steps of 3 x 2 (the last of an epoch: 1 example, none for rank 1) --------


def _examples(path: Path) -> Path:
    rows = [{"prompt": f"Question {i}?", "chosen": " ".join(["water falls from the clouds"] * (1 + i % 3)),
             "rejected": "no", "side": ("P1A", "P2A", "P3B")[i % 3]} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mt_args(model_dir: Path, pairs: Path, out: Path) -> list[str]:
    sets = {"epochs": 2, "batch_size": 3, "grad_accum": 2, "lr": "1e-2", "checkpoint_every": 2, "log_every": 1,
            "lora.dropout": 0.0, "lora.r": 4, "lora.alpha": 8, "lora.target_modules": "q_proj,v_proj",
            "device": "cpu", "progress": "false"}
    args = ["train-multitask", "--pairs", str(pairs), "--model", str(model_dir), "-o", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def test_train_multitask_two_processes_match_one(tmp_path, tiny_model_dir):
    pairs = _examples(tmp_path / "pairs.jsonl")
    _ok(_run(_mt_args(tiny_model_dir, pairs, tmp_path / "two"), nproc=2))
    _ok(_run(_mt_args(tiny_model_dir, pairs, tmp_path / "one"), nproc=1))
    name = "adapter/adapter_model.safetensors"
    diff = _assert_same(tmp_path / "two" / name, tmp_path / "one" / name)
    print(f"multitask: max abs difference {diff:.2e}")
    two = [r for r in _rows(tmp_path / "two") if "train/loss" in r]
    one = [r for r in _rows(tmp_path / "one") if "train/loss" in r]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        for k in ("train/loss", "train/token_accuracy", "train/entropy", "train/grad_norm", "train/tokens"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


# -- train-pmorl: 3 prompts x 2 samples split 2 + 1, each side's reward normalised over the whole batch ------


def _pmorl_args(model_dir: Path, out: Path) -> list[str]:
    sets = {"steps": 3, "batch_prompts": 3, "group_size": 2, "max_new_tokens": 6, "limit": 8, "device": "cpu",
            "progress": "false", "lr": "1e-2", "checkpoint_every": 2, "lora.r": 4, "lora.alpha": 8,
            "lora.target_modules": "q_proj,v_proj,lm_head", "rewards.P1A": "test_distributed:length"}
    args = ["train-pmorl", "--reward", "test_distributed:e_share", "--model", str(model_dir), "-o", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def test_train_pmorl_two_processes_match_one(tmp_path, tiny_model_dir):
    _ok(_run(_pmorl_args(tiny_model_dir, tmp_path / "two"), nproc=2))
    _ok(_run(_pmorl_args(tiny_model_dir, tmp_path / "one"), nproc=1))
    name = "adapter/adapter_model.safetensors"
    diff = _assert_same(tmp_path / "two" / name, tmp_path / "one" / name)
    print(f"pmorl: max abs difference {diff:.2e}")
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one):
        for k in ("train/reward_raw", "train/reward_combined", "train/reward", "train/kl", "train/loss",
                  "train/reward_raw/P1A"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


# -- FSDP: the frozen base weights sharded over two CPU processes (the shipped fsdp.yaml) ----------------


def _shards(proc: subprocess.CompletedProcess) -> dict[int, tuple[int, int]]:
    """rank -> (frozen elements it holds, frozen elements of the model), from the processes' reports."""
    found = re.findall(r"shards: rank (\d) holds (\d+) of (\d+)", proc.stdout + proc.stderr)
    return {int(r): (int(x), int(y)) for r, x, y in found}


def _assert_sharded(proc: subprocess.CompletedProcess) -> None:
    shards = _shards(proc)
    assert set(shards) == {0, 1}, proc.stderr[-2000:]
    (held0, total), (held1, total1) = shards[0], shards[1]
    assert total == total1 and held0 + held1 == total and 0 < held0 < total and 0 < held1 < total


def test_train_rm_fsdp_two_processes_match_one(tmp_path, tiny_model_dir):
    """One pair per batch: every step one process has no pair and runs one with weight 0; evaluation
    slices of 3 and 2 pairs in batches of 2 take 2 and 1 passes, the second process runs an extra one."""
    pairs = _pairs(tmp_path / "pairs.jsonl")
    args = _rm_args(tiny_model_dir, pairs, tmp_path / "two") + ["--set", "batch_size=1", "--set", "epochs=1"]
    proc = _run(args, nproc=2, accelerate=True, config="fsdp")
    _ok(proc)
    _assert_sharded(proc)
    _ok(_run(_rm_args(tiny_model_dir, pairs, tmp_path / "one") + ["--set", "batch_size=1", "--set", "epochs=1"],
             nproc=1))
    diff = _assert_same(tmp_path / "two" / "reward_model.safetensors", tmp_path / "one" / "reward_model.safetensors")
    print(f"reward model, FSDP: max abs difference {diff:.2e}")
    two, one = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one):
        for k in ("train/loss", "eval/accuracy", "eval/loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_train_expert_fsdp_two_processes_match_one(tmp_path, tiny_model_dir):
    """ppo with minibatches of one sample: each minibatch is one process's, the other runs a pass with
    weight 0; the LoRA on the output layer too (its base weight is sharded, the adapter whole)."""
    extra = ["--algorithm", "ppo", "--set", "ppo_epochs=2", "--set", "minibatch_size=1", "--set", "kl_coef=0.5"]
    proc = _run(_expert_args(tiny_model_dir, tmp_path / "two", *extra), nproc=2, accelerate=True, config="fsdp")
    _ok(proc)
    _assert_sharded(proc)
    _ok(_run(_expert_args(tiny_model_dir, tmp_path / "one", *extra), nproc=1))
    for name in ("adapter/adapter_model.safetensors", "value_head.safetensors"):
        diff = _assert_same(tmp_path / "two" / name, tmp_path / "one" / name)
        print(f"ppo {name}, FSDP: max abs difference {diff:.2e}")


def test_decoding_in_lockstep_runs_until_every_process_is_done():
    """A process whose rows all end at the first token keeps stepping while ``all_done`` says another
    process is still decoding (FSDP runs sharded layers in every process at every step)."""
    from personalign.generation import SamplingConfig, decode

    class EndsAtOnce:  # scores that always pick end-of-sequence (id 0)
        models = ()  # nothing for the thin-input kernels to patch
        vocab_size = 3

        def start(self, input_ids, mask, position_ids):
            self.forwards = 1

        def scores(self, ctx, penalty):
            return torch.tensor([[5.0, 0.0, 0.0]]).expand(ctx.prompt_ids.shape[0], -1)

        def accept(self, tokens, ctx):
            pass

        def advance(self, tokens, mask, position_ids):
            self.forwards += 1

    others = iter([False, False, True])  # the other process finishes after three steps
    step = EndsAtOnce()
    out = decode(step, torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long),
                 SamplingConfig(max_new_tokens=8, temperature=0), eos=[0], pad=0, generator=None,
                 all_done=lambda done: done and next(others))
    assert step.forwards == 3 and out.tokens.shape == (2, 3)
    assert out.mask.tolist() == [[1, 0, 0], [1, 0, 0]]  # the rows ended at their first token
    alone = EndsAtOnce()
    decode(alone, torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long),
           SamplingConfig(max_new_tokens=8, temperature=0), eos=[0], pad=0, generator=None)
    assert alone.forwards == 1


def test_fsdp_settings_are_honoured_or_refused_in_one_line():
    from personalign.errors import ConfigError

    ok = {"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP",
          "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}
    s = distributed.fsdp_settings(ok)
    assert not s.reshard_after_forward and not s.wrap and s.layer_classes == ("LlamaDecoderLayer",)
    assert distributed.fsdp_settings({"FSDP_VERSION": "2"}) == distributed.FSDPSettings()
    for key, value, match in [("FSDP_VERSION", "1", "fsdp_version is 1"),
                              ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params is 'true'"),
                              ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "fsdp_auto_wrap_policy"),
                              ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", "fsdp_state_dict_type")]:
        with pytest.raises(ConfigError, match=match):
            distributed.fsdp_settings({**ok, key: value})
    fsdp = distributed.Dist(rank=0, world=2, device="cpu", fsdp=distributed.FSDPSettings())
    with pytest.raises(ConfigError, match="train-pcm does not run under FSDP"):
        distributed.require_unsharded(fsdp, "train-pcm")
    distributed.require_unsharded(distributed.Dist(), "train-pcm")
    # Every process runs as many passes as the largest slice needs: 5 items over 2 processes in batches of 2
    assert [distributed.Dist(rank=r, world=2).lockstep_batches(5, 2) for r in (0, 1)] == [2, 1]
    assert [distributed.Dist(rank=r, world=2, fsdp=distributed.FSDPSettings()).lockstep_batches(5, 2)
            for r in (0, 1)] == [2, 2]


if __name__ == "__main__":  # the launched script: the CLI, optionally dying in an optimizer step
    if os.environ.get(DIE_AT) and os.environ.get("RANK", "0") == "1":
        die_at, calls, real_step = int(os.environ[DIE_AT]), [0], torch.optim.AdamW.step

        def dying_step(self, *a, **k):
            calls[0] += 1
            if calls[0] == die_at:
                os._exit(17)  # no cleanup, as a killed process
            return real_step(self, *a, **k)

        torch.optim.AdamW.step = dying_step
    real_shard = distributed.Dist.shard_frozen

    def reporting_shard(self, base, *a, **k):
        real_shard(self, base, *a, **k)
        from torch.distributed.tensor import DTensor

        frozen = [p for p in base.parameters() if isinstance(p, DTensor)]
        held = sum(p.to_local().numel() for p in frozen)
        print(f"shards: rank {self.rank} holds {held} of {sum(p.numel() for p in frozen)}", file=sys.stderr)

    distributed.Dist.shard_frozen = reporting_shard
    from personalign.cli import main

    main(sys.argv[1:])


def test_a_step_smaller_than_the_processes_is_refused_in_one_line():
    from personalign.errors import ConfigError
    from personalign.distributed import Dist

    Dist(rank=0, world=2).require_per_process(2, "batch_prompts")  # one each: fine
    with pytest.raises(ConfigError, match=r"batch_prompts is 1, fewer than the 2 processes: each process needs at "
                                          r"least one pair per step \(batch_prompts=2 or more\)"):
        Dist(rank=1, world=2).require_per_process(1, "batch_prompts", "pair")


class _Exited(Exception):
    pass


def _record_exit(monkeypatch) -> list[int]:
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise _Exited

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    return codes


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["eval", "--config", "no-such-file.yaml"], 2)])
def test_a_launched_process_ends_after_destroying_its_process_group(monkeypatch, tmp_path, argv, code):
    """With a process group running, the CLI ends with the command's status through os._exit, after
    the group is destroyed (no interpreter teardown for gloo's threads to abort)."""
    from personalign.cli import main

    codes = _record_exit(monkeypatch)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(_Exited):
            main(argv)
        assert codes == [code]
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_without_a_process_group_the_cli_exits_as_usual(monkeypatch):
    from personalign.cli import main

    codes = _record_exit(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and codes == []
