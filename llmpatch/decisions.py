"""Per-layer, per-query-head attention decisions: the one place a Patch keeps its state on a model.

Each attention module of a patched model carries one `LayerDecision` (attribute `llmpatch_layer`). Methods fill it
in; the attention function (`attention.py`) renders it into one backend call. The decision kinds (`Kind`), each
set by at most one method per layer:
- PATTERN: static per-head sink + window (`sink[H]`, `window[H]`, window -1 = unlimited; dense by default), and
  its dense `tail`: the last `tail` queries of a prompt see every visible key (the instruction reads the whole
  prompt before a cache is cut to the pattern);
- ATTENTION: the method's own attention (`attend`, LongHeads and DHSA), replacing the backend call;
- HEAD_MASK: `head_mask` (a `HeadMask`), uniform or zero rows on decode steps (and prefill if asked);
- CALIBRATION: `calibration` (ACT's `methods.act.Calibration`), which also keeps its prefill sink set.
Observers that are not decisions sit in `taps` (sparsity tracker, calibration observer, MoA profiler). A cache
that keeps tokens out of order hands the next call its key positions through `key_positions`.
Methods set decisions in the model's global heads; on a tensor-parallel model `apply` then cuts every layer to
its rank's heads (`localize`), and spans set later (per prompt) go through `set_spans`, which cuts them the same.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import ParameterError, PatchStateError
from .kernels.rules import HEAD_KEEP, HEAD_MODES


class Kind(enum.Enum):
    PATTERN = "static pattern"
    ATTENTION = "attention"
    HEAD_MASK = "head mask"
    CALIBRATION = "calibration"


@dataclass
class HeadMask:
    modes: torch.Tensor  # [H] int8: HEAD_KEEP / HEAD_UNIFORM / HEAD_ZERO
    prefill: bool = False  # also on the prompt's attention

    def kernel_args(self, prefill: bool) -> dict:
        return {} if prefill and not self.prefill else {"head_mask": self.modes}


@dataclass
class KeyPositions:
    """What a cache layer that keeps tokens out of order (`caches.RingLayer`) publishes for the call it feeds."""

    q_pos: torch.Tensor  # [B, Nq] token positions of the queries
    k_pos: torch.Tensor  # [B, Hkv, Nk] token position of each key slot for each KV head, -1 = not its token
    length: int  # the keys a full cache would hold (for counting sparsity as if dense)
    spans: list | None = None  # [(lo, hi)] per KV head: where its slots lie (a hint for the fast paths)


@dataclass
class Taps:
    tracker: object | None = None  # kernels.density.SparsityTracker
    observer: Callable | None = None  # f(decision, q, k, mask, scale, softcap) on decode steps (retrieval)
    profiler: Callable | None = None  # f(decision, q, k, v, scale, softcap) -> out (MoA gradient profiling)


@dataclass
class LayerDecision:
    layer: int
    num_heads: int
    sliding_window: int | None = None  # the layer's own window (from the model), always applied
    backend: str | None = None
    sink: torch.Tensor = None  # [H] int64
    window: torch.Tensor = None  # [H] int64, -1 = unlimited
    tail: int = 0  # the last `tail` queries of a prompt attend densely (part of the PATTERN decision)
    pins: int = 0  # slots per compressed KV head kept for tokens a selection picks after the prompt
    select: Callable | None = (
        None  # f(decision, q, k, v, mask, scale, softcap) on a prompt: picks what to pin
    )
    pin_to: Callable | None = None  # weakref to the cache layer that takes the pins (set by that layer)
    attend: Callable | None = (
        None  # f(decision, q, k, v, mask, scale, softcap) -> (out, computed count or None)
    )
    head_mask: HeadMask | None = None
    calibration: object | None = None  # methods.act.Calibration
    owners: dict = field(default_factory=dict)  # Kind -> method name, to refuse conflicting methods
    taps: Taps = field(default_factory=Taps)
    key_positions: KeyPositions | None = None  # set by a cache layer's update(), taken by the next call
    shard: object | None = None  # sharding.Shard of a tensor-parallel rank (num_heads is then local)

    def __post_init__(self):
        if self.sink is None:
            self.sink = torch.zeros(self.num_heads, dtype=torch.long)
        if self.window is None:
            self.window = torch.full((self.num_heads,), -1, dtype=torch.long)
        self.narrowest_window()

    def claim(self, kind: Kind, method: str) -> None:
        """Record that `method` sets decision `kind` here; two methods may not set the same kind."""
        other = self.owners.get(kind)
        if other is not None and other != method:
            raise ParameterError(
                f"method: {method!r} and {other!r} both set the {kind.value} decision of layer {self.layer}; "
                "compose methods that set different kinds (e.g. a sparse pattern plus 'act')"
            )
        self.owners[kind] = method

    def set_static(self, method: str, sink, window, tail: int = 0) -> None:
        self.claim(Kind.PATTERN, method)
        self.sink = torch.as_tensor(sink, dtype=torch.long).expand(self.num_heads).clone()
        self.window = torch.as_tensor(window, dtype=torch.long).expand(self.num_heads).clone()
        self.tail = int(tail)
        self.narrowest_window()
        if self.tail:  # ACT's column sums need one call over the whole prompt
            self.claim(Kind.CALIBRATION, method)

    def set_spans(self, sink: torch.Tensor, window: torch.Tensor) -> None:
        """Replace the pattern's spans ([H] over the model's heads), e.g. per prompt for elastic spans."""
        dev = self.sink.device
        self.sink, self.window = self.local(sink).to(dev), self.local(window).to(dev)
        self.narrowest_window()

    def _map_heads(self, fn) -> None:
        """Replace every per-head tensor t of the decision by fn(t)."""
        self.sink, self.window = fn(self.sink), fn(self.window)
        if self.head_mask is not None:
            self.head_mask.modes = fn(self.head_mask.modes)
        if self.calibration is not None:
            self.calibration.heads = fn(self.calibration.heads)
        self.narrowest_window()

    def to(self, device) -> None:
        """Keep the decision tensors on the layer's execution device (set once by `apply`)."""
        self._map_heads(lambda t: t.to(device))

    def local(self, per_head: torch.Tensor) -> torch.Tensor:
        """A tensor over the model's heads (first dim), cut to this rank's heads."""
        if self.shard is None:
            return per_head
        return per_head[self.shard.heads(self.num_heads * self.shard.size)]

    def localize(self, shard) -> None:
        """Keep only the heads of rank `shard` (None: no-op): called once, after every method configured the layer
        in the model's global heads."""
        if shard is None:
            return
        cut = shard.heads(self.num_heads)
        self.num_heads, self.shard = cut.stop - cut.start, shard
        self._map_heads(lambda t: t[cut].clone())

    def mask_head(self, method: str, head: int, mode: str, prefill: bool) -> None:
        self.claim(Kind.HEAD_MASK, method)
        if self.head_mask is None:
            self.head_mask = HeadMask(torch.full((self.num_heads,), HEAD_KEEP, dtype=torch.int8), prefill)
        self.head_mask.modes[head] = HEAD_MODES[mode]
        self.head_mask.prefill = prefill

    def narrowest_window(self) -> int | None:
        """The smallest window among the heads that have one (None: no head narrows its keys): a python-level fact
        recomputed only when `window` is replaced or edited in place (tensor versions), so a decode step pays no
        tensor reduction for it in every layer."""
        if torch.compiler.is_compiling():  # traced: the value every eager change of the spans computed
            return self._narrowest
        key = (id(self.window), self.window._version)
        if getattr(self, "_pattern_key", None) != key:
            limited = self.window[self.window >= 0]
            self._pattern_key, self._narrowest = key, int(limited.min()) if limited.numel() else None
        return self._narrowest

    def take_key_positions(self, key: torch.Tensor) -> KeyPositions | None:
        """The positions a cache published for this call (once), checked against the key it returned."""
        kp, self.key_positions = self.key_positions, None
        if kp is not None and kp.k_pos.shape[-1] != key.shape[2]:
            raise PatchStateError(
                f"cache: layer {self.layer} published positions for {kp.k_pos.shape[-1]} key slots but attention "
                f"got {key.shape[2]} keys; the cache was updated outside this model's forward"
            )
        return kp

    def describe(self) -> str:
        parts = []
        if bool((self.window >= 0).any()):
            pairs = sorted({(int(s), int(w)) for s, w in zip(self.sink, self.window, strict=True)})
            parts.append("sink+window " + ", ".join(f"{s}+{w if w >= 0 else 'all'}" for s, w in pairs))
            if self.tail:
                parts.append(f"dense prefill tail {self.tail}")
        if self.attend is not None:
            parts.append(f"own attention ({getattr(self.attend, 'label', type(self.attend).__name__)})")
        if self.head_mask is not None:
            masked = [i for i, m in enumerate(self.head_mask.modes.tolist()) if m != HEAD_KEEP]
            if masked:
                parts.append(f"head mask {masked}{' (+prefill)' if self.head_mask.prefill else ''}")
        if self.calibration is not None and self.calibration.describe():
            parts.append(self.calibration.describe())
        return "; ".join(parts) or "dense"
