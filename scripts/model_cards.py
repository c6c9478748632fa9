"""Write the model cards of a weights distribution from what its files record.

    python scripts/model_cards.py [--model smollm2-135m-instruct] [--eval RUN ...] [--pcm-eval RUN ...]

For each shipped expert, ``README.md`` beside ``expert.json``: what it is, how it was trained (from
``expert.json`` and ``pipeline.json``), which judge labelled its training data, its win rate against the
prompted base on the held-out instructions with every judge that evaluated it (from ``--eval``: a
``personalign eval --single-sides`` run folder, each judge's ``judgments/<judge>/results.json``), how it
is stored (``half_precision_check.json``) and its limits. The PCM gets one too, with MoPE's measured win
rates from the first ``--pcm-eval`` run whose generations were made with that very PCM file (by digest);
the distribution's ``README.md`` lists them. peft's empty template card (``adapter/README.md``) is
removed. Nothing is written by hand: rerun this after shipping or evaluating again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from personalign.compose import shipped_experts_dir
from personalign.pcm import shipped_pcm_dir
from personalign.preferences import default_space
from personalign.provenance import made_by_runs
from personalign.report import points_difference
from personalign.weights import HALF_CHECK

ROOT = Path(__file__).resolve().parents[1]
JUDGE_NOTES = {
    "offline": "the offline judge, which also labelled the training data (not independent)",
    "independent": "the independent judge (other signals and libraries; never used for training)",
}


def _pct(v: dict[str, float] | None) -> str:
    if not v:
        return "–"
    return f"{100 * v['value']:.1f}% [{100 * v['low']:.1f}, {100 * v['high']:.1f}]"


def win_rates(eval_dirs: list[Path], side: str) -> list[tuple[str, str, int]]:
    """(judge, win rate with interval, instructions) of the expert for ``side`` under each judge, from the
    first of ``eval_dirs`` that evaluated it (a later evaluation of some experts comes first)."""
    for eval_dir in eval_dirs:
        found = _win_rates(eval_dir, side)
        if found:
            return found
    return []


def _win_rates(eval_dir: Path, side: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    if not (eval_dir / "judgments").is_dir():
        return out
    for folder in sorted((eval_dir / "judgments").iterdir()):
        path = folder / "results.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        for method in res.get("methods", []):
            combo = res["win_rates"].get(method, {}).get("by_combination", {}).get(side)
            if combo:
                out.append((folder.name, _pct(combo["avg"]), int(res["instructions"])))
    return out


def storage_note(package: Path) -> str:
    path = package / HALF_CHECK
    if not path.is_file():
        return "Stored in float32, as trained."
    check = json.loads(path.read_text())
    n_cases, n_prompts = len(check["cases"]), len(check["prompts"])
    if check.get("all_same"):
        return (f"Stored in float16: greedy answers ({check['max_new_tokens']} tokens) of {n_cases} cases (each expert alone, "
                f"both soups and MoPE) on {n_prompts} held-out instructions are identical to the float32 "
                f"weights' (`{HALF_CHECK}`; the integration tests regenerate them from these weights).")
    return "Stored in float32: float16 changed some answers (see `half_precision_check.json`)."


def expert_card(folder: Path, package: Path, eval_dirs: list[Path]) -> str:
    doc = json.loads((folder / "expert.json").read_text())
    cfg = doc.get("config") or {}
    metrics = doc.get("metrics") or {}
    pipeline = json.loads((folder / "pipeline.json").read_text()) if (folder / "pipeline.json").is_file() else {}
    side = doc["side"]
    space = default_space()
    dim = space.dimensions[space.sides[side].dimension]
    other = " / ".join(f"{s} ({space.sides[s].name})" for s in dim.sides if s != side)
    lora = cfg.get("lora") or {}
    rates = win_rates(eval_dirs, side)
    lines = [
        f"# personalign expert {side} ({doc.get('side_name', side)}) for SmolLM2-135M-Instruct",
        "",
        f"A LoRA adapter that makes SmolLM2-135M-Instruct answer the **{doc.get('side_name', side)}** way on the "
        f"*{dim.name}* dimension (the other side: {other}). personalign composes it with the experts of the "
        "other dimensions for any combination: merged (Personalized Soups) or mixed token by token (MoPE).",
        "",
        "## Use",
        "",
        "```",
        f"personalign generate --method expert --prefs {side} \"Why is the sky blue?\"",
        f"personalign generate --method soup --prefs {side},<one side of each other dimension> \"...\"",
        "```",
        "",
        "## Training",
        "",
        f"- Policy prompt: \"{doc.get('policy_prompt', '')}\"",
        f"- Algorithm: {doc.get('algorithm', '?')}, {metrics.get('steps', cfg.get('steps', '?'))} steps, "
        f"{cfg.get('batch_prompts', '?')} prompts x {cfg.get('group_size', '?')} samples per step, lr "
        f"{cfg.get('lr', '?')}, KL coefficient {cfg.get('kl_coef', '?')}, {cfg.get('max_new_tokens', '?')} new "
        f"tokens at temperature {cfg.get('temperature', '?')}, on the built-in training instructions.",
        f"- LoRA: r={lora.get('r', '?')}, alpha={lora.get('alpha', '?')}, on "
        f"{', '.join(lora.get('target_modules') or [])}.",
        f"- Reward: the reward model for {side} (`{doc.get('reward', '?')}` in the run that trained it), "
        "trained on preference pairs of the base model's own answers"
        + (f"; plus {cfg['ontopic_coef']:g} x the share of the question's words the answer covers, so that it "
           "stays on the question" if cfg.get("ontopic_coef") else "") + ".",
        f"- **Training labels from: {', '.join(doc.get('label_judges') or ['unknown'])}.** The offline judge is "
        "lexical (readability, word rarity, length, sentiment and cue lists; `docs/judges.md`): the expert "
        "learned that judge's idea of the side, cues included.",
        f"- Reward moved from {metrics.get('train/reward_raw_first', float('nan')):.2f} to "
        f"{metrics.get('train/reward_raw_last', float('nan')):.2f} with KL {metrics.get('train/kl_last', float('nan')):.2f}; "
        f"{metrics.get('time/train_seconds', 0) / 60:.0f} min on 2 CPU cores.",
        f"- Made by: `{(doc.get('made_by') or {}).get('command', 'personalign pipeline')}` "
        f"(run `{(doc.get('made_by') or {}).get('run', pipeline.get('run_dir', '?'))}`); every setting is in "
        "`expert.json` and `pipeline.json`, every step's metrics in `metrics.jsonl`.",
        "",
        "## Evaluation",
        "",
    ]
    if rates:
        lines += [f"Win rate against the base model given the same {side} prompt, on the held-out built-in "
                  "instructions, each pair judged in both orders (ties half), 95% bootstrap interval:", "",
                  "| judge | win rate | instructions |", "|---|---:|---:|"]
        lines += [f"| {JUDGE_NOTES.get(j, j)} | {r} | {n} |" for j, r, n in rates]
    else:
        lines += ["Not evaluated yet: `personalign eval --single-sides` measures it against its prompted base."]
    lines += [
        "",
        "## Storage",
        "",
        storage_note(package),
        "",
        "## Limits",
        "",
        "- No judge here checks that an answer is correct; the expert is trained for a style, not for facts.",
        "- A 135M-parameter base model: answers are short and often wrong or repetitive.",
        "- English only. The training labels come from one lexical judge, so the expert may have learned its cues.",
        "",
        "License: Apache-2.0, as personalign; the base model SmolLM2-135M-Instruct is Apache-2.0.",
    ]
    return "\n".join(lines) + "\n"


def pcm_card(folder: Path, evals: list[Path] | None = None) -> str:
    doc = json.loads((folder / "pcm.json").read_text())
    arch, metrics = doc.get("architecture") or {}, doc.get("metrics") or {}
    cfg = doc.get("config") or {}
    return "\n".join([
        "# personalign Preference Control Model for SmolLM2-135M-Instruct",
        "",
        f"A small network ({arch.get('hidden', '?')} hidden units) that weights the shipped experts "
        f"({', '.join(doc.get('sides', []))}) token by token for MoPE, given a preference and the text so far.",
        "",
        "```",
        "personalign generate --method mope --pcm shipped --prefs 1A,2B,3A \"...\"",
        "```",
        "",
        "## Training",
        "",
        f"- REBEL, online, {doc.get('steps', metrics.get('steps', '?'))} steps, temperature "
        f"{cfg.get('temperature', '?')}, on Bradley-Terry-normalised rewards from the six reward models "
        f"(`{', '.join(sorted(set((doc.get('rewards') or {}).values())))}`).",
        f"- **Training labels from: {', '.join(doc.get('label_judges') or ['unknown'])}** (through those reward "
        "models).",
        f"- {metrics.get('time/train_seconds', 0) / 60:.0f} min on 2 CPU cores. Made by "
        f"`{(doc.get('made_by') or {}).get('command', 'personalign train-pcm')}`; settings in `pcm.json` and "
        "`config.json`, every step in `metrics.jsonl`.",
        "- Stored in float32 (180 KB: halving it saves nothing that matters).",
        "",
        "## Evaluation and limits",
        "",
        *pcm_evaluation(folder, evals or []),
        "`bench/RESULTS.md` of the personalign repository compares MoPE with this PCM against fixed weights and "
        "soups, with the offline and the independent judge. No judge there checks correctness.",
        "",
        *replaced_note(folder, doc),
        "License: Apache-2.0.",
    ]) + "\n"


def pcm_evaluation(folder: Path, eval_dirs: list[Path]) -> list[str]:
    """The measured win rates of MoPE with this very PCM, from the first of ``eval_dirs`` whose generations
    were made with it: found by the SHA-256 of ``pcm.safetensors`` in ``generations/sources.json``, so a
    number measured with another PCM is never shown as this one's."""
    from personalign.compose import file_digest
    from personalign.pcm import PCM_WEIGHTS

    if not (folder / PCM_WEIGHTS).is_file():
        return []
    digest = file_digest(folder / PCM_WEIGHTS)
    for eval_dir in eval_dirs:
        sources = eval_dir / "generations" / "sources.json"
        if not sources.is_file():
            continue
        used: dict[str, set[str | None]] = {}
        for name, weights in json.loads(sources.read_text()).items():
            parts = Path(name).parts
            if len(parts) == 3:
                used.setdefault(parts[1], set()).add(weights.get("pcm"))
        methods = sorted(m for m, pcms in used.items() if pcms == {digest})
        rows: list[str] = []
        for results in sorted((eval_dir / "judgments").glob("*/results.json")):
            res = json.loads(results.read_text())
            for method in (m for m in methods if m in res.get("win_rates", {})):
                combos = len(res["win_rates"][method].get("by_combination", {}))
                paired = "; ".join(f"{other}{_another_pcm(used.get(other, set()), digest)} {points_difference(d)}"
                                   for other, d in sorted((res.get("paired") or {}).get(method, {}).items()) if d)
                rows.append(f"| {JUDGE_NOTES.get(res['judge'], res['judge'])} | {res.get('reference', '?')} "
                            f"| {_pct(res['win_rates'][method]['avg'])} | {res['instructions']} x {combos} "
                            f"| {paired or '–'} |")
        if rows:
            return [(f"MoPE with this PCM (`{methods[0]}` in `{eval_dir.name}`, generations made with this "
                    f"file's SHA-256 {digest[:12]}): the average criterion's win rate against the reference method "
                    "(`prompt` is preference prompting), each pair judged in both orders (ties half), 95% bootstrap "
                    "interval; "
                    "and its difference to other methods of that run in points, paired on instructions:"), "",
                    "| judge | reference | win rate | instructions x combinations | paired difference |",
                    "|---|---|---:|---:|---|",
                    *rows, ""]
    return ["Not evaluated with this file yet: `personalign eval` with the method `mope-pcm` measures it.", ""]


