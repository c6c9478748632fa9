"""Reward functions: specs parse and fail early, every source returns (N,) floats, and the combined
(P-MORL) reward normalises each side before averaging."""

from __future__ import annotations

import pytest
import torch

from personalign.errors import ConfigError, PersonalignError
from personalign.judges.base import UnsupportedSideError
from personalign.rewards import (
    CombinedReward,
    RewardFunction,
    RewardSpec,
    as_reward_tensor,
    callable_reward,
    offline_reward,
    parse_reward_spec,
    reward_from_spec,
)

PROMPTS = ["What is rain?", "Explain photosynthesis to me."]
RESPONSES = ["Water falling from clouds.",
             ("Plants use sunlight, water and carbon dioxide to make sugar and oxygen, which is how they "
              "grow; in other words, they make food from light, basically, you know.")]


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def wrong_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [1.0]


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan")] * len(responses)


NOT_CALLABLE = "text"


def test_offline_reward_matches_side_score():
    from personalign.judges.offline import side_score

    fn = reward_from_spec("offline", "P2A")
    assert isinstance(fn, RewardFunction)
    got = fn(PROMPTS, RESPONSES)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert got.tolist() == pytest.approx([side_score("P2A", p, r) for p, r in zip(PROMPTS, RESPONSES)])
    assert got[0] > got[1]  # the concise answer wins on P2A
    with pytest.raises(UnsupportedSideError):
        offline_reward("P3C")


def test_callable_reward_imports_and_checks_output():
    fn = reward_from_spec(f"{__name__}:length_reward", "P2A")
    assert fn(PROMPTS, RESPONSES).tolist() == [float(len(r)) for r in RESPONSES]
    with pytest.raises(ConfigError, match="shape \\(1,\\) for 2 responses"):
        callable_reward(f"{__name__}:wrong_length")(PROMPTS, RESPONSES)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        callable_reward(f"{__name__}:nan_reward")(PROMPTS, RESPONSES)


def test_as_reward_tensor_accepts_lists_and_columns():
    assert as_reward_tensor([1, 2], 2, "x").tolist() == [1.0, 2.0]
    assert as_reward_tensor(torch.tensor([[1.0], [2.0]]), 2, "x").tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError, match="not numbers"):
        as_reward_tensor(["a", "b"], 2, "x")


@pytest.mark.parametrize(("spec", "side", "match"), [
    ("", "P2A", "empty"),
    ("offline", "P3D", "cannot score side P3D"),
    ("no_such_module_xyz:fn", "P2A", "cannot import module 'no_such_module_xyz'"),
    (f"{__name__}:missing", "P2A", "has no attribute 'missing'"),
    (f"{__name__}:NOT_CALLABLE", "P2A", "not callable"),
    ("rm:/no/such/rm", "P2A", "does not exist"),
    ("just words", "P2A", "not a known reward"),
])
def test_bad_specs_fail_with_one_line(spec, side, match):
    with pytest.raises(PersonalignError, match=match) as info:
        parse_reward_spec(spec, side)
    assert "\n" not in str(info.value)


def test_folder_that_is_not_a_reward_model(tmp_path):
    with pytest.raises(ConfigError, match="not a reward-model folder"):
        parse_reward_spec(str(tmp_path), "P2A")


def test_reward_model_spec_loads_and_scores(tmp_path, tiny):
    from personalign.reward_model import RewardModel

    base, tok = tiny
    rm = RewardModel(base, tok, ["P2A"], side_prompts={"P2A": "Be brief."})
    folder = rm.save(tmp_path / "rm-P2A")
    assert parse_reward_spec(f"rm:{folder}", "P2A") == RewardSpec("rm", str(folder))
    assert parse_reward_spec(str(folder), "P2A") == RewardSpec("rm", str(folder))  # a bare folder works too
    with pytest.raises(ConfigError, match="scores side\\(s\\) P2A, not P1A"):
        parse_reward_spec(f"rm:{folder}", "P1A")
    # With no base given, the reward model loads the base recorded in its folder (its own copy).
    fn = reward_from_spec(f"rm:{folder}", "P2A", device="cpu")
    got = fn(PROMPTS, RESPONSES)
    assert got.shape == (2,)
    torch.testing.assert_close(got, rm.score(PROMPTS, RESPONSES, side="P2A").float(), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in fn.model.parameters())


def _const(values: list[float]):
    return lambda prompts, responses: torch.tensor(values[: len(responses)])


def test_combined_reward_normalises_each_side_before_averaging():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([40.0, 10.0, 30.0, 20.0])
    combined = CombinedReward({"P2A": _const(a.tolist()), "P1A": _const(b.tolist())})
    got = combined(["x"] * 4, ["y"] * 4)

    def z(x: torch.Tensor) -> torch.Tensor:  # first batch: the running stats are the batch's own
        return (x - x.mean()) / x.std(unbiased=False)

    torch.testing.assert_close(got, (z(a) + z(b)) / 2, atol=1e-3, rtol=1e-3)
    assert set(combined.last_raw) == {"P2A", "P1A"} and torch.equal(combined.last_raw["P1A"], b)

    # A side's raw scale does not matter: multiplying it by 1000 changes nothing.
    scaled = CombinedReward({"P2A": _const(a.tolist()), "P1A": _const((1000 * b).tolist())})
    torch.testing.assert_close(scaled(["x"] * 4, ["y"] * 4), got, atol=1e-3, rtol=1e-3)

    # Weights: sum w_i z_i / sum |w_i|; a single side with weight 1 is that side, normalised.
    weighted = CombinedReward({"P2A": _const(a.tolist()), "P1A": _const(b.tolist())}, {"P2A": 3.0})
    torch.testing.assert_close(weighted(["x"] * 4, ["y"] * 4), (3 * z(a) + z(b)) / 4, atol=1e-3, rtol=1e-3)


def test_combined_reward_state_round_trip_and_frozen_stats():
    fns = {"P2A": _const([1.0, 5.0]), "P2B": _const([0.0, 2.0])}
    first = CombinedReward(fns)
    first(["x", "x"], ["y", "y"])
    second = CombinedReward(fns, update=False)
    second.load_state_dict(first.state_dict())
    first.update = False
    assert torch.equal(first(["x", "x"], ["y", "y"]), second(["x", "x"], ["y", "y"]))
    before = second.state_dict()
    second(["x", "x"], ["y", "y"])
    assert second.state_dict() == before  # update=False leaves the statistics alone


def test_combined_reward_rejects_bad_weights():
    with pytest.raises(ConfigError, match="no reward"):
        CombinedReward({"P2A": _const([1.0])}, {"P9": 1.0})
    with pytest.raises(ConfigError, match="not all zero"):
        CombinedReward({"P2A": _const([1.0])}, {"P2A": 0.0})
    with pytest.raises(ConfigError, match="at least one side"):
        CombinedReward({})
