"""Throughput in vLLM with llmpatch's plugin against dense vLLM, same machine, same run: N concurrent prompts of
about L tokens (default 16 x 2048), the prefill's wall time (tokens/s), then vLLM's time per output token (TPOT,
per request from its first to its last token, mean over requests) in a pass with decode steps; one engine
process per plan, in order. Ratios are against the dense engine of the same run.

Plans: dense (vLLM's own kernel, no plugin); "sink_window 0+max_len", a dense-equivalent plan that goes through
the plugin's per-head path (every key visible, no KV saved); streamingllm 25%; the shipped MoA plan.
The elastic plans (streamingllm's density, MoA's spans) are evaluated at one length, the plugin's `length`:
vLLM's max_model_len unless `--plan-length` is given. At max_model_len 4096 "25%" is a window of 1024, half of a
2k prompt; `--plan-length 2048` evaluates the plans at the requests' own length, where 25% means 512 tokens.

Run in the vLLM venv (tests/vllm_plugin/run.sh makes it), on an otherwise idle machine:
  .venv-vllm/bin/python benchmarks/vllm_throughput.py --out benchmarks/vllm-throughput-smollm2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vllm_capacity import engine, save  # noqa: E402

PLANS = ("dense-equivalent", "streamingllm", "moa")


def configs(max_len: int, plans: list[str], plan_length: int | None = None) -> dict:
    at = {} if plan_length is None else {"length": plan_length}
    tag = "" if plan_length is None else f" at length {plan_length}"
    every = {
        "dense-equivalent": (
            f"sink_window 0+{max_len} (dense-equivalent)",
            {"method": "sink_window", "params": {"sink": 0, "window": max_len}},
        ),
        "streamingllm": (
            f"streamingllm 25%{tag}",
            {"method": "streamingllm", "params": {"density": 0.25, **at}},
        ),
        "moa": (f"moa (shipped plan){tag}", {"method": "moa", "plan": "auto", "params": {**at}}),
    }
    return {"dense": "dense", **dict(every[p] for p in plans)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", default="16x2048", help="NxL: N concurrent prompts of about L tokens")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-gib", type=float, default=2.0, help="KV memory (enough for every request at once)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096, help="vLLM's step budget")
    ap.add_argument("--plans", default=",".join(PLANS), help=f"beside dense, any of {', '.join(PLANS)}")
    ap.add_argument(
        "--plan-length",
        type=int,
        default=None,
        help="the length the elastic plans are evaluated at (default: max_model_len)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    plans = args.plans.split(",")
    if not set(plans) <= set(PLANS):
        ap.error(f"--plans: each of {', '.join(PLANS)}; got {args.plans!r}")

    rows = []
    for label, cfg in configs(args.max_model_len, plans, args.plan_length).items():
        got = engine(label, cfg, "--model", args.model, "--throughput", args.requests, "--new-tokens",
                     str(args.decode_steps), "--max-model-len", str(args.max_model_len), "--kv-gib",
                     str(args.kv_gib), "--max-num-batched-tokens", str(args.max_num_batched_tokens))  # fmt: skip
        rows.append({"plan": label, "config": cfg, **got})
        print(f"{label}: prefill {got['prefill_s']} s, TPOT {got['tpot_ms']} ms", flush=True)
    dense = rows[0]
    print(f"\n{args.requests} tokens, {dense['prompt_tokens']:,} prompt tokens in all\n")
    print("| plan | prefill s | prefill tok/s | vs dense | TPOT ms | vs dense |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['plan']} | {r['prefill_s']} | {r['prefill_tok_s']:,} | {r['prefill_s'] / dense['prefill_s']:.2f}x "
              f"| {r['tpot_ms']} | {r['tpot_ms'] / dense['tpot_ms']:.2f}x |")  # fmt: skip
    save(args, rows)


if __name__ == "__main__":
    main()
