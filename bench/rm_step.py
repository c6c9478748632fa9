"""Reward-model training step time: LoRA on every layer versus on the last N layers only.

One Bradley-Terry step (8 pairs = 16 sequences, float32, forward + backward) on the embedded model.

    python bench/rm_step.py [--top-layers 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import time

from personalign.losses import bradley_terry_loss
from personalign.models import load_model
from personalign.reward_model import LoraSpec, RewardModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--top-layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    texts = ["Why is the sky blue? " + "The sky looks blue because air scatters short wavelengths of sunlight more. "
             * 10] * 16
    for top in (None, args.top_layers):
        base, tok = load_model(args.model, device="cpu", dtype="float32")
        rm = RewardModel(base, tok, ["P1A"], LoraSpec(top_layers=top), 256)
        rm.train()
        enc = rm.encode(texts)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            r = rm(**enc).float()
            bradley_terry_loss(r[:8, 0], r[8:, 0]).backward()
            times.append(time.perf_counter() - t0)
        print(f"top_layers={top}: tokens {tuple(enc['input_ids'].shape)}, step seconds "
              f"{', '.join(f'{t:.2f}' for t in times)}", flush=True)


if __name__ == "__main__":
    main()
