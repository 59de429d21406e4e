"""Per-layer, per-query-head attention decisions: the one place a Patch keeps its state on a model.

Each attention module of a patched model carries one `LayerDecision` (attribute `llmpatch_layer`). Methods
fill it in; the attention function reads it and calls one backend entry point. Kinds, per query head:
- dense: sink 0, window -1;
- static sink + window: analytic, no index tensor;
- dynamic block list: `selector(q, k, ...)` returns compact (kv_count, kv_index) at run time;
- own attention: `attend(decision, q, k, v, mask, scale, softcap)` replaces the backend call (LongHeads);
- head mask: HEAD_UNIFORM or HEAD_ZERO, on decode steps (and prefill if `mask_prefill`);
- column calibration (ACT): `calib[h]`, with beta and threshold; sinks found at prefill are reused on decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import ParameterError
from .kernels.reference import HEAD_KEEP, HEAD_UNIFORM, HEAD_ZERO

HEAD_MASK_MODES = {"uniform": HEAD_UNIFORM, "zero": HEAD_ZERO}


@dataclass
class LayerDecision:
    layer: int
    num_heads: int
    sliding_window: int | None = None  # the layer's own window (from the model), always applied
    sink: torch.Tensor = None  # [H] int64
    window: torch.Tensor = None  # [H] int64, -1 = unlimited
    selector: Callable | None = None  # dynamic block list: f(q, k, decision) -> (kv_count, kv_index)
    # a method's own attention: f(decision, q, k, v, mask, scale, softcap) -> out [B, H, Nq, D]
    attend: Callable | None = None
    block_size: int = 64
    head_mask: torch.Tensor = None  # [H] int8: HEAD_KEEP / HEAD_UNIFORM / HEAD_ZERO
    mask_prefill: bool = False
    calib: torch.Tensor = None  # [H] bool
    calib_beta: float = 0.4
    calib_threshold: float = 0.1
    calib_decode: bool = True
    backend: str | None = None
    owners: dict = field(default_factory=dict)  # decision kind -> method name, to refuse conflicting methods
    state: dict = field(default_factory=dict)  # run-time state (e.g. ACT sinks found at prefill)

    def __post_init__(self):
        h = self.num_heads
        if self.sink is None:
            self.sink = torch.zeros(h, dtype=torch.long)
        if self.window is None:
            self.window = torch.full((h,), -1, dtype=torch.long)
        if self.head_mask is None:
            self.head_mask = torch.full((h,), HEAD_KEEP, dtype=torch.int8)
        if self.calib is None:
            self.calib = torch.zeros(h, dtype=torch.bool)

    def claim(self, kind: str, method: str) -> None:
        """Record that `method` sets decision `kind` here; two methods may not set the same kind."""
        other = self.owners.get(kind)
        if other is not None and other != method:
            raise ParameterError(
                f"method: {method!r} and {other!r} both set the {kind} decision of layer {self.layer}; "
                "compose methods that set different kinds (e.g. a sparse pattern plus 'act')"
            )
        self.owners[kind] = method

    def set_static(self, method: str, sink, window) -> None:
        self.claim("static pattern", method)
        self.sink = torch.as_tensor(sink, dtype=torch.long).expand(self.num_heads).clone()
        self.window = torch.as_tensor(window, dtype=torch.long).expand(self.num_heads).clone()

    @property
    def is_dense(self) -> bool:
        return (
            bool((self.window < 0).all())
            and self.selector is None
            and self.attend is None
            and not bool((self.head_mask != HEAD_KEEP).any())
            and not bool(self.calib.any())
        )

    def describe(self) -> str:
        parts = []
        if bool((self.window >= 0).any()):
            pairs = sorted({(int(s), int(w)) for s, w in zip(self.sink, self.window, strict=True)})
            parts.append("sink+window " + ", ".join(f"{s}+{w if w >= 0 else 'all'}" for s, w in pairs))
        if self.selector is not None:
            parts.append(
                f"dynamic blocks ({getattr(self.selector, '__name__', 'selector')}, b={self.block_size})"
            )
        if self.attend is not None:
            fn = getattr(self.attend, "func", self.attend)
            parts.append(f"own attention ({fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__})")
        masked = [i for i, m in enumerate(self.head_mask.tolist()) if m != HEAD_KEEP]
        if masked:
            parts.append(f"head mask {masked}{' (+prefill)' if self.mask_prefill else ''}")
        calibrated = [i for i, c in enumerate(self.calib.tolist()) if c]
        if calibrated:
            parts.append(f"ACT heads {calibrated} beta={self.calib_beta} tau={self.calib_threshold}")
        return "; ".join(parts) or "dense"
