#!/usr/bin/env bash
# The accuracy-vs-KV sweep behind benchmarks/RESULTS.md ("Held-out mix"), in resumable parts: llmpatch's points
# at ~67% KV saved, kvpress at 67%, then the other ratios. Rerun it to continue where it stopped.
# Usage: benchmarks/mix_sweep.sh [OUT]   (default benchmarks/mix-smollm2-135m)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/mix-smollm2-135m}"
recipe=recipes/smollm2-135m-mix.yaml
llmpatch bench accuracy "$recipe" --out "$out" \
  --only dense,streamingllm-67,streamingllm-tail-67,snapkv-67,moa-67,moa-tail-67,retrieval_kv-67,retrieval_kv-tail-67
benchmarks/peers/run_kvpress.sh "$out" --ratios 0.67
llmpatch bench accuracy "$recipe" --out "$out"
benchmarks/peers/run_kvpress.sh "$out" --ratios 0.5,0.75
llmpatch bench accuracy "$recipe" --out "$out" --report-only
