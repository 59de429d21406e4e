"""Decode speed of the ring cache's whole-head growth step (caches.ring.GROW), against dense in the same run.

SmolLM2-135M, retrieval_kv with 40 whole query heads (the mix's retrieval_kv-50 settings), the README's 1k
passkey prompt, --new greedy tokens (end-of-sequence held off); each setting is timed --repeats times,
interleaved, by `measure.generate_timed` (the decode rate of `llmpatch apply --compare`). Prints ms per decode
token, the ratio to dense and the KV saved at the end; writes the figures and the run's metadata as JSON.
`python benchmarks/grow_decode.py --grow 256,32 --out benchmarks/grow-decode-smollm2.json`
"""

import argparse
import json
from pathlib import Path

import llmpatch
from llmpatch.caches import ring
from llmpatch.measure import generate_timed
from llmpatch.meta import run_metadata

ap = argparse.ArgumentParser()
ap.add_argument("--grow", default="256,32")
ap.add_argument("--new", type=int, default=256)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--out", default=None)
args = ap.parse_args()

model, tok = llmpatch.load_model("smollm2-135m")
prompt = (Path(__file__).parents[1] / "examples" / "passkey-1k.txt").read_text()
plan = "benchmarks/retrieval/smollm2-135m-heads.json"
settings = ["dense"] + [int(g) for g in args.grow.split(",")]
runs = {s: [] for s in settings}
for _ in range(args.repeats):
    for s in settings:
        if s == "dense":
            runs[s].append(generate_timed(model, tok, prompt, args.new, min_new_tokens=args.new))
            continue
        ring.GROW = s
        with llmpatch.patched(model, "retrieval_kv", plan=plan, top_k=40, score="mass", sink=32, recent=128):
            runs[s].append(generate_timed(model, tok, prompt, args.new, min_new_tokens=args.new))
ms = {s: 1e3 / max(r.decode_tokens_per_s for r in runs[s]) for s in settings}
rows = []
for s in settings:
    last = runs[s][-1]
    saved = 1 - last.kv_bytes / last.dense_kv_bytes
    rows.append({"setting": "dense" if s == "dense" else f"GROW {s}", "ms_per_token": ms[s],
                 "vs_dense": ms[s] / ms["dense"], "kv_saved": saved})  # fmt: skip
    print(
        f"{rows[-1]['setting']:>9}  {ms[s]:7.1f} ms/token  {ms[s] / ms['dense']:5.2f}x dense  KV saved {saved:.1%}"
    )
if args.out:
    json.dump({"meta": run_metadata(args=vars(args)), "rows": rows}, open(args.out, "w"), indent=1)
