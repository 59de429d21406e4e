"""Retrieval-head masking: the causal test of Wu et al. (2024), "Retrieval Head Mechanistically Explains
Long-Context Factuality" (METHODS.md §5).

Which heads: exactly one of
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

from ..decisions import HEAD_MASK_MODES
from ..errors import ParameterError, PlanError
from .base import Method, check_head_pairs, param


def check_scores(method: str, scores, spec) -> None:
    shape_ok = (
        isinstance(scores, list)
        and len(scores) == spec.num_layers
        and all(isinstance(r, list) and len(r) == spec.num_heads for r in scores)
    )
    if not shape_ok:
        raise PlanError(
            f"{method}: parameter 'scores' must be a {spec.num_layers} x {spec.num_heads} (layers x heads) list "
            "for this model; this plan was made for another model or is malformed"
        )


def ranked_heads(scores) -> list[tuple[int, int]]:
    """All (layer, head) pairs, best score first (ties: lower layer, then lower head)."""
    flat = [(-float(s), li, hi) for li, row in enumerate(scores) for hi, s in enumerate(row)]
    return [(li, hi) for _, li, hi in sorted(flat)]


@dataclasses.dataclass
class ScoredHeads(Method):
    """The per-head scores of a retrieval plan (its `retrieval_heads` entry), shared by retrieval_mask and
    retrieval_kv."""

    plan_entry = "retrieval_heads"

    scores: list | None = param(None, "a layers x heads list of retrieval scores (a retrieval plan)")
    mass_scores: list | None = param(
        None, "a layers x heads list of needle attention mass (a retrieval plan)"
    )
    score: str = param("copy", "'copy' (the paper's copy-paste score) or 'mass' (attention mass on the needle)",
                       lambda v: v in ("copy", "mass"))  # fmt: skip

    def ranking(self, spec) -> list[list[float]]:
        """The score table `score` names, checked against the model."""
        if self.scores is None:
            raise ParameterError(
                f"{self.name}: needs per-head scores: pass plan=heads.json from `llmpatch calibrate retrieval` "
                "(or scores=...), or list the heads with heads=[[layer, head], ...]"
            )
        check_scores(self.name, self.scores, spec)
        if self.score == "copy":
            return self.scores
        if self.mass_scores is None:
            raise ParameterError(
                f"{self.name}: score='mass' needs 'mass_scores' (written by `llmpatch calibrate retrieval`)"
            )
        check_scores(self.name, self.mass_scores, spec)
        return self.mass_scores


@dataclasses.dataclass
class RetrievalMask(ScoredHeads):
    name = "retrieval_mask"
    summary = "mask retrieval heads (top-k by score, listed, or random non-retrieval) on decode steps"

    top_k: int | None = param(None, "an int >= 1 (mask the K best-scoring heads)", lambda v: v >= 1)
    heads: list | None = param(None, "a list of [layer, head] pairs")
    random: int | None = param(None, "an int >= 1 (mask K random non-retrieval heads)", lambda v: v >= 1)
    seed: int = param(0, "an int")
    threshold: float = param(0.1, "a number > 0 (retrieval-head score cut-off)", lambda v: v > 0)
    mode: str = param("uniform", "'uniform' or 'zero'", lambda v: v in HEAD_MASK_MODES)
    prefill: bool = param(False, "true or false (also mask the prompt's attention)")

    def validate(self, spec):
        self.selected(spec)

    def selected(self, spec) -> list[tuple[int, int]]:
        """The (layer, head) pairs this configuration masks, checked against the model."""
        chosen = [k for k in ("top_k", "heads", "random") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ParameterError(
                f"{self.name}: give exactly one of 'top_k', 'heads' or 'random', got {chosen or 'none'}"
            )
        total = spec.num_layers * spec.num_heads
        if self.heads is not None:
            return check_head_pairs(self.name, self.heads, spec)
        ranked = ranked_heads(self.ranking(spec))
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
        code = HEAD_MASK_MODES[self.mode]
        for li, hi in self.selected(spec):
            layer = layers[li]
            layer.claim("head mask", self.name)
            layer.head_mask[hi] = code
            layer.mask_prefill = self.prefill
