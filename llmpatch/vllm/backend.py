"""vLLM's CPU attention with llmpatch's per-head patterns: a subclass of vLLM's `CPUAttentionBackendImpl`.

A layer whose decision is dense runs vLLM's own kernel, and so does every request whose pattern keeps every key
at its length (`paged.keeps_every_key`: no head mask, every window at least as long as the request), the
whole step in one call when all of them do. Otherwise each request is one llmpatch kernel call
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

import dataclasses

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ..attention import pattern_args
from ..kernels import dispatch
from . import paged, state


class LlmpatchCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        state.served()  # resolved while vLLM builds the model (its config is current): errors at start-up

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):  # fmt: skip
        decision = None if attn_metadata is None else state.decision_for(layer, self.num_heads)
        isa = getattr(layer, "isa", "vec")
        if decision is None or isa not in paged.LAYOUTS:
            if decision is not None:
                state.refuse_isa(isa)
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        starts = attn_metadata.query_start_loc.tolist()
        lengths = attn_metadata.seq_lens.tolist()
        native = {r for r, n in enumerate(lengths) if paged.keeps_every_key(decision, n)}
        if len(native) == len(lengths):  # the pattern keeps every key of every request: vLLM's kernel
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
            )
        if native:
            self._native(layer, query, kv_cache, attn_metadata, sorted(native), starts, output)
        kw = dict(
            scale=self.scale, softcap=self.logits_soft_cap or None, sliding_window=decision.sliding_window
        )
        table = attn_metadata.block_table
        decode = []  # requests with one new token after earlier ones: one batched call below
        for r, length in enumerate(lengths):
            q0, q1 = starts[r], starts[r + 1]
            if q1 == q0 or r in native:
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
                out = paged.prompt_chunk(decision, q, kv_cache, isa, table[r : r + 1], length, kw)
            output[q0:q1] = out[0].transpose(0, 1).reshape(output[q0:q1].shape)
        if decode:
            at = torch.tensor([starts[r] for r in decode])
            rows = table[torch.tensor(decode)]
            out = paged.decode(
                decision, query[at].unsqueeze(2), kv_cache, isa, rows, [lengths[r] for r in decode], kw
            )
            output[at] = out[:, :, 0].reshape(len(decode), *output.shape[1:])
        return output

    def _native(self, layer, query, kv_cache, md, reqs: list[int], starts: list[int], output) -> None:
        """vLLM's own kernel for the requests `reqs` of this step (their queries gathered, their metadata cut)."""
        rows = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in reqs])
        counts = torch.tensor([starts[r + 1] - starts[r] for r in reqs])
        pick = torch.tensor(reqs)
        loc = torch.zeros(len(reqs) + 1, dtype=md.query_start_loc.dtype)
        loc[1:] = counts.cumsum(0)
        seq_lens = md.seq_lens[pick]
        sub = dataclasses.replace(
            md, num_actual_tokens=len(rows), max_query_len=int(counts.max()), query_start_loc=loc,
            max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=md.block_table[pick],
            scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(reqs), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size, seq_lens=seq_lens, dtype=query.dtype, query_start_loc=loc,
                causal=md.causal, sliding_window_size=-1,  # -1: schedules every key (the builder's choice
                # for a group whose layers disagree); the kernel still applies the layer's own window
                isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=self.kv_cache_dtype,
            ),
        )  # fmt: skip
        out = torch.empty((len(rows), *output.shape[1:]), dtype=output.dtype)
        super().forward(layer, query[rows], None, None, kv_cache, sub, out)
        output[rows] = out


class LlmpatchCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return LlmpatchCPUAttentionImpl
