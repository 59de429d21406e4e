#!/usr/bin/env bash
# kvpress 0.5.5 in its own venv (it pins transformers < 5.3), run on the samples llmpatch wrote.
# Usage: benchmarks/peers/run_kvpress.sh OUT_DIR [extra kvpress_mix.py args]
#   OUT_DIR: a `llmpatch bench accuracy` folder (it holds samples.test.jsonl); MODEL_DIR defaults to SmolLM2's
#   converted folder in the llmpatch cache (run any llmpatch command on the alias first).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${KVPRESS_VENV:-$here/.venv-kvpress}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0"   # CPU build first: a bare torch pulls a CUDA build
  "$venv/bin/pip" install -q "kvpress==0.5.5"
fi
model_dir="${MODEL_DIR:-${LLMPATCH_CACHE:-$HOME/.cache/llmpatch}/models/smollm2-135m/hf}"
exec "$venv/bin/python" "$here/kvpress_mix.py" --model-dir "$model_dir" --out "$1" "${@:2}"
