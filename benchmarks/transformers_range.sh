#!/usr/bin/env bash
# The tested transformers range: for each version, a venv with llmpatch and that transformers, then the parity
# suite (dense = unpatched on every family, remove() exact, left padding = batch 1, every method on 2 ranks = one
# process, and the per-method behaviour tests). Writes benchmarks/transformers-range/<version>.txt (pytest's
# summary) and prints a version x pass/fail table; venvs are kept in $TF_RANGE_VENVS (default /tmp/llmpatch-tf).
# Usage: benchmarks/transformers_range.sh [VERSION ...]   (default: 5.0.0 5.2.0 5.24.0 5.25.0; a version that does
# not install is a row saying why)
set -uo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(5.0.0 5.2.0 5.24.0 5.25.0)
root="${TF_RANGE_VENVS:-/tmp/llmpatch-tf}"
suite=(tests/test_parity.py tests/test_methods.py tests/test_caches.py tests/test_cache_contract.py tests/test_tp.py
       tests/test_accelerate.py tests/test_dynamo.py tests/test_moa.py tests/test_dhsa.py tests/test_longheads.py
       tests/test_kvzip.py)
mkdir -p benchmarks/transformers-range
for v in "${versions[@]}"; do
  venv="$root/$v"
  if ! "$venv/bin/python" -c 'import transformers, pytest' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==2.13.0"          # CPU build first
    if ! "$venv/bin/pip" install -q -e ".[dev]" "transformers==$v" > "$venv/install.log" 2>&1; then
      echo "| $v | does not install: $(grep ^ERROR "$venv/install.log" | tail -n 1) |"
      continue
    fi
  fi
  got="$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
  "$venv/bin/python" -m pytest -q -m "not slow and not real" -p no:cacheprovider "${suite[@]}" \
      > "benchmarks/transformers-range/$v.txt" 2>&1
  echo "| $got | $(tail -n 1 "benchmarks/transformers-range/$v.txt" | tr -d '=') |"
done
