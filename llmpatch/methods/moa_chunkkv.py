"""MoA + ChunkKV: a static MoA plan (Fu et al., 2024) with query-aware chunk pins (Liu et al., 2025) on the heads
the plan compresses; the "query-aware eviction on top of a static plan" of docs/METHODS.md §8.

MoA alone keeps each head's sink + elastic window, chosen offline: a needle outside every compressed head's
window is seen only by the plan's few full heads. Here each compressed KV head also keeps `keep` prompt tokens,
whole chunks of `chunk` consecutive positions, chosen by the prompt's last `observe` queries (chunkkv's
selection, read from the same code). Full heads keep everything and get no pins. Everything else is moa's: the
plan (a moa plan file serves, `plan_entry`), sink, min_span, the ring cache and the dense `tail`.

Defaults: moa's, with keep 64, observe 64, chunk 16, tail 64 (the question's queries attend densely, so the
selection reads their true attention). At equal KV kept, pair a sparser plan with the pins.
Departures: none from either part beyond theirs; the ring cache is required (pins live in its slots).
"""

from __future__ import annotations

import dataclasses

from ..errors import ParameterError
from .base import param
from .chunkkv import ChunkPins
from .moa import MoA


@dataclasses.dataclass
class MoAChunkKV(MoA, ChunkPins):
    name = "moa_chunkkv"
    summary = "a MoA plan plus the prompt chunks the question attends to most, pinned on the compressed heads"
    plan_entry = "moa"

    keep: int = param(64, "an int >= 0 (prompt tokens pinned per compressed KV head, whole chunks)",
                      lambda v: v >= 0)  # fmt: skip
    tail: int = param(64, "an int >= 0 (last prompt tokens that attend densely)", lambda v: v >= 0)

    def validate(self, spec):
        super().validate(spec)
        if not self.ring:
            raise ParameterError(
                "moa_chunkkv: parameter 'ring' must be true (the pins live in the ring cache)"
            )

    def configure(self, spec, layers):
        super().configure(spec, layers)
        self.add_pins(layers)
