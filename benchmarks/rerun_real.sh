#!/usr/bin/env bash
# Re-runs the real-weight results an attention-path change could move (issue 14's list), one after another on a
# quiet machine: the 8k prefill benchmarks of sink_window and streamingllm, the MoA and retrieval_kv passkey
# recipes at 4k, and LongHeads at 16k. About 75 minutes on 2 cores. Figures go to benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2
llmpatch bench model --model smollm2-135m --method sink_window --set sink=64 --set window=1024 \
    --length 8192 --repeats 2 --decode-tokens 16 --json benchmarks/bench-model-smollm2-8k.json
llmpatch bench model --model smollm2-135m --method streamingllm --set sink=64 --set window=1024 \
    --length 8192 --repeats 2 --decode-tokens 16 --json benchmarks/bench-model-smollm2-8k-streamingllm.json
llmpatch eval recipes/smollm2-135m-moa.yaml --out benchmarks/recipe-smollm2-135m-moa
llmpatch eval recipes/smollm2-135m-retrieval-kv.yaml --out benchmarks/recipe-smollm2-135m-retrieval-kv
llmpatch eval recipes/smollm2-135m-longheads-16k.yaml --out benchmarks/recipe-smollm2-135m-longheads-16k
