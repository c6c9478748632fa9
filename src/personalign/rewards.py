"""Reward functions for reinforcement learning: one interface, three sources, one combination rule.

A reward function maps instructions and responses to one float per response::

    reward(prompts, responses) -> torch.Tensor  # (N,)

``prompts`` are the user's instructions *without* any preference prompt: a reward model adds the
side's wording itself (the wording its training pairs saw) and the offline judge measures the
response. Sources, written as a spec string wherever a command takes a reward:

* ``offline``: the offline judge's score for the side (:func:`personalign.judges.offline.side_score`);
* ``rm:PATH`` or just ``PATH``: a reward-model folder written by ``train-rm`` (it must score the side);
* ``module:function``: a user's Python callable with the signature above (lists of floats are
  accepted and converted); the module is looked up on ``sys.path`` and in the current folder.

:func:`parse_reward_spec` checks a spec without loading any model (folders exist and hold the side,
the callable imports), so a run fails in a second instead of after the model load.
:class:`CombinedReward` is the P-MORL reward: the mean of several sides' rewards, each normalised by
its own running mean and standard deviation so that no side wins by having a larger raw scale.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from personalign.errors import ConfigError, ModelError
from personalign.losses import RunningMeanStd

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from personalign.reward_model import RewardModel

__all__ = [
    "CombinedReward",
    "RewardFunction",
    "RewardSpec",
    "as_reward_tensor",
    "callable_reward",
    "import_callable",
    "offline_reward",
    "parse_reward_spec",
    "reward_from_spec",
    "reward_model_reward",
]

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
SPEC_HELP = "use offline, rm:PATH (a folder written by train-rm) or module:function"


@runtime_checkable
class RewardFunction(Protocol):
    """What the RL recipes call: one scalar per (instruction, response) pair, higher is better."""

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:  # (N,)
        ...


def as_reward_tensor(values: Any, n: int, source: str) -> torch.Tensor:
    """``values`` as a float32 CPU tensor of shape (n,), or a one-line error naming ``source``.

    User functions may return lists or arrays; a wrong length or a NaN would otherwise surface much
    later as a shape error or a NaN loss.
    """
    try:
        out = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"reward {source} returned {type(values).__name__}, not numbers ({exc})") from None
    if out.dim() == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (n,):
        raise ConfigError(f"reward {source} returned shape {tuple(out.shape)} for {n} responses; it must "
                          "return one number per response")
    if not torch.isfinite(out).all():
        raise ConfigError(f"reward {source} returned a NaN or infinite value; return finite numbers")
    return out


# -- sources ---------------------------------------------------------------------------------------


class OfflineReward:
    """The offline judge's score of one side: deterministic, no model, cheap."""

    def __init__(self, side: str):
        from personalign.judges.base import UnsupportedSideError
        from personalign.judges.offline import SUPPORTED_SIDES, side_score

        if side not in SUPPORTED_SIDES:
            raise UnsupportedSideError(side, "offline", SUPPORTED_SIDES)
        self.side = side
        self._score = side_score

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return as_reward_tensor([self._score(self.side, p, r) for p, r in zip(prompts, responses)],
                                len(responses), f"offline:{self.side}")

    def __repr__(self) -> str:
        return f"OfflineReward({self.side!r})"


def offline_reward(side: str) -> OfflineReward:
    return OfflineReward(side)


class ModelReward:
    """A trained reward model's score for one side (the RM encodes with attention masks)."""

    def __init__(self, model: RewardModel, side: str, batch_size: int = 16, name: str = "rm"):
        self.model = model
        self.side = side
        self.batch_size = batch_size
        self.name = name
        model.side_index(side)  # raises if the model does not score this side

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        vals = self.model.score(list(prompts), list(responses), side=self.side, batch_size=self.batch_size)
        return as_reward_tensor(vals, len(responses), self.name)

    def __repr__(self) -> str:
        return f"ModelReward({self.name!r}, side={self.side!r})"


