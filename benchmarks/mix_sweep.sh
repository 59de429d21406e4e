#!/usr/bin/env bash
# The accuracy-vs-KV sweep behind benchmarks/RESULTS.md ("Held-out mix"), resumable: every point appends one JSON
# line per sample and a rerun skips the seeds already there, so stop it at any time and rerun it to continue.
# Usage: benchmarks/mix_sweep.sh [OUT] [RECIPE]   (default benchmarks/mix-smollm2-135m, recipes/smollm2-135m-mix.yaml)
# Two processes share 2 cores best with one thread each (OMP_NUM_THREADS=1), e.g. llmpatch's points and
# kvpress's side by side: `benchmarks/mix_sweep.sh ours & benchmarks/mix_sweep.sh kvpress`.
set -euo pipefail
cd "$(dirname "$0")/.."
part="all"
case "${1:-}" in ours|kvpress) part="$1"; shift ;; esac
out="${1:-benchmarks/mix-smollm2-135m}"
recipe="${2:-recipes/smollm2-135m-mix.yaml}"
if [ "$part" != kvpress ]; then
  llmpatch bench accuracy "$recipe" --out "$out"
fi
model="$(sed -n 's/^model: *//p' "$recipe")"   # kvpress reads the same weights, converted by llmpatch
export MODEL_DIR="${MODEL_DIR:-${LLMPATCH_CACHE:-$HOME/.cache/llmpatch}/models/$model/hf}"
if [ "$part" != ours ]; then
  benchmarks/peers/run_kvpress.sh "$out" --ratios 0.67
  benchmarks/peers/run_kvpress.sh "$out" --ratios 0.5,0.75
fi
llmpatch bench accuracy "$recipe" --out "$out" --report-only
