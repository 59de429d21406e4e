"""llmpatch attention backends (installed as `llmpatch.kernels`).

Importing this package needs neither CUDA nor triton. Imported by its folder's name, `kernels` (a checkout's root
on sys.path, as `python -m pytest` puts it), it hands that name to the installed `kernels` package if there is
one (transformers >= 5.25 depends on it and imports it); otherwise it loads as itself, which transformers' probe
reads as "not installed" (no version).
"""

import sys


def _hand_over_the_name() -> bool:
    import importlib.util
    from importlib.machinery import PathFinder
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != root])
    if spec is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)
    return True


if __name__ != "kernels" or not _hand_over_the_name():
    from .api import block_sparse_attention, sink_window_attention
    from .dispatch import BACKENDS, attention
    from .rules import HEAD_KEEP, HEAD_UNIFORM, HEAD_ZERO

__all__ = [
    "BACKENDS",
    "attention",
    "block_sparse_attention",
    "sink_window_attention",
    "HEAD_KEEP",
    "HEAD_UNIFORM",
    "HEAD_ZERO",
]
