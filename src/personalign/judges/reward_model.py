"""A pairwise judge from trained reward models: the response with the higher reward wins.

Used to evaluate with the controller's own training signal (``personalign eval --set judge=rm:FOLDER``);
never independent of the training labels, since the reward models learned them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personalign.errors import ConfigError
from personalign.judges.base import PairwiseJudge, UnsupportedSideError, Verdict

__all__ = ["RewardModelJudge", "reward_model_sources"]


def reward_model_sources(folder: str | Path, *, weights: bool = True) -> dict[str, Path]:
    """Side -> reward-model folder: ``folder`` itself, or its ``<name>/`` subfolders (pipeline's ``rm/``).

    Single-side models are preferred; a multi-head model covers the sides no single-side model has.
    Reads only the config files. ``weights=False`` accepts a folder whose weights are absent (for what
    its configs record, such as who labelled its pairs); a judge or reward needs them.
    """
    from personalign.reward_model import CONFIG, WEIGHTS

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"reward-model folder {folder} does not exist; "
                          "give a folder written by personalign "
                          "train-rm or the pipeline's rm/ folder")

    def sides_of(f: Path) -> list[str]:
        try:
            cfg = json.loads((f / CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{f / CONFIG} is not valid JSON ({exc.msg})") from None
        if cfg.get("kind") != "reward_model" or (weights and not (f / WEIGHTS).is_file()):
            raise ConfigError(f"{f} is not a complete reward model ({CONFIG} and {WEIGHTS})")
        return list(cfg["sides"])

    if (folder / CONFIG).is_file():
        return {s: folder for s in sides_of(folder)}
    single: dict[str, Path] = {}
    multi: list[tuple[Path, list[str]]] = []
    for sub in sorted(p for p in folder.iterdir() if (p / CONFIG).is_file()):
        sides = sides_of(sub)
        if len(sides) == 1:
            single.setdefault(sides[0], sub)
        else:
            multi.append((sub, sides))
    for sub, sides in multi:
        for s in sides:
            single.setdefault(s, sub)
    if not single:
        raise ConfigError(f"{folder} holds no reward model ({CONFIG}, directly or in subfolders)")
    return single


class RewardModelJudge(PairwiseJudge):
    """The response with the higher reward wins; a gap under ``margin`` is a tie.

    Rewards are Bradley-Terry scores, so ``sigmoid(r_a - r_b)`` is the model's probability that ``a``
    is better: a margin of 0.1 ties pairs it rates within 0.475-0.525. Models load on first use, one at
    a time, and each (side, prompt, response) is scored once (the reference's responses recur).
    """

    def __init__(self, folder: str | Path, margin: float = 0.1, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 16):
        self.folder = Path(folder)
        self.sources = reward_model_sources(folder)
        self.supported_sides = tuple(self.sources)
        self.margin = float(margin)
        self.name = f"rm:{self.folder.resolve()}"
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._loaded: tuple[Path, Any] | None = None
        self._memo: dict[tuple[str, str, str], float] = {}

    def _model(self, side: str) -> Any:
        from personalign.reward_model import RewardModel

        path = self.sources[side]
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = None  # release the previous model before loading the next
            self._loaded = (path, RewardModel.load(path, device=self.device, dtype=self.dtype))
        return self._loaded[1]

    def rewards(self, side: str, prompts: list[str], responses: list[str]) -> list[float]:
        if side not in self.sources:
            raise UnsupportedSideError(side, "reward-model", self.supported_sides)
        todo = sorted({(p, r) for p, r in zip(prompts, responses) if (side, p, r) not in self._memo})
        if todo:
            model = self._model(side)
            vals = model.score([p for p, _ in todo], [r for _, r in todo], side=side,
                               batch_size=self.batch_size)
            for (p, r), v in zip(todo, vals.tolist()):
                self._memo[(side, p, r)] = float(v)
        return [self._memo[(side, p, r)] for p, r in zip(prompts, responses)]

    def judge(self, prompt: str, a: str, b: str, side: str) -> Verdict:
        return self.judge_many([(prompt, a, b)], side)[0]

    def judge_many(self, items: Sequence[tuple[str, str, str]], side: str) -> list[Verdict]:
        items = list(items)
        ra = self.rewards(side, [p for p, _, _ in items], [a for _, a, _ in items])
        rb = self.rewards(side, [p for p, _, _ in items], [b for _, _, b in items])
        return ["tie" if abs(x - y) < self.margin else ("a" if x > y else "b") for x, y in zip(ra, rb)]
