from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from personalign.cli import app
from personalign.errors import ConfigError, DataError
from personalign.evaluation import agreement
from personalign.judges import HumanLabelJudge, JudgeConfig
from personalign.recipes import label, rollout

runner = CliRunner()

SHORT = "Rain is water falling from clouds."
LONG = ("Rain forms when water vapour in the atmosphere condenses into droplets around tiny particles; when the "
        "droplets grow heavy enough, gravity pulls them down, and the water cycle returns them to rivers and seas.")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_agreement_hand_computed():
    # 4 of 5 agree; x: a,a,b,b,tie ; y: a,a,b,tie,tie
    res = agreement(["a", "a", "b", "b", "tie"], ["a", "a", "b", "tie", "tie"])
    assert res["agreement"] == pytest.approx(0.8)
    p_e = (2 * 2 + 2 * 1 + 1 * 2) / 25
    assert res["kappa"] == pytest.approx((0.8 - p_e) / (1 - p_e))
    assert agreement(["a"], ["a"])["kappa"] == 1.0
    with pytest.raises(ValueError):
        agreement(["a"], [])


def test_make_pairs_groups_consecutive_samples():
    rows = [{"side": "P2A", "prompt": "q", "response": str(i)} for i in range(5)]
    rows.insert(2, {"side": "P2B", "prompt": "q", "response": "x"})
    pairs = label.make_pairs(rows)
    assert [(a["response"], b["response"]) for a, b in pairs] == [("0", "1"), ("2", "3")]
    every = label.make_pairs(rows[:4], "all")  # samples 0, 1, 2 of P2A (and one of P2B: no pair)
    assert [(a["response"], b["response"]) for a, b in every] == [("0", "1"), ("0", "2"), ("1", "2")]
    with pytest.raises(ConfigError, match="unknown pairing"):
        label.make_pairs(rows, "random")


def _rollouts(tmp_path):
    rows = []
    for i in range(3):
        for side in ("P2A", "P2B"):
            rows += [{"id": str(i), "prompt": f"Why does it rain {i}?", "side": side, "sample": 0, "response": SHORT},
                     {"id": str(i), "prompt": f"Why does it rain {i}?", "side": side, "sample": 1, "response": LONG}]
    # An identical pair: a tie, dropped.
    rows += [{"prompt": "Same?", "side": "P2A", "sample": 0, "response": SHORT},
             {"prompt": "Same?", "side": "P2A", "sample": 1, "response": SHORT}]
    return _write(tmp_path / "rollouts.jsonl", rows)


def test_label_offline_drops_ties_and_orders_pairs(tmp_path):
    out = tmp_path / "pairs.jsonl"
    stats = label.main(label.LabelConfig(rollouts=str(_rollouts(tmp_path)), output=str(out)))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["sides"]["P2A"] == {"pairs": 4, "ties_dropped": 1, "kept": 3}
    assert all(r["chosen"] == SHORT for r in rows if r["side"] == "P2A")
    assert all(r["chosen"] == LONG for r in rows if r["side"] == "P2B")
    assert set(rows[0]) >= {"prompt", "chosen", "rejected", "side", "judge"}
    assert json.loads((tmp_path / "pairs.jsonl.stats.json").read_text())["judges"] == ["offline"]


def test_label_two_judges_reports_agreement(tmp_path):
    roll = _rollouts(tmp_path)
    # Human labels that disagree with the offline judge on one P2A pair.
    human = [{"prompt": f"Why does it rain {i}?", "side": "P2A", "a": SHORT, "b": LONG, "verdict": "a"} for i in range(3)]
    human[0]["verdict"] = "b"
    human += [{"prompt": f"Why does it rain {i}?", "side": "P2B", "chosen": LONG, "rejected": SHORT} for i in range(3)]
    human += [{"prompt": "Same?", "side": "P2A", "a": SHORT, "b": SHORT, "verdict": "tie"}]
    labels = _write(tmp_path / "human.jsonl", human)
    judges = (JudgeConfig(), JudgeConfig(kind="human", labels=str(labels)))
    stats = label.main(label.LabelConfig(rollouts=str(roll), output=str(tmp_path / "p.jsonl"), judges=judges))
    ag = stats["sides"]["P2A"]["agreement"]["offline~human"]
    assert ag["pairs"] == 4 and ag["agreement"] == pytest.approx(0.75)
    assert stats["sides"]["P2B"]["agreement"]["offline~human"]["agreement"] == 1.0
    stats = label.main(label.LabelConfig(rollouts=str(roll), output=str(tmp_path / "u.jsonl"), judges=judges,
                                         combine="unanimous"))
    assert stats["sides"]["P2A"]["kept"] == 2 and stats["sides"]["P2A"]["disagreements_dropped"] == 1


