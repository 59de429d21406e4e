"""llmpatch attention backends (installed as `llmpatch.kernels`).

Importing this package needs neither CUDA nor triton.
"""

from .dispatch import BACKENDS, attention
from .reference import HEAD_KEEP, HEAD_UNIFORM, HEAD_ZERO

__all__ = ["BACKENDS", "attention", "HEAD_KEEP", "HEAD_UNIFORM", "HEAD_ZERO"]
