"""The vLLM plugin's tests need vLLM (`pip install "llmpatch[vllm]"`, in its own venv: tests/vllm_plugin/run.sh); the
default suite, without vLLM, does not collect them."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