def reward_model_reward(folder: str | Path, side: str, base: PreTrainedModel | None = None,
                        tokenizer: PreTrainedTokenizerBase | None = None, *, device: str = "auto",
                        dtype: str = "auto", batch_size: int = 16) -> ModelReward:
    """Load a ``train-rm`` folder as a reward function for ``side``.

    ``base`` must be a model instance of its own, never the policy being trained: the reward model
    injects its LoRA into the base it is given. With ``base=None`` the reward model loads the base
    recorded in its folder.
    """
    from personalign.reward_model import RewardModel

    rm = RewardModel.load(folder, base=base, tokenizer=tokenizer, device=device, dtype=dtype)
    for p in rm.parameters():
        p.requires_grad_(False)
    return ModelReward(rm, side, batch_size=batch_size, name=f"rm:{folder}")


class CallableReward:
    """A user's ``module:function``, with its output checked on every call. A function that also takes the
    side (a judge's contract, :mod:`personalign.judges.function`) is called with ``side``."""

    def __init__(self, fn: Callable[..., Any], name: str, side: str | None = None):
        from personalign.judges.function import function_sides, takes_side

        self.fn = fn
        self.name = name
        self.side = side if takes_side(fn) else None
        if takes_side(fn) and side is None:
            raise ConfigError(f"reward {name!r} takes the side it scores; give the side (--side)")
        declared = function_sides(fn)
        if self.side is not None and declared is not None and self.side not in declared:
            raise ConfigError(f"reward {name!r} scores side(s) {', '.join(declared)}, not {self.side}")

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        args = (list(prompts), list(responses)) + ((self.side,) if self.side is not None else ())
        return as_reward_tensor(self.fn(*args), len(responses), self.name)

    def __repr__(self) -> str:
        return f"CallableReward({self.name!r})"


def import_callable(target: str, what: str = "reward") -> Callable[..., Any]:
    """Import ``module:function`` (a reward or a judge), or a one-line error naming what is wrong."""
    if not _CALLABLE.match(target):
        raise ConfigError(f"{what} {target!r} is not of the form module:function")
    return _import_callable(target, what)


def _import_callable(target: str, what: str = "reward") -> Callable[..., Any]:
    help_text = SPEC_HELP if what == "reward" else "name a module on PYTHONPATH or in the current folder"
    module_name, _, attr = target.partition(":")
    # Console scripts do not put the current folder on sys.path; a user's rewards.py there should import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {target!r}: cannot import module {module_name!r} ({exc}); put it on "
                          f"PYTHONPATH or {help_text}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: say so in one line
        raise ConfigError(f"{what} {target!r}: importing {module_name!r} failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {target!r}: {module_name} has no attribute {attr!r}; name a function "
                              f"defined there as module:function")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what} {target!r} is a {type(obj).__name__}, not callable; it must be a function "
                          "(prompts: list[str], responses: list[str][, side: str]) -> one float per response")
    return obj


def callable_reward(target: str, side: str | None = None) -> CallableReward:
    """Import ``module:function`` as a reward function (for ``side``, when the function takes one)."""
    return CallableReward(import_callable(target), target, side)


# -- specs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec: ``kind`` is offline, rm or callable; ``target`` the folder or module:function."""

    kind: str
    target: str = ""

    def __str__(self) -> str:
        return {"offline": "offline", "rm": f"rm:{self.target}"}.get(self.kind, self.target)


