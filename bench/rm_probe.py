"""Where in the backbone a reward model should read: linear probes of frozen features, per side.

For each side's labelled pairs (a pipeline run's ``pairs.jsonl``, split by instruction as ``train-rm``
splits them), the base model runs once over every text as the reward model formats it; at each listed
layer, the state of the last real token (``last``) and the mean over the sequence (``mean``) are
features (and both side by side, ``last+mean``), and a Bradley-Terry linear probe (``losses.fit_bradley_terry_head``) is fitted on the
training pairs' feature differences and scored on the held-out pairs. High held-out accuracy at a
layer means a reward model read there starts from features that already separate the side's pairs.

To choose a readout without looking at the held-out pairs, ``--l2-grid`` also reports each probe's
5-fold cross-validated accuracy over the training instructions (``losses.select_l2_by_cv``, as
``train-rm``'s ``probe_l2_grid`` chooses the penalty), with the penalty chosen the same way.

    python bench/rm_probe.py --run-dir runs/psoups-smollm2 [--sides P2B P3A] [--layers 4 8 10 16 30]
    python bench/rm_probe.py --sides P3B --pools mean --l2-grid 0.01 0.1 1 10 --output bench/rm_probe_p3b.json
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from personalign.data import build_user_message, format_chat
from personalign.losses import fit_bradley_terry_head, select_l2_by_cv
from personalign.models import load_model
from personalign.preferences import load_space
from personalign.data import read_pairs, split_by_prompt
from personalign.reward_model import last_token_index


def rm_text(tok, prompt: str, response: str, side_prompt: str) -> str:
    """What a single-side reward model reads (``RewardModel.format``)."""
    return format_chat(tok, build_user_message(prompt, side_prompt)) + response.strip() + (tok.eos_token or "")


@torch.no_grad()
def features(decoder, tok, texts: list[str], layers: list[int], batch: int = 16,
             max_length: int = 256) -> dict[str, dict[str, torch.Tensor]]:
    tok.padding_side = "right"
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                  add_special_tokens=False)
        hs = decoder(**enc, output_hidden_states=True, use_cache=False).hidden_states
        idx = last_token_index(enc["attention_mask"])
        m = enc["attention_mask"][..., None].float()
        for j, t in enumerate(chunk):
            f = {}
            for layer in layers:
                h = hs[layer][j].float()
                f[f"last{layer}"] = h[idx[j]]
                f[f"mean{layer}"] = (h * m[j]).sum(0) / m[j].sum()
                f[f"last+mean{layer}"] = torch.cat([f[f"last{layer}"], f[f"mean{layer}"]])
            out[t] = f
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/psoups-smollm2")
    ap.add_argument("--sides", nargs="+", default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 6, 8, 10, 12, 16, 22, 30])
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--l2-grid", type=float, nargs="+", default=None,
                    help="choose each probe's penalty by cross-validation on the training pairs and report it")
    ap.add_argument("--pools", nargs="+", default=["last", "mean", "last+mean"],
                    choices=["last", "mean", "last+mean"])
    ap.add_argument("--output", default=str(Path(__file__).with_name("rm_probe.json")))
    args = ap.parse_args()

    base, tok = load_model(None, device="cpu", dtype="float32")
    space = load_space(None)
    pairs_path = Path(args.run_dir) / "pairs.jsonl"
    sides = args.sides or sorted({r["side"] for r in read_pairs(pairs_path)})
    record = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "run_dir": args.run_dir, "l2": args.l2, "l2_grid": args.l2_grid, "layers": args.layers, "sides": {}}
    decoder = base.get_decoder()
    for side in sides:
        prompt_of = space.sides[side].prompt
        rows = read_pairs(pairs_path, {side})
        train, held = split_by_prompt(rows, 0.1, 0)

        def text(r: dict, k: str) -> str:
            return rm_text(tok, r["prompt"], r[k], prompt_of)

        texts = list(dict.fromkeys(text(r, k) for r in rows for k in ("chosen", "rejected")))
        feats = features(decoder, tok, texts, args.layers)

        def diff(rs: list[dict], name: str) -> torch.Tensor:
            return torch.stack([feats[text(r, "chosen")][name] - feats[text(r, "rejected")][name] for r in rs])

        result = {}
        for layer in args.layers:
            for pool in args.pools:
                name = f"{pool}{layer}"
                l2, entry = args.l2, {}
                if args.l2_grid:
                    l2, cv = select_l2_by_cv(diff(train, name), [r["prompt"] for r in train], args.l2_grid)
                    entry = {"l2": l2, "cv": cv[l2]}
                w = fit_bradley_terry_head(diff(train, name), l2)
                result[name] = {"train": float((diff(train, name) @ w > 0).float().mean()),
                                "held_out": float((diff(held, name) @ w > 0).float().mean()), **entry}
        record["sides"][side] = {"train_pairs": len(train), "held_out_pairs": len(held), "probes": result}
        key = "cv" if args.l2_grid else "held_out"
        best = max(result, key=lambda n: result[n][key])
        print(side, " ".join(f"{n}={v[key]:.3f}" for n, v in result.items()), f"best {key}={best}", flush=True)
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