def _another_pcm(pcms: set[str | None], digest: str) -> str:
    """`` (another PCM, <digest>)`` for a method of the run made with another PCM file: the run's method names
    are as they were then (its ``mope-pcm`` may be a PCM shipped before this one)."""
    others = sorted(d for d in pcms if d and d != digest)
    return f" (another PCM, {', '.join(d[:12] for d in others)})" if others else ""


def replaced_note(folder: Path, doc: dict[str, Any]) -> list[str]:
    """Which experts beside the PCM were made by another run than the ones it was trained with."""
    trained = doc.get("experts_runs") or {}
    now = made_by_runs(folder.parent / "experts", trained)
    replaced = sorted(s for s in trained if now.get(s) != trained[s])
    if not replaced:
        return []
    return [f"**Trained with earlier versions of {', '.join(replaced)}** (run "
            f"`{', '.join(sorted({trained[s] for s in replaced}))}`): the experts beside it now were made by run "
            f"`{', '.join(sorted({str(now.get(s)) for s in replaced}))}`. Its weights were learned for the earlier "
            "ones; `make pcm` trains it again for these.", ""]


def strength_note(experts: Path) -> list[str]:
    """The experts' measured default strengths (``experts/strength.json``), as a paragraph."""
    from personalign.personalize import STRENGTH_FILE, default_strengths

    if not (experts / STRENGTH_FILE).is_file():
        return []
    doc = json.loads((experts / STRENGTH_FILE).read_text())
    named = ", ".join(f"`{k}` {v:g} (selected on `{doc.get('measured', {}).get(k, {}).get('selected_on', '?')}`)"
                      for k, v in doc["default_strength"].items())
    default_strengths(experts)  # the file is valid
    return [f"A request that gives no strength gets the default measured for these experts "
            f"(`experts/{STRENGTH_FILE}`, written by `bench/strength.py defaults`): {named}; every other rule 1.", ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--eval", type=Path, action="append",
                    help="a `personalign eval --single-sides` run folder; repeat it, the first that evaluated an "
                         "expert gives its numbers (default: runs/eval-experts-shipped, then runs/eval-experts)")
    ap.add_argument("--pcm-eval", type=Path, action="append",
                    help="a `personalign eval` run folder with MoPE generations; the first whose generations were "
                         "made with the shipped PCM's file gives its numbers (default: runs/eval-pcm-shipped)")
    args = ap.parse_args()
    evals = args.eval or [ROOT / "runs" / "eval-experts-shipped", ROOT / "runs" / "eval-experts"]
    experts = shipped_experts_dir(args.model)
    if experts is None:
        print(f"error: no weights distribution ships experts for {args.model}", file=sys.stderr)
        return 1
    package = experts.parent
    rows: list[str] = []
    for folder in sorted(p for p in experts.iterdir() if (p / "expert.json").is_file()):
        (folder / "README.md").write_text(expert_card(folder, package, evals))
        template = folder / "adapter" / "README.md"
        if template.is_file() and "[More Information Needed]" in template.read_text():
            template.unlink()
        doc: dict[str, Any] = json.loads((folder / "expert.json").read_text())
        rates = "; ".join(f"{j}: {r}" for j, r, _ in win_rates(evals, folder.name)) or "not evaluated"
        rows.append(f"| {folder.name} | {doc.get('side_name', '')} | {rates} |")
        print(f"{folder.name}: {folder / 'README.md'}")
    pcm = shipped_pcm_dir(args.model)
    if pcm is not None:
        (pcm / "README.md").write_text(pcm_card(pcm, args.pcm_eval or [ROOT / "runs" / "eval-pcm-shipped"]))
    dist = package.parents[1]
    (dist / "README.md").write_text("\n".join([
        "# personalign-smollm2",
        "",
        "The six LoRA experts and the Preference Control Model that personalign ships for "
        "SmolLM2-135M-Instruct, as their own distribution. personalign finds them through the "
        "`personalign.weights` entry point (`make install` installs both); experts for another base model "
        "ship the same way.",
        "",
        "| expert | side | win rate against its prompted base (judge: value [95% CI]) |",
        "|---|---|---|",
        *rows,
        "",
        "`offline` labelled the training data of every expert, so its numbers are not independent; "
        "`independent` shares none of its signals. Each expert's `README.md` says how it was made. "
        + storage_note(package),
        "",
        *strength_note(experts),
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
