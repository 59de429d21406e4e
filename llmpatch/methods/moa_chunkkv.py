"""MoA + ChunkKV: a static MoA plan (Fu et al., 2024) with query-aware chunk pins (Liu et al., 2025) on the heads
the plan compresses; the "query-aware eviction on top of a static plan" of docs/METHODS.md §8.

MoA alone keeps each head's sink + elastic window, chosen offline: a needle outside every compressed head's
window is seen only by the plan's few full heads. Here each compressed KV head also keeps `keep` prompt tokens,
whole chunks of `chunk` consecutive positions, chosen by the prompt's last `observe` queries (chunkkv's
selection, read from the same code). Full heads keep everything and get no pins. Everything else is moa's: the
plan (a moa plan file serves, `plan_entry`), sink, min_span, the ring cache and the dense `tail`.

Defaults: moa's, with keep 64, observe 64, chunk 16, tail 64 (the question's queries attend densely, so the
selection reads their true attention). At equal KV kept, pair a sparser plan with the pins (recipes do).
Departures: none from either part beyond theirs; the ring cache is required (pins live in its slots).
"""

from __future__ import annotations

import dataclasses

from ..errors import ParameterError
from .base import param
from .chunkkv import ChunkKV
from .moa import MoA
from .snapkv import SnapKV


@dataclasses.dataclass
class MoAChunkKV(MoA):
    name = "moa_chunkkv"
    summary = "a MoA plan plus the prompt chunks the question attends to most, pinned on the compressed heads"
    plan_entry = "moa"

    keep: int = param(64, "an int >= 0 (prompt tokens pinned per compressed KV head)", lambda v: v >= 0)
    observe: int = param(64, "an int >= 1 (the last prompt tokens that score the rest)", lambda v: v >= 1)
    chunk: int = param(16, "an int >= 1 (consecutive prompt positions pinned together)", lambda v: v >= 1)
    tail: int = param(64, "an int >= 0 (last prompt tokens that attend densely)", lambda v: v >= 0)

    smooth = ChunkKV.smooth  # chunkkv's scoring and snapkv's selection: one copy of each rule
    select = SnapKV.select

    def validate(self, spec):
        super().validate(spec)
        if not self.ring:
            raise ParameterError(
                "moa_chunkkv: parameter 'ring' must be true (the pins live in the ring cache)"
            )

    def configure(self, spec, layers):
        super().configure(spec, layers)
        for layer in layers:
            layer.pins, layer.select = self.keep, self.select
