"""Retrieval-head KV compression, as in DuoAttention / RazorAttention and the retrieval-head paper's discussion
(Wu et al., 2024; docs/METHODS.md §5): retrieval heads keep their full KV cache, the other heads keep sink + recent.

Heads: the `top_k` best-scoring query heads (by `score`: "copy", the paper's copy-paste score, "mass", the
attention mass on the needle while answering, or "effect", the measured answer-loss effect) of a retrieval plan (`llmpatch calibrate retrieval`), or those above
`threshold` when `top_k` is not given, or an explicit `heads` list. GQA: query heads share a KV head, so a KV head
stays full when any of its query heads is kept (its whole group is then full); `kv_report()` counts them.
`keep` > 0 also pins, on each compressed KV head, the prompt chunks the question attends to most (chunkkv's
selection, `ChunkPins`; full heads get none).
Defaults: sink 64, recent 256 (DuoAttention's deployment), keep 0. Compressed heads use sink + window(recent) attention on
the prompt too, so prefill and decode see the same pattern. Layers with the model's own sliding window are left
as they are (their cache is already bounded) unless `sliding` is true: then their retrieval heads keep the
model's window and the others sink + recent (Gemma-3 at short lengths, where those layers hold most of the KV). The saving is real: the per-KV-head ring cache (`llmpatch.caches.ring`, shared with moa) stores
only what the pattern reads; `kv_report()` measures it against the dense cache. Does not compose with other
methods that set attention decisions (act, retrieval_mask) yet.
"""

from __future__ import annotations

import dataclasses

from ..decisions import Kind
from .base import compressed_layers, param
from .chunkkv import ChunkPins
from .shared import ScoredHeads, kept_heads, sliding_param, tail_param


@dataclasses.dataclass
class RetrievalKV(ScoredHeads, ChunkPins):
    name = "retrieval_kv"
    summary = (
        "retrieval heads keep the full KV cache, the other heads keep sink + recent (real memory saving)"
    )

    top_k: int | None = param(
        None, "an int >= 0 (keep the K best-scoring query heads in full)", lambda v: v >= 0
    )
    heads: list | None = param(None, "a list of [layer, head] pairs to keep in full")
    threshold: float = param(0.1, "a number > 0 (keep heads scoring above it when top_k is not given)",
                             lambda v: v > 0)  # fmt: skip
    sink: int = param(64, "an int >= 0", lambda v: v >= 0)
    recent: int = param(256, "an int >= 1", lambda v: v >= 1)
    sliding: bool = sliding_param()
    tail: int = tail_param()

    def validate(self, spec):
        self.full_kv_heads(spec)

    def kept(self, spec) -> list[tuple[int, int]]:
        return kept_heads(self, spec)

    def full_kv_heads(self, spec) -> dict[int, list[int]]:
        """{layer: KV heads kept in full} for the layers that are compressed (no own sliding window, unless
        `sliding`)."""
        g = spec.num_heads // spec.num_kv_heads
        full = {i: set() for i in compressed_layers(spec, self.sliding)}
        for li, hi in self.kept(spec):
            if li in full:
                full[li].add(hi // g)
        return {i: sorted(s) for i, s in full.items()}

    def configure(self, spec, layers):
        g = spec.num_heads // spec.num_kv_heads
        compressed = self.full_kv_heads(spec)  # {layer: its full KV heads}, for every layer this method cuts
        for li, full in compressed.items():
            layer = layers[li]
            for kind in (Kind.CALIBRATION, Kind.HEAD_MASK):  # the ring cache path does not apply them yet
                layer.claim(kind, self.name)
            sink = [0 if h // g in full else self.sink for h in range(spec.num_heads)]
            window = [-1 if h // g in full else self.recent for h in range(spec.num_heads)]
            layer.set_static(self.name, sink, window, self.tail)
        self.add_pins([layers[li] for li in compressed])

    def install(self, model, spec, layers):
        from ..caches import ring  # imports transformers: not at package import time

        return ring.install(model, spec, layers)

    def kv_report(self, cache) -> dict:
        """Bytes this cache holds against the model's own dense cache for the same tokens."""
        from .. import caches

        return caches.kv_report(cache)
