"""KV capacity in vLLM with llmpatch's plugin against dense vLLM: the KV tokens and the maximum concurrency vLLM
reports at one max_model_len and one fixed KV memory, per served plan (each in its own engine process).

Run in the vLLM venv (tests/vllm_plugin/run.sh makes it):
  .venv-vllm/bin/python benchmarks/vllm_capacity.py --out benchmarks/vllm-capacity-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DRIVE = Path(__file__).parents[1] / "tests" / "vllm_plugin" / "drive.py"
CONFIGS = {
    "dense": "dense",
    "streamingllm 25%": {"method": "streamingllm", "params": {"density": 0.25}},
    "moa (shipped plan)": {"method": "moa", "plan": "auto", "params": {}},
    "sink_window 64+448": {"method": "sink_window", "params": {"sink": 64, "window": 448}},
}


def engine(label: str, cfg, *args: str) -> dict:
    """One engine process (tests/vllm_plugin/drive.py) for `cfg` ("dense": no plugin): its RESULT line."""
    arg = cfg if cfg == "dense" else json.dumps(cfg)
    proc = subprocess.run(
        [sys.executable, str(DRIVE), arg, *args], capture_output=True, text=True, timeout=3600
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{label}: the engine did not start\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def save(args, rows: list[dict]) -> None:
    """The rows with the run's metadata (versions, git commit, arguments) as JSON at `args.out`."""
    import vllm

    from llmpatch.meta import run_metadata

    meta = run_metadata(vllm=vllm.__version__, args=vars(args) | {"out": str(args.out)})
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-gib", type=float, default=1.0)
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="vLLM's step budget: a prompt is "
        "prefilled in chunks of this size, so a bounded layer holds its span plus one chunk",
    )
    ap.add_argument(
        "--block-size", type=int, default=None, help="KV block size (default: vLLM's, 128 on CPU)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    rows = []
    for label, cfg in CONFIGS.items():
        got = engine(label, cfg, "--model", args.model, "--capacity-only", "--max-model-len",
                     str(args.max_model_len), "--kv-gib", str(args.kv_gib), "--max-num-batched-tokens",
                     str(args.max_num_batched_tokens),
                     *(["--block-size", str(args.block_size)] if args.block_size else []))  # fmt: skip
        rows.append({"plan": label, "config": cfg, **got})
        print(f"{label}: {rows[-1]['kv_tokens']} KV tokens", flush=True)
    dense = rows[0]["kv_tokens"]
    print(f"\n| plan | KV tokens | max concurrency at {args.max_model_len} | vs dense |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['plan']} | {r['kv_tokens']:,} | {r['max_concurrency']:.2f}x | {r['kv_tokens'] / dense:.2f}x |"
        )
    save(args, rows)


if __name__ == "__main__":
    main()
