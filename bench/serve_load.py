"""Serving under load: many people at once, each with their own continuous preference, through the official
``openai`` async client against ``personalign serve`` on loopback (the server in its own process).

Every request asks for one answer to a held-out instruction under a random weight vector over the three
dimensions (each dimension's side drawn at random, the weights from a flat Dirichlet), streamed, with
``max_tokens`` new tokens at the default sampling settings (no seed, so requests share batches); with
``--ignore-eos`` every request decodes exactly that many, so that early ends do not make one method's
phase look faster than another's. One set
of weight vectors serves every method. Measured per method: aggregate completion tokens/s (all tokens
over the phase's wall time), p50/p95 latency, p95 time to first token, errors, and the server's resident
memory at the end of the phase. Methods:

* ``prompt``: the base model with the preference prompt (what a user would run without experts);
* ``soup``: the exact soup of each request's weights, computed per row in the shared batch;
* ``soup-naive``: the same exact soups the way a server without per-row soups serves them: merge each
  request's soup into a copy of the base, then generate (``personalign serve --no-continuous``; at most
  ``--max-models`` merged models at once);
* ``mope``: K=3 experts mixed token by token with the request's fixed weights, in the shared batch;
* ``mope-pcm``: the same with the shipped PCM choosing the weights at every token.

Then the head-of-line test: a short request (8 tokens) sent while ``clients - 1`` long ones (4x the tokens)
decode, against the same request on an idle server: its time to first token and latency.

Methods run in one order, then the reverse (``--rounds 2``), on the same two server processes; the
table reports each round and the mean.

    python bench/serve_load.py [--clients 32] [--new-tokens 64] [--rounds 2] [--ignore-eos] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from urllib.request import urlopen

import openai

from personalign.data import load_builtin
from personalign.models import EMBEDDED_DEFAULT

IGNORE_EOS = False  # --ignore-eos: every request decodes exactly max_tokens
DIMENSIONS = (("P1A", "P1B"), ("P2A", "P2B"), ("P3A", "P3B"))
METHODS = {
    "prompt": {"method": "prompt"},
    "soup": {"method": "soup", "merge": "exact"},
    "mope": {"method": "mope", "mix": "prob", "pcm": "none"},
    "mope-pcm": {"method": "mope", "mix": "prob", "pcm": "shipped"},
    "soup-naive": {"method": "soup", "merge": "exact"},  # on the server without the shared batch
}


def preferences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        raw = [rng.expovariate(1.0) for _ in DIMENSIONS]  # a flat Dirichlet, normalised below
        sides = [rng.choice(d) for d in DIMENSIONS]
        out.append(",".join(f"{s}={w / sum(raw):.3f}" for s, w in zip(sides, raw)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``personalign serve`` in a child process."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).with_name("personalign")), "serve", "--port", str(self.port),
               "--set", "log_level=warning",
               *args]
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        deadline = time.monotonic() + 600
        while True:
            try:
                with urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {' '.join(cmd)}") from None
                time.sleep(0.5)

    def health(self) -> dict:
        with urlopen(f"{self.url}/health", timeout=10) as r:
            return json.load(r)

    def memory_mib(self) -> dict:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {k: round(int(fields[k].split()[0]) / 1024) for k in ("VmRSS", "VmHWM")}

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)


async def one(client: openai.AsyncOpenAI, question: str, prefs: str, extra: dict, tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    used = 0
    try:
        stream = await client.chat.completions.create(
            model=EMBEDDED_DEFAULT, messages=[{"role": "user", "content": question}], max_tokens=tokens,
            stream=True, stream_options={"include_usage": True},
            extra_body={"preferences": prefs, "ignore_eos": IGNORE_EOS, **extra})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
    except openai.APIError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "latency": time.perf_counter() - start}
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": used}


async def load(url: str, questions: list[str], prefs: list[str], extra: dict, tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=3600)
    start = time.perf_counter()
    results = await asyncio.gather(*[one(client, q, p, extra, tokens) for q, p in zip(questions, prefs)])
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(xs: list[float], q: float) -> float | None:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None

    return {"requests": len(results), "errors": len(results) - len(ok),
            "error_examples": [r["error"] for r in results if "error" in r][:3],
            "tokens": sum(r["tokens"] for r in ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "latency_mean_s": round(statistics.mean(lat), 2) if lat else None,
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95), "ttft_p95_s": pct(ttft, 0.95)}


async def head_of_line(url: str, question: str, pref: str, clients: int, tokens: int) -> dict:
    """A short request alone, then the same while ``clients - 1`` long requests decode."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=3600)
    extra = {"method": "prompt"}
    idle = await one(client, question, pref, extra, 8)
    longs = [asyncio.create_task(one(client, question, pref, extra, tokens * 4)) for _ in range(clients - 1)]
    while True:  # until the long ones are all decoding
        await asyncio.sleep(0.2)
        with urlopen(f"{url}/health", timeout=10) as r:
            if json.load(r)["rows"] >= clients - 1:
                break
    busy = await one(client, question, pref, extra, 8)
    long_done = await asyncio.gather(*longs)
    await client.close()
    return {"idle_ttft_s": round(idle["ttft"], 3), "idle_latency_s": round(idle["latency"], 3),
            "busy_ttft_s": round(busy["ttft"], 3), "busy_latency_s": round(busy["latency"], 3),
            "long_latency_mean_s": round(statistics.mean(r["latency"] for r in long_done), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-models", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every request decodes exactly --new-tokens (the methods then compare on equal work)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("serve_load.json"))
    args = ap.parse_args()
    global IGNORE_EOS
    IGNORE_EOS = args.ignore_eos

    questions = [i.prompt for i in load_builtin("eval")][: args.clients]
    prefs = preferences(args.clients)
    shared = Server("--max-batch", str(args.clients), "--max-queue", str(4 * args.clients))
    naive = Server("--max-batch", str(args.clients), "--max-queue", str(4 * args.clients), "--no-continuous",
                   "--max-models", str(args.max_models)) if "soup-naive" in args.methods else None
    rounds = []
    try:
        for name in args.methods:  # warm-up, not measured: experts, PCM and first merges load here
            server = naive if name == "soup-naive" else shared
            asyncio.run(load(server.url, questions[:2], prefs[-2:], METHODS[name], 2))
        for r in range(args.rounds):
            order = args.methods if r % 2 == 0 else list(reversed(args.methods))
            results = {}
            for name in order:
                server = naive if name == "soup-naive" else shared
                print(f"round {r + 1}: {name} ...", flush=True)
                res = asyncio.run(load(server.url, questions, prefs, METHODS[name], args.new_tokens))
                res["memory_mib"] = server.memory_mib()
                results[name] = res
                print(f"  {json.dumps(res)}", flush=True)
            rounds.append({"order": order, "results": results})
        print("head of line ...", flush=True)
        hol = asyncio.run(head_of_line(shared.url, questions[0], prefs[0], args.clients, args.new_tokens))
        print(f"  {json.dumps(hol)}", flush=True)
    finally:
        shared.stop()
        if naive is not None:
            naive.stop()

    def mean(name: str, key: str) -> float | None:
        vals = [rd["results"][name][key] for rd in rounds if name in rd["results"] and rd["results"][name][key]]
        return round(statistics.mean(vals), 3) if vals else None

    tps = {m: mean(m, "tokens_per_s") for m in args.methods}

    def ratio(a: str, b: str) -> float | None:
        return round(tps[a] / tps[b], 3) if tps.get(a) and tps.get(b) else None

    summary = {
        "tokens_per_s": tps,
        "soup_over_prompt": ratio("soup", "prompt"),
        "soup_over_naive": ratio("soup", "soup-naive"),
        "mope_over_prompt": ratio("mope", "prompt"),
        "pcm_over_mope": ratio("mope-pcm", "mope"),
        "mope_over_soup_latency": (round(mean("mope", "latency_mean_s") / mean("soup", "latency_mean_s"), 3)
                                   if mean("mope", "latency_mean_s") and mean("soup", "latency_mean_s") else None),
        "paper_mope_over_soup_latency": round(10.5 / 13.3, 3),
        "head_of_line": hol,
    }
    doc = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "command": "python bench/serve_load.py " + " ".join(sys.argv[1:]),
           "clients": args.clients, "new_tokens": args.new_tokens, "ignore_eos": args.ignore_eos, "rounds": rounds,
           "summary": summary}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
