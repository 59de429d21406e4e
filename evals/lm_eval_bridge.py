"""lm-eval bridge: `--model llmpatch` is HFLM with a patch applied, and `llmpatch lm-eval` runs lm-eval's CLI.

    llmpatch lm-eval --model llmpatch \
        --model_args pretrained=smollm2-135m,method=sink_window,window=256 \
        --tasks llmpatch_passkey --apply_chat_template

model_args: pretrained (alias, HF id or path), method (several joined with '+'), plan, backend; any other key
that HFLM does not take is a method parameter override. The local tasks in evals/tasks are added to
--include_path automatically; lm-eval runs offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set).
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import llmpatch
from llmpatch.models import ALIASES, fetch

TASKS_DIR = Path(__file__).parent / "tasks"
_HF_PARAMS = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def resolve_pretrained(name: str) -> str:
    """An alias becomes its cached safetensors folder (fetched once); anything else is passed through."""
    return str(fetch(name, progress=lambda *a: None)) if name in ALIASES else name


@register_model("llmpatch")
class LlmpatchLM(HFLM):
    def __init__(self, pretrained: str, method: str = "dense", plan: str | None = None, backend: str | None = None,
                 **kwargs):  # fmt: skip
        hf_kwargs = {k: v for k, v in kwargs.items() if k in _HF_PARAMS}
        overrides = {k: v for k, v in kwargs.items() if k not in _HF_PARAMS}
        if "device" not in hf_kwargs:
            import torch

            hf_kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=resolve_pretrained(pretrained), **hf_kwargs)
        self.patch = llmpatch.apply(self.model, method.split("+"), plan, backend=backend,
                                    **overrides)  # fmt: skip


def main(args: list[str]) -> int:
    """Run lm-eval's own CLI with the llmpatch model registered and the local tasks included."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = list(args)
    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args]
    cli_evaluate()
    return 0
