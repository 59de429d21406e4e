"""Does a query-agnostic token score keep the needle? For dev samples at 4k, reform_zip's per-(layer, KV head)
repeat scores (kvzip's) are reduced to one score per token in several ways, and reform's chunk choice at several
ratios is checked for keeping every token of the needle's answer. Writes coverage.jsonl and coverage.meta.json.

  python benchmarks/mix-dev-smollm2-135m/4k-reform-zip/coverage.py --samples 0:5 [--scores DIR]

--scores keeps each sample's [layers, KV heads, N] scores (fp16) in DIR and reuses them on a later run.
"""

import argparse
import json
from pathlib import Path

import torch

import llmpatch
from llmpatch.meta import run_metadata
from llmpatch.methods import reform_zip
from llmpatch.methods.reform import Reform

HERE = Path(__file__).parent
REDUCE = {
    "max": lambda s: s.amax(0),
    "top8": lambda s: s.topk(8, 0).values.sum(0),
    "mean": lambda s: s.mean(0),
}
RATIOS = (0.53, 0.70, 0.78)


def needle(tok, ids, answer):
    for i in range(len(ids)):
        if answer[:3] in tok.decode(ids[i : i + 3]):
            for n in range(1, 12):
                if answer in tok.decode(ids[i : i + n]):
                    return list(range(i, i + n))
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", default="0:5")
    ap.add_argument("--scores", default=None)
    args = ap.parse_args()
    lo, hi = map(int, args.samples.split(":"))
    samples = [json.loads(line) for line in open(HERE.parent / "4k-rkv" / "samples.dev.jsonl")][lo:hi]
    model, tok = llmpatch.load_model("smollm2-135m")
    seen, inner = {}, reform_zip.repeat_scores
    reform_zip.repeat_scores = lambda *a, **k: seen.setdefault("s", inner(*a, **k))
    out = []
    for smp in samples:
        path = Path(args.scores) / f"s{smp['seed']}.pt" if args.scores else None
        if path is not None and path.exists():
            scores = torch.load(path)["s"].float()
        else:
            seen.clear()
            with llmpatch.patched(model, "reform_zip", ratio=0.5), torch.no_grad():
                model(torch.tensor([smp["context_ids"]]), use_cache=True)
            scores = seen["s"]
            if path is not None:
                torch.save({"s": scores.half(), "seed": smp["seed"]}, path)
        pos = needle(tok, smp["context_ids"], smp["answers"][0])
        flat = scores.float().flatten(0, 1)
        rec = {"seed": smp["seed"], "needle": pos}
        for name, fn in REDUCE.items():
            token = fn(flat)
            for ratio in RATIOS:
                kept = set(Reform(ratio=ratio)._choose(token).tolist())
                rec[f"{name}@{ratio}"] = all(p in kept for p in pos)
        out.append(rec)
        print(json.dumps(rec), flush=True)
    with open(HERE / "coverage.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    (HERE / "coverage.meta.json").write_text(json.dumps(run_metadata(samples=args.samples), indent=1))


if __name__ == "__main__":
    main()
