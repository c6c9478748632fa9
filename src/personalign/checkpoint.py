"""Resumable training state in safetensors + JSON (never pickle).

A checkpoint folder holds ``model.safetensors`` (trainable tensors), ``optimizer.safetensors`` (the
optimizer's tensors), ``rng.safetensors`` (the CPU random generator), and ``trainer.json`` (progress counters, the optimizer's scalar state and param
groups). It is written to a temporary folder and renamed into place, so an interruption leaves either
the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from personalign.errors import ModelError

__all__ = ["save_checkpoint", "load_checkpoint", "optimizer_to_flat", "optimizer_from_flat"]


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: str | Path, model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
                    progress: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    meta: dict[str, Any] = {}
    if optimizer is not None:
        tensors, meta = optimizer_to_flat(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
    # The CPU generator drives dropout and sampling; restoring it makes a resumed run match exactly.
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps({"progress": progress, "optimizer": meta}, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder: str | Path, optimizer: torch.optim.Optimizer | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(model tensors, progress) of a checkpoint, restoring ``optimizer`` in place; None if absent."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.exists():
        old = folder.with_name(folder.name + ".old")  # interrupted between the two renames
        if old.exists():
            folder = old
        else:
            return None
    try:
        info = json.loads((folder / "trainer.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
        if optimizer is not None and (folder / "optimizer.safetensors").exists():
            optimizer_from_flat(optimizer, load_file(str(folder / "optimizer.safetensors")), info["optimizer"])
        if (folder / "rng.safetensors").exists():
            torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
        raise ModelError(f"checkpoint {folder} is unreadable ({type(exc).__name__}: {exc}); delete it to start over") from None
    return state, info["progress"]
