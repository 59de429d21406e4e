"""ChunkKV: query-aware KV eviction by whole chunks (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache
Compression for Efficient Long-Context LLM Inference"), on snapkv's observation window and ring cache.

SnapKV keeps single tokens: on the held-out mix the first tokens of a needle's value survive and the rest do not,
so a multi-token answer starts right and then derails (both in llmpatch's snapkv and kvpress's SnapKVPress). ChunkKV
scores fixed chunks of `chunk` consecutive prompt positions by the observation window's attention summed over the
chunk, and keeps the best chunks whole, `keep` tokens in all. Everything else is snapkv's: sink, window, observe,
tail (the question attends densely) and the per-KV-head pins.

Defaults: snapkv's, with chunk 16 (keep 192 = 12 chunks). The paper's chunk is 10.
Departures: chunks are counted over the tokens the ring drops (a chunk cut by the sink or the window scores only
its dropped part, and only that part is pinned); no layer-wise index reuse (each layer selects its own chunks).
"""

from __future__ import annotations

import dataclasses

import torch

from .base import param
from .snapkv import SnapKV


@dataclasses.dataclass
class ChunkPins:
    """Chunk pins as a capability of a ring-cache method (chunkkv itself, moa_chunkkv, retrieval_kv): each
    compressed KV head also keeps `keep` prompt tokens, whole chunks chosen by the last `observe` queries.
    keep=0: none. The selection is snapkv's (one copy of the rule); the scoring is `smooth`, here."""

    keep: int = param(0, "an int >= 0 (prompt tokens pinned per compressed KV head, whole chunks; 0 = none)",
                      lambda v: v >= 0)  # fmt: skip
    observe: int = param(64, "an int >= 1 (the last prompt tokens that score the rest)", lambda v: v >= 1)
    chunk: int = param(16, "an int >= 1 (consecutive prompt positions scored and pinned together)",
                       lambda v: v >= 1)  # fmt: skip

    select = SnapKV.select

    def smooth(self, scores, k_pos, dropped):
        """Each token gets its chunk's summed score (dropped tokens only); the stable top-`keep` sort then takes
        whole chunks, best first."""
        ids = (k_pos.clamp(min=0) // self.chunk)[:, None, :].expand_as(scores)
        sums = torch.zeros(*scores.shape[:2], int(ids.max()) + 1, dtype=scores.dtype, device=scores.device)
        sums.scatter_add_(-1, ids, torch.where(dropped, scores, 0.0))
        return sums.gather(-1, ids)

    def add_pins(self, layers) -> None:
        if self.keep:
            for layer in layers:
                layer.pins, layer.select = self.keep, self.select


@dataclasses.dataclass
class ChunkKV(SnapKV, ChunkPins):  # snapkv's fields and defaults (keep 192, ...), ChunkPins' `chunk`
    name = "chunkkv"
    summary = "sink + window ring cache plus the prompt chunks the question attends to most (whole chunks)"

    smooth = ChunkPins.smooth  # over SnapKV's max-pool
