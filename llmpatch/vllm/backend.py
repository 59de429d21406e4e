"""vLLM's CPU attention with llmpatch's per-head patterns: a subclass of vLLM's `CPUAttentionBackendImpl`.

A layer whose decision is dense runs vLLM's own kernel. Otherwise each request is one llmpatch kernel call
(`kernels.dispatch.attention`, the same entry point the HF path uses):
- a fresh prompt (all its tokens in this step) attends over the step's own keys and values;
- a later chunk of a prompt reads from the paged cache the layer's sinks and the contiguous run of positions
  its widest window still reaches, as one run of keys with the chunk's queries at its end (the kernels' band
  path, as for an HF prompt over a cache); a layer's own sliding window with sinks before the run takes the
  positioned path below instead;
- decode steps read, per KV head, only the tokens one of its heads can still see (its sink and its window), at
  their positions (`k_pos`), never the whole cache; the step's decode requests share one gather and one call.
A step of more than one query is a prompt (a head mask applies on decode steps only): a prompt's last chunk of
one token counts as a decode step. A dense `tail` is refused at start-up (`served.resolve`): a prompt split
over steps no longer holds the middle keys its tail would read.
The paged cache is read in `paged.py` (its layout is there).
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ..attention import pattern_args
from ..kernels import dispatch
from . import paged, state

LAYOUT_ISAS = ("vec", "vec16")


class LlmpatchCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        state.served()  # resolved while vLLM builds the model (its config is current): errors at start-up

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):  # fmt: skip
        decision = None if attn_metadata is None else state.decision_for(layer, self.num_heads)
        if decision is None or getattr(layer, "isa", "vec") not in LAYOUT_ISAS:
            if decision is not None:
                state.refuse_isa(layer.isa)
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        starts = attn_metadata.query_start_loc.tolist()
        lengths = attn_metadata.seq_lens.tolist()
        kw = dict(
            scale=self.scale, softcap=self.logits_soft_cap or None, sliding_window=decision.sliding_window
        )
        table = attn_metadata.block_table
        decode = []  # requests with one new token after earlier ones: one batched call below
        for r, length in enumerate(lengths):
            q0, q1 = starts[r], starts[r + 1]
            if q1 == q0:
                continue
            first = length - (q1 - q0)
            if first > 0 and q1 - q0 == 1:
                decode.append(r)
                continue
            q = query[q0:q1].transpose(0, 1).unsqueeze(0)
            if first == 0:  # a fresh prompt, over its own keys
                k = key[q0:q1].transpose(0, 1).unsqueeze(0)
                v = value[q0:q1].transpose(0, 1).unsqueeze(0)
                out = dispatch.attention(q, k, v, **kw, **pattern_args(decision, length, False, True))[0]
            else:
                out = paged.prompt_chunk(decision, q, kv_cache, table[r : r + 1], length, kw)
            output[q0:q1] = out[0].transpose(0, 1).reshape(output[q0:q1].shape)
        if decode:
            at = torch.tensor([starts[r] for r in decode])
            rows = table[torch.tensor(decode)]
            out = paged.decode(
                decision, query[at].unsqueeze(2), kv_cache, rows, [lengths[r] for r in decode], kw
            )
            output[at] = out[:, :, 0].reshape(len(decode), *output.shape[1:])
        return output


class LlmpatchCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return LlmpatchCPUAttentionImpl
