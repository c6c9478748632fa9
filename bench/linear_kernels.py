"""The linear layers of one decoding step, by number of rows: ``F.linear`` versus the thin-input path.

Runs every linear layer of the model (all decoder projections and the LM head, distinct weights, so
they stream from memory as in real decoding) on M rows, for each M, in both ways:

* ``linear``: ``torch.nn.functional.linear(x, W)``, what transformers runs;
* ``thin``: ``personalign.kernels.thin_linear`` — ``(W @ x.T).T`` on rows padded by ``padded_rows``.

Best of ``--reps`` sweeps per M; the ratio is linear / thin (above 1: the thin path is faster).
M is B for a batch of B sequences, K*B for a mixture of K experts.

    python bench/linear_kernels.py [--rows 1 2 3 4 6 8 12 16 24 32 48 64 96 128] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from personalign.kernels import padded_rows, thin_linear
from personalign.models import load_model


def sweep(weights: list[torch.Tensor], rows: int, fn, reps: int) -> float:
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            for w in weights:
                fn(xs[w.shape[1]], w)
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--output", default=str(Path(__file__).with_name("linear_kernels.json")))
    args = ap.parse_args()

    model, _ = load_model(args.model, device="cpu", dtype="float32")
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    results = []
    for m in args.rows:
        plain = sweep(weights, m, lambda x, w: F.linear(x, w), args.reps)
        thin = sweep(weights, m, lambda x, w: thin_linear(x, w), args.reps)
        row = {"rows": m, "padded_to": padded_rows(m), "linear_ms": plain, "thin_ms": thin, "ratio": plain / thin}
        results.append(row)
        print(json.dumps(row), flush=True)
    record = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "model": args.model or "smollm2-135m-instruct",
              "layers": len(weights), "parameters": sum(w.numel() for w in weights), "results": results}
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
