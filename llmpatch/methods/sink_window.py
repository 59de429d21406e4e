"""Sink + window: every query head keeps the first `sink` tokens and the last `window` tokens.

This is the StreamingLLM pattern (Xiao et al., 2023) and MoA's uniform baseline (docs/METHODS.md §3: sink 64).
Defaults: sink 64, window 1024, all layers. The window counts the query itself: window 1 sees only itself.
It composes with the model's own sliding window (both apply). Prefill and decode use the same analytic pattern;
the KV cache is not shrunk here (`streamingllm` is the same pattern with a bounded ring-buffer cache).
"""

from __future__ import annotations

import dataclasses

from .base import Method, check_layers, param


@dataclasses.dataclass
class SinkWindow(Method):
    name = "sink_window"
    summary = "static attention sink + sliding window on every head (StreamingLLM / MoA baseline)"

    sink: int = param(64, "an int >= 0", lambda v: v >= 0)
    window: int = param(1024, "an int >= 1", lambda v: v >= 1)
    layers: list | None = param(None, "null (all layers) or a list of layer indices")

    def validate(self, spec):
        check_layers(self.name, self.layers, spec)

    def configure(self, spec, layers):
        for i in check_layers(self.name, self.layers, spec):
            layers[i].set_static(self.name, self.sink, self.window)