def test_human_judge_flips_and_reports_missing(tmp_path):
    f = _write(tmp_path / "h.jsonl", [{"prompt": "p", "side": "concise", "a": "x", "b": "y", "verdict": "b"}])
    j = HumanLabelJudge(f)
    assert j.judge("p", "x", "y", "P2A") == "b"
    assert j.judge("p", "y", "x", "2A") == "a"
    with pytest.raises(DataError, match="no human label for side P2B"):
        j.judge("p", "x", "y", "P2B")
    bad = _write(tmp_path / "b.jsonl", [{"prompt": "p", "side": "P2A", "a": "x", "b": "y", "verdict": "maybe"}])
    with pytest.raises(DataError, match="verdict must be one of a, b, tie"):
        HumanLabelJudge(bad)


def test_label_bad_input(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        label.main(label.LabelConfig(rollouts=str(empty), output=str(tmp_path / "o.jsonl")))
    bad = _write(tmp_path / "b.jsonl", [{"prompt": "p", "side": "P2A"}])
    with pytest.raises(DataError, match="line 1 lacks string field.s. response"):
        label.main(label.LabelConfig(rollouts=str(bad), output=str(tmp_path / "o.jsonl")))
    single = _write(tmp_path / "s.jsonl", [{"prompt": "p", "side": "P2A", "response": "r"}])
    with pytest.raises(DataError, match="no instruction with two samples"):
        label.main(label.LabelConfig(rollouts=str(single), output=str(tmp_path / "o.jsonl")))
    for sides in (("P2A", "P1A"), ("elementary",)):  # a side asked for that the rollouts lack: named
        with pytest.raises(DataError, match=r"has no rollouts for side\(s\) P1A \(it has P2A, P2B\)"):
            label.main(label.LabelConfig(rollouts=str(_rollouts(tmp_path)), sides=sides,
                                         output=str(tmp_path / "o.jsonl")))
    with pytest.raises(ConfigError, match="needs a labels file"):
        JudgeConfig(kind="human")
    with pytest.raises(ConfigError, match="unknown judge 'gpt'"):
        JudgeConfig(kind="gpt")
    assert not (tmp_path / "o.jsonl").exists()


def test_judge_command(tmp_path):
    inp = _write(tmp_path / "pairs.jsonl", [{"prompt": "Why rain?", "a": LONG, "b": SHORT, "extra": 1}])
    res = runner.invoke(app, ["judge", "--side", "P2A", "--input", str(inp)])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)
    assert row["verdict"] == "b" and row["extra"] == 1 and row["side"] == "P2A"
    out = tmp_path / "v.jsonl"
    assert runner.invoke(app, ["judge", "--side", "informative", "-i", str(inp), "-o", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["verdict"] == "a"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--side", "P9Z"], "unknown preference side 'P9Z'"),
        (["--side", "P3D"], "cannot measure side 'P3D'"),
        (["--side", "P2A", "--judge", "llm"], "needs --base-url and --judge-model"),
    ],
)
def test_judge_command_errors(tmp_path, args, fragment):
    inp = _write(tmp_path / "pairs.jsonl", [{"prompt": "Why rain?", "a": LONG, "b": SHORT}])
    res = runner.invoke(app, ["judge", "--input", str(inp), *args])
    assert res.exit_code == 2 and fragment in res.output, res.output


def test_judge_command_malformed_line_keeps_existing_output(tmp_path):
    inp = tmp_path / "pairs.jsonl"
    inp.write_text('{"prompt": "p", "a": "x", "b": "y"}\n{"prompt": "p", "a": "x"\n')
    out = tmp_path / "v.jsonl"
    out.write_text("previous\n")
    res = runner.invoke(app, ["judge", "--side", "P2A", "-i", str(inp), "-o", str(out)])
    assert res.exit_code == 2 and ":2: malformed JSON" in res.output
    assert out.read_text() == "previous\n"


