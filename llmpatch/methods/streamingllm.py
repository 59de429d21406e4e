"""StreamingLLM: the same attention sink + sliding window on every head, with a bounded KV cache (Xiao et al.,
2023); MoA's uniform baseline (docs/METHODS.md §3).

Give `density` (MoA's measure: span / N, so the span is density * N tokens, sink included: the official baseline
is alpha 0, beta 0.5) or a fixed `window`. Defaults: sink 64, ring cache on (`llmpatch.caches.ring`: each KV head
keeps sink + window slots, so memory stops growing with the context). Where `sink_window` only masks, this
method also drops what the pattern can no longer read. `ring=False` keeps the full cache (masks only).
Same departures as `moa`: the span is fixed when the prompt is read; in a batch N is the padded length.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ParameterError
from .base import param
from .shared import ElasticSinkWindow, spans_at, tail_param


@dataclasses.dataclass
class StreamingLLM(ElasticSinkWindow):
    name = "streamingllm"
    summary = "uniform attention sink + sliding window with a bounded (ring-buffer) KV cache"

    density: float | None = param(None, "a number in (0, 1] (span = density x input length)",
                                  lambda v: 0 < v <= 1)  # fmt: skip
    window: int | None = param(None, "an int >= 1 (tokens, the query included)", lambda v: v >= 1)
    sink: int = param(64, "an int >= 0", lambda v: v >= 0)
    length: int | None = param(None, "null (each prompt's length) or an int >= 1", lambda v: v >= 1)
    ring: bool = param(True, "true (ring-buffer decode cache) or false (masks over the full cache)")
    tail: int = tail_param()

    def validate(self, spec):
        if (self.density is None) == (self.window is None):
            raise ParameterError(
                "streamingllm: give exactly one of 'density' (0 < d <= 1) or 'window' (>= 1)"
            )

    def spans(self, spec):
        def at(n: int):
            if self.window is not None:  # fixed: never widened to dense, so decode memory stays bounded
                h = spec.num_heads
                pattern = (torch.full((h,), self.sink), torch.full((h,), self.window))
                return {i: pattern for i in range(spec.num_layers)}
            return spans_at([[0.0] * spec.num_heads] * spec.num_layers,
                            [[self.density] * spec.num_heads] * spec.num_layers, n, sink=self.sink,
                            min_span=self.sink + 1)  # fmt: skip

        return at
