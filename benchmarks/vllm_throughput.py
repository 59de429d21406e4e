"""Throughput in vLLM with llmpatch's plugin against dense vLLM, same machine, same run: N concurrent prompts of
about L tokens (default 16 x 2048), the prefill's wall time (tokens/s) and the time per decode step after it, one
engine process per plan, in order. Ratios are against the dense engine of the same run.

Plans: dense (vLLM's own kernel, no plugin); "sink_window 0+max_len", a dense-equivalent plan that goes through
the plugin's per-head path (every key visible, no KV saved); streamingllm 25%; the shipped MoA plan.

Run in the vLLM venv (tests/vllm_plugin/run.sh makes it), on an otherwise idle machine:
  .venv-vllm/bin/python benchmarks/vllm_throughput.py --out benchmarks/vllm-throughput-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vllm_capacity import engine  # noqa: E402


def configs(max_len: int) -> dict:
    return {
        "dense": "dense",
        f"sink_window 0+{max_len} (dense-equivalent)": {
            "method": "sink_window",
            "params": {"sink": 0, "window": max_len},
        },
        "streamingllm 25%": {"method": "streamingllm", "params": {"density": 0.25}},
        "moa (shipped plan)": {"method": "moa", "plan": "auto", "params": {}},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", default="16x2048", help="NxL: N concurrent prompts of about L tokens")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-gib", type=float, default=2.0, help="KV memory (enough for every request at once)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096, help="vLLM's step budget")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from llmpatch.meta import run_metadata

    rows = []
    for label, cfg in configs(args.max_model_len).items():
        got = engine(label, cfg, "--model", args.model, "--throughput", args.requests, "--new-tokens",
                     str(args.decode_steps), "--max-model-len", str(args.max_model_len), "--kv-gib",
                     str(args.kv_gib), "--max-num-batched-tokens", str(args.max_num_batched_tokens))  # fmt: skip
        rows.append({"plan": label, "config": cfg, **got})
        print(f"{label}: prefill {got['prefill_s']} s, decode {got['decode_step_ms']} ms/step", flush=True)
    dense = rows[0]
    print(f"\n{args.requests} tokens, {dense['prompt_tokens']:,} prompt tokens in all\n")
    print(
        "| plan | prefill s | prefill tok/s | vs dense | decode ms/step | vs dense |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(f"| {r['plan']} | {r['prefill_s']} | {r['prefill_tok_s']:,} | {r['prefill_s'] / dense['prefill_s']:.2f}x "
              f"| {r['decode_step_ms']} | {r['decode_step_ms'] / dense['decode_step_ms']:.2f}x |")  # fmt: skip
    import vllm

    meta = run_metadata(vllm=vllm.__version__, args=vars(args) | {"out": str(args.out)})
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
