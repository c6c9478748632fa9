"""A user's own dimension: a module:function judge through label, judge, train-rm, train-expert and eval;
four-way soups and K=4 mixtures keep the invariances of three.

The dimension and its judge are the shipped example (examples/structure), imported as a user would.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from personalign.cli import app
from personalign.config import from_dict
from personalign.errors import ConfigError, DataError
from personalign.judges import FunctionJudge, JudgeConfig, UnsupportedSideError, build_judge
from personalign.preferences import load_space

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "structure"
DIMS = str(EXAMPLE / "dimensions.yaml")
JUDGE = "structure_judge:score"
SIDES = ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B", "P4A", "P4B"]
LIST = "Tips:\n- sleep well\n- eat greens\n- walk daily"
PROSE = "Sleep well every night. Eat greens with each meal. Walk daily, because it helps."
runner = CliRunner()


@pytest.fixture(autouse=True)
def _example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("structure_judge", None)
    sys.modules.pop("markdown_judge", None)
    sys.modules.pop("prose_judge", None)
    sys.modules.pop("coherence_judge", None)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the judge -------------------------------------------------------------------------------------------


def test_the_prose_judge_passes_its_hand_written_pairs_where_the_other_two_judges_fail():
    import prose_judge

    table = prose_judge.validate()  # the shipped pairs, at the documented margin
    assert table["prose_judge"]["all"] >= 0.9 and table["prose_judge"]["held_out"] >= 0.9
    import markdown_judge
    import structure_judge

    others = prose_judge.validate(judges={"structure_judge": structure_judge.score,
                                          "markdown_judge": markdown_judge.score})
    # more, shorter sentences win the labelling judge; the Markdown judge ties anything without a list
    assert others["structure_judge"]["choppy"] < 0.5 and others["structure_judge"]["lines"] < 0.5
    assert others["markdown_judge"]["choppy"] == others["markdown_judge"]["fragments"] == 0.5


def test_the_prose_judge_scores_sentences_paragraphs_and_flow():
    import prose_judge

    para = ("Plants make food from light. They take in water and carbon dioxide, "
            "and their green leaves turn both of them into sugar.")
    one_per_line = para.replace(". ", ".\n")
    fn = prose_judge.score
    assert fn(["q"], [para], "P4B")[0] > 0.95
    assert fn(["q"], [""], "P4B") == [-10.0]
    assert fn(["q"], [LIST], "P4B") == [0.0]  # list items and a label line are never prose
    assert fn(["q"], ["leaves, light, sugar; water in, oxygen out"], "P4B") == [0.0]  # fragments
    s_line, = fn(["q"], [one_per_line], "P4B")
    assert 0.4 < s_line < 1.0 - prose_judge.MARGIN  # full sentences, no paragraph
    m = prose_judge.parts("The cat sat down. Rockets are loud today. Bread is baked daily.")
    assert m["cohesion"] == 0.0 and m["S"] == 1.0  # no link word, no shared content word
    m = prose_judge.parts("The cat sat down. Then the cat slept all day long.")
    assert m["cohesion"] == 1.0
    joined = prose_judge.parts("Plants make food from light and\nwater in their leaves every day.")
    assert joined["S"] == 1.0  # a line that continues in lower case belongs to the line before
    assert prose_judge.score.sides == ("P4B",)



def test_the_coherence_judge_splits_markup_sentences_and_the_finished_end():
    import coherence_judge as cj

    markup, sentences, finished = cj.split("## Plan\nSleep well every night. Then walk\n- eat greens")
    assert sentences == ["Sleep well every night.", "Then walk"] and not finished
    assert markup == pytest.approx(3 / 9)  # "Plan" and "eat greens": three words of nine
    assert cj.split("It rained. We stayed in!")[1:] == (["It rained.", "We stayed in!"], True)
    assert cj.split("   ") == (0.0, [], False)
    # a later sentence earns a gain only when it is a full sentence that does not repeat the text before it
    assert cj.counts("The leaves turn sugar into energy.", ["Plants make sugar."])
    assert not cj.counts("Keeps us warm.", ["Gravity pulls."])  # a fragment
    assert not cj.counts("Plants make sugar from light, in short.", ["Plants make sugar from light."])


def test_the_coherence_judge_scores_with_a_model_it_loads_once(tiny_model_dir, monkeypatch):
    import coherence_judge as cj

    monkeypatch.setenv("PERSONALIGN_COHERENCE_MODEL", str(tiny_model_dir))
    cj._model.cache_clear()
    try:
        prose = "Plants make food from light. They turn water and carbon dioxide into sugar in their leaves."
        fragments = "Plants. Light and water. Sugar made. Leaves green."
        repeated = "Plants make food from light. Plants make food from light, truly."
        parts = cj.parts(["How do plants eat?"] * 4, [prose, fragments, repeated, "- a list\n- of points"])
        assert parts[0]["G"] != 0.0 and parts[0]["E"] == 1.0 and parts[0]["M"] == 0.0
        assert parts[1]["G"] == parts[2]["G"] == 0.0  # fragments and copying earn no gain
        assert parts[3] == {"M": 1.0, "E": 0.0, "G": 0.0}
        scores = cj.score(["How do plants eat?"] * 3, [prose, "", "One full sentence stands alone here."], "P4B")
        assert scores[0] == pytest.approx(parts[0]["G"] + 0.3, abs=1e-5)  # G + 0.3 E - M
        assert scores[1:] == [-10.0, 0.3]  # empty; one sentence has no gain
        # the gain is a difference of log-probabilities the model gives: the same with every batch size
        one = cj.context_gains(["q"], [cj.split(prose)[1]])
        assert one[0] == pytest.approx(cj.context_gains(["q"] * 2, [cj.split(prose)[1]] * 2)[1], abs=1e-5)
        assert cj._model.cache_info().misses == 1
    finally:
        cj._model.cache_clear()
    assert cj.score.sides == ("P4B",)


def test_the_evaluation_judge_reads_markdown_and_differs_from_the_labelling_judge_where_it_should():
    import markdown_judge
    import structure_judge

    both = (markdown_judge.score, structure_judge.score)
    for fn in both:  # clear cases: both judges agree
        a, p = fn(["q", "q"], [LIST, PROSE], "P4A")
        assert a > p
        a, p = fn(["q", "q"], [LIST, PROSE], "P4B")
        assert p > a
        assert fn(["q"], [""], "P4A") == fn(["q"], [" "], "P4B") == [-10.0]
    # a "\u2022" line is a list item to the labelling judge, a paragraph to CommonMark
    dots = "Tips:\n\u2022 sleep well\n\u2022 eat greens\n\u2022 walk daily"
    assert structure_judge.score(["q"], [dots], "P4A")[0] > 0.5
    assert markdown_judge.score(["q"], [dots], "P4A") == [0.0]
    # words, not lines: one long paragraph over one short bullet is mostly prose to this judge
    mixed = "A long paragraph of many words that explains the whole idea in full sentences here.\n\n- short"
    assert markdown_judge.score(["q"], [mixed], "P4A")[0] < 0.2 + 0.05
    assert markdown_judge.score(["q"], ["# Title\n\n" + PROSE], "P4B")[0] == pytest.approx(0.75)
    assert markdown_judge.score.sides == ("P4A", "P4B")


def test_the_function_judge_decides_by_the_score_difference_and_refuses_other_sides():
    judge = build_judge(JudgeConfig(kind="function", function=JUDGE))
    assert isinstance(judge, FunctionJudge) and judge.name == JUDGE
    assert judge.judge_many([("q", LIST, PROSE), ("q", PROSE, LIST), ("q", LIST, LIST)], "P4A") == ["a", "b", "tie"]
    assert judge.judge_many([("q", LIST, PROSE)], "P4B") == ["b"]
    with pytest.raises(UnsupportedSideError, match="cannot measure side 'P2A'"):
        judge.judge_many([("q", LIST, PROSE)], "P2A")
    wide = FunctionJudge(JUDGE, margins={"P4A": 5.0})  # a margin larger than any difference: ties
    assert wide.judge_many([("q", LIST, PROSE)], "P4A") == ["tie"]


def _module(tmp_path, monkeypatch, body):
    (tmp_path / "userjudge.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("userjudge", None)
    return "userjudge:f"


@pytest.mark.parametrize(("body", "error", "message"), [
    ("def f(prompts, responses, side):\n    return [1.0]\n", DataError, "returned 1 scores for 2 responses"),
    ("def f(prompts, responses, side):\n    return [float('nan')] * len(responses)\n", DataError, "finite"),
    ("def f(prompts, responses, side):\n    return 'ab'\n", DataError, "returned 2 scores|not one number"),
])
def test_a_function_that_breaks_the_contract_is_named_in_one_line(tmp_path, monkeypatch, body, error, message):
    judge = FunctionJudge(_module(tmp_path, monkeypatch, body))
    with pytest.raises(error, match=message):
        judge.judge_many([("q", "a", "b")], "P4A")


@pytest.mark.parametrize(("spec", "message"), [
    ("nosuchmodule_xyz:score", "cannot import module 'nosuchmodule_xyz'"),
    ("structure_judge:nosuch", "has no attribute 'nosuch'"),
    ("structure_judge:EMPTY", "is a float, not callable"),
    ("structure_judge:layout", "must take (prompts, responses, side)"),
    ("not a function", "not of the form module:function"),
])
def test_a_malformed_judge_is_one_line_before_any_model_loads(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_judge(JudgeConfig(kind="function", function=spec))
    with pytest.raises(ConfigError, match="needs function"):
        JudgeConfig(kind="function")


def test_the_commands_refuse_a_malformed_judge_before_loading_a_model(tmp_path, monkeypatch):
    import personalign.models

    monkeypatch.setattr(personalign.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    rollouts = _write(tmp_path / "r.jsonl", [{"prompt": "q", "side": "P4A", "response": LIST, "policy_prompt": ""}] * 2)
    pairs = _write(tmp_path / "p.jsonl", [{"prompt": "q", "a": LIST, "b": PROSE}])
    for args in (["label", "-i", str(rollouts), "-o", str(tmp_path / "o.jsonl"), "--judge", "nosuchmod_q:f"],
                 ["judge", "--side", "P4A", "-i", str(pairs), "--judge", "nosuchmod_q:f"],
                 ["eval", "-o", str(tmp_path / "run"), "--judge", "nosuchmod_q:f", "--set", "methods=[vanilla]"],
                 ["train-expert", "--side", "P4A", "--reward", "nosuchmod_q:f", "-o", str(tmp_path / "x")]):
        result = runner.invoke(app, [*args, "--dimensions", DIMS] if args[0] in ("label", "judge") else
                               [*args, "--set", f"dimensions={DIMS}"])
        assert result.exit_code == 2, (args, result.output)
        assert "cannot import module 'nosuchmod_q'" in result.output and "Traceback" not in result.output
    # a reward that declares its sides refuses another side before any model loads
    result = runner.invoke(app, ["train-expert", "--side", "P2A", "--reward", JUDGE, "-o", str(tmp_path / "y")])
    assert result.exit_code == 2 and "scores side(s) P4A, P4B, not P2A" in result.output


# -- through every command, on the tiny model ------------------------------------------------------------


def test_label_judge_train_rm_train_expert_with_the_users_judge(tmp_path, tiny_model_dir):
    from personalign.recipes import judge as judge_recipe
    from personalign.recipes import label, train_expert, train_rm

    # rollouts: lists and prose for the bulleted side, two samples per instruction
    rows = []
    for i in range(12):
        q = f"Give advice number {i}."
        rows += [{"prompt": q, "side": "P4A", "response": f"Advice {i}:\n- rest\n- drink water\n- walk {i}",
                  "policy_prompt": ""},
                 {"prompt": q, "side": "P4A", "response": f"Rest, drink water and walk {i} times. It helps.",
                  "policy_prompt": ""}]
    rollouts = _write(tmp_path / "rollouts.jsonl", rows)
    stats = label.main(from_dict(label.LabelConfig, {
        "rollouts": str(rollouts), "output": str(tmp_path / "pairs.jsonl"), "dimensions": DIMS,
        "judges": [{"kind": "function", "function": JUDGE}]}))
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert stats["sides"]["P4A"]["kept"] == 12 and all("\n- " in p["chosen"] for p in pairs)
    assert {p["judge"] for p in pairs} == {JUDGE}  # the label source, for provenance

    verdicts = judge_recipe.main(from_dict(judge_recipe.JudgeFileConfig, {
        "side": "bulleted", "input": str(_write(tmp_path / "ab.jsonl", [{"prompt": "q", "a": PROSE, "b": LIST}])),
        "dimensions": DIMS, "judge": {"kind": "function", "function": JUDGE}}))
    assert verdicts[0]["verdict"] == "b" and verdicts[0]["judge"] == JUDGE

    rm = train_rm.main(train_rm.TrainRMConfig(
        pairs=str(tmp_path / "pairs.jsonl"), output_dir=str(tmp_path / "rm"), model=str(tiny_model_dir),
        dimensions=DIMS, lr=5e-3, epochs=3, batch_size=4, progress=False, device="cpu", autocast_bf16=False))
    assert rm["eval/accuracy"] >= 0.5 and json.loads((tmp_path / "rm" / "reward_config.json").read_text())[
        "sides"] == ["P4A"]

    result = train_expert.main(train_expert.TrainExpertConfig(
        side="P4A", output_dir=str(tmp_path / "expert"), model=str(tiny_model_dir), dimensions=DIMS,
        reward=JUDGE, steps=2, batch_prompts=2, group_size=2, max_new_tokens=6, progress=False, device="cpu",
        limit=8))
    metrics = [json.loads(x) for x in (tmp_path / "expert" / "metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == 2 and all("train/reward_raw" in m for m in metrics if "train/loss" in m)
    expert_doc = json.loads((tmp_path / "expert" / "expert.json").read_text())
    assert expert_doc["side"] == "P4A" and expert_doc["reward"] == JUDGE


def test_eval_with_the_users_judge_over_four_dimensions(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import save_side_experts

    from personalign.recipes import evaluate

    class Embedder:
        def encode(self, texts, **kw):
            return np.array([[len(t) + 1.0, t.count("e") + 1.0] for t in texts])

    monkeypatch.setattr(evaluate, "load_embedder", lambda device="auto": Embedder())
    experts = save_side_experts(tiny_model_dir, tmp_path / "experts", SIDES)
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "Explain rain."}])
    base = {"run_dir": str(tmp_path / "run"), "model": str(tiny_model_dir), "experts": str(experts),
            "dimensions": DIMS, "prompts": str(prompts), "methods": ["soup-exact", "mope-prob"],
            "batch_size": 2, "device": "cpu", "dtype": "float32", "progress": False, "bootstrap_resamples": 50,
            "sampling": {"max_new_tokens": 3}}
    # every combination of four dimensions has a criterion this judge cannot measure: refused up front
    with pytest.raises(UnsupportedSideError, match="cannot measure side 'P1A'"):
        evaluate.main(from_dict(evaluate.EvalConfig, {**base, "judge": JUDGE}))
    assert not (tmp_path / "run" / "generations").exists()
    # the built-in sides keep the offline judge, the new dimension goes to its own, over the 16 combinations
    routed = {"P4A": JUDGE, "prose": JUDGE}
    results = evaluate.main(from_dict(evaluate.EvalConfig, {**base, "side_judges": routed}))
    assert len(results["combinations"]) == 16
    assert re.fullmatch(r"offline\+P4A-fn-structure_judge_score-\w+\+P4B-fn-structure_judge_score-\w+",
                        results["judge"]), results["judge"]
    for m in ("soup-exact", "mope-prob"):
        assert set(results["win_rates"][m]["by_criterion"]) == set(SIDES)
        assert sum(results["win_rates"][m]["counts"].values()) == 16 * 4  # combinations x criteria
    verdicts = {}
    folder = tmp_path / "run" / "judgments" / results["judge"] / "soup-exact"
    for path in folder.glob("*.jsonl"):
        for row in map(json.loads, path.read_text().splitlines()):
            verdicts[row["side"]] = row
    assert set(verdicts) == set(SIDES)
    assert results["judge_sources"] == ["offline", JUDGE]
    with pytest.raises(ConfigError, match="unknown judge 'nosuch'"):
        from_dict(evaluate.EvalConfig, {**base, "side_judges": {"P4A": "nosuch"}})


# -- four-way composition keeps the invariances ------------------------------------------------------------


def test_the_space_with_a_fourth_dimension_has_sixteen_combinations():
    space = load_space(DIMS)
    combos = space.combinations()
    assert len(combos) == 16 and all(len(c.sides) == 4 for c in combos)
    assert space.parse("1A,2B,3A,bulleted").sides == ("P1A", "P2B", "P3A", "P4A")


def test_four_way_merges_are_exact_and_one_expert_at_weight_one_is_that_expert():
    from personalign.adapters import LoraAdapter, module_delta
    from personalign.merging import merge_adapters

    def adapter(seed, a=None):
        g = torch.Generator().manual_seed(seed)
        t = {"base_model.model.l.q_proj.lora_A.weight": a if a is not None else torch.randn(4, 10, generator=g),
             "base_model.model.l.q_proj.lora_B.weight": torch.randn(6, 4, generator=g)}
        return LoraAdapter(tensors=t, r=4, lora_alpha=8, target_modules=["q_proj"], base_model="tiny")

    four = [adapter(i) for i in range(4)]
    m = "base_model.model.l.q_proj"
    w = [0.4, 0.3, 0.2, 0.1]
    exact, _ = merge_adapters(four, w, "exact")
    torch.testing.assert_close(module_delta(exact, m), sum(wi * module_delta(a, m) for wi, a in zip(w, four)))
    for i in range(4):
        one, _ = merge_adapters(four, [1.0 if j == i else 0.0 for j in range(4)], "psoups")
        torch.testing.assert_close(module_delta(one, m), module_delta(four[i], m))
    shared = [adapter(i, a=four[0].tensors[m + ".lora_A.weight"]) for i in range(4)]  # equal A: psoups is exact
    ps, _ = merge_adapters(shared, w, "psoups")
    ex, _ = merge_adapters(shared, w, "exact")
    torch.testing.assert_close(module_delta(ps, m), module_delta(ex, m))


def test_a_k4_mixture_with_all_weight_on_one_expert_is_that_expert(tiny, tiny_model_dir, tmp_path):
    from conftest import save_side_experts

    from personalign.generation import SamplingConfig
    from personalign.personalize import MethodOptions, personalize, resolve

    model, tok = tiny
    experts = save_side_experts(tiny_model_dir, tmp_path / "experts", ["P1A", "P2B", "P3A", "P4A"])
    greedy = SamplingConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
    q = ["Explain rain.", "Name three rivers."]

    def run(prefs, method, **o):
        spec = resolve(prefs, MethodOptions(method=method, experts=str(experts), **o), model=str(tiny_model_dir),
                       dimensions=DIMS)
        return personalize(model, tok, spec).generate(q, greedy), spec

    alone, _ = run("P4A", "expert")
    for mix in ("prob", "logit", "extrapolate"):
        # every expert of the four in the batch, weight only on P4A (the others exactly zero)
        mixed, spec = run("P1A=0,P2B=0,P3A=0,P4A=1", "mope", mix=mix)
        assert mixed == alone, mix
    four, spec = run("1A,2B,3A,4A", "mope")
    assert list(spec.weights) == ["P1A", "P2B", "P3A", "P4A"] and four != alone


def test_the_pareto_sweep_scores_the_new_dimension_with_the_users_function(tmp_path, tiny_model_dir):
    from conftest import save_side_experts

    from personalign.recipes import pareto

    experts = save_side_experts(tiny_model_dir, tmp_path / "experts", SIDES)
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "Explain rain."}, {"prompt": "Name a colour."}])
    base = {"run_dir": str(tmp_path / "pareto"), "model": str(tiny_model_dir), "experts": str(experts),
            "dimensions": DIMS, "prompts": str(prompts), "sides": ["bulleted", "prose"], "weights": [0, 1],
            "fixed": ["P1A"], "batch_size": 2, "device": "cpu", "dtype": "float32", "progress": False,
            "sampling": {"max_new_tokens": 4}}
    # the offline judge cannot score the new sides: refused before any model loads, naming the way out
    with pytest.raises(ConfigError, match="cannot score side.*P4A.*module:function"):
        pareto.validate(from_dict(pareto.ParetoConfig, base))
    with pytest.raises(ConfigError, match="neither offline nor module:function"):
        from_dict(pareto.ParetoConfig, {**base, "scorer": "structure"})
    with pytest.raises(UnsupportedSideError):  # a function that declares other sides refuses these
        pareto.validate(from_dict(pareto.ParetoConfig, {**base, "sides": ["P1A", "P1B"], "fixed": [],
                                                        "scorer": JUDGE}))
    result = pareto.main(from_dict(pareto.ParetoConfig, {**base, "scorer": JUDGE}))
    assert result["sides"] == ["P4A", "P4B"] and result["scorer"] == JUDGE
    import structure_judge

    rows = [json.loads(x) for x in (tmp_path / "pareto/generations/soup-psoups/w1.jsonl").read_text().splitlines()]
    texts = [r["response"] for r in rows]
    point = result["methods"]["soup-psoups"]["points"][1]
    assert point["weight"] == 1 and rows[0]["prefs"] == "P1A=1,P4A=1,P4B=0"
    assert point["x"] == pytest.approx(np.mean(structure_judge.score(["q"] * len(texts), texts, "P4A")))
    assert point["y"] == pytest.approx(np.mean(structure_judge.score(["q"] * len(texts), texts, "P4B")))
    assert "structure_judge:score" in (tmp_path / "pareto" / "pareto.md").read_text()


def test_the_four_way_bench_compares_each_method_with_the_three_way_rule_at_the_old_experts_weight():
    """bench/four_dimensions.py: a four-way method is set against the three-way rule in which every old expert
    carries the same merged weight (strength x weight / sum of the weights)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_four_dimensions", ROOT / "bench" / "four_dimensions.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    label = bench.three_way_label
    assert label("soup-exact") == "soup-exact" and label("mope-uniform") == "mope-uniform"
    assert label("soup-exact-x1.33333") == "soup-exact"  # 4/3 x 1/4 = 1 x 1/3
    assert label("soup-exact-x4") == "soup-exact-x3"
    assert label("mope-extrapolate-x1.33333") == "mope-extrapolate"
    assert label("soup-exact-w4=0.5-x1.16667") == "soup-exact"  # 1.16667 / 3.5 = 1/3 per old expert
    assert label("soup-exact-w4=0.5-x3.5") == "soup-exact-x3"  # 3.5 / 3.5 = 3 / 3
    assert label("soup-exact-w4=0.5") == "soup-exact-x0.8571"  # 1 / 3.5 = 0.8571 / 3
    # a weight on an old dimension stays in the three-way label: (1, 2, 1, 1) x 5/5 against (1, 2, 1) x 4/4
    assert label("soup-exact-w2=2-x1.25") == "soup-exact-w2=2"
    with pytest.raises(SystemExit, match="keyed 'P4B'"):
        label("soup-exact-wP4B=0.5-x1.16667")


