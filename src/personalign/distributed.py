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
device are accelerate's. FSDP and DeepSpeed (sharded weights) are refused with a clear message: the
recipes do not shard parameters.

One process (no launcher) gets ``Dist()``: every method is then the identity and nothing is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from personalign.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["TIMEOUT_ENV", "Dist", "init", "is_main_process"]

# A process that dies leaves the others waiting in a collective; the launcher ends them, and this
# timeout ends a collective that still waits (minutes).
TIMEOUT_ENV = "PERSONALIGN_DIST_TIMEOUT_MINUTES"
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world`` processes (rank 0 is the main one)."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the process's own device ("cuda:1", "cpu"); None: one process

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
    state = PartialState(cpu=cpu, timeout=timedelta(minutes=minutes))
    kind = getattr(state.distributed_type, "name", str(state.distributed_type))
    if kind in SHARDED:
        raise ConfigError(f"accelerate's {kind} mode shards the weights, which personalign's recipes do not "
                          "support; launch with the data-parallel config (configs/accelerate/multi_gpu.yaml) "
                          "or torchrun (see docs/distributed.md)")
    if state.num_processes <= 1:
        return Dist()
    return Dist(rank=state.process_index, world=state.num_processes, device=str(state.device))


def is_main_process() -> bool:
    """False in a launcher's processes other than the main one (rank 0), so that a command's result is
    printed once: the running process group's rank, else the launcher's ``RANK``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
