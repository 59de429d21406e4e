"""vLLM's CPU attention with llmpatch's per-head patterns: a subclass of vLLM's `CPUAttentionBackendImpl`.

A layer whose decision is dense runs vLLM's own kernel. Otherwise each request is one llmpatch kernel call
(`kernels.dispatch.attention`, the same entry point the HF path uses):
- a fresh prompt (all its tokens in this step) attends over the step's own keys and values, with the layer's
  dense `tail`;
- later steps (decode, or the rest of a chunked prompt) read from the paged cache only the tokens some head of
  each KV head can still see (its sink and its window), at their positions, never the whole cache.
A step of more than one query is a prompt (a head mask applies on decode steps only): a prompt's last chunk of
one token counts as a decode step.
Cache layout read here (vLLM 0.32 CPU "vec" / "vec16" ISAs): `[blocks, kv_heads, block_size, 2 * D]`, each
block and KV head holding its keys as `[D, block_size]` and then its values as `[block_size, D]`.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ..attention import dense_tail, pattern_args
from ..kernels import dispatch
from . import state

LAYOUT_ISAS = ("vec", "vec16")


def kv_views(kv_cache: torch.Tensor):
    """(keys [blocks, kv_heads, block_size, D], values [blocks, kv_heads, block_size, D]) as views."""
    nb, hkv, bs, two_d = kv_cache.shape
    d = two_d // 2
    halves = kv_cache.view(nb, hkv, 2, bs * d)
    return halves[:, :, 0].view(nb, hkv, d, bs).transpose(2, 3), halves[:, :, 1].view(nb, hkv, bs, d)


def kept_positions(decision, hkv: int, length: int, first_query: int) -> list[torch.Tensor]:
    """Per KV head: the positions < `length` that one of its query heads can see from a query at or after
    `first_query` (its sink, its window; every position for a dense head)."""
    g = decision.num_heads // hkv
    out = []
    for kv in range(hkv):
        sink = decision.sink[kv * g : (kv + 1) * g]
        window = decision.window[kv * g : (kv + 1) * g]
        lo_window = first_query - (decision.sliding_window or 0) + 1 if decision.sliding_window else 0
        if bool((window < 0).any()):
            out.append(torch.arange(max(0, lo_window), length))
            continue
        w, s = int(window.max()), int(sink.max())
        start = max(first_query - w + 1, lo_window, 0)
        head = torch.arange(0, min(s, start))
        out.append(torch.cat([head, torch.arange(start, length)]))
    return out


def gather(kv_cache, block_row: torch.Tensor, positions: list[torch.Tensor]):
    """Keys, values [1, Hkv, M, D] and their positions [1, Hkv, M] (-1 = padding) for per-KV-head positions."""
    keys, values = kv_views(kv_cache)
    bs = keys.shape[2]
    m = max(len(p) for p in positions)
    hkv, d = keys.shape[1], keys.shape[3]
    k = keys.new_zeros(1, hkv, m, d)
    v = values.new_zeros(1, hkv, m, d)
    k_pos = torch.full((1, hkv, m), -1, dtype=torch.long)
    for h, pos in enumerate(positions):
        blocks = block_row[pos // bs].long()
        k[0, h, : len(pos)] = keys[blocks, h, pos % bs]
        v[0, h, : len(pos)] = values[blocks, h, pos % bs]
        k_pos[0, h, : len(pos)] = pos
    return k, v, k_pos


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
        hkv = self.num_kv_heads
        for r, length in enumerate(lengths):
            q0, q1 = starts[r], starts[r + 1]
            if q1 == q0:
                continue
            q = query[q0:q1].transpose(0, 1).unsqueeze(0)
            first = length - (q1 - q0)
            kw = dict(
                scale=self.scale, softcap=self.logits_soft_cap or None, sliding_window=decision.sliding_window
            )
            # a prompt, or a later chunk of one (decode steps are 1 token)
            prefill = first == 0 or q1 - q0 > 1
            if first == 0:
                k = key[q0:q1].transpose(0, 1).unsqueeze(0)
                v = value[q0:q1].transpose(0, 1).unsqueeze(0)
                kw.update(pattern_args(decision, length, False, prefill))
                tail = min(decision.tail, q1 - q0) if "sink" in kw else 0
                out = dense_tail(q, k, v, tail, None, kw) if tail else dispatch.attention(q, k, v, **kw)[0]
            else:
                positions = kept_positions(decision, hkv, length, first)
                k, v, k_pos = gather(kv_cache, attn_metadata.block_table[r], positions)
                kw.update(q_pos=torch.arange(first, length).unsqueeze(0), k_pos=k_pos)
                kw.update(pattern_args(decision, k.shape[2], True, prefill))
                out = dispatch.attention(q, k, v, **kw)[0]
            output[q0:q1] = out[0].transpose(0, 1).reshape(output[q0:q1].shape)
        return output


class LlmpatchCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return LlmpatchCPUAttentionImpl
