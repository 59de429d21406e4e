"""Query-agnostic gather and recompute: KVzip's context-reconstruction scores pick the prompt chunks, which are
then recomputed densely into the cache as `reform` does (REFORM: Song et al., 2025, "Compress, Gather, and
Recompute: REFORMing Long-Context Processing in Transformers", arXiv 2506.01215; the scores from KVzip: Kim et
al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv 2505.23416).

`reform` picks chunks by what the prompt's last tokens attend to, so it needs the question inside the prompt;
asked afterwards (a cache built once for many questions), it keeps what the context's end looks at. Here no
question is assumed:
1. The prompt is prefilled densely (the scoring reads every layer's keys and values).
2. The model is asked to repeat the prompt, as in `kvzip` (its instruction, chunks of `repeat` tokens): a token's
   importance in a KV head is the largest probability a repeat query of its group gives it. A token scores its
   `top` best (layer, KV head) importances, summed.
3. As in `reform`: whole chunks of `chunk` positions by summed score, pooled over `pool` chunks; the first `sink`
   and last `window` prompt tokens and the best chunks, (1 - ratio) of the prompt, are run again on their own at
   their positions, densely among themselves; their keys and values are the cache (the same tokens in every
   layer and KV head), and the prompt's last logits come from that pass. A ring of `decode` slots per KV head
   holds what comes after the prompt (a later question, the answer); KV saved counts it.

Defaults: reform's (ratio 0.75, sink 16, window 128, chunk 16, pool 3, decode = window), kvzip's repeat chunk
(2048) and instruction, top 8. `observe` is not read (the prompt attends densely).
Departures: from REFORM, as in `reform`, and the tokens are chosen by reconstruction scores, not by the question;
from KVzip, tokens are kept or evicted in every head together (whole chunks) and the kept ones are recomputed
without the evicted context. Costs: the dense prefill, the repeat passes (about three times its attention) and
the recompute ((1 - ratio)^2); `prefill attention computed` counts all three.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ParameterError
from ..sharding import all_gather_heads
from .base import param
from .kvzip import decoder, lead_ids, repeat_scores
from .reform import Reform

DENSE = 2**62  # a tail longer than any prompt: every prompt row attends densely


@dataclasses.dataclass
class ReformZip(Reform):
    name = "reform_zip"
    summary = (
        "query-agnostic reform: KVzip's repeat scores pick the chunks that are recomputed into the cache"
    )

    repeat: int = param(2048, "an int >= 1 (prompt tokens repeated per scoring pass)", lambda v: v >= 1)
    top: int = param(8, "an int >= 1 (a token's score: the sum of its best `top` (layer, KV head) importances)",
                     lambda v: v >= 1)  # fmt: skip
    instruction: list | None = param(None, "null (the model's tokenizer encodes kvzip's instruction and chat "
                                     "turn) or a list of token ids used before every chunk instead")  # fmt: skip

    def validate(self, spec):
        super().validate(spec)
        if self.observe != Reform.observe:
            raise ParameterError(
                f"reform_zip: parameter 'observe' is not used (the prompt attends densely), got {self.observe}"
            )

    def configure(self, spec, layers):
        super().configure(spec, layers)
        h = spec.num_heads
        for layer in layers:  # a dense prompt; every layer's keys and values feed the repeat passes
            layer.set_static(self.name, torch.full((h,), self.sink), torch.full((h,), self.window), DENSE)
            layer.select = self._stash
        self._stashed, self._hkv = {}, spec.local_kv_heads

    def _stash(self, decision, q, k, v, mask, scale, softcap) -> None:
        if not self._busy:
            self._stashed[decision.layer] = (k, v)
            self._starts, self._prompt_in = mask.row_start(q.shape[0], q.device).tolist(), True

    def _gather(self, model, out, cache) -> None:
        try:
            super()._gather(model, out, cache)
        finally:
            self._stashed = {}  # the dense prompt's keys and values are not kept past the gather

    def _token_scores(self, model, ids) -> torch.Tensor:
        """[B, N]: each row's prompt tokens scored alone (zeros before its first real slot)."""
        inner = decoder(model)
        lead = lead_ids(inner, self.instruction)
        out = torch.zeros(ids.shape)
        for row, start in enumerate(self._starts):
            stash = {i: (k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for i, (k, v) in
                     self._stashed.items()}  # fmt: skip
            scores = repeat_scores(inner, ids[row : row + 1, start:], stash, lead, self._layers,
                                   self._scoring, self.sink, self.repeat, self._hkv)  # fmt: skip
            scores = all_gather_heads(scores, self._shard, 1).flatten(0, 1)  # [layers * all KV heads, N]
            out[row, start:] = self._best(scores, 0).sum(0)
        return out
