"""SnapKV: query-aware KV eviction by an observation window (Li et al., 2024, "SnapKV: LLM Knows What You are
Looking for Before Generation"), on llmpatch's sparse-prefill sink + window ring cache (docs/METHODS.md §6).

Every compressed KV head keeps the first `sink` tokens, the last `window` tokens (a ring, as `streamingllm`), and
`keep` tokens of the prompt chosen by the prompt's last `observe` queries, the observation window (the question):
their attention probabilities over the prompt, summed over the window's rows and the KV group's query heads,
smoothed by a max-pool of width `pool` (the paper's clustering), top-`keep` among the tokens the ring drops.
The last `tail` queries attend densely (`LayerDecision.tail`; tail >= observe: the selection reads the question's
true attention); the rest of the prompt is prefilled with the sink + window pattern, so prefill attention is cut
too (a tail as long as the prompt is SnapKV's dense prefill). The cache holds
sink + keep + window slots per KV head, whatever the prompt length.

Defaults: sink 16, window 128, keep 192 (336 tokens: 67% KV saved at 1k), observe 64 (SnapKV's window size),
tail 64, pool 7 (max pooling).
Departures: SnapKV prefills densely; here only the tail does. The selection is per KV head (GQA: scores summed
over the group, as kvpress does). Pinned tokens are read like sinks (the ring publishes them at position 0). Layers
with the model's own sliding window keep their own bounded cache (kvpress's Gemma-3 rule) unless `sliding` is true
(default false). Selection happens once per prompt: protocol B
(the question after the context) selects with the context's last `observe` tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from ..kernels import rules
from .base import compressed_layers, param
from .shared import ElasticSinkWindow, sliding_param


@dataclasses.dataclass
class SnapKV(ElasticSinkWindow):
    name = "snapkv"
    summary = (
        "sink + window ring cache plus the prompt tokens the question attends to most (observation window)"
    )
    ring = True
    length = None

    sink: int = param(16, "an int >= 1", lambda v: v >= 1)
    window: int = param(128, "an int >= 1 (recent tokens, the query included)", lambda v: v >= 1)
    keep: int = param(192, "an int >= 0 (prompt tokens kept per KV head by the observation window)",
                      lambda v: v >= 0)  # fmt: skip
    observe: int = param(64, "an int >= 1 (the observation window: the last prompt tokens that score the rest)",
                         lambda v: v >= 1)  # fmt: skip
    tail: int = param(64, "an int >= 1 (last prompt tokens that attend densely; >= the prompt: a dense prefill)",
                      lambda v: v >= 1)  # fmt: skip
    pool: int = param(7, "an odd int >= 1 (max-pool width over the scores)", lambda v: v >= 1 and v % 2 == 1)
    sliding: bool = sliding_param()

    def spans(self, spec):
        h = spec.num_heads
        pattern = (torch.full((h,), self.sink), torch.full((h,), self.window))
        return lambda n: {i: pattern for i in compressed_layers(spec, self.sliding)}

    def configure(self, spec, layers):
        super().configure(spec, layers)
        for i in compressed_layers(spec, self.sliding):
            layers[i].pins, layers[i].select = self.keep, self.select

    def smooth(self, scores, k_pos, dropped):
        """SnapKV's clustering: a max-pool of width `pool` over each KV head's scores [B, Hkv, N]."""
        return torch.nn.functional.max_pool1d(scores, self.pool, stride=1, padding=self.pool // 2)

    def select(self, decision, q, k, v, mask, scale, softcap) -> None:
        """Pin each KV head's top-`keep` prompt tokens by the observation window's attention."""
        ring = decision.pin_to() if decision.pin_to is not None else None
        if ring is None or not self.keep:
            return
        b, h, n, _ = q.shape
        hkv = k.shape[1]
        probs, q_pos, k_pos = observed(q, k, mask, scale, softcap, self.observe)
        scores = probs.sum(2).view(b, hkv, h // hkv, n).sum(2)  # [B, Hkv, N]
        last = q_pos[:, -1:, None]  # [B, 1, 1]: the prompt's last position
        sink = torch.tensor(ring.sink, device=q.device).view(1, -1, 1)
        span = torch.tensor(ring.ring, device=q.device).view(1, -1, 1)
        kp = k_pos[:, None, :]
        dropped = (kp >= sink) & (kp <= last - span) & (span >= 0)  # what the ring lets go
        scores = self.smooth(scores, k_pos, dropped).masked_fill(~dropped, float("-inf"))
        # stable: ties (pooling makes plateaus) go to the earlier token, the same with or without padding
        values, order = scores.sort(dim=-1, descending=True, stable=True)
        top = min(self.keep, n)
        ring.pin(torch.where(torch.isfinite(values[..., :top]), order[..., :top], -1), k, v)


def observed(q, k, mask, scale, softcap, observe: int):
    """The observation window: the prompt's last `observe` queries' attention probabilities over its keys
    [B, H, t, N] (t = min(observe, N), each KV head's keys shared by its group), with their positions
    (q_pos [B, t], k_pos [B, N])."""
    b, h, n, d = q.shape
    t = min(observe, n)
    start = mask.row_start(b, q.device)
    q_pos, k_pos = rules.token_positions(b, t, n, start, mask.key_padding, q.device)
    logits = torch.matmul(q[:, :, n - t :].float(), k.float().repeat_interleave(h // k.shape[1], 1).mT)
    logits = rules.soft_cap(logits * (scale if scale is not None else d**-0.5), softcap)
    seen = rules.visible(q_pos[:, None, :, None], k_pos[:, None, None, :])
    return torch.softmax(logits.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0), q_pos, k_pos
