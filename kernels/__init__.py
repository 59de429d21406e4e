"""llmpatch attention backends (installed as `llmpatch.kernels`).

Importing this package needs neither CUDA nor triton. Imported by its folder's name, `kernels` (a checkout's root
on sys.path, as `python -m pytest` puts it), it hands that name to the installed `kernels` package, which
transformers >= 5.25 depends on and imports, or reports it missing.
"""

import sys


def _hand_over_the_name() -> None:
    import importlib.util
    from importlib.machinery import PathFinder
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != root])
    if spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ is llmpatch.kernels)",
                                  name="kernels")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_the_name()
else:
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
