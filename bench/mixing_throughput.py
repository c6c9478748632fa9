"""Decoding throughput of the token-level mixture (MoPE) with K experts, next to the base model alone and
next to a naive mixture that runs K separate models, in one process.

* base: plain transformers ``generate`` on the base model (greedy);
* base_fast: the same, with the thin-input linear path the mixture also uses (``kernels.fast_decode``),
  so the mixture's ratio to it isolates the cost of mixing;
* mixture, one pass: K LoRA experts on one base, all K in one batched forward pass per token with
  their own KV-cache rows (``Experts.from_adapters``);
* mixture, K models: the same experts merged into K separate models, each run every token
  (``Experts.from_models``) — what one would write without the shared base;
* mixture, PCM: the one-pass mixture weighted per token by a Preference Control Model (the shipped
  architecture: context features, hidden 64, proj 32, untrained weights cost the same as trained
  ones), so its ratio to the fixed-weight one-pass mixture is the PCM's cost per token.

Experts are LoRA adapters (r=16 on every projection) with random ``lora_B``, so each expert really
differs; only speed is measured here. Greedy decoding of a fixed number of new tokens (end-of-sequence
disabled) so every path decodes the same number of tokens.

    python bench/mixing_throughput.py [--experts 3] [--new-tokens 64] [--batch 1 4] [--model PATH]
        [--device cpu|cuda] [--dtype float32|bfloat16] [--random-init]

``--random-init`` builds the model from the folder's config.json and tokenizer with random weights,
for machines that have the architecture but not the weights; speed does not depend on weight values.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from personalign.data import load_builtin
from personalign.experts import Experts
from personalign.generation import SamplingConfig
from personalign.kernels import fast_decode
from personalign.mixing import MixRule
from personalign.mixture import FixedWeights, generate_mixed
from personalign.models import load_model
from personalign.personalize import Method, build_prompts
from personalign.preferences import parse_preference

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_experts(base, k: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    names = ["P1A", "P2A", "P3A", "P1B", "P2B", "P3B"][:k]
    model = get_peft_model(base, cfg, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    model.eval()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--output", default=str(Path(__file__).with_name("mixing_throughput.json")))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--random-init", action="store_true")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.random_init:
        if args.model is None:
            ap.error("--random-init needs --model FOLDER holding config.json and the tokenizer")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
        base = base.to(device=device, dtype=getattr(torch, args.dtype)).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        base, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    plain = copy.deepcopy(base)
    peft_model = build_experts(base, args.experts)
    names = ["P1A", "P2A", "P3A", "P1B", "P2B", "P3B"][: args.experts]  # side ids: the PCM weights sides
    separate = []
    for n in names:
        m = copy.deepcopy(peft_model)
        m.set_adapter(n)
        separate.append(m.merge_and_unload().eval())
    one_pass = Experts.from_adapters(peft_model, names)
    k_models = Experts.from_models(separate)
    weights = FixedWeights([1 / args.experts] * args.experts)
    from personalign.pcm import PCMConfig, PCMWeights, PreferenceControlModel
    from personalign.reward_model import base_fingerprint

    pcm_sides = ("P1A", "P1B", "P2A", "P2B", "P3A", "P3B")
    pcm = PreferenceControlModel(PCMConfig(pcm_sides, base.config.hidden_size, True, 64, 32),
                                 base=base_fingerprint(plain)).to(device).eval()
    pcm_pref = parse_preference({n: 1.0 for n in names})
    never = [len(tok) + 10]  # an id never produced: every path decodes exactly new_tokens
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, repetition_penalty=1.0)
    tok.padding_side = "left"
    pref = parse_preference("1A,2A,3A")
    prompts = build_prompts(tok, [i.prompt for i in load_builtin("eval")], pref, Method.PROMPT)

    def run_base(enc):
        with torch.inference_mode():
            plain.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)

    def run_base_fast(enc):  # the base model on the same thin-input linear path the mixture uses
        with torch.inference_mode(), fast_decode(plain):
            plain.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)

    def run_mix(experts):
        def f(enc):
            with torch.inference_mode():
                generate_mixed(experts, enc["input_ids"], enc["attention_mask"], weights, eos_token_ids=never,
                               pad_token_id=tok.pad_token_id, rule=MixRule.PROB, sampling=sampling)
        return f

    def run_pcm(enc):
        provider = PCMWeights(pcm, one_pass, plain.get_input_embeddings(), pcm_pref)
        with torch.inference_mode():
            generate_mixed(one_pass, enc["input_ids"], enc["attention_mask"], provider, eos_token_ids=never,
                           pad_token_id=tok.pad_token_id, rule=MixRule.PROB, sampling=sampling)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = []
    for b in args.batch:
        enc = tok(prompts[:b], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        paths = {"base": run_base, "base_fast": run_base_fast, "mixture_one_pass": run_mix(one_pass),
                 "mixture_pcm": run_pcm, "mixture_k_models": run_mix(k_models)}
        times: dict[str, list[float]] = {p: [] for p in paths}
        for rep in range(args.reps + 1):
            order = list(paths) if rep % 2 == 0 else list(reversed(paths))
            for p in order:
                sync()
                t0 = time.perf_counter()
                paths[p](enc)
                sync()
                if rep > 0:  # the first repetition warms up
                    times[p].append(time.perf_counter() - t0)
        tps = {p: b * args.new_tokens / statistics.median(t) for p, t in times.items()}
        row = {"batch": b, "tok_s": tps, "seconds": times,
               "one_pass_vs_base": tps["mixture_one_pass"] / tps["base"],
               "one_pass_vs_base_fast": tps["mixture_one_pass"] / tps["base_fast"],
               "k_models_vs_base": tps["mixture_k_models"] / tps["base"],
               "one_pass_vs_k_models": tps["mixture_one_pass"] / tps["mixture_k_models"],
               "pcm_vs_base": tps["mixture_pcm"] / tps["base"],
               "pcm_vs_fixed": tps["mixture_pcm"] / tps["mixture_one_pass"],
               "pcm_ms_per_token": 1e3 * (statistics.median(times["mixture_pcm"])
                                          - statistics.median(times["mixture_one_pass"])) / args.new_tokens}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "seconds"}), flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} ({machine})"
    record = {"date": date.today().isoformat(), "machine": machine, "device": str(device), "dtype": args.dtype,
              "random_init": args.random_init,
              "torch": torch.__version__, "model": args.model or "smollm2-135m-instruct", "experts": args.experts,
              "new_tokens": args.new_tokens, "results": results}
    Path(args.output).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
