"""DHSA: dynamic hierarchical sparse attention for prefill (Xiong et al., 2025; docs/METHODS.md §4). Official code:
xiongsiheng/DHSA (Gemma-2 only).

Per prompt: variable-length chunks from a training-free boundary rule, computed once at the first patched layer
and shared by all layers; per layer, chunk keys k_c = mean(K_c) * sqrt(|c|) and query-block means
q_b = mean(Q_b) * sqrt(|b|) (fp32, heads averaged); scores q_b . k_c upsampled to key tokens; per query block the
first `sink` and the last `recent` tokens are forced and the rest of `budget` goes to the best-scoring keys; the
last `tail` queries (the instruction) attend densely. One selection is shared by every head of a layer. Run time:
`runtime.py` beside this file; attention: the block-list kernels (CPU flex_attention, Triton).

Defaults: budget 1024 (the paper's NIAH setting; 2048 for LongBench), sink 128, recent 128, tail 64, boundary
window w = 4, NMS 8, at most 8 boundaries per 128 tokens.

Decisions and departures:
- Boundaries: the paper trains a small predictor on labels from the attention-ratio rule; we use the rule itself,
  on every `stride`-th query (32), so it costs N^2 / stride scores at one layer, never N x N. Non-maximum
  suppression keeps gaps that are the largest within +-8 (max-pool), then the best ones up to the cap.
- Query blocks are `block_size` (64) tokens, not 128, and key selection is rounded to key blocks of 64 (a block
  takes its best token's score) so the selection feeds the block-list kernels directly; the budget counts
  whole blocks (budget // block_size of them, at least the forced ones).
- Decode is dense, as in the paper; so is a prompt within the budget (every block would be chosen) and a prefill
  continued over a cache. Layers with the model's own sliding window are left dense.
- Batch > 1 with left padding: each row is selected in its own token space.
"""

from __future__ import annotations

import dataclasses

from ...decisions import Kind
from ...errors import ParameterError
from ..base import Method, full_attention_layers, param


@dataclasses.dataclass
class DHSA(Method):
    name = "dhsa"
    summary = "dynamic chunks + chunk-level scores pick a key budget per query block at prefill (DHSA)"

    budget: int = param(1024, "an int >= sink + recent (keys per query block, in tokens)", lambda v: v >= 1)
    block_size: int = param(64, "one of 4, 8, 16, 32, 64, 128 (Triton needs >= 16)",
                            lambda v: v in (4, 8, 16, 32, 64, 128))  # fmt: skip
    sink: int = param(128, "an int >= 0", lambda v: v >= 0)
    recent: int = param(128, "an int >= 1 (includes the query's own block)", lambda v: v >= 1)
    tail: int = param(64, "an int >= 0 (last queries that attend densely)", lambda v: v >= 0)
    gap_window: int = param(4, "an int >= 1", lambda v: v >= 1)
    nms: int = param(8, "an int >= 1", lambda v: v >= 1)
    per_128: int = param(8, "an int >= 1 (boundaries per 128 tokens at most)", lambda v: v >= 1)
    stride: int = param(32, "an int >= 1 (query sampling for the boundary rule)", lambda v: v >= 1)
    layers: list | None = param(None, "null (every full-attention layer) or a list of layer indices")

    def chosen_layers(self, spec) -> list[int]:
        return full_attention_layers(self.name, self.layers, spec)

    def validate(self, spec):
        forced = self.sink + self.recent
        if self.budget < forced:
            raise ParameterError(
                f"dhsa: parameter 'budget' must be at least the forced tokens sink + recent = {forced}, "
                f"got {self.budget}"
            )
        if self.budget < self.block_size:
            raise ParameterError(
                f"dhsa: parameter 'budget' must be at least block_size={self.block_size}, got {self.budget}"
            )
        self.chosen_layers(spec)

    def configure(self, spec, layers):
        from .runtime import Config, DHSAAttention

        cfg = Config(self.budget, self.block_size, self.sink, self.recent, self.tail, self.gap_window, self.nms,
                     self.per_128, self.stride)  # fmt: skip
        shared: dict = {}  # the prompt's chunk boundaries, from the first patched layer
        chosen = self.chosen_layers(spec)
        for i in chosen:
            for kind in Kind:
                layers[i].claim(kind, self.name)
            layers[i].attend = DHSAAttention(cfg, shared, i == chosen[0])
