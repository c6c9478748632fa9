"""Pairwise judges: one verdict ("a", "b" or "tie") per pair of responses and side.

* :class:`OfflineJudge` measures text properties and needs no network or model
  (``pip install 'personalign[judges]'``);
* :class:`~personalign.judges.llm.LLMJudge` asks any OpenAI-compatible endpoint, one criterion at a
  time, both orders (``pip install 'personalign[api]'``);
* :class:`HumanLabelJudge` reads labels from a file;
* :class:`~personalign.judges.independent.IndependentJudge` measures with other signals and libraries
  than the offline judge, for evaluation only (``pip install 'personalign[independent]'``);
* :class:`~personalign.judges.function.FunctionJudge` asks a user's ``module:function`` to score the
  responses, for sides a user defines (:mod:`personalign.judges.function` has the contract).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from personalign.errors import ConfigError
from personalign.judges.base import PairwiseJudge, UnsupportedSideError, Verdict, flip_verdict
from personalign.judges.human import HumanLabelJudge
from personalign.judges.offline import DEFAULT_MARGINS, SUPPORTED_SIDES, OfflineJudge, side_score

__all__ = [
    "DEFAULT_MARGINS",
    "SUPPORTED_SIDES",
    "EVALUATION_ONLY",
    "FunctionJudge",
    "HumanLabelJudge",
    "IndependentJudge",
    "JudgeConfig",
    "LLMJudge",
    "OfflineJudge",
    "PairwiseJudge",
    "UnsupportedSideError",
    "Verdict",
    "build_judge",
    "flip_verdict",
    "side_score",
]

JUDGE_KINDS = ("offline", "independent", "llm", "human", "function")
# Judges that never label training data: an evaluation by them is independent of every shipped method.
EVALUATION_ONLY = ("independent",)


def __getattr__(name: str):  # noqa: ANN202 - lazy: LLMJudge needs the `api` extra (openai)
    if name == "LLMJudge":
        from personalign.judges.llm import LLMJudge

        return LLMJudge
    if name == "FunctionJudge":
        from personalign.judges.function import FunctionJudge

        return FunctionJudge
    if name == "IndependentJudge":
        from personalign.judges.independent import IndependentJudge

        return IndependentJudge
    raise AttributeError(name)


@dataclass(frozen=True)
class JudgeConfig:
    """Which judge to use; the fields of the other kinds are ignored."""

    kind: str = "offline"
    function: str | None = None  # function: the user's module:function (personalign.judges.function)
    labels: str | None = None  # human: the labels file
    base_url: str | None = None  # llm: e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # llm: the endpoint's model name
    api_key_env: str = "OPENAI_API_KEY"
    cache: str | None = None  # llm: on-disk answer cache
    concurrency: int = 4
    timeout: float = 60.0
    # offline and function: per side, the score difference below which a pair ties (e.g. {P3B: 1.0}); unset
    # sides keep DEFAULT_MARGINS (offline) or 0 (function)
    margins: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in JUDGE_KINDS:
            raise ConfigError(f"unknown judge {self.kind!r}; choose one of {', '.join(JUDGE_KINDS)}")
        if self.margins and self.kind not in ("offline", "function"):
            raise ConfigError(f"margins apply to the offline and function judges only, not to the {self.kind} "
                              "judge")
        if (self.kind == "function") != (self.function is not None):
            raise ConfigError("a function judge needs function: module:function (and function goes with kind "
                              "function only); on the command line write --judge module:function")
        if self.kind == "human" and not self.labels:
            raise ConfigError("the human judge needs a labels file (--labels FILE)")
        if self.kind == "llm" and not (self.base_url and self.model):
            raise ConfigError("the llm judge needs --base-url and --judge-model (an OpenAI-compatible endpoint)")


def build_judge(cfg: JudgeConfig, space=None) -> PairwiseJudge:  # noqa: ANN001
    if cfg.kind == "offline":
        return OfflineJudge(cfg.margins)
    if cfg.kind == "independent":
        from personalign.judges.independent import IndependentJudge

        return IndependentJudge()
    if cfg.kind == "function":
        from personalign.judges.function import FunctionJudge

        return FunctionJudge(cfg.function, cfg.margins)  # type: ignore[arg-type]
    if cfg.kind == "human":
        return HumanLabelJudge(cfg.labels, space=space)  # type: ignore[arg-type]
    from personalign.judges.llm import LLMJudge

    kwargs = {"space": space} if space is not None else {}
    return LLMJudge(base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                    timeout=cfg.timeout, cache_path=cfg.cache, **kwargs)
