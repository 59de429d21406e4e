"""Bases shared by several methods: elastic per-head sink + window spans (moa, streamingllm), the per-head
scores of a retrieval plan (retrieval_mask, retrieval_kv) and the hooks of methods that act once the prompt is in
(kvzip, reform)."""

from __future__ import annotations

import dataclasses

import torch

from ..decisions import Kind
from ..errors import ParameterError, PlanError
from .base import Method, check_head_pairs, param


def sliding_param():
    """Whether a cache method also cuts the layers with the model's own sliding window (Gemma-2/3's local
    layers), whose cache is bounded already (`base.compressed_layers`)."""
    return param(
        False, "false (leave the model's own sliding-window layers as they are) or true (compress them too)"
    )


def tail_param():
    """The dense-tail parameter of the cache methods (`LayerDecision.tail`): the last T prompt tokens (the
    instruction) attend to the whole prompt, then the cache is cut to the pattern (docs/METHODS.md §3)."""
    return param(0, "an int >= 0 (the last prompt tokens that attend to the whole prompt before the cache is cut; "
                 "0 = the pattern everywhere)", lambda v: v >= 0)  # fmt: skip


def span(alpha: float, beta: float, n: int, min_span: int) -> int:
    """A head's elastic span at input length n: S(n) = alpha + beta * n tokens, rounded, at least `min_span`."""
    return max(min_span, round(alpha + beta * n))


def kept(alpha: float, beta: float, n: int, min_span: int, window: int | None = None) -> int:
    """Keys a head sees at input length n: its span, capped at the input and at the layer's own `window`."""
    return min(span(alpha, beta, n, min_span), window or n, n)


def spans_at(
    alphas, betas, n: int, *, sink: int, min_span: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (sink [H], window [H])} at input length n; window -1 where the span covers the input."""
    out = {}
    for i, (a_row, b_row) in enumerate(zip(alphas, betas, strict=True)):
        s = torch.tensor([span(a, b, n, min_span) for a, b in zip(a_row, b_row, strict=True)])
        dense = s >= n
        out[i] = (torch.where(dense, 0, sink), torch.where(dense, -1, (s - sink).clamp(min=1)))
    return out


class ElasticSinkWindow(Method):
    """Shared by `moa` and `streamingllm`: per-head sink + window spans that may grow with the input length,
    set before each prompt, and (with `ring`) the ring-buffer decode cache. Subclasses give `spans(spec)`, a
    function of N returning {layer: (sink [H], window [H])}, and the fields `length`, `ring` and `tail`."""

    def spans(self, spec):
        raise NotImplementedError

    def configure(self, spec, layers):
        n = self.length or spec.max_position_embeddings or 4096  # until a prompt sets N
        for i, (sink, window) in self.spans(spec)(n).items():
            layers[i].set_static(self.name, sink, window, self.tail)
            if self.ring:
                for kind in (Kind.CALIBRATION, Kind.HEAD_MASK):  # the ring path does not apply them yet
                    layers[i].claim(kind, self.name)

    def install(self, model, spec, layers):
        from ..caches import ring  # imports transformers: not at package import time

        undo = [install_elastic(model, layers, self.spans(spec), self.length)]
        if self.ring:
            undo.append(ring.install(model, spec, layers))
        return lambda: [u() for u in reversed(undo)]


def install_after_prompt(model, spec, layers, before, after):
    """The ring cache on `layers`, and two hooks on the model's forward: `before(input_ids, fresh)` ahead of every
    call (input_ids None without them; fresh: the call starts a new cache, i.e. it is a prompt) and `after(out,
    cache)` after it, for methods that rework the cache once the prompt is in (kvzip, reform). Returns the undo
    callback."""
    from ..caches import cache_argument, find_cache, output_cache, ring  # imports transformers: not at import

    undo_ring = ring.install(model, spec, layers)
    name = cache_argument(model)

    def pre(module, args, kwargs):
        cache = find_cache(kwargs, name)
        fresh = cache is None or cache.get_seq_length() == 0
        before(kwargs.get("input_ids", args[0] if args else None), fresh)

    def post(module, args, kwargs, out):
        after(out, output_cache(out))
        return out

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]  # fmt: skip

    def undo():
        for handle in handles:
            handle.remove()
        undo_ring()

    return undo


def input_length(args, kwargs) -> int | None:
    """The sequence length of a model forward's input (input_ids or inputs_embeds)."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    return None if x is None else int(x.shape[1])


