"""KVzip with retrieval heads kept whole: KVzip's query-agnostic, reconstruction-scored eviction (Kim et al., 2025)
on every KV head except the retrieval heads, which keep the whole prompt as in DuoAttention (Xiao et al., 2024,
"DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads") and RazorAttention.

Why: reconstruction scores rank what the model needs to *repeat* the context; a retrieval head's job is to find
one span the question names, which a repeat pass may not single out. Keeping those heads whole costs
(their KV heads / all KV heads) of the budget; the model-wide `ratio` still holds, so the other heads give
up the difference, ranked by their reconstruction scores as in `kvzip`.

Heads: as in `retrieval_kv`: the `top_k` best query heads of a retrieval plan's ranking (`score`: copy, mass or
effect), those above `threshold`, or an explicit `heads` list; a KV head is whole when any of its query heads is
chosen. Layers with the model's own sliding window keep their own cache (as in kvzip).
Defaults: kvzip's (ratio 0.67, sink 4, window 64, chunk 2048) and retrieval_kv's head choice (threshold 0.1 on
the plan's `score`). Departures: kvzip's, plus the whole heads (not in either paper's method).
"""

from __future__ import annotations

import dataclasses

import torch

from .base import param
from .kvzip import KVzip
from .shared import ScoredHeads, kept_heads


@dataclasses.dataclass
class KVzipHeads(KVzip, ScoredHeads):
    name = "kvzip_heads"
    summary = "kvzip eviction on every KV head except the retrieval heads, which keep the whole prompt"

    top_k: int | None = param(
        None, "an int >= 0 (keep the K best-scoring query heads whole)", lambda v: v >= 0
    )
    heads: list | None = param(None, "a list of [layer, head] pairs to keep whole")
    threshold: float = param(0.1, "a number > 0 (keep heads scoring above it when top_k is not given)",
                             lambda v: v > 0)  # fmt: skip

    def validate(self, spec):
        kept_heads(self, spec)

    def configure(self, spec, layers):
        super().configure(spec, layers)
        g = spec.num_heads // spec.num_kv_heads
        self._whole = torch.zeros(len(self._managed), spec.num_kv_heads, dtype=torch.bool)  # all ranks' heads
        for li, hi in kept_heads(self, spec):
            if li in self._managed:
                self._whole[self._managed.index(li), hi // g] = True

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """kvzip's choice with the whole heads' prompt tokens ranked first (they count against the budget)."""
        return super()._choose(scores.masked_fill(self._whole[..., None], float("inf")))
