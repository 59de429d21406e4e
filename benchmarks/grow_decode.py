"""Decode speed of the ring cache's whole-head growth step (caches.ring.GROW), against dense in the same run.

SmolLM2-135M, retrieval_kv with 40 whole query heads (the mix's retrieval_kv-50 settings), a 1k prompt, greedy
decode of --new tokens; each setting is timed --repeats times, interleaved. Prints ms per token, the ratio to
dense and the KV saved at the end; writes the figures and the run's metadata as JSON.
`python benchmarks/grow_decode.py --grow 256,32,8 --out benchmarks/grow-decode-smollm2.json`
"""

import argparse
import json
import time

import torch

import llmpatch
from llmpatch import caches
from llmpatch.caches import ring
from llmpatch.meta import run_metadata

ap = argparse.ArgumentParser()
ap.add_argument("--grow", default="256,32")
ap.add_argument("--prompt", type=int, default=1024)
ap.add_argument("--new", type=int, default=256)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--out", default=None)
args = ap.parse_args()

model, tok = llmpatch.load_model("smollm2-135m")
ids = torch.randint(100, 40000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
plan = "benchmarks/retrieval/smollm2-135m-heads.json"
settings = ["dense"] + [int(g) for g in args.grow.split(",")]
one = dict(kw, max_new_tokens=1, min_new_tokens=1)
times = {s: [] for s in settings}
saved = {}


def decode_seconds(s):
    """generate(new) - generate(1): the decode steps without the prompt's prefill."""
    t0 = time.perf_counter()
    model.generate(ids, **one)
    t1 = time.perf_counter()
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0), out


for _ in range(args.repeats):
    for s in settings:
        if s == "dense":
            times[s].append(decode_seconds(s)[0])
            continue
        ring.GROW = s
        with llmpatch.patched(
            model, "retrieval_kv", plan=plan, top_k=40, score="mass", sink=32, recent=128
        ) as p:
            dt, out = decode_seconds(s)
            times[s].append(dt)
            saved[s] = p.methods[0].kv_report(caches.output_cache(out))["saved"]
rows = []
dense = min(times["dense"]) / (args.new - 1) * 1e3
for s in settings:
    ms = min(times[s]) / (args.new - 1) * 1e3
    rows.append(
        {
            "setting": s if s == "dense" else f"GROW {s}",
            "ms_per_token": ms,
            "vs_dense": ms / dense,
            "kv_saved": saved.get(s, 0.0),
        }
    )
    print(
        f"{rows[-1]['setting']:>9}  {ms:7.1f} ms/token  {ms / dense:5.2f}x dense  KV saved {saved.get(s, 0.0):.1%}"
    )
if args.out:
    json.dump({"meta": run_metadata(args=vars(args)), "rows": rows}, open(args.out, "w"), indent=1)
