"""The pieces of training the controller (MoPE's PCM) by REBEL, besides the PCM itself and the loss: the
preferences drawn for training, the reference replies (kept in the run folder), each side's reward of a
reply against its reference, and the reward scales. ``recipes/train_pcm.py`` runs them in order; the
utility and the loss are :func:`personalign.pcm.preference_utility` and
:func:`personalign.losses.rebel_loss`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from personalign.preferences import Preference, PreferenceSpace
    from personalign.rewards import RewardFunction, RewardSpec

__all__ = ["ReferenceCache", "SideRewards", "calibration_spread", "decode_responses", "sample_preference",
           "score_batch"]


def sample_preference(space: PreferenceSpace, sides: tuple[str, ...], combos: list[Preference],
                      rng: random.Random, weighted_fraction: float, alpha: float) -> Preference:
    """One training preference over ``sides``: a hard combination, or a random weighted one (see the
    module docstring). Always at least two sides with positive weight."""
    if not combos or rng.random() < weighted_fraction:
        dims = [[s for s in d.sides if s in sides] for d in space.dimensions.values()]
        dims = [d for d in dims if d]
        while True:
            chosen = rng.sample(dims, rng.randint(1, len(dims)))
            picked = [rng.choice(d) for d in chosen]
            if len(picked) == 1 and len(chosen[0]) > 1:  # one dimension: weigh two of its sides
                picked = rng.sample(chosen[0], 2)
            if len(picked) >= 2:
                break
        g = [rng.gammavariate(alpha, 1.0) for _ in picked]
        total = sum(g)
        # A Dirichlet draw can put (numerically) all mass on one side; keep every side present.
        w = [max(x / total, 1e-3) if total > 0 else 1.0 / len(g) for x in g]
        return space.parse({s: x / sum(w) for s, x in zip(picked, w)})
    return combos[rng.randrange(len(combos))]


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class ReferenceCache:
    """``y_ref`` per model input text (instruction + preference prompt), kept in a JSONL file.

    ``write=False``: kept in memory only (a data-parallel process other than the main one, which
    writes the file for every process)."""

    def __init__(self, path: Path, write: bool = True):
        self.path = path
        self.write = write
        self.responses: dict[str, str] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by an interruption: it is regenerated
                    self.responses[row["key"]] = row["response"]

    def missing(self, texts: list[str]) -> list[str]:
        out: list[str] = []
        for t in texts:
            if _key(t) not in self.responses and t not in out:
                out.append(t)
        return out

    def add(self, texts: list[str], responses: list[str]) -> None:
        for t, r in zip(texts, responses):
            self.responses[_key(t)] = r
        if self.write:
            with self.path.open("a", encoding="utf-8") as fh:
                for t, r in zip(texts, responses):
                    fh.write(json.dumps({"key": _key(t), "input": t, "response": r}) + "\n")

    def get(self, text: str) -> str:
        return self.responses[_key(text)]


class SideRewards:
    """r_j for every side j; a reward-model folder named for several sides is loaded once, and a
    multi-head model that reads no side prompt scores all its sides in one forward pass."""

    def __init__(self, specs: dict[str, RewardSpec], device: str, dtype: str):
        from personalign.rewards import ModelReward, reward_from_spec, reward_model_reward

        loaded: dict[str, Any] = {}
        self.fns: dict[str, RewardFunction] = {}
        for side, spec in specs.items():
            if spec.kind == "rm" and spec.target in loaded:
                self.fns[side] = ModelReward(loaded[spec.target], side, name=f"rm:{spec.target}")
            elif spec.kind == "rm":
                fn = reward_model_reward(spec.target, side, device=device, dtype=dtype)
                loaded[spec.target] = fn.model
                self.fns[side] = fn
            else:
                self.fns[side] = reward_from_spec(spec, side)

    def __call__(self, side: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
        from personalign.rewards import as_reward_tensor

        return as_reward_tensor(self.fns[side](prompts, responses), len(responses), f"for side {side}")

    def groups(self, sides: tuple[str, ...]) -> list[list[int]]:
        """Indices into ``sides``, grouped by what one forward pass can score: the sides of one
        multi-head model whose input carries no side prompt share a group; every other side is alone."""
        from personalign.rewards import ModelReward

        out: list[list[int]] = []
        shared: dict[int, list[int]] = {}
        for j, side in enumerate(sides):
            fn = self.fns[side]
            if isinstance(fn, ModelReward) and not fn.model.side_prompt_in_input:
                if id(fn.model) not in shared:
                    shared[id(fn.model)] = []
                    out.append(shared[id(fn.model)])
                shared[id(fn.model)].append(j)
            else:
                out.append([j])
        return out

    def score_group(self, sides: list[str], prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Rewards (N, len(sides)) of one group from :meth:`groups`, in one pass where it shares a model."""
        from personalign.rewards import ModelReward, as_reward_tensor

        fn = self.fns[sides[0]]
        if len(sides) == 1 or not isinstance(fn, ModelReward):
            return torch.stack([self(s, prompts, responses) for s in sides], dim=1)
        vals = fn.model.score(list(prompts), list(responses), batch_size=fn.batch_size)  # (N, K), every side
        if vals.dim() == 1:
            vals = vals[:, None]
        cols = [fn.model.side_index(s) for s in sides]
        return torch.stack([as_reward_tensor(vals[:, c], len(responses), f"for side {s}")
                            for s, c in zip(sides, cols)], dim=1)


