"""Replay the patched samples of a stored recipe run on the current code, without its dense baseline: the same
prompts (suite, length, seed, index), the same method, and each output compared with the stored one.

    python benchmarks/replay_samples.py benchmarks/recipe-smollm2-135m-longheads-128/results.json \
        --label longheads-2048-128 --length 16384 --samples 5 --json benchmarks/replay-longheads-16k.json

For re-checking a change to the attention path where the baseline cannot have moved (it is the unpatched
model) and a full recipe would spend most of its time on it. Writes per-sample outputs, scores, timings,
whether each output equals the stored one, and run metadata.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmpatch.evals.runner import budget
from llmpatch.evals.suites import get_suite

import llmpatch
from llmpatch.measure import generate_timed
from llmpatch.meta import run_metadata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="results.json of a stored `llmpatch eval` run")
    ap.add_argument("--label", required=True, help="the method configuration to replay")
    ap.add_argument("--length", type=int, required=True)
    ap.add_argument("--samples", type=int, default=None, help="the first N samples (default: all)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    stored = json.loads(args.results.read_text())
    model_name = stored["model"]
    result = stored["results"][0]
    config = next(c for c in result["configs"] if c["label"] == args.label)
    old = [s for s in config["samples"] if s["length"] == args.length][: args.samples]
    suite = get_suite(result["suite"], result.get("families"))
    model, tok = llmpatch.load_model(model_name)
    rows = []
    with llmpatch.patched(model, config["methods"], config["plan"], **config["params"]):
        for i, before in enumerate(old):
            s = suite.sample(tok, args.length, i, seed=result["seed"], depth=before.get("depth"))
            gen = generate_timed(model, tok, s.prompt_ids or s.prompt, budget(suite, s))
            row = {"index": i, "output": gen.text, "score": suite.score(s, gen.text), "stored_output": before["output"],
                   "stored_score": before["score"], "same_output": gen.text == before["output"],
                   **{k: v for k, v in gen.to_dict().items() if k != "text"}}  # fmt: skip
            rows.append(row)
            print(
                json.dumps({k: row[k] for k in ("index", "score", "stored_score", "same_output", "ttft_s")})
            )
    summary = {
        "accuracy": sum(r["score"] for r in rows) / len(rows),
        "stored_accuracy": sum(r["stored_score"] for r in rows) / len(rows),
        "same_outputs": sum(r["same_output"] for r in rows),
        "n": len(rows),
        "mean_ttft_s": sum(r["ttft_s"] for r in rows) / len(rows),
    }
    print(json.dumps(summary))
    meta = run_metadata(replayed=str(args.results), label=args.label, length=args.length)
    args.json.write_text(json.dumps({"summary": summary, "samples": rows, "metadata": meta}, indent=1) + "\n")


if __name__ == "__main__":
    main()
