"""How much can any choice of MoPE weights gain over uniform mixing, with the shipped experts?

The learned controller (PCM) ties uniform mixing on its own reward models and leads it by under a point
on the offline judge. This measures the room there is: for each hard combination and each evaluation
instruction, MoPE replies under a few fixed weight vectors (uniform, and leaning ``--lean`` on each
active side in turn), two independent samples each, all scored against the prompted base's replies of
the evaluation run (the same reference as the win-rate table):

* ``judge``: the offline judge's mean criterion score (win 1, tie 0.5, both orders), i.e. the win rate;
* ``rm``: the controller's training utility, ``mean_j sigmoid((r_j(y) - r_j(ref)) / scale_j)``.

Then three policies are compared with uniform mixing, each *selected on one sample and scored on the
other* (and the other way round, averaged), so that picking the luckiest sample does not count as gain:

* ``per-combination``: the best weight vector for each combination (what a context-free PCM can learn);
* ``per-instruction``: the best vector for each (instruction, combination) -- an oracle that knows the
  instruction, which a PCM reading the prompt could at most approach;
* ``best-of-samples`` (not cross-fitted): the best reply of all vectors and samples, the upper bound
  that includes sampling luck, for scale.

95% intervals are bootstrap over instructions. Resumable: the replies are kept as JSONL files, one per
(combination, vector, sample), under ``--out``.

    python bench/pcm_headroom.py --instructions 30            # about 85 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def vectors(lean: float) -> dict[str, list[float]]:
    rest = (1 - lean) / 2
    out = {"uniform": [1 / 3] * 3}
    for k in range(3):
        out[f"lean-P{k + 1}"] = [lean if j == k else rest for j in range(3)]
    return out


def spec(sides: list[str], w: list[float]) -> str:
    return ",".join(f"{s}={x:.4f}" for s, x in zip(sides, w))


def generate_all(args: argparse.Namespace, combos: list[list[str]], vecs: dict[str, list[float]],
                 prompts_file: Path) -> None:
    from personalign.data import load_prompts, read_jsonl
    from personalign.generation import SamplingConfig
    from personalign.generations import write_answers
    from personalign.models import load_model
    from personalign.personalize import MethodOptions, personalize, resolve

    items = load_prompts(str(prompts_file))
    base: list = []  # the embedded model, loaded on first use

    for sides in combos:
        for name, w in vecs.items():
            for s in range(args.samples):
                path = Path(args.out) / "+".join(sides) / f"{name}-s{s}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.exists() and len(read_jsonl(path)) >= args.instructions:
                    continue
                t = time.time()
                request = resolve(spec(sides, w), MethodOptions(method="mope", mix="prob"))

                def build(request=request):
                    if not base:
                        base.extend(load_model())
                    return personalize(base[0], base[1], request)

                write_answers(request, build, items, path,
                              SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9,
                                             repetition_penalty=1.1, seed=1000 + s),
                              batch_size=args.batch_size, progress=False)
                print(f"{path.relative_to(args.out)}: {time.time() - t:.0f} s", flush=True)


def bootstrap(per_inst: np.ndarray) -> list[float]:
    """Mean over instructions and its 95% interval, bootstrapped as the evaluation does."""
    from personalign.evaluation import _bootstrap

    return [float(per_inst.mean()), *_bootstrap(per_inst, 0.95, 2000, 0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instructions", type=int, default=20, help="the first N evaluation instructions")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--lean", type=float, default=0.6, help="weight on the favoured side of a leaning vector")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--reference", default=str(REPO / "runs/eval-psoups-all/generations/prompt"))
    p.add_argument("--rm", default=str(REPO / "runs/psoups-smollm2/rm"))
    p.add_argument("--scales", default=str(REPO / "runs/pcm-smollm2-t07/scales.json"))
    p.add_argument("--out", default=str(REPO / "runs/pcm-headroom"))
    p.add_argument("--results", default=str(REPO / "bench/pcm_headroom.json"))
    args = p.parse_args()

    import torch

    from personalign.data import read_jsonl
    from personalign.evaluation import SCORES, combine_orders, outcome
    from personalign.judges import JudgeConfig, build_judge
    from personalign.pcm import preference_utility
    from personalign.preferences import default_space
    from personalign.judges.reward_model import RewardModelJudge

    space = default_space()
    combos = [list(c.sides) for c in space.combinations()]
    vecs = vectors(args.lean)
    refs = {"+".join(c): read_jsonl(Path(args.reference) / f"{'+'.join(c)}.jsonl")[: args.instructions]
            for c in combos}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "instructions.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n"
                                    for r in refs["+".join(combos[0])]))
    generate_all(args, combos, vecs, prompts_file)

    judge = build_judge(JudgeConfig())
    rm = RewardModelJudge(args.rm)
    scales = json.loads(Path(args.scales).read_text())["scales"]
    n, V, S = args.instructions, len(vecs), args.samples
    replies: dict[tuple[int, int, int], list[str]] = {}
    for ci, sides in enumerate(combos):
        key = "+".join(sides)
        for vi, name in enumerate(vecs):
            for si in range(S):
                rows = read_jsonl(out / key / f"{name}-s{si}.jsonl")[:n]
                if [r["prompt"] for r in rows] != [r["prompt"] for r in refs[key]]:
                    raise SystemExit(f"{out / key}/{name}-s{si}.jsonl: not the reference's instructions")
                replies[ci, vi, si] = [r["response"] for r in rows]
    # Each side's reward model scores every reply it judges in one pass (models load one at a time).
    rewards: dict[tuple[str, int, int, int], np.ndarray] = {}
    for side in space.sides:
        cells = [(ci, vi, si) for (ci, vi, si) in replies if side in combos[ci]]
        if not cells:
            continue
        refs_in = sorted({ci for ci, _, _ in cells})
        prompts = [r["prompt"] for ci in refs_in for r in refs["+".join(combos[ci])]]
        answers = [r["response"] for ci in refs_in for r in refs["+".join(combos[ci])]]
        answers += [y for cell in cells for y in replies[cell]]
        prompts += [r["prompt"] for ci, _, _ in cells for r in refs["+".join(combos[ci])]]
        flat = np.array(rm.rewards(side, prompts, answers))
        for k, ci in enumerate(refs_in):
            rewards[side, ci, -1, -1] = flat[k * n:(k + 1) * n]
        for k, cell in enumerate(cells, start=len(refs_in)):
            rewards[(side, *cell)] = flat[k * n:(k + 1) * n]
    # score[metric][combination, vector, sample, instruction]
    score = {m: np.zeros((len(combos), V, S, n)) for m in ("judge", "rm")}
    for (ci, vi, si), ys in replies.items():
        sides = combos[ci]
        prompts = [r["prompt"] for r in refs["+".join(sides)]]
        ref = [r["response"] for r in refs["+".join(sides)]]
        for side in sides:  # as the evaluation scores a pair: both orders, a disagreement ties
            fwd = judge.judge_many(list(zip(prompts, ys, ref)), side)
            bwd = judge.judge_many(list(zip(prompts, ref, ys)), side)
            score["judge"][ci, vi, si] += [SCORES[combine_orders(outcome(f, "a"), outcome(b, "b"))]
                                           for f, b in zip(fwd, bwd)]
        score["judge"][ci, vi, si] /= len(sides)
        mine = torch.tensor(np.stack([rewards[side, ci, vi, si] for side in sides], 1))
        theirs = torch.tensor(np.stack([rewards[side, ci, -1, -1] for side in sides], 1))
        score["rm"][ci, vi, si] = preference_utility(
            mine, theirs, torch.full((n, len(sides)), 1 / len(sides), dtype=torch.float64),
            torch.tensor([scales[s] for s in sides], dtype=torch.float64)).numpy()

    results: dict = {
        "machine": f"{platform.node()} {platform.machine()}, {platform.python_version()}",
        "date": str(date.today()),
        "command": "python bench/pcm_headroom.py " + " ".join(sys.argv[1:]),
        "instructions": n, "samples": S, "vectors": vecs, "combinations": ["+".join(c) for c in combos],
    }
    u0 = list(vecs).index("uniform")
    for m, sc in score.items():
        # Mean by (combination, vector), over samples and instructions.
        table = {"+".join(c): {name: float(sc[ci, vi].mean()) for vi, name in enumerate(vecs)}
                 for ci, c in enumerate(combos)}
        base = sc[:, u0].mean(1)  # (C, n): uniform, averaged over its samples
        gains: dict[str, list] = {}
        # per-combination: vector chosen by the mean over instructions of sample a, scored on sample b
        pc = np.zeros((len(combos), n))
        pi = np.zeros((len(combos), n))
        for a in range(S):
            b = (a + 1) % S
            best_c = sc[:, :, a].mean(-1).argmax(1)  # (C,)
            pc += sc[np.arange(len(combos)), best_c, b] / S
            best_i = sc[:, :, a].argmax(1)  # (C, n)
            pi += np.take_along_axis(sc[:, :, b], best_i[:, None], 1)[:, 0] / S
        bos = sc.reshape(len(combos), V * S, n).max(1)
        for name, pol in (("per-combination", pc), ("per-instruction", pi), ("best-of-samples", bos)):
            gains[name] = bootstrap((pol - base).mean(0) * 100)
        results[m] = {"by_combination_vector": table, "uniform": bootstrap(base.mean(0) * 100),
                      "gain_over_uniform_points": gains,
                      "lean_minus_uniform_points": {name: bootstrap((sc[:, vi].mean(1) - base).mean(0) * 100)
                                                    for vi, name in enumerate(vecs) if vi != u0}}
        print(f"\n{m}: uniform {results[m]['uniform'][0]:.1f}")
        for name, g in gains.items():
            print(f"  {name:16s} {g[0]:+.1f} [{g[1]:+.1f}, {g[2]:+.1f}]")
        for name, g in results[m]["lean_minus_uniform_points"].items():
            print(f"  {name:16s} {g[0]:+.1f} [{g[1]:+.1f}, {g[2]:+.1f}]")
    Path(args.results).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
