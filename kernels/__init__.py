"""llmpatch attention backends (installed as `llmpatch.kernels`).

Importing this package needs neither CUDA nor triton.
"""

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
