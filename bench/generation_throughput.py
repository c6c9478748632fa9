"""Generation throughput: personalign's generation path versus plain transformers ``generate``.

Both run in one process on the same loaded model, the same formatted prompts and the same settings
(greedy, no repetition penalty, 128 new tokens), alternating order over repetitions; the median is
reported. Our path is what ``personalign generate --input ... --output ...`` runs once the model is
loaded: the personalized model (``personalize``), preference prompt composition, chat formatting, the
decode loop of ``personalign.generation``, and durable JSONL writes per batch. Tokens are counted up to and including end-of-sequence (identical for the two
paths: greedy decoding of the same model).

    python bench/generation_throughput.py [--reps 3] [--max-new-tokens 128] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from personalign.data import Instruction, load_builtin
from personalign.generation import SamplingConfig, eos_token_ids
from personalign.generations import write_answers
from personalign.models import load_model
from personalign.personalize import MethodOptions, personalize, resolve
from personalign.preferences import parse_preference


def count_new_tokens(tok, responses: list[str]) -> int:
    # +1 for the end-of-sequence token each finished response emitted.
    return sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in responses)


def ours(model, tok, instructions, pref, sampling, batch_size, out_path: Path) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    spec = resolve(pref, MethodOptions(method="prompt"))
    rows = write_answers(spec, lambda: personalize(model, tok, spec), [Instruction(x) for x in instructions],
                         out_path, sampling, batch_size=batch_size, progress=False)
    return time.perf_counter() - t0, [r["response"] for r in rows]


def plain(model, tok, instructions, pref, max_new_tokens, batch_size) -> tuple[float, list[str]]:
    """What a user would write with transformers alone."""
    t0 = time.perf_counter()
    tok.padding_side = "left"
    eos = eos_token_ids(model, tok)
    out: list[str] = []
    for i in range(0, len(instructions), batch_size):
        msgs = [[{"role": "user", "content": f"{x} {pref.prompt()}"}] for x in instructions[i:i + batch_size]]
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        out += [s.strip() for s in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--output", default=str(Path(__file__).with_name("generation_throughput.json")))
    args = ap.parse_args()

    model, tok = load_model(device="cpu", dtype=args.dtype)
    pref = parse_preference("1A,2A,3A")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    evals = [i.prompt for i in load_builtin("eval")]
    results = []
    for batch_size, n in ((1, 4), (8, 8)):
        instructions = evals[:n]
        ours_t, plain_t = [], []
        tokens = None
        for rep in range(args.reps):
            with tempfile.TemporaryDirectory() as tmp:
                runs = [("ours", lambda: ours(model, tok, instructions, pref, sampling, batch_size, Path(tmp) / "o.jsonl")),
                        ("plain", lambda: plain(model, tok, instructions, pref, args.max_new_tokens, batch_size))]
                if rep % 2:
                    runs.reverse()
                outs = {}
                for name, fn in runs:
                    secs, responses = fn()
                    (ours_t if name == "ours" else plain_t).append(secs)
                    outs[name] = responses
            if outs["ours"] != outs["plain"]:
                raise SystemExit("the two paths produced different text; the comparison would be unfair")
            tokens = count_new_tokens(tok, outs["ours"])
        row = {
            "batch_size": batch_size, "prompts": n, "new_tokens": tokens,
            "ours_tok_s": tokens / statistics.median(ours_t), "plain_tok_s": tokens / statistics.median(plain_t),
            "ours_s": ours_t, "plain_s": plain_t,
        }
        row["ratio"] = row["ours_tok_s"] / row["plain_tok_s"]
        results.append(row)
        print(f"batch {batch_size}: ours {row['ours_tok_s']:.1f} tok/s, plain transformers {row['plain_tok_s']:.1f} "
              f"tok/s, ratio {row['ratio']:.3f}", flush=True)
    record = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or 'cpu'}", "torch": torch.__version__, "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens, "reps": args.reps, "results": results,
    }
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