def install_elastic(model, layers, spans, length: int | None):
    """Spans that grow with the input (MoA's S = alpha + beta * N): before each prompt (a forward with an empty
    cache), set every layer's sink and window from `spans(N)` -> {layer: (sink [H], window [H])}, with N the
    prompt length (in a batch, the padded length) or the fixed `length`. Decode steps keep the prompt's spans.
    Returns the undo callback."""
    from ..caches import cache_argument, find_cache

    name = cache_argument(model)

    def hook(module, args, kwargs):
        cache = find_cache(kwargs, name)
        n = input_length(args, kwargs)
        if n is None or (cache is not None and cache.get_seq_length() > 0):
            return None
        with torch.inference_mode(False):  # decision tensors keep version counters
            for i, (sink, window) in spans(length or n).items():
                layers[i].set_spans(sink, window)
        return None

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return handle.remove


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


SCORES = {"copy": "scores", "mass": "mass_scores", "effect": "effect_scores"}  # score -> the plan's table


@dataclasses.dataclass
class ScoredHeads(Method):
    """The per-head scores of a retrieval plan (its `retrieval_heads` entry), shared by retrieval_mask and
    retrieval_kv."""

    plan_entry = "retrieval_heads"
    plan_keys = ("scores", "heads")

    scores: list | None = param(None, "a layers x heads list of retrieval scores (a retrieval plan)")
    mass_scores: list | None = param(
        None, "a layers x heads list of needle attention mass (a retrieval plan)"
    )
    effect_scores: list | None = param(
        None, "a layers x heads list of measured effects (`llmpatch calibrate retrieval-effect`)"
    )
    score: str = param("copy", "'copy' (the paper's copy-paste score), 'mass' (attention mass on the needle) or "
                       "'effect' (answer loss when the head's KV is cut)", lambda v: v in SCORES)  # fmt: skip

    def ranking(self, spec) -> list[list[float]]:
        """The score table `score` names, checked against the model."""
        if self.scores is None:
            raise ParameterError(
                f"{self.name}: needs per-head scores: pass plan=heads.json from `llmpatch calibrate retrieval` "
                "(or scores=...), plan='auto' for the stored or shipped plan (`llmpatch plans`), or list the heads "
                "with heads=[[layer, head], ...]"
            )
        check_scores(self.name, self.scores, spec)
        if self.score == "copy":
            return self.scores
        table = getattr(self, SCORES[self.score])
        if table is None:
            by = (
                "`llmpatch calibrate retrieval-effect`"
                if self.score == "effect"
                else "`llmpatch calibrate retrieval`"
            )
            raise ParameterError(
                f"{self.name}: score={self.score!r} needs {SCORES[self.score]!r} (written by {by})"
            )
        check_scores(self.name, table, spec)
        return table


def kept_heads(method, spec) -> list[tuple[int, int]]:
    """The query heads a method keeps whole (retrieval_kv, kvzip_heads): its `heads` list, else its `top_k`
    best-ranked heads, else those ranked above its `threshold`."""
    if method.heads is not None:
        if method.top_k is not None:
            raise ParameterError(f"{method.name}: give 'top_k' or 'heads', not both")
        return check_head_pairs(method.name, method.heads, spec)
    table = method.ranking(spec)
    if method.top_k is not None:
        total = spec.num_layers * spec.num_heads
        if method.top_k > total:
            raise ParameterError(
                f"{method.name}: parameter 'top_k' must be in 0..{total}, got {method.top_k}"
            )
        return ranked_heads(table)[: method.top_k]
    return [p for p in ranked_heads(table) if table[p[0]][p[1]] > method.threshold]
