"""The demo: every row is the answer its labelled method gives alone (one shared batch computes them all),
progress shows while it generates, and its labels stay whole at any terminal width."""

from __future__ import annotations

import io
import itertools
import re

import pytest
from rich.console import Console

from personalign.generation import SamplingConfig
from personalign.personalize import MethodOptions, personalize, resolve
from personalign.recipes import demo
from personalign.recipes.demo import method_name

SIDES = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
COMBOS = ("P1A,P2A,P3A", "P1B,P2B,P3B")
QUESTIONS = ("Bake bread?", "Why is the sky blue?")
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def experts(tiny_model_dir, tmp_path_factory):
    from conftest import save_side_experts

    return save_side_experts(tiny_model_dir, tmp_path_factory.mktemp("demo") / "experts", SIDES)


def _cfg(tiny_model_dir, experts, **kw):
    fields = {"combinations": COMBOS, "instructions": QUESTIONS, "sampling": GREEDY, **kw}
    return demo.DemoConfig(model=str(tiny_model_dir), experts=str(experts), device="cpu", dtype="float32", **fields)


def _console(width: int) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)


def test_each_row_is_what_its_method_gives_alone(tiny_model_dir, experts, tiny):
    rows = demo.main(_cfg(tiny_model_dir, experts), show=False)
    assert [r["method"] for r in rows][::2] == ["prompt", "prompt", "soup-exact", "soup-exact", "mope-prob",
                                                 "mope-prob"]
    model, tok = tiny
    for method, options in (("prompt", {}), ("soup", {"merge": "exact"}), ("mope", {})):
        for combo in COMBOS:
            spec = resolve(combo, MethodOptions(method=method, experts=None if method == "prompt" else str(experts),
                                                **options), model=str(tiny_model_dir))
            alone = personalize(model, tok, spec).generate(list(QUESTIONS), GREEDY)
            shown = [r["response"] for r in rows if r["method"] == spec.label and r["prefs"] == combo]
            assert shown == alone, (spec.label, combo)
    # the three methods really differ on this model, so a mislabelled row would show
    by_method = {m: [r["response"] for r in rows if r["method"] == m] for m in ("prompt", "soup-exact", "mope-prob")}
    assert len({tuple(v) for v in by_method.values()}) == 3


def test_a_soup_rule_outside_the_shared_batch_is_labelled_as_what_ran(tiny_model_dir, experts, tiny):
    cfg = _cfg(tiny_model_dir, experts, compose=("soup",), soup_merge="psoups", combinations=("P1A,P2A,P3A",))
    rows = demo.main(cfg, show=False)
    assert [r["method"] for r in rows] == ["prompt", "prompt", "soup-psoups", "soup-psoups"]
    spec = resolve("P1A,P2A,P3A", MethodOptions(method="soup", experts=str(experts)), model=str(tiny_model_dir))
    assert [r["response"] for r in rows[2:]] == personalize(*tiny, spec).generate(list(QUESTIONS), GREEDY)


def test_progress_counts_answers_and_tokens(tiny_model_dir, experts, tiny):
    model, tok = tiny
    specs = [resolve(c, MethodOptions(method=m, experts=None if m == "prompt" else str(experts)),
                     model=str(tiny_model_dir)) for m in ("prompt", "mope") for c in COMBOS]
    seen: list[tuple[int, int]] = []
    answers = demo.generate_all(model, tok, specs, QUESTIONS, SamplingConfig(max_new_tokens=40, temperature=0.0),
                                str(experts), on_progress=lambda done, tokens: seen.append((done, tokens)))
    assert len(answers) == 4 and all(len(a) == 2 for a in answers)
    assert seen[-1][0] == 8 and seen[-1][1] > 0
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in itertools.pairwise(seen))  # never goes back


def test_the_demo_shows_progress_then_the_table(tiny_model_dir, experts):
    console = _console(80)
    demo.main(_cfg(tiny_model_dir, experts), show=True, console=console)
    out = console.file.getvalue()
    assert re.search(r"generating .* 12/12 answers \d+ tokens", out), out[:2000]
    assert out.index("12/12 answers") < out.index("Bake bread?")
    assert re.search(r"12 responses generated in \d+\.\d s", out)


def _specs(tiny_model_dir, experts):
    return [resolve(c, MethodOptions(method=m, experts=None if m == "prompt" else str(experts),
                                     **({"merge": "exact"} if m == "soup" else {})), model=str(tiny_model_dir))
            for m in ("prompt", "soup", "mope") for c in COMBOS]


@pytest.mark.parametrize("width", [40, 60, 80, 100, 200])
def test_labels_are_whole_at_any_width(tiny_model_dir, experts, width):
    specs = _specs(tiny_model_dir, experts)
    prefs = [s.preference for s in specs[:2]]
    answer = "Water expands when it freezes, so ice is less dense than the liquid around it. " * 3
    rows = [{"instruction": q, "prefs": s.preference.spec(), "describe": s.preference.describe(),
             "method": s.label, "response": f"{answer} [{s.label} {s.preference.spec()}]"}
            for s in specs for q in QUESTIONS]
    console = _console(width)
    demo.show_methods(console, specs)
    demo.show_table(console, list(QUESTIONS), prefs, specs, rows, 1.0, 2.0)
    out = console.file.getvalue()
    assert "…" not in out and "..." not in out
    assert max(len(line) for line in out.splitlines()) <= width
    flat = " ".join(out.split())
    for name in ("prompting", "exact soup", "MoPE (prob)"):
        assert re.search(rf"(^|[\s│┃]){re.escape(name)}($|[\s│┃:])", out, re.MULTILINE), (name, out[:3000])
    for p in prefs:
        assert p.describe() in flat and f"({p.spec()})" in flat
    if width >= 80:  # two preferences fit side by side with the method column at 80 columns
        assert "┃ method" in out
    else:  # stacked: each answer whole under its method and preference
        assert "┃" not in out
        for q in QUESTIONS:
            section = flat[flat.index(q):]
            for s in specs:
                at = section.index(f"- {method_name(s)} -")
                tag = f"[{s.label} {s.preference.spec()}]"
                assert section.index(tag) > section.index(s.preference.describe(), at), tag


def test_the_screen_names_a_soups_strength_when_it_is_not_one(tiny_model_dir, experts):
    from personalign.recipes.demo import method_help

    plain = resolve("1A,2A", MethodOptions(method="soup", merge="exact", experts=str(experts)), model=str(tiny_model_dir))
    strong = resolve("1A,2A", MethodOptions(method="soup", merge="exact", experts=str(experts), strength=3.0),
                     model=str(tiny_model_dir))
    assert method_name(plain) == "exact soup" and "strength" not in method_help(plain)
    assert method_name(strong) == "exact soup x3" and "at strength 3" in method_help(strong)


def test_the_demo_refuses_vanilla_which_follows_no_preference(tiny_model_dir, monkeypatch):
    import personalign.models
    from personalign.errors import ConfigError

    monkeypatch.setattr(personalign.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="method vanilla follows none; use method prompt"):
        demo.main(demo.DemoConfig(model=str(tiny_model_dir), method="vanilla"), show=False)
