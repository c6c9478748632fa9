"""Store the shipped experts in half precision, if and only if the tokens they produce do not change.

    python scripts/half_precision.py [--model smollm2-135m-instruct] [--prompts 8] [--tokens 48]

Finds the experts a weights distribution ships for the model (``personalign.weights``), makes a
float16 copy of every adapter, and generates greedily with the float32 and the float16 experts: each
expert alone, the psoups and exact soups and the MoPE mixture of the two opposite combinations, on the
first held-out instructions. When every answer is identical, the float16 adapters replace the
float32 ones and ``half_precision_check.json`` (beside the experts folder) records the prompts and the
float32 answers, which the integration tests regenerate from the shipped weights. When any answer
differs, nothing changes and the script says which.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from personalign.compose import shipped_experts_dir
from personalign.data import load_builtin
from personalign.models import load_model
from personalign.weights import HALF_CHECK, check_cases, half_precision_check, to_half

ADAPTER = Path("adapter") / "adapter_model.safetensors"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()

    shipped = shipped_experts_dir(args.model)
    if shipped is None:
        print(f"error: no weights distribution ships experts for {args.model}", file=sys.stderr)
        return 1
    sides = sorted(p.name for p in shipped.iterdir() if (p / ADAPTER).is_file())
    prompts = [item.prompt for item in load_builtin("eval")[: args.prompts]]
    pairs = [s for s in sides if s.endswith("A")], [s for s in sides if s.endswith("B")]
    combos = [",".join(group) for group in pairs if len(group) > 1]
    with tempfile.TemporaryDirectory() as tmp:
        full, half = Path(tmp) / "float32", Path(tmp) / "float16"
        shutil.copytree(shipped, full)
        shutil.copytree(shipped, half)
        for side in sides:
            to_half(full / side / ADAPTER, half / side / ADAPTER)
        model, tok = load_model(args.model)
        result = half_precision_check(model, tok, {"float32": full, "float16": half}, prompts,
                                      check_cases(sides, combos), max_new_tokens=args.tokens, model_name=args.model)
        changed = [f"{c['method']} {c['variant'] or ''} {c['prefs']}" for c in result["cases"]
                   if not c["same"]["float16"]]
        if changed:
            print(f"float16 changes the answers of: {'; '.join(changed)}; the experts stay in float32")
            return 1
        for side in sides:
            shutil.copy2(half / side / ADAPTER, shipped / side / ADAPTER)
    (shipped.parent / HALF_CHECK).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    size = sum(f.stat().st_size for f in shipped.rglob("*.safetensors"))
    print(f"{len(result['cases'])} cases x {len(prompts)} prompts identical; experts stored in float16 "
          f"({size / 1e6:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
