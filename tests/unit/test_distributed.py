"""Data parallelism: every training recipe (train-expert, train-rm, train-pcm, train-multitask,
train-pmorl) started by torchrun as two CPU processes (gloo) on the same global batch gives the
one-process weights, and a two-process run killed after a checkpoint resumes to them.

The runs go through the real CLI: this file is also the launched script (``__main__`` below), which
runs ``personalign.cli`` and, with ``PERSONALIGN_TEST_DIE_AT=N``, kills rank 1 in its N-th optimizer
step (as a killed machine would), after the checkpoint of the step before.
"""

from __future__ import annotations

import json
import os
import random
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


def _run(args: list[str], nproc: int, die_at: int | None = None, accelerate: bool = False
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           distributed.TIMEOUT_ENV: "2", "OMP_NUM_THREADS": "1"}
    env.pop(DIE_AT, None)
    if die_at is not None:
        env[DIE_AT] = str(die_at)
    if accelerate:  # the shipped two-CPU-process config
        config = Path(distributed.__file__).parent / "configs" / "accelerate" / "multi_cpu.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--main_process_port", str(_free_port()), str(HERE), *args]
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


if __name__ == "__main__":  # the launched script: the CLI, optionally dying in an optimizer step
    if os.environ.get(DIE_AT) and os.environ.get("RANK", "0") == "1":
        die_at, calls, real_step = int(os.environ[DIE_AT]), [0], torch.optim.AdamW.step

        def dying_step(self, *a, **k):
            calls[0] += 1
            if calls[0] == die_at:
                os._exit(17)  # no cleanup, as a killed process
            return real_step(self, *a, **k)

        torch.optim.AdamW.step = dying_step
    from personalign.cli import main

    main(sys.argv[1:])
