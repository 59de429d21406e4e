"""Retrieval-head masking: the causal test of Wu et al. (2024), "Retrieval Head Mechanistically Explains
Long-Context Factuality" (docs/METHODS.md §5).

Which heads: at most one of
- none: the retrieval heads, those scoring above `threshold` (0.1, the paper's cut-off) in the ranking;
- `top_k`: the K highest-scoring heads of the plan's `scores` (from `llmpatch calibrate retrieval`);
- `heads`: an explicit list of [layer, head] pairs;
- `random`: K heads drawn (with `seed`) from the non-retrieval heads: neither among the top K nor above
  `threshold` (0.1, the paper's retrieval-head cut-off).
Ranking: `score="copy"` (default, the paper's copy-paste score) or `"mass"` (our broader score: the mean attention
mass a head puts on the needle while the answer is decoded; both come from `llmpatch calibrate retrieval`).
Modes: `uniform` (default, the paper's: the head attends uniformly to every key it may see) or `zero` (the head
outputs 0). As in the paper the mask applies on decode steps; `prefill=True` extends it to the prompt.
"""

from __future__ import annotations

import dataclasses
import random as _random

from ..errors import ParameterError
from .base import check_head_pairs, param
from .shared import ScoredHeads, ranked_heads


@dataclasses.dataclass
class RetrievalMask(ScoredHeads):
    name = "retrieval_mask"
    summary = "mask retrieval heads (top-k by score, listed, or random non-retrieval) on decode steps"

    top_k: int | None = param(None, "an int >= 1 (mask the K best-scoring heads)", lambda v: v >= 1)
    heads: list | None = param(None, "a list of [layer, head] pairs")
    random: int | None = param(None, "an int >= 1 (mask K random non-retrieval heads)", lambda v: v >= 1)
    seed: int = param(0, "an int")
    threshold: float = param(0.1, "a number > 0 (retrieval-head score cut-off)", lambda v: v > 0)
    mode: str = param("uniform", "'uniform' or 'zero'", lambda v: v in ("uniform", "zero"))
    prefill: bool = param(False, "true or false (also mask the prompt's attention)")

    def validate(self, spec):
        self.selected(spec)

    def selected(self, spec) -> list[tuple[int, int]]:
        """The (layer, head) pairs this configuration masks, checked against the model."""
        chosen = [k for k in ("top_k", "heads", "random") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ParameterError(
                f"{self.name}: give at most one of 'top_k', 'heads' or 'random', got {chosen}"
            )
        total = spec.num_layers * spec.num_heads
        if self.heads is not None:
            return check_head_pairs(self.name, self.heads, spec)
        table = self.ranking(spec)
        ranked = ranked_heads(table)
        if not chosen:
            above = sorted(p for p in ranked if table[p[0]][p[1]] > self.threshold)
            if not above:
                raise ParameterError(f"{self.name}: no head scores above 'threshold' {self.threshold}; lower it "
                                     "or give top_k, heads or random")  # fmt: skip
            return above
        k = self.top_k if self.top_k is not None else self.random
        key = "top_k" if self.top_k is not None else "random"
        if self.top_k is not None:
            if k > total:
                raise ParameterError(
                    f"{self.name}: parameter 'top_k' must be in 1..{total} (all heads), got {k}"
                )
            return sorted(ranked[:k])
        top = set(ranked[:k])
        pool = [p for p in ranked if p not in top and self.scores[p[0]][p[1]] <= self.threshold]
        if k > len(pool):
            raise ParameterError(
                f"{self.name}: parameter '{key}' must be in 1..{len(pool)} (the non-retrieval heads outside the "
                f"top {k}), got {k}"
            )
        return sorted(_random.Random(self.seed).sample(sorted(pool), k))

    def configure(self, spec, layers):
        for li, hi in self.selected(spec):
            layers[li].mask_head(self.name, hi, self.mode, self.prefill)
