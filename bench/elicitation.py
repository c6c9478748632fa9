"""Finding a preference from picks, with simulated people on real answers of the embedded model.

Answers: each held-out instruction answered by the embedded model under the 9 weight vectors a playground
session uses (one side per dimension at weight 1, and neutral), greedy, by preference prompting or
(``--method soup``) the exact soup of the shipped experts.
The estimator sees each answer through the pipeline's reward models (side B's reward minus side A's,
per dimension, standardised per instruction), as the server would with reward models. The simulated
people judge through a different scorer, the offline judge (the same differences from its lexical
scores): each has hidden weights over the three dimensions and picks between two answers with the
Bradley-Terry probability of their utility difference. Per person: 20 picks, each on the next
instruction, the pair chosen by the estimate (active) or at random. A third curve, a diagnostic, lets
the estimator read the people's own scorer: the gap between it and "active" is what the two scorers'
disagreement costs. Reported: the cosine similarity of
the estimated and the hidden weights after 1..20 picks (median over people), against random pairs and
the neutral guess (cosine 0).

    python bench/elicitation.py [--people 50] [--instructions 12] [--method prompt|soup|mope] [--rm DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np

from personalign.data import load_builtin
from personalign.elicit import Pick, PreferenceEstimate
from personalign.generation import SamplingConfig
from personalign.models import load_model
from personalign.personalize import MethodOptions, personalize, resolve
from personalign.serve.elicitation import candidate_weights

PAIRS = [("P1A", "P1B"), ("P2A", "P2B"), ("P3A", "P3B")]


def standardise(x: np.ndarray) -> np.ndarray:
    spread = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(spread > 1e-9, spread, 1.0)


def answers(questions: list[str], tokens: int, method: str) -> list[list[str]]:
    """(Q, 9) answers: each question under each candidate weight vector."""
    model, tok = load_model(None, device="cpu", dtype="float32")
    out = [[""] * len(candidate_weights(PAIRS)) for _ in questions]
    for k, weights in enumerate(candidate_weights(PAIRS)):
        options = MethodOptions(method=method, merge="exact") if method == "soup" else MethodOptions(method=method)
        spec = resolve(weights or None, options if weights else MethodOptions(method="vanilla"))
        texts = personalize(model, tok, spec).generate(questions, SamplingConfig(max_new_tokens=tokens, temperature=0),
                                                       batch_size=len(questions))
        for q, text in enumerate(texts):
            out[q][k] = text
        print(f"answered under {weights or 'neutral'}", flush=True)
    return out


def rm_features(questions: list[str], texts: list[list[str]], folder: str) -> np.ndarray:
    from personalign.judges.reward_model import reward_model_sources
    from personalign.reward_model import RewardModel

    sources = reward_model_sources(folder)
    scores: dict[str, np.ndarray] = {}
    flat_q = [q for q, row in zip(questions, texts) for _ in row]
    flat_a = [a for row in texts for a in row]
    for side in {s for pair in PAIRS for s in pair}:
        rm = RewardModel.load(sources[side], device="cpu", dtype="float32")
        scores[side] = rm.score(flat_q, flat_a, side=side).numpy().reshape(len(questions), -1)
    raw = np.stack([scores[b] - scores[a] for a, b in PAIRS], -1)  # (Q, 9, 3)
    return np.stack([standardise(raw[q]) for q in range(len(questions))])


def judge_features(questions: list[str], texts: list[list[str]]) -> np.ndarray:
    from personalign.serve.elicitation import features

    return np.stack([features(q, row, PAIRS) for q, row in zip(questions, texts)])


def simulate(est_f: np.ndarray, true_f: np.ndarray, hidden: np.ndarray, picks: int, active: bool,
             rng: np.random.Generator, sharpness: float) -> list[float]:
    est = PreferenceEstimate(3, sharpness=1.5)
    out = []
    for t in range(picks):
        q = t % est_f.shape[0]
        if active:
            i, j = est.choose(est_f[q])
        else:
            i, j = sorted(rng.choice(est_f.shape[1], 2, replace=False).tolist())
        p = 1 / (1 + np.exp(-sharpness * hidden @ (true_f[q, i] - true_f[q, j])))
        est.add(Pick(tuple(est_f[q, i]), tuple(est_f[q, j]), "a" if rng.random() < p else "b"))
        m = est.mean
        out.append(float(m @ hidden / (np.linalg.norm(m) * np.linalg.norm(hidden) + 1e-12)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=50)
    ap.add_argument("--instructions", type=int, default=12)
    ap.add_argument("--picks", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--sharpness", type=float, default=3.0, help="how consistently the simulated people pick")
    ap.add_argument("--rm", default="runs/psoups-smollm2/rm")
    ap.add_argument("--method", default="prompt", choices=["prompt", "soup", "mope"],
                    help="how the contrasting answers are made (soup: exact, with the shipped experts)")
    ap.add_argument("--cache", type=Path, default=Path("runs/elicitation-answers.json"))
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("elicitation.json"))
    args = ap.parse_args()

    questions = [i.prompt for i in load_builtin("eval")][: args.instructions]
    cached = json.loads(args.cache.read_text()) if args.cache.is_file() else {}
    if cached.get("questions") == questions and cached.get("method", "prompt") == args.method:
        texts = cached["answers"]
    else:
        texts = answers(questions, args.tokens, args.method)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        args.cache.write_text(json.dumps({"questions": questions, "method": args.method, "answers": texts}))
    est_f = rm_features(questions, texts, args.rm)
    true_f = judge_features(questions, texts)
    agree = [float(np.corrcoef(est_f[..., d].ravel(), true_f[..., d].ravel())[0, 1]) for d in range(3)]
    rng = np.random.default_rng(0)
    # "same scorer" is a diagnostic, not the measurement: the estimator reads the people's own scorer, which
    # shows how much of the gap to 1 comes from the two scorers disagreeing.
    curves: dict[str, list[list[float]]] = {"active": [], "random": [], "active, same scorer (diagnostic)": []}
    for _ in range(args.people):
        hidden = rng.uniform(-1, 1, 3)
        seed = int(rng.integers(2**31))
        for mode in curves:
            feats = true_f if "same scorer" in mode else est_f
            curves[mode].append(simulate(feats, true_f, hidden, args.picks, mode.startswith("active"),
                                         np.random.default_rng(seed), args.sharpness))
    median = {m: [round(float(v), 3) for v in np.median(np.array(c), axis=0)] for m, c in curves.items()}
    summary = {"median_cosine_after_10": {m: median[m][9] for m in median},
               "median_cosine_after_20": {m: median[m][-1] for m in median}, "neutral_guess": 0.0,
               "feature_agreement_rm_vs_judge": dict(zip(["expertise", "informativeness", "style"],
                                                         [round(a, 3) for a in agree]))}
    doc = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "command": "python bench/elicitation.py " + " ".join(sys.argv[1:]),
           "people": args.people, "instructions": len(questions), "sharpness": args.sharpness, "method": args.method,
           "estimator_scorer": f"reward models ({args.rm})", "people_scorer": "offline judge",
           "median_cosine": median, "summary": summary}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(median, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))


def plot(median: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, values in median.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=f"{mode} pairs")
    ax.axhline(0.0, color="grey", ls=":", label="neutral guess")
    ax.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("picks")
    ax.set_ylabel("median cosine(estimate, hidden weights)")
    ax.set_title("Finding a preference from picks (simulated people)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