def decode_responses(tokenizer: PreTrainedTokenizerBase, tokens: torch.Tensor, mask: torch.Tensor,
                     eos_ids: list[int]) -> list[str]:
    """Response texts from (B, T) tokens and the (B, T) mask (which covers the end-of-sequence token)."""
    out = []
    for row, m in zip(tokens.tolist(), mask.tolist()):
        n = int(sum(m))
        if n and row[n - 1] in eos_ids:
            n -= 1
        out.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    return out


def score_batch(rewards: SideRewards, sides: tuple[str, ...], prompts: list[str], responses: list[str],
                refs: list[str], pref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards (N, S) of the responses and (N, S) of their references, on the active sides only
    (NaN elsewhere). Rows: N = len(responses); ``refs`` and ``pref`` (N, S) are aligned with them.
    Sides one multi-head model scores together are scored in one pass over the rows active on any."""
    n = len(responses)
    r = torch.full((n, len(sides)), math.nan)
    r_ref = torch.full((n, len(sides)), math.nan)
    for group in rewards.groups(sides):
        active = pref[:, group] > 0  # (N, G)
        rows = active.any(dim=1).nonzero().flatten().tolist()
        if not rows:
            continue
        # Each reference is scored once even though both responses of a pair share it.
        uniq = sorted({(prompts[i], refs[i]) for i in rows})
        texts = [prompts[i] for i in rows] + [p for p, _ in uniq]
        vals = rewards.score_group([sides[j] for j in group], texts,
                                   [responses[i] for i in rows] + [y for _, y in uniq])  # (M, G)
        ref_row = {key: len(rows) + k for k, key in enumerate(uniq)}
        for g, j in enumerate(group):
            for k, i in enumerate(rows):
                if active[i, g]:
                    r[i, j] = vals[k, g]
                    r_ref[i, j] = vals[ref_row[(prompts[i], refs[i])], g]
    return r, r_ref


def calibration_spread(raw: torch.Tensor, raw_other: torch.Tensor) -> torch.Tensor:
    """Per side, the root mean square of ``r_j(y) - r_j(y')`` over the rows where side j was scored
    (non-NaN): (N, S), (N, S) -> (S,), NaN for a side with no scored row. Two replies of one policy
    to one input: the reward gap a side typically shows, its natural unit."""
    diff = raw - raw_other
    seen = ~torch.isnan(diff)
    sq = torch.where(seen, diff, 0.0).pow(2).sum(0)
    n = seen.sum(0)
    return torch.where(n > 0, (sq / n.clamp_min(1)).sqrt(), torch.full_like(sq, math.nan))
