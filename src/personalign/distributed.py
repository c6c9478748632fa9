"""Data parallelism over the processes that ``torchrun`` or ``accelerate launch`` starts.

Every process runs the whole recipe. Each global batch (the batch one process would take) is cut into
contiguous slices, one per process (:meth:`Dist.shard`); each process computes its slice's share of
the *global* loss (a sum over its items divided by the global count, so uneven slices still add up
to the one-process mean), the gradients are **summed** over processes (:meth:`Dist.sum_grads`), and
every process then clips and steps on the same gradient, so the weights stay equal everywhere
without a wrapper. Metrics are gathered (:meth:`Dist.gather`, :meth:`Dist.all_sum`) so that the
logged numbers are the global batch's. Only the main process writes (run folder, metrics,
checkpoints, the final model); :meth:`Dist.barrier` orders the others after it.

Why no ``DistributedDataParallel`` or ``Accelerator.prepare``: the RL recipes sample, score and
update minibatches whose samples fall unevenly on the processes (a PPO minibatch may hold none of a
process's samples), and the reference model is the policy with its adapter disabled. Summing the
LoRA gradients by hand is one collective per step, works for any split, and keeps the one-process
code path unchanged. accelerate's :class:`~accelerate.PartialState` still starts the process group,
so the launchers' environments (``accelerate launch`` configs, ``torchrun``, MPI) and the per-process
device are accelerate's.

FSDP (an accelerate config with ``distributed_type: FSDP``, ``fsdp_version: 2``; train-rm and
train-expert): the same data parallelism, with the *frozen* base weights sharded over the processes by
torch's ``fully_shard`` (:meth:`Dist.shard_frozen`: each decoder layer, then the rest), so that a base
model that does not fit one device fits several. The trainable weights (LoRA, heads) stay whole on
every process (``ignored_params``: a few MB), so their gradients, the optimizer, checkpoints and saving
are exactly as without FSDP. What FSDP adds is lockstep: a sharded layer gathers its weights from every
process when it runs, so every process runs the same forward and backward passes (a process with no
item in a batch runs one with weight 0, decoding continues until every process's rows are finished:
:meth:`Dist.lockstep_batches`, :meth:`Dist.all_done`). Settings FSDP2 reads from the accelerate config
are honoured or refused (:func:`fsdp_settings`). DeepSpeed, Megatron-LM and XLA are refused.

One process (no launcher) gets ``Dist()``: every method is then the identity and nothing is imported.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from personalign.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["TIMEOUT_ENV", "Dist", "FSDPSettings", "fsdp_settings", "init", "is_main_process", "require_unsharded"]

# A process that dies leaves the others waiting in a collective; the launcher ends them, and this
# timeout ends a collective that still waits (minutes).
TIMEOUT_ENV = "PERSONALIGN_DIST_TIMEOUT_MINUTES"
SHARDED = ("DEEPSPEED", "MEGATRON_LM", "XLA")


@dataclass(frozen=True)
class FSDPSettings:
    """What the accelerate FSDP config asks of ``fully_shard``."""

    reshard_after_forward: bool = True  # free a layer's gathered weights after its forward pass
    wrap: bool = True  # shard each decoder layer on its own (TRANSFORMER_BASED_WRAP); False: NO_WRAP
    layer_classes: tuple[str, ...] = ()  # the layers' class names; empty: the model's own (_no_split_modules)


# accelerate launch passes the FSDP config to the processes as FSDP_* variables. These must hold one of
# the values given (a missing variable is the accelerate default, listed first); the others configure
# FSDP version 1 only, or what personalign never does with FSDP (its state dict: the trainable weights
# are whole on every process and saved as without FSDP).
_FSDP_FIXED = {
    "FSDP_VERSION": ("1", "2"),  # "1" is accelerate's default and is refused below: FSDP2 only
    "FSDP_OFFLOAD_PARAMS": ("false",),
    "FSDP_ACTIVATION_CHECKPOINTING": ("false",),
    "FSDP_CPU_RAM_EFFICIENT_LOADING": ("false",),
    "FSDP_RESHARD_AFTER_FORWARD": ("true", "false"),
    "FSDP_AUTO_WRAP_POLICY": ("TRANSFORMER_BASED_WRAP", "NO_WRAP"),
    "FSDP_STATE_DICT_TYPE": ("FULL_STATE_DICT",),
}


def fsdp_settings(env: dict[str, str] | None = None) -> FSDPSettings:
    """The FSDP settings of an ``accelerate launch`` FSDP config, or a one-line error naming the field
    personalign cannot honour."""
    env = dict(os.environ if env is None else env)
    for key, allowed in _FSDP_FIXED.items():
        value = env.get(key, allowed[0])
        if value.lower() not in [a.lower() for a in allowed]:
            field = key.lower()
            raise ConfigError(f"accelerate FSDP config: {field} is {value!r}; personalign's FSDP supports "
                              f"{' or '.join(allowed)} (see configs/accelerate/fsdp.yaml)")
    if env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("accelerate FSDP config: fsdp_version is 1; personalign shards with FSDP2 "
                          "(torch's fully_shard): set fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")
    classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    return FSDPSettings(reshard_after_forward=env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true",
                        wrap=env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP") != "NO_WRAP",
                        layer_classes=classes)


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world`` processes (rank 0 is the main one)."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the process's own device ("cuda:1", "cpu"); None: one process
    fsdp: FSDPSettings | None = None  # the frozen weights sharded over the processes (FSDP2)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def resolve_device(self, device: str) -> str:
        """The device a config's ``device`` means in this process: ``auto`` and ``cuda`` become the
        launcher's device for this rank; anything explicit stays as given."""
        if self.device is None or device not in ("auto", "cuda"):
            return device
        return self.device

    def require_per_process(self, n: int, name: str, unit: str = "prompt") -> None:
        """Refuse a per-step count ``name`` = ``n`` smaller than the number of processes: every process needs
        at least one ``unit`` per step."""
        if n < self.world:
            raise ConfigError(f"{name} is {n}, fewer than the {self.world} processes: each process needs at "
                              f"least one {unit} per step ({name}={self.world} or more)")

    def shard(self, n: int) -> tuple[int, int]:
        """``[start, stop)``: this process's contiguous slice of ``n`` items (sizes differ by at most one,
        the first processes take the extra ones). The slices in rank order are the items in order."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over processes (a new tensor; ``x`` itself with one process)."""
        if not self.active:
            return x
        y = x.detach().clone()
        torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.SUM)
        return y

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's ``x`` concatenated along dim 0 in rank order (the first dims may differ)."""
        if not self.active:
            return x
        x = x.detach().contiguous()
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, n)
        rows = [int(s) for s in sizes]
        padded = x.new_zeros((max(rows), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[:r] for p, r in zip(parts, rows)])

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every process's ``items`` (picklable: texts, records) concatenated in rank order."""
        if not self.active:
            return list(items)
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum each parameter's gradient over processes, in place (a process whose slice was empty
        contributes zeros). One collective per dtype."""
        if not self.active:
            return
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            offset = 0
            for p in group:
                k = p.grad.numel()
                p.grad.copy_(flat[offset : offset + k].view_as(p.grad))
                offset += k

    # -- FSDP ----------------------------------------------------------------------------------------

    def load_place(self, device: str, dtype: str = "auto") -> tuple[str, str]:
        """(device, dtype) to load a recipe's base model with: under FSDP the CPU, in the dtype ``dtype``
        means on this process's device (``fully_shard`` then moves each process's shard there, so no
        device holds the whole model); else this process's device and ``dtype``."""
        if self.fsdp is None:
            return self.resolve_device(device), dtype
        from personalign.models import resolve_device, resolve_dtype

        return "cpu", str(resolve_dtype(dtype, resolve_device(self.resolve_device(device)))).removeprefix("torch.")

    def shard_frozen(self, base: torch.nn.Module, root: torch.nn.Module | None = None,
                     extra: Sequence[torch.nn.Module] = ()) -> None:
        """Under FSDP, shard ``base``'s frozen weights over the processes with torch's ``fully_shard``:
        each decoder layer on its own (the model's ``_no_split_modules`` classes, or the config's
        ``fsdp_transformer_layer_cls_to_wrap``), each module of ``extra`` (parts the recipe never runs,
        such as a reward model's unused output layer), then ``root`` (default ``base``: the module whose
        forward the recipe calls, holding the rest). Trainable weights stay whole on every process, moved
        to the process's device. Nothing without FSDP."""
        if self.fsdp is None:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = torch.device(self.device or "cpu")
        mesh = init_device_mesh(device.type, (self.world,))
        trainable = {p for p in base.parameters() if p.requires_grad}
        names = set(self.fsdp.layer_classes or getattr(base, "_no_split_modules", None) or ())
        layers = [m for m in base.modules() if type(m).__name__ in names] if self.fsdp.wrap else []
        if self.fsdp.wrap and not layers:
            raise ConfigError(f"FSDP: no layer of class {', '.join(sorted(names)) or '(none named)'} in this model; "
                              "set fsdp_transformer_layer_cls_to_wrap to its decoder layer class, or "
                              "fsdp_auto_wrap_policy: NO_WRAP")
        for module in [*layers, *extra, root if root is not None else base]:
            fully_shard(module, mesh=mesh, reshard_after_forward=self.fsdp.reshard_after_forward,
                        ignored_params=trainable)
        with torch.no_grad():
            for p in trainable:
                p.data = p.data.to(device)

    def all_done(self, done: bool) -> bool:
        """``done`` in every process (a collective): under FSDP, decoding goes on until every process's
        rows are finished, since each step runs sharded layers. ``done`` itself without FSDP."""
        if self.fsdp is None:
            return done
        flag = torch.tensor([int(done)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def lockstep_batches(self, n: int, batch_size: int) -> int:
        """Batches of ``batch_size`` to run over this process's slice of ``n`` items: its own count, or
        under FSDP the largest slice's (each process runs as many forward passes as every other; the
        extra ones are discarded)."""
        a, b = self.shard(n)
        if self.fsdp is None:
            return math.ceil((b - a) / batch_size)
        return math.ceil(math.ceil(n / self.world) / batch_size)

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copy the main process's values of ``tensors`` into every process's, in place."""
        if not self.active:
            return
        with torch.no_grad():
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)


def init(device: str = "auto") -> Dist:
    """This process's :class:`Dist`: ``Dist()`` unless a launcher started several processes
    (``WORLD_SIZE`` > 1), in which case accelerate starts the process group (gloo on CPU, NCCL on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    minutes = float(os.environ.get(TIMEOUT_ENV, "30"))
    fsdp = fsdp_settings() if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else None
    state = PartialState(cpu=cpu, timeout=timedelta(minutes=minutes))
    kind = getattr(state.distributed_type, "name", str(state.distributed_type))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        kind = "DEEPSPEED"
    if kind in SHARDED:
        raise ConfigError(f"accelerate's {kind} mode is not supported by personalign's recipes; launch with "
                          "the data-parallel config (configs/accelerate/multi_gpu.yaml), the FSDP one "
                          "(configs/accelerate/fsdp.yaml) or torchrun (see docs/distributed.md)")
    if state.num_processes <= 1:
        return Dist()
    atexit.register(_close)
    return Dist(rank=state.process_index, world=state.num_processes, device=str(state.device), fsdp=fsdp)


def _close() -> None:
    """End the process group before the interpreter exits: gloo's threads still running at exit abort
    the process ("terminate called without an active exception") after its work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_launched_process(code: int) -> None:
    """End a process of a launched run (its process group started) with exit status ``code``, without the
    interpreter's teardown: the process group is destroyed and collected while Python is fully alive,
    the output flushed, and the process left with ``os._exit``. A gloo thread or work object still
    alive during interpreter finalization aborts the process now and then (SIGABRT, "terminate called
    without an active exception") after its work is done and saved, and the launcher then reports the
    finished run as failed. Nothing to do (returns) when no process group runs."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    _close()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed stream: nothing left to write
            pass
    os._exit(code)


def require_unsharded(dist: Dist, command: str) -> None:
    """Refuse FSDP for ``command``, whose recipe does not keep its processes in lockstep (FSDP would
    wait forever in a layer one process skips)."""
    if dist.fsdp is not None:
        raise ConfigError(f"{command} does not run under FSDP (train-rm and train-expert do); launch it "
                          "with the data-parallel config (configs/accelerate/multi_gpu.yaml) or torchrun")


def is_main_process() -> bool:
    """False in a launcher's processes other than the main one (rank 0), so that a command's result is
    printed once: the running process group's rank, else the launcher's ``RANK``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
