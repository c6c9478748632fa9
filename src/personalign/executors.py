"""Executors: run a workflow's independent units in this process, one after another, or as Ray tasks.

A unit is one piece of work that writes its own output folder or file and needs nothing from the others
but what its ``after`` units have written: one side's reward model, one side's expert (after its reward
model), one baseline, one generation file of an evaluation or a Pareto sweep. A unit is a module-level
function and its config (a frozen dataclass), so Ray pickles it by reference and a worker imports
personalign as the driver does.

- :class:`LocalExecutor` (the default) runs the units in order in this process, exactly as the recipes
  did before executors existed: the first error stops the run.
- :class:`RayExecutor` sends them to a Ray cluster (a local instance, or ``address``) as tasks with the
  CPUs, GPUs and memory of their kind (:class:`ResourcesConfig`). Results are gathered with ``ray.wait``
  as they finish, so a failure is printed at once (unit, error, the worker's traceback) while the others
  go on; a unit whose ``after`` failed does not run. At the end :meth:`ExecutorReport.raise_failures`
  lists every failed unit in one error.

A unit marked ``done`` (its outputs are complete, by the same files the recipe's own early return
checks) is not sent anywhere: it runs in the driver, where its recipe returns at once without loading a
model and still checks what it checks (e.g. a reward model trained on pairs that have since changed).
So a rerun does only what is missing. Every start, finish, failure and reuse is appended to the log
(``executor.jsonl`` in the pipeline's run folder).

Ray is an extra (``pip install 'personalign[ray]'``), imported only when a RayExecutor starts.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalign.errors import ConfigError, PersonalignError

__all__ = ["EXECUTORS", "ExecutorConfig", "ExecutorReport", "LocalExecutor", "RayExecutor", "Resources",
           "ResourcesConfig", "Unit", "UnitsFailed", "make_executor"]

EXECUTORS = ("local", "ray")
OnDone = Callable[[str, Any], None]  # called in the driver with each unit's name and result as it finishes


@dataclass(frozen=True)
class Resources:
    """What one unit asks the cluster for (Ray's ``num_cpus``, ``num_gpus``, ``memory``)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None  # None: no memory reservation
    timeout_minutes: float | None = None  # a unit running longer is cancelled and reported as failed

    def __post_init__(self) -> None:
        def ok(x: float) -> bool:
            return isinstance(x, (int, float)) and math.isfinite(x)

        if not (ok(self.cpus) and self.cpus >= 0):
            raise ConfigError(f"cpus must be a number >= 0, e.g. 1; got {self.cpus!r}")
        if not (ok(self.gpus) and self.gpus >= 0):
            raise ConfigError(f"gpus must be a number >= 0 (fractions share a GPU, e.g. 0.5); got {self.gpus!r}")
        if self.memory_gb is not None and not (ok(self.memory_gb) and self.memory_gb > 0):
            raise ConfigError(f"memory_gb must be a positive number of GiB or unset; got {self.memory_gb!r}")
        if self.timeout_minutes is not None and not (ok(self.timeout_minutes) and self.timeout_minutes > 0):
            raise ConfigError(f"timeout_minutes must be a positive number or unset; got {self.timeout_minutes!r}")

    def ray_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_gb is not None:
            opts["memory"] = int(self.memory_gb * 2**30)
        return opts


@dataclass(frozen=True)
class ResourcesConfig:
    """Per kind of unit, what each one asks for."""

    reward: Resources = field(default_factory=Resources)  # one reward model (a side's, or the multi-head one)
    expert: Resources = field(default_factory=Resources)  # one RL expert
    baseline: Resources = field(default_factory=Resources)  # multitask, P-MORL
    generate: Resources = field(default_factory=Resources)  # one evaluation or Pareto generation file

    def of(self, kind: str) -> Resources:
        if kind not in ("reward", "expert", "baseline", "generate"):
            raise ConfigError(f"unknown unit kind {kind!r}; kinds are reward, expert, baseline, generate")
        return getattr(self, kind)


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = "local"  # local: in this process, in order; ray: Ray tasks
    address: str | None = None  # ray: an existing cluster ("auto", "ray://head:10001"); unset: a local instance
    num_cpus: int | None = None  # ray, local instance only: CPUs it may use (unset: every core)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ConfigError(f"executor {self.kind!r} is not one of {', '.join(EXECUTORS)}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num_cpus must be at least 1, got {self.num_cpus}")
        if self.address is not None and self.num_cpus is not None:
            raise ConfigError("num_cpus sizes a local Ray instance; a cluster given by address has its own CPUs: "
                              "set one of them")
        if self.kind == "local" and (self.address is not None or self.num_cpus is not None):
            raise ConfigError("address and num_cpus are Ray settings; add --executor ray")


@dataclass(frozen=True)
class Unit:
    """One independent piece of work: ``fn(cfg)``, writing its own outputs."""

    name: str  # "reward/P2A", "expert/P2A", "generate/prompt/P2A", ...
    fn: Callable[[Any], Any]  # module-level, so that it pickles by reference
    cfg: Any
    kind: str  # reward | expert | baseline | generate: which resources it asks for
    after: tuple[str, ...] = ()  # units whose outputs it reads
    done: bool = False  # outputs complete: run in the driver, where its recipe returns at once


@dataclass(frozen=True)
class Failure:
    error: str  # "ValueError: ..." or "not run: reward/P2B failed"
    traceback: str = ""


@dataclass
class ExecutorReport:
    results: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # in the order they finished
    reused: list[str] = field(default_factory=list)  # done before: checked in the driver

    def raise_failures(self) -> None:
        if self.failures:
            raise UnitsFailed(self.failures)


class UnitsFailed(PersonalignError):
    """One or more units failed; the others finished. Rerunning the same command does only what is missing."""

    def __init__(self, failures: dict[str, Failure]) -> None:
        self.failures = dict(failures)
        listed = "; ".join(f"{name} ({f.error.splitlines()[0] if f.error else 'failed'})"
                           for name, f in failures.items())
        super().__init__(f"{len(failures)} unit(s) failed: {listed}. The other units finished; fix the cause "
                         "and run the same command again to do only what is missing")


class _Log:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, unit: str, event: str, **extra: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), "unit": unit, "event": event, **extra}) + "\n")


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The events an executor wrote (``started``, ``finished``, ``failed``, ``reused``, ``not_run``)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _check_units(units: Sequence[Unit]) -> None:
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ConfigError(f"unit names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    known = set(names)
    for i, u in enumerate(units):
        for dep in u.after:
            if dep in known and dep not in names[:i]:
                raise ConfigError(f"unit {u.name} runs after {dep}, which is listed after it")


class LocalExecutor:
    """The units in order, in this process; the first error is raised as it is (the recipes' behaviour)."""

    kind = "local"

    def __init__(self, log: str | Path | None = None) -> None:
        self.log = _Log(Path(log) if log else None)

    def run(self, units: Sequence[Unit], on_done: OnDone | None = None) -> ExecutorReport:
        _check_units(units)
        report = ExecutorReport()
        for u in units:
            t0 = time.perf_counter()
            self.log.write(u.name, "started", where="driver")
            try:
                report.results[u.name] = u.fn(u.cfg)
            except BaseException as exc:
                self.log.write(u.name, "failed", error=f"{type(exc).__name__}: {exc}")
                raise
            (report.reused if u.done else report.ran).append(u.name)
            self.log.write(u.name, "reused" if u.done else "finished",
                           seconds=round(time.perf_counter() - t0, 3))
            if on_done is not None:
                on_done(u.name, report.results[u.name])
        return report


def _call(fn: Callable[[Any], Any], cfg: Any) -> tuple[str, Any, str]:
    """What a Ray task runs: errors come back as text (any exception pickles this way), with the worker's
    traceback, so the driver reports them whatever they hold."""
    try:
        return "ok", fn(cfg), ""
    except BaseException as exc:  # noqa: BLE001 - the driver reports every failure
        return "error", f"{type(exc).__name__}: {exc}", traceback.format_exc()


class RayExecutor:
    """Units as Ray tasks with their kind's resources; failures reported as they happen, the rest go on."""

    kind = "ray"

    def __init__(self, resources: ResourcesConfig | None = None, address: str | None = None,
                 num_cpus: int | None = None, log: str | Path | None = None, poll_s: float = 5.0) -> None:
        try:
            import ray
        except ImportError as exc:
            from personalign.extras import install_hint

            raise ConfigError(install_hint("ray", "the Ray executor (--executor ray)", module="ray")) from exc
        self.ray = ray
        self.resources = resources or ResourcesConfig()
        self.log = _Log(Path(log) if log else None)
        self.poll_s = poll_s
        if not ray.is_initialized():
            if address is not None:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        self._remote = ray.remote(max_retries=0)(_call)

    def _report_failure(self, report: ExecutorReport, name: str, failure: Failure) -> None:
        report.failures[name] = failure
        self.log.write(name, "not_run" if failure.error.startswith("not run") else "failed", error=failure.error)
        print(f"unit {name} failed: {failure.error}", file=sys.stderr)
        if failure.traceback:
            print(failure.traceback.rstrip(), file=sys.stderr)

    def run(self, units: Sequence[Unit], on_done: OnDone | None = None) -> ExecutorReport:
        _check_units(units)
        ray = self.ray
        report = ExecutorReport()
        names = {u.name for u in units}
        waiting = list(units)
        running: dict[Any, tuple[Unit, float]] = {}  # ObjectRef -> (unit, start time)

        def ok(dep: str) -> bool:
            return dep not in names or dep in report.results

        def submit_ready() -> None:
            for u in list(waiting):
                failed = [d for d in u.after if d in report.failures]
                if failed:
                    waiting.remove(u)
                    self._report_failure(report, u.name, Failure(f"not run: {', '.join(failed)} failed"))
                    continue
                if not all(ok(d) for d in u.after):
                    continue
                waiting.remove(u)
                if u.done:  # its recipe returns at once: no worker needed
                    try:
                        report.results[u.name] = u.fn(u.cfg)
                        report.reused.append(u.name)
                        self.log.write(u.name, "reused")
                        if on_done is not None:
                            on_done(u.name, report.results[u.name])
                    except Exception as exc:  # noqa: BLE001
                        self._report_failure(report, u.name, Failure(f"{type(exc).__name__}: {exc}",
                                                                     traceback.format_exc()))
                    continue
                opts = self.resources.of(u.kind).ray_options()
                ref = self._remote.options(name=u.name, **opts).remote(u.fn, u.cfg)
                running[ref] = (u, time.perf_counter())
                self.log.write(u.name, "started", where="ray", **opts)

        submit_ready()
        while running or waiting:
            if not running:  # nothing can start: the rest wait on failed units (reported by submit_ready)
                submit_ready()
                if not running:
                    break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_s)
            for ref in ready:
                u, t0 = running.pop(ref)
                seconds = round(time.perf_counter() - t0, 3)
                try:
                    status, value, tb = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died (out of memory, killed)
                    status, value, tb = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}", str(exc)
                if status == "ok":
                    report.results[u.name] = value
                    report.ran.append(u.name)
                    self.log.write(u.name, "finished", seconds=seconds)
                    print(f"unit {u.name} finished in {seconds:.1f} s", file=sys.stderr)
                    if on_done is not None:
                        on_done(u.name, value)
                else:
                    self._report_failure(report, u.name, Failure(value, tb))
            self._cancel_overdue(report, running)
            submit_ready()
        return report

    def _cancel_overdue(self, report: ExecutorReport, running: dict[Any, tuple[Unit, float]]) -> None:
        now = time.perf_counter()
        for ref, (u, t0) in list(running.items()):
            limit = self.resources.of(u.kind).timeout_minutes
            if limit is not None and now - t0 > limit * 60:
                self.ray.cancel(ref, force=True)
                running.pop(ref)
                self._report_failure(report, u.name, Failure(f"TimeoutError: ran longer than {limit:g} minutes "
                                                             f"(resources.{u.kind}.timeout_minutes); cancelled"))


Executor = LocalExecutor | RayExecutor


def make_executor(cfg: ExecutorConfig, log: str | Path | None = None) -> Executor:
    if cfg.kind == "ray":
        return RayExecutor(cfg.resources, address=cfg.address, num_cpus=cfg.num_cpus, log=log)
    return LocalExecutor(log=log)
