"""HF path A/B of the CPU kernels' per-span passes (`kernels/cpu.py: _split_pays`): one prefill configuration in
this process, with the split on (as shipped) or forced off, so the two can be run alternately on a quiet machine:
  for s in off on off on; do python benchmarks/span_split_ab.py $s; done   # SmolLM2, shipped MoA plan, 4k
"""

import argparse
import json

from llmpatch.kernels import cpu

from llmpatch.bench import model_one
from llmpatch.meta import run_metadata

ap = argparse.ArgumentParser()
ap.add_argument("split", choices=["on", "off"])
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--method", default="moa")
ap.add_argument("--length", type=int, default=4096)
args = ap.parse_args()
if args.split == "off":
    cpu._split_pays = lambda *a: False
row = model_one(args.model, args.method, {"plan": "auto"}, args.length, 4, 2)
print(
    json.dumps(
        {"split": args.split, "prefill_s": round(row["prefill_s"], 2), "meta": run_metadata(args=vars(args))}
    )
)