def _rm_sides(folder: Path, spec: str) -> list[str]:
    from personalign.reward_model import CONFIG, WEIGHTS

    if not folder.is_dir():
        raise ConfigError(f"reward {spec!r}: folder {folder} does not exist; {SPEC_HELP}")
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ConfigError(f"reward {spec!r}: {folder} is not a reward-model folder (needs {CONFIG} and "
                          f"{WEIGHTS}; train one with train-rm)")
    try:
        doc = json.loads((folder / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / CONFIG} is unreadable ({exc}); retrain the reward model") from None
    if doc.get("kind") != "reward_model" or not isinstance(doc.get("sides"), list):
        raise ConfigError(f"reward {spec!r}: {folder} does not hold a reward model")
    return [str(s) for s in doc["sides"]]


def parse_reward_spec(spec: str, side: str | None = None) -> RewardSpec:
    """Parse and check ``spec`` without loading a model; with ``side``, check the source can score it.

    A path that exists wins over the ``module:function`` reading (``runs/rm:v2`` stays a folder).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"reward spec is empty; {SPEC_HELP}")
    spec = spec.strip()
    if spec == "offline":
        if side is not None:
            from personalign.judges.offline import SUPPORTED_SIDES

            if side not in SUPPORTED_SIDES:
                raise ConfigError(f"reward 'offline' cannot score side {side} (it measures "
                                  f"{', '.join(SUPPORTED_SIDES)}); give a reward model (rm:PATH) or "
                                  "module:function")
        return RewardSpec("offline")
    if spec.startswith("rm:") or Path(spec).exists():
        folder = Path(spec.removeprefix("rm:"))
        sides = _rm_sides(folder, spec)
        if side is not None and side not in sides:
            raise ConfigError(f"reward {spec!r} scores side(s) {', '.join(sides)}, not {side}; give the "
                              f"reward model trained for {side}")
        return RewardSpec("rm", str(folder))
    if _CALLABLE.match(spec):
        fn = _import_callable(spec)
        if side is not None:
            CallableReward(fn, spec, side)  # checks the sides the function declares
        return RewardSpec("callable", spec)
    raise ConfigError(f"reward {spec!r} is not a known reward: {SPEC_HELP} (no file or folder {spec!r} "
                      "exists)")


def reward_from_spec(spec: str | RewardSpec, side: str, base: PreTrainedModel | None = None,
                     tokenizer: PreTrainedTokenizerBase | None = None, *, device: str = "auto",
                     dtype: str = "auto") -> RewardFunction:
    """Build the reward function a spec names, for ``side`` (see :func:`reward_model_reward` on ``base``)."""
    parsed = spec if isinstance(spec, RewardSpec) else parse_reward_spec(spec, side)
    if parsed.kind == "offline":
        return offline_reward(side)
    if parsed.kind == "rm":
        return reward_model_reward(parsed.target, side, base, tokenizer, device=device, dtype=dtype)
    return callable_reward(parsed.target, side)


# -- combination (P-MORL) --------------------------------------------------------------------------


class CombinedReward:
    """Weighted mean of several sides' rewards, each normalised by its own running mean/std.

    Without per-side normalisation the side with the largest raw scale (a reward model's logits
    against an offline score in log2 units) would decide alone. ``weights`` default to 1 for every
    side; the result is ``sum_i w_i * norm_i(r_i) / sum_i |w_i|``. Statistics update on every call
    while ``update`` is True (set it False to score without moving them, e.g. for evaluation).
    ``last_raw`` keeps the latest raw rewards per side for logging.

    A call is :meth:`raw` then :meth:`combine`; data-parallel training calls them apart, scoring its
    slice of a batch and normalising the gathered batch (the statistics must see every process's rewards).
    """

    def __init__(self, rewards: Mapping[str, RewardFunction], weights: Mapping[str, float] | None = None,
                 update: bool = True):
        if not rewards:
            raise ConfigError("a combined reward needs at least one side")
        self.rewards = dict(rewards)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.rewards))
        if unknown:
            raise ConfigError(f"weights name side(s) {', '.join(unknown)} that have no reward")
        self.weights = {s: float(weights.get(s, 1.0)) for s in self.rewards}
        total = sum(abs(w) for w in self.weights.values())
        if not all(math.isfinite(w) for w in self.weights.values()) or total == 0:
            raise ConfigError(f"combined reward weights must be finite and not all zero, got {self.weights}")
        self._total = total
        self.stats = {s: RunningMeanStd() for s in self.rewards}
        self.update = update
        self.last_raw: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.combine(self.raw(prompts, responses))

    def raw(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        """Each side's raw rewards (n,), float32; kept in ``last_raw``."""
        self.last_raw = {side: as_reward_tensor(fn(prompts, responses), len(responses), f"for side {side}")
                         for side, fn in self.rewards.items()}
        return self.last_raw

    def combine(self, raw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted mean of each side's normalised ``raw`` rewards (n,), the statistics updated
        first (while ``update``)."""
        n = len(next(iter(raw.values())))
        out = torch.zeros(n)
        for side in self.rewards:
            if self.update:
                self.stats[side].update(raw[side])
            out += self.weights[side] * self.stats[side].normalize(raw[side]).float()
        return out / self._total

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {s: st.state_dict() for s, st in self.stats.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        missing = sorted(set(self.stats) - set(state))
        if missing:
            raise ModelError(f"combined reward state lacks side(s) {', '.join(missing)}")
        for s, st in self.stats.items():
            st.load_state_dict(dict(state[s]))

