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


def split_args(kwargs: dict) -> tuple[dict, dict]:
    """model_args -> (HFLM's keywords, method parameter overrides)."""
    return (
        {k: v for k, v in kwargs.items() if k in _HF_PARAMS},
        {k: v for k, v in kwargs.items() if k not in _HF_PARAMS},
    )


def check_model_args(args: list[str]) -> None:
    """`--model llmpatch --model_args ...`: the method, plan and parameters checked before lm-eval starts."""
    from lm_eval.utils import simple_parse_args_string

    if "--model" not in args or args[args.index("--model") + 1 :][:1] != ["llmpatch"]:
        return
    if "--model_args" not in args or args.index("--model_args") + 1 >= len(args):
        return
    parsed = simple_parse_args_string(args[args.index("--model_args") + 1])
    _, overrides = split_args(
        {k: v for k, v in parsed.items() if k not in ("pretrained", "method", "plan", "backend")}
    )
    llmpatch.check(str(parsed.get("method", "dense")).split("+"), parsed.get("plan"),
                   backend=parsed.get("backend"), **overrides)  # fmt: skip


def resolve_pretrained(name: str) -> str:
    """An alias becomes its cached safetensors folder (fetched once); anything else is passed through."""
    return str(fetch(name, progress=lambda *a: None)) if name in ALIASES else name


@register_model("llmpatch")
class LlmpatchLM(HFLM):
    def __init__(self, pretrained: str, method: str = "dense", plan: str | None = None, backend: str | None = None,
                 **kwargs):  # fmt: skip
        hf_kwargs, overrides = split_args(kwargs)
        llmpatch.check(method.split("+"), plan, backend=backend, **overrides)  # before the model loads
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
    check_model_args(args)
    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args]
    cli_evaluate()
    return 0
