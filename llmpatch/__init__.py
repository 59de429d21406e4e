"""llmpatch: inference-time attention patching for HuggingFace causal LMs.

    patch = llmpatch.apply(model, "sink_window", window=256)
    ...
    patch.remove()

Importing llmpatch needs neither CUDA nor triton.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .adapters import ModelSpec, detect, supported_families  # noqa: E402
from .errors import (  # noqa: E402
    LlmpatchError,
    ModelFetchError,
    ParameterError,
    PatchStateError,
    PlanError,
    UnsupportedModelError,
)
from .patch import Patch, apply, check, current_patch, patched  # noqa: E402
from .plan import Plan  # noqa: E402


def methods() -> dict[str, str]:
    """The available methods: name -> one-line summary."""
    from .methods import REGISTRY

    return {name: cls.summary for name, cls in REGISTRY.items()}


def load_model(name: str, **kwargs):
    """(model, tokenizer) for an alias (`smollm2-135m`, `gemma3-270m`), a HF id or a local path."""
    from .models import load_model as _load

    return _load(name, **kwargs)


__all__ = [
    "__version__",
    "apply",
    "check",
    "patched",
    "Patch",
    "Plan",
    "ModelSpec",
    "detect",
    "methods",
    "load_model",
    "current_patch",
    "supported_families",
    "LlmpatchError",
    "ModelFetchError",
    "ParameterError",
    "PatchStateError",
    "PlanError",
    "UnsupportedModelError",
]