def test_the_head_to_head_bench_judges_four_way_against_three_way_answers_and_resumes(tmp_path, monkeypatch):
    """bench/four_vs_three.py: each old criterion judged on the four-way answer against the same method's
    three-way answer; prompting's shift is subtracted, and a rerun reads the verdicts it wrote."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_four_vs_three", ROOT / "bench" / "four_vs_three.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    long = ("Water is a fascinating substance with many properties, and to understand it we need to look at "
            "hydrogen bonds, density, temperature and the arrangement of molecules in the solid state. ") * 3
    short = "Ice is less dense than water."
    ids = [f"eval-{i:04d}" for i in range(6)]

    def write(run, method, combo, text):
        (run / "generations" / method).mkdir(parents=True, exist_ok=True)
        _write(run / "generations" / method / f"{combo}.jsonl",
               [{"id": i, "prompt": f"Why does ice float? ({i})", "response": text} for i in ids])

    four, three = tmp_path / "four", tmp_path / "three"
    for side4 in ("P4A", "P4B"):
        write(four, "soup-exact-x1.33333", f"P1A+P2A+P3A+{side4}", short)  # shorter with the new dimension
        write(four, "prompt", f"P1A+P2A+P3A+{side4}", long)
    write(three, "soup-exact", "P1A+P2A+P3A", long)
    write(three, "prompt", "P1A+P2A+P3A", long)
    out = tmp_path / "out.json"
    argv = ["four_vs_three.py", "--four-way", str(four), "--three-way", str(three), "--pair", "soup-exact-x1.33333",
            "soup-exact", "--pair", "prompt", "prompt", "--judge", "offline", "--run-dir", str(tmp_path / "v"),
            "--output", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    doc = json.loads(out.read_text())["results"]["offline"]
    soup, prompt = doc["soup-exact-x1.33333 vs soup-exact"], doc["prompt vs prompt"]
    assert soup["P2A"]["value"] == 1.0 and soup["P2A"]["win"] == 12  # concise: 6 instructions x 2 combinations
    assert prompt["P2A"]["value"] == 0.5 and prompt["P2A"]["tie"] == 12  # the same answers tie
    assert soup["minus_prompt"]["P2A"]["value"] == pytest.approx(0.5)
    assert soup["minus_prompt_familywise"]["P2A"]["confidence"] == pytest.approx(1 - 0.05 / 6)
    assert set(soup) - {"minus_prompt", "minus_prompt_familywise"} == {"P1A", "P2A", "P3A", "avg"}  # the old sides held

    class Refuse:  # a rerun judges nothing: every verdict is on disk
        def judge_many(self, items, side):
            raise AssertionError("judged again")

    monkeypatch.setattr(bench, "build_judge", lambda cfg: Refuse())
    bench.main()
    assert json.loads(out.read_text())["results"]["offline"]["soup-exact-x1.33333 vs soup-exact"]["P2A"] == soup["P2A"]


def test_the_resample_bench_gives_the_chance_an_unchanged_method_lands_inside_its_interval(monkeypatch):
    """bench/resample_floor.py: two equally wide 95% intervals of an unchanged quantity hold each other's point
    estimate 83% of the time; a narrower second estimate more often; the paired difference of identical
    outcomes is 0, and of a changed column its share."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_resample_floor", ROOT / "bench" / "resample_floor.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    wide = {"value": 0.6, "low": 0.57, "high": 0.63}
    assert bench.inside_probability(wide, wide) == pytest.approx(0.834, abs=1e-3)
    narrow = {"value": 0.6, "low": 0.6 - 0.03 / 2 ** 0.5, "high": 0.6 + 0.03 / 2 ** 0.5}  # half the variance
    assert bench.inside_probability(wide, narrow) == pytest.approx(0.890, abs=1e-3)
    assert bench.inside_probability({"value": 0.5, "low": 0.5, "high": 0.5}, wide) == 0.0
    first = {"P1A+P2A+P3A": {"P1A": {"a": "win", "b": "loss"}, "P2A": {"a": "tie", "b": "win"}}}
    same = bench.paired(bench.paired_columns(first, first), None)
    assert same["value"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0
    again = {"P1A+P2A+P3A": {"P1A": {"a": "win", "b": "win"}, "P2A": {"a": "tie", "b": "win"}}}
    cols = bench.paired_columns(again, first)
    assert bench.paired(cols, "P1A")["value"] == pytest.approx(0.5)  # one of two instructions: loss -> win
    assert bench.paired(cols, "P2A")["value"] == 0.0
