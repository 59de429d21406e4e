"""Gather and recompute: a sparse prefill finds the prompt chunks the question needs, and only those are computed
again, densely, into the cache (after REFORM: Song et al., 2025, "Compress, Gather, and Recompute: REFORMing
Long-Context Processing in Transformers", arXiv 2506.01215).

1. The prompt is prefilled with a sink + window pattern, its last `observe` tokens (the question) attending
   densely, so the pass costs about (sink + window) / (N / 2) of the dense prefill's attention.
2. Every layer's last `observe` queries score the prompt tokens: a token's score is its attention probability
   summed over those rows, in the head (of any layer) that gives it the most (summed over its `top` best heads
   when top > 1); a chunk of `chunk` consecutive positions scores the sum over its tokens, and then the best
   score within `pool` chunks around it (so the neighbours of a chunk that holds what the question looks for
   come with it).
3. The first `sink` and the last `window` prompt tokens and the best chunks, (1 - ratio) of the prompt in all,
   are run through the model again on their own, at their original positions, with dense causal attention
   among them: their keys and values replace the sparse pass's in the cache (the same tokens in every layer and
   KV head), and the logits of the prompt's last token come from this pass.
So every kept entry is the one a dense prefill of the gathered tokens gives, and no entry is computed from a
context the cache no longer holds. Each KV head also keeps a ring of `decode` slots (default: `window`; at most
`window`) for what comes after the prompt (a later question, the answer), outside the ratio, as in `kvzip`; KV
saved counts it.

Defaults: ratio 0.75, sink 16, window 128, observe 64, chunk 16 (the pass-1 pattern and the selection window of
`chunkkv`), pool 3, top 1, decode = window.
Departures from REFORM: one sparse prefill instead of its recurrent chunked encoding with a compressed cache and
early exit; tokens are gathered by the question's attention in the sparse pass (summed over chunks, as ChunkKV
does) instead of the cosine similarity of cross-layer QKV embeddings; gathered as whole chunks; no prompt longer
than the model's trained length. Each row of a batch is gathered alone (its own chunks, as batch 1). On a model
with sliding-window layers (Gemma-2/3) only the layers that read the whole prompt score it (all, if every layer
slides), and a sliding layer keeps just the gathered tokens its window still shows the next token, at their
positions, so they leave the window as in the model's own cache (its pattern is lifted until the next prompt).
Recomputing costs about (1 - ratio)^2 of the dense prefill's attention (and the MLPs of the gathered tokens
again); `prefill attention computed` counts it, within each layer's window (docs/METHODS.md §11).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ParameterError
from ..sharding import all_gather_heads
from .base import Method, compressed_layers, param
from .shared import install_after_prompt
from .snapkv import observed


@dataclasses.dataclass
class Reform(Method):
    name = "reform"
    summary = "sparse prefill; the question picks prompt chunks, which are recomputed densely into the cache"

    ratio: float = param(
        0.75, "a number in [0, 1) (share of the prompt's tokens evicted)", lambda v: 0 <= v < 1
    )
    sink: int = param(
        16, "an int >= 1 (first prompt tokens, always kept; the sparse pass's sink)", lambda v: v >= 1
    )
    window: int = param(128, "an int >= 1 (the sparse pass's window; the last prompt tokens, always kept; the ring "
                        "for later tokens)", lambda v: v >= 1)  # fmt: skip
    observe: int = param(64, "an int >= 1 (the last prompt tokens that score the rest; they attend densely)",
                         lambda v: v >= 1)  # fmt: skip
    chunk: int = param(16, "an int >= 1 (consecutive prompt positions kept together)", lambda v: v >= 1)
    decode: int | None = param(None, "null (= window) or an int in 1..window (ring slots for the tokens after the "
                               "prompt: a later question, the answer)", lambda v: v >= 1)  # fmt: skip
    pool: int = param(3, "an odd int >= 1 (chunks: a chunk's score is the best in the `pool` chunks around it, so a "
                      "chunk's neighbours come with it)", lambda v: v >= 1 and v % 2 == 1)  # fmt: skip
    top: int = param(1, "an int >= 1 (a token's score: the sum over the heads, of any layer, that attend to it most)",
                     lambda v: v >= 1)  # fmt: skip

    def validate(self, spec):
        if self.decode is not None and self.decode > self.window:
            raise ParameterError(
                f"reform: parameter 'decode' must be null (= window) or an int in 1..window ({self.window}), "
                f"got {self.decode} (the decode queries keep the sparse pass's window)"
            )

    def configure(self, spec, layers):
        h = spec.num_heads
        self._own = list(spec.sliding_window)
        for layer in layers:
            layer.set_static(
                self.name, torch.full((h,), self.sink), torch.full((h,), self.window), self.observe
            )
        # the layers that read the whole prompt score it (all of them when every layer slides)
        self._scoring = compressed_layers(spec) or compressed_layers(spec, sliding=True)
        for i in self._scoring:
            layers[i].select = self._score
        self._layers, self._scores, self._busy, self._ids, self._shard = layers, None, False, None, spec.shard
        self._prompt_in = False  # a prompt's pass has run its selection hook: gather after this forward
        self._heads, self._lifted = h, False

    def install(self, model, spec, layers):
        def before(ids, fresh):
            if self._busy:
                return
            self._ids, self._scores, self._prompt_in = ids, None, False
            if fresh and self._lifted:  # a new prompt: the sliding layers' sparse pattern again
                self._lift(None)

        def after(out, cache):
            if self._prompt_in and not self._busy:
                try:
                    self._busy = True
                    self._gather(model, out, cache)
                finally:
                    self._busy, self._scores, self._prompt_in = False, None, False

        return install_after_prompt(model, spec, layers, before, after)

    def _lift(self, window: int | None) -> None:
        """On the layers with the model's own sliding window: no pattern (-1) once their pins hold the gathered
        tokens at their positions (the window decides what a later query sees), or the sparse pass's again."""
        with torch.inference_mode(False):
            for layer in self._layers:
                if self._own[layer.layer] is not None:
                    span = self.window if window is None else window
                    layer.set_spans(torch.full((self._heads,), self.sink), torch.full((self._heads,), span))
        self._lifted = window is not None

    def _score(self, decision, q, k, v, mask, scale, softcap) -> None:
        """On the prompt (the sparse pass): add this layer's attention of the last `observe` queries to the
        per-token scores [B, N], and remember each row's first real slot."""
        if self._busy:
            return
        probs, _, _ = observed(q, k, mask, scale, softcap, self.observe)
        scores = probs.sum(2).cpu()  # [B, H, N]; kept: the `top` heads so far that attend to each token most
        if self._scores is not None:
            scores = torch.cat([self._scores, scores], 1)
        self._scores = self._best(scores, 1)
        self._starts, self._prompt_in = mask.row_start(q.shape[0], q.device).tolist(), True

    def _gather(self, model, out, cache) -> None:
        ids = self._ids
        if ids is None:
            raise ParameterError(
                "reform: the prompt must come as input_ids (its chosen tokens are run again)"
            )
        scores = self._token_scores(model, ids)
        rows = []
        for row, start in enumerate(self._starts):  # each row alone: a batch row keeps what batch 1 keeps
            kept = self._choose(scores[row, start:])
            pos = torch.cat([torch.arange(min(self.sink, ids.shape[1] - start)), kept])
            keys, values, logits = self._recompute(model, ids[row : row + 1, start:], pos)
            rows.append((pos, keys, values, ids.shape[1] - start))
            out.logits[row, -1] = logits.to(out.logits.dtype)
        for layer in cache.layers:
            if not hasattr(layer, "pin"):
                continue
            i, own = layer.decision.layer, self._own[layer.decision.layer]
            # what the layer's sink slots do not hold; on a sliding layer only what its window still shows the
            # next token, at the tokens' positions
            picks = [((pos >= max(layer.sink)) & (own is None or pos > n - own)).nonzero().flatten()
                     for pos, _, _, n in rows]  # fmt: skip
            count = max(len(p) for p in picks)
            # the ring's tokens are pinned now; it holds the next `decode` tokens
            layer.set_pins([count] * layer.num_kv_heads, keep_ring=False, window=self.decode)
            shape = (len(rows), layer.num_kv_heads, max(len(p) for p, _, _, _ in rows), layer.keys.shape[-1])
            keys = torch.zeros(shape, dtype=layer.keys.dtype)
            values, index = torch.zeros_like(keys), torch.full((*shape[:2], count), -1, dtype=torch.long)
            at = torch.full((len(rows), count), -1, dtype=torch.long)
            for r, ((pos, k, v, _), pick) in enumerate(zip(rows, picks, strict=True)):
                index[r, :, : len(pick)], at[r, : len(pick)] = pick, pos[pick]
                keys[r, :, : len(pos)], values[r, :, : len(pos)] = k[i][0], v[i][0]
            dev = layer.keys.device
            layer.pin(index.to(dev), keys.to(dev), values.to(dev), None if own is None else at)
        if any(w is not None for w in self._own):
            self._lift(-1)

    def _token_scores(self, model, ids) -> torch.Tensor:
        """[B, N]: the prompt tokens' scores (every rank the same: the best heads over all ranks' heads)."""
        return self._best(all_gather_heads(self._scores, self._shard, 1), 1).sum(1)

    def _best(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        """The `top` largest scores along `dim` (the heads; all of them where there are fewer)."""
        return scores.topk(min(self.top, scores.shape[dim]), dim).values

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The prompt positions pinned (sorted): the best-scored whole chunks after the sink and the last `window`,
        with the sink (which stays in its own slots, not returned) (1 - ratio) of the prompt in all."""
        n = scores.numel()
        sink, recent = min(self.sink, n), max(min(self.sink, n), n - self.window)
        budget = max(0, int((1 - self.ratio) * n) - sink - (n - recent))
        ids = torch.arange(n) // self.chunk
        sums = torch.zeros(int(ids[-1]) + 1).scatter_add_(0, ids[sink:recent], scores[sink:recent])
        counts = torch.zeros_like(sums).scatter_add_(0, ids[sink:recent], torch.ones(recent - sink))
        sums = torch.nn.functional.max_pool1d(sums[None], self.pool, stride=1, padding=self.pool // 2)[0]
        sums = sums.masked_fill(counts == 0, -1.0)  # chunks wholly in the sink or the window take no budget
        order = sums.argsort(descending=True, stable=True)
        take = torch.zeros_like(sums, dtype=torch.bool)
        take[order[(counts[order].cumsum(0) <= budget) & (counts[order] > 0)]] = True
        middle = torch.arange(sink, recent)
        return torch.cat([middle[take[ids[sink:recent]]], torch.arange(recent, n)])

    def _recompute(self, model, prompt, pos):
        """Run the tokens at positions `pos` (sorted) of one prompt [1, N] at those positions, dense and causal
        among themselves: each layer's keys and values [1, Hkv, K, D] and the last token's logits."""
        from ..kernels import density, dispatch

        pos = pos.to(prompt.device)
        keys, values, saved = {}, {}, [(layer.taps.profiler, layer.taps.tracker) for layer in self._layers]

        def tap_for(layer, tracker):
            def tap(decision, q, k, v, scale, softcap):
                b, h, nq, _ = q.shape
                kw = dict(
                    backend=decision.backend,
                    scale=scale,
                    softcap=softcap,
                    sliding_window=decision.sliding_window,
                )
                if decision.sliding_window is not None:  # the model's own window, over the real positions
                    kw.update(q_pos=pos[None], k_pos=pos.view(1, 1, -1).expand(b, k.shape[1], -1))
                out = dispatch.attention(q, k, v, **kw)[0]  # in slot order, causal is causal in positions
                if tracker is not None:  # counted as computed, not in the dense prefill's total
                    tracker.add(density.gathered_count(pos, h, sliding_window=decision.sliding_window), 0)
                keys[layer.layer], values[layer.layer] = k, v
                return out

            return tap

        try:
            for layer, (_, tracker) in zip(self._layers, saved, strict=True):
                layer.taps.profiler, layer.taps.tracker = tap_for(layer, tracker), None
            ids = prompt[:, pos]  # a mask, or transformers reads the gaps in position_ids as packed sequences
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos[None],
                           use_cache=False, logits_to_keep=1).logits[0, -1]  # fmt: skip
        finally:
            for layer, (profiler, tracker) in zip(self._layers, saved, strict=True):
                layer.taps.profiler, layer.taps.tracker = profiler, tracker
        return keys, values, logits
