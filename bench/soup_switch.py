"""Personalized Soups at request time: the cost of switching to a new preference vector (merge + load,
cold and with the soup cache warm), and generation throughput with a merged soup versus the base model,
in one process.

Experts: the folder given with ``--experts`` (default: the shipped experts for the model), or, with
``--random-experts``, LoRA experts with random ``lora_B`` on every projection (r=16), which cost the
same to merge and load as trained ones.

    python bench/soup_switch.py [--experts DIR | --random-experts] [--method psoups] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from personalign.data import load_builtin
from personalign.generation import SamplingConfig
from personalign.models import load_model
from personalign.personalize import MethodOptions, personalize, resolve

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")


def random_experts(base, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    for i, side in enumerate(SIDES):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
        model.save_pretrained(folder / side / "adapter")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", default=None)
    ap.add_argument("--random-experts", action="store_true")
    ap.add_argument("--method", default="psoups")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--output", default=str(Path(__file__).with_name("soup_switch.json")))
    args = ap.parse_args()

    base, tok = load_model(args.model, device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        experts = str(random_experts(base, tmp / "experts")) if args.random_experts else args.experts
        prefs = ["1A,2A,3A", "1B,2B,3B", "P2A=0.7,P2B=0.3,P1A=1", "1A,2B,3A"]
        cold, warm, loads = [], [], []
        for spec in prefs:  # a switch: resolve the request, then personalize a copy of the base
            t0 = time.perf_counter()
            request = resolve(spec, MethodOptions(method="soup", experts=experts, merge=args.method), model=args.model)
            soup = personalize(base, tok, request, cache=tmp / "cache")
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            request = resolve(spec, MethodOptions(method="soup", experts=experts, merge=args.method), model=args.model)
            soup = personalize(base, tok, request, cache=tmp / "cache")
            warm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            copy.deepcopy(base)
            loads.append(time.perf_counter() - t0)

        # Throughput: the last soup (merged into the weights) against the base, alternating order.
        sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, repetition_penalty=1.0)
        # Both answer the same formatted texts (the soup's preference prompt), so only the weights differ.
        texts = [soup.format(i.prompt) for i in load_builtin("eval")][: args.batch]
        prompted = personalize(base, tok, resolve(None, MethodOptions(method="vanilla"), model=args.model))
        times: dict[str, list[float]] = {"base": [], "soup": []}
        tokens: dict[str, int] = {}
        for rep in range(args.reps + 1):
            order = [("base", prompted), ("soup", soup)] if rep % 2 == 0 else [("soup", soup), ("base", prompted)]
            for name, m in order:
                t0 = time.perf_counter()
                out = m.generate_texts(texts, sampling, batch_size=args.batch)
                if rep > 0:
                    times[name].append(time.perf_counter() - t0)
                tokens[name] = sum(len(tok(o, add_special_tokens=False)["input_ids"]) + 1 for o in out)
    tps = {k: tokens[k] / statistics.median(v) for k, v in times.items()}
    record = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "model": args.model or "smollm2-135m-instruct", "method": args.method,
        "experts": "random" if args.random_experts else str(request.experts_dir),
        "switch_cold_s": cold, "switch_warm_s": warm, "base_copy_s": loads,
        "switch_cold_median_s": statistics.median(cold), "switch_warm_median_s": statistics.median(warm),
        "tok_s": tps, "tokens": tokens, "soup_vs_base": tps["soup"] / tps["base"],
    }
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, list)}, indent=2))
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
