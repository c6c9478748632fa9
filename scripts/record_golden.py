"""Record what every generation method produces on the embedded model, to test that it never changes.

Writes ``tests/assets/golden_generations.json``: for each case (method, its options, a preference,
greedy or seeded sampling) the responses to three instructions, generated two per batch (so padding
and the seeding of a second batch are covered). ``tests/integration/test_golden.py`` regenerates every
case and compares byte for byte. Rerun this only when a change of output is intended, and say why in
the commit.

    python scripts/record_golden.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from personalign.generation import SamplingConfig
from personalign.recipes import generate

INSTRUCTIONS = [
    "Explain why the sky is blue.",
    "Give me advice for a job interview.",
    "What is a prime number?",
]
SAMPLINGS = {
    "greedy": SamplingConfig(max_new_tokens=40, temperature=0.0, seed=0),
    "sampled": SamplingConfig(max_new_tokens=40, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=3),
}
# (name, generate options). Preferences: a hard combination, and a weighted one.
CASES = [
    ("vanilla", {"method": "vanilla", "prefs": None}),
    ("prompt", {"method": "prompt", "prefs": "1A,2B,3A"}),
    ("expert-P2A", {"method": "expert", "prefs": "P2A"}),
    *[(f"soup-{m}", {"method": "soup", "prefs": "1A,2B,3A", "merge": m,
                     "merge_density": 0.5 if m in ("ties", "dare", "dare_ties") else None})
      for m in ("psoups", "exact", "ties", "dare", "dare_ties")],
    ("soup-exact-weighted", {"method": "soup", "prefs": "concise=0.7,informative=0.3,friendly=1", "merge": "exact"}),
    *[(f"mope-{r}", {"method": "mope", "prefs": "1A,2B,3A", "mix": r}) for r in ("prob", "logit", "uniform")],
    ("mope-prob-weighted", {"method": "mope", "prefs": "concise=0.7,informative=0.3,friendly=1", "mix": "prob"}),
    ("mope-pcm", {"method": "mope", "prefs": "1A,2B,3A", "mix": "prob", "pcm": "shipped"}),
]


def main(out: Path) -> None:
    cases = []
    for sampling_name, sampling in SAMPLINGS.items():
        for name, opts in CASES:
            cfg = generate.GenerateConfig(instructions=tuple(INSTRUCTIONS), batch_size=2, progress=False,
                                          sampling=sampling, **opts)
            rows = generate.main(cfg)
            cases.append({"name": f"{name}/{sampling_name}", "options": opts, "sampling": asdict(sampling),
                          "batch_size": 2, "responses": [r["response"] for r in rows]})
            print(f"{name}/{sampling_name}: {rows[0]['response'][:70]!r}", file=sys.stderr)
    out.write_text(json.dumps({"instructions": INSTRUCTIONS, "cases": cases}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(Path(__file__).resolve().parents[1] / "tests" / "assets" / "golden_generations.json")