def test_rollout_plan_and_resume(tmp_path, tiny_model_dir):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "Why rain?"}, {"prompt": "Why snow?"}])
    cfg = rollout.RolloutConfig(output=str(tmp_path / "r.jsonl"), sides=("1A", "P2B"), prompts=str(prompts),
                                model=str(tiny_model_dir), batch_size=3, progress=False, device="cpu")
    plan = rollout.plan(cfg)
    assert [(r["side"], r["prompt"], r["sample"]) for r in plan][:3] == [
        ("P1A", "Why rain?", 0), ("P1A", "Why rain?", 1), ("P1A", "Why snow?", 0)]
    assert plan[0]["policy_prompt"].startswith("Generate a response that can be easily understood")
    from dataclasses import replace

    cfg = replace(cfg, sampling=replace(cfg.sampling, max_new_tokens=4))
    rollout.main(cfg)
    full = (tmp_path / "r.jsonl").read_text()
    assert len(full.splitlines()) == 8
    (tmp_path / "r.jsonl").write_text("".join(full.splitlines(keepends=True)[:3]))
    rollout.main(cfg)
    assert (tmp_path / "r.jsonl").read_text() == full
    (tmp_path / "r.jsonl").write_text("".join(full.splitlines(keepends=True)[:3]))
    with pytest.raises(DataError, match=r"different run \(sampling.seed 0 -> 5 differ\)"):  # never mixed
        rollout.main(replace(cfg, sampling=replace(cfg.sampling, seed=5)))
    with pytest.raises(ConfigError, match="listed twice"):
        rollout.plan(replace(cfg, sides=("P1A", "1A")))


def test_rollout_side_limits_extend_a_finished_file(tmp_path, tiny_model_dir):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": f"Why {w}?"} for w in ("rain", "snow", "hail", "fog")])
    from dataclasses import replace

    cfg = rollout.RolloutConfig(output=str(tmp_path / "r.jsonl"), sides=("P1A", "P2B"), prompts=str(prompts),
                                limit=2, model=str(tiny_model_dir), batch_size=4, progress=False, device="cpu")
    cfg = replace(cfg, sampling=replace(cfg.sampling, max_new_tokens=3))
    small = rollout.plan(cfg)
    more = replace(cfg, side_limits={"2B": 4})
    big = rollout.plan(more)
    assert big[:len(small)] == small  # the smaller run's rows are a prefix of the larger one's
    extra = [(r["side"], r["prompt"], r["sample"]) for r in big[len(small):]]
    assert extra == [("P2B", p, k) for p in ("Why hail?", "Why fog?") for k in (0, 1)]
    fewer = rollout.plan(replace(cfg, side_limits={"P1A": 1}))
    assert [r["prompt"] for r in fewer if r["side"] == "P1A"] == ["Why rain?", "Why rain?"]

    rollout.main(cfg)
    before = (tmp_path / "r.jsonl").read_text()
    rollout.main(more)  # extends the finished file with P2B's two extra instructions
    after = (tmp_path / "r.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == len(big)
    with pytest.raises(ConfigError, match="side_limits names 'P3A'"):
        rollout.plan(replace(cfg, side_limits={"P3A": 3}))
    with pytest.raises(ConfigError, match="at least 1"):
        rollout.plan(replace(cfg, side_limits={"P2B": 0}))

    # More samples for one side come last: the finished file is extended, never reordered.
    most = replace(more, side_samples={"P2B": 3})
    rows = rollout.plan(most)
    assert rows[:len(big)] == big
    assert [(r["side"], r["prompt"], r["sample"]) for r in rows[len(big):]] == [
        ("P2B", p, 2) for p in ("Why rain?", "Why snow?", "Why hail?", "Why fog?")]
    rollout.main(most)
    extended = (tmp_path / "r.jsonl").read_text()
    assert extended.startswith(after) and len(extended.splitlines()) == len(rows)
    third = [json.loads(x) for x in extended.splitlines()[len(big):]]
    assert [(r["side"], r["sample"]) for r in third] == [("P2B", 2)] * 4
    one = rollout.plan(replace(cfg, side_samples={"P1A": 1}))
    assert [r["sample"] for r in one if r["side"] == "P1A"] == [0, 0]
    with pytest.raises(ConfigError, match="side_samples.P2B must be a whole number"):
        rollout.plan(replace(cfg, side_samples={"P2B": 0}))
    with pytest.raises(ConfigError, match="side_samples names 'P3A'"):
        rollout.plan(replace(cfg, side_samples={"P3A": 3}))
