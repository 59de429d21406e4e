"""MoA: a mixture of sparse attention, one elastic sink + sliding window per head (Fu et al., 2024; docs/METHODS.md §3).

Head h attends to the first `sink` tokens and the last S_h(N) - sink tokens, with S_h(N) = alpha_h + beta_h * N
for an input of N tokens (the prompt length, or the fixed `length`), at least `min_span` (the official cache's
floor, 128). A head whose span covers the whole input is dense. Plans come from `llmpatch calibrate moa` (gradient
profiling + a MILP, `llmpatch.calibrate.moa`) or from the official {"alphas", "betas"} JSON (`import_official`).
Defaults: sink 64, min_span 128, ring cache on.

Decode: each KV head keeps sink + ring slots (`llmpatch.caches.ring`), a real memory saving; `ring=False` keeps the
full cache and masks it (the reference the ring is tested against). GQA natively: a pattern per query head, and a
KV head's cache keeps the union (largest span) of its query heads'. The search makes per-query-head plans by
default (measured better at equal MoA density, for a larger cache: see `llmpatch.calibrate.moa`); `--gqa group`
plans give a KV group one span, and then the union costs nothing.

Departures: spans are fixed when the prompt is read (N = prompt length; the official cache sizes use
N_in + max_new); in a batch N is the padded length, so a shorter row gets the spans of the longer one (set
`length` for spans that do not depend on the batch). On layers with the model's own sliding window the ring
cache holds min(span, window) per KV head, so a plan that narrows them saves their memory too. Does not compose with act / retrieval_mask / retrieval_kv yet.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import ParameterError, PlanError
from .base import param
from .shared import ElasticSinkWindow, kept, spans_at, tail_param


def _matrix_ok(v, lo: float = float("-inf"), hi: float = float("inf")) -> bool:
    return isinstance(v, list) and all(
        isinstance(r, list)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and lo <= x <= hi for x in r)
        for r in v
    )


def density_at(alphas, betas, n: int, *, min_span: int = 128) -> float:
    """MoA's density: the mean over heads of min(S_h(n), n) / n."""
    vals = [kept(a, b, n, min_span) / n for ar, br in zip(alphas, betas, strict=True)
            for a, b in zip(ar, br, strict=True)]  # fmt: skip
    return sum(vals) / len(vals)


@dataclasses.dataclass
class MoA(ElasticSinkWindow):
    name = "moa"
    plan_keys = ("alphas", "betas")
    summary = "per-head elastic sink + window from a profiled plan, with a per-head ring-buffer decode cache"

    alphas: list | None = param(None, "a [layers][heads] list of numbers (tokens), from a plan", _matrix_ok)
    betas: list | None = param(
        None, "a [layers][heads] list of numbers in [0, 1], from a plan", lambda v: _matrix_ok(v, 0, 1)
    )
    sink: int = param(64, "an int >= 0", lambda v: v >= 0)
    min_span: int = param(128, "an int >= 1", lambda v: v >= 1)
    length: int | None = param(None, "null (each prompt's length) or an int >= 1", lambda v: v >= 1)
    ring: bool = param(True, "true (ring-buffer decode cache) or false (masks over the full cache)")
    tail: int = tail_param()

    def validate(self, spec):
        if self.alphas is None or self.betas is None:
            raise ParameterError(
                "moa: parameters 'alphas' and 'betas' are required; pass plan=... from `llmpatch calibrate moa` "
                "(or moa.import_official), or plan='auto' for the stored or shipped plan (`llmpatch plans`)"
            )
        for key in ("alphas", "betas"):
            m = getattr(self, key)
            if len(m) != spec.num_layers or any(len(r) != spec.num_heads for r in m):
                shape = f"[{len(m)}][{', '.join(sorted({str(len(r)) for r in m}))}]"
                raise ParameterError(
                    f"moa: parameter {key!r} must be [{spec.num_layers}][{spec.num_heads}] (layers x query heads "
                    f"of this model), got {shape}: a plan for another model?"
                )
        context = spec.max_position_embeddings  # below -context a span never leaves min_span: a mistake
        if context and any(a < -context for r in self.alphas for a in r):
            raise ParameterError(f"moa: parameter 'alphas' must hold offsets >= -{context} (minus the model's "
                                 f"context; a large one makes a head dense), got {min(min(r) for r in self.alphas)}")  # fmt: skip

    def spans(self, spec):
        return lambda n: spans_at(self.alphas, self.betas, n, sink=self.sink, min_span=self.min_span)


def import_official(source, spec=None) -> dict:
    """Read the official MoA plan {"alphas": [[...]], "betas": [[...]]} (a path or dict) into moa params."""
    try:
        data = json.loads(Path(source).read_text()) if not isinstance(source, dict) else source
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"moa: cannot read the official plan {str(source)!r} ({exc})") from None
    if not isinstance(data, dict) or not _matrix_ok(data.get("alphas")) or not _matrix_ok(data.get("betas")):
        raise PlanError(
            'moa: an official plan must be a JSON object {"alphas": [[number] * heads] * layers, "betas": '
            "[[number] * heads] * layers}"
        )
    a, b = data["alphas"], data["betas"]
    if [len(r) for r in a] != [len(r) for r in b]:
        raise PlanError("moa: official plan 'alphas' and 'betas' must have the same [layers][heads] shape")
    params = {"alphas": a, "betas": b}
    if spec is not None:
        MoA.from_params(params).validate(spec)
    return params


def export_official(params: dict) -> dict:
    return {"alphas": params["alphas"], "betas": params["betas"]}
