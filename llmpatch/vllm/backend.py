"""vLLM's CPU attention with llmpatch's per-head patterns: a subclass of vLLM's `CPUAttentionBackendImpl`.

A layer whose decision is dense runs vLLM's own kernel. Otherwise each request is one llmpatch kernel call
(`kernels.dispatch.attention`, the same entry point the HF path uses):
- a fresh prompt (all its tokens in this step) attends over the step's own keys and values, with the layer's
  dense `tail`;
- later steps (decode, or the rest of a chunked prompt) read from the paged cache only the tokens some head of
  each KV head can still see (its sink and its window), at their positions, never the whole cache; the step's
  decode requests go in one batched gather and one kernel call.
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
from .served import group_spans

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
    lo_window = max(0, first_query - decision.sliding_window + 1) if decision.sliding_window else 0
    out = []
    for sink, window in kv_spans(decision, hkv):
        if window is None:
            out.append(torch.arange(lo_window, length))
            continue
        start = max(first_query - window + 1, lo_window, 0)
        out.append(torch.cat([torch.arange(0, min(sink, start)), torch.arange(start, length)]))
    return out


def kv_spans(decision, hkv: int) -> list[tuple[int, int | None]]:
    """Per KV head: `served.group_spans`, read once per decision (the spans are fixed for the engine's life)."""
    cached = getattr(decision, "_vllm_kv_spans", None)
    if cached is None:
        cached = decision._vllm_kv_spans = group_spans(decision, hkv)
    return cached


def gather(kv_cache, block_rows: torch.Tensor, positions: list[list[torch.Tensor]]):
    """For R requests (their block-table rows [R, blocks]) and per request, per KV head positions: keys, values
    [R, Hkv, M, D] and their positions [R, Hkv, M] (-1 = padding, zeros), in one indexing each."""
    keys, values = kv_views(kv_cache)
    bs, hkv = keys.shape[2], keys.shape[1]
    m = max(len(p) for rows in positions for p in rows)
    pos = torch.full((len(positions), hkv, m), -1, dtype=torch.long)
    for r, rows in enumerate(positions):
        for h, p in enumerate(rows):
            pos[r, h, : len(p)] = p
    safe = pos.clamp(min=0)
    blocks = torch.gather(block_rows.long(), 1, (safe // bs).flatten(1)).view_as(safe)
    heads = torch.arange(hkv).view(1, hkv, 1).expand_as(safe)
    pad = (pos < 0).unsqueeze(-1)
    k = keys[blocks, heads, safe % bs].masked_fill(pad, 0)
    v = values[blocks, heads, safe % bs].masked_fill(pad, 0)
    return k, v, pos


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
        kw = dict(
            scale=self.scale, softcap=self.logits_soft_cap or None, sliding_window=decision.sliding_window
        )
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
                args = {**kw, **pattern_args(decision, length, False, True)}
                tail = min(decision.tail, q1 - q0) if "sink" in args else 0
                out = (
                    dense_tail(q, k, v, tail, None, args) if tail else dispatch.attention(q, k, v, **args)[0]
                )
            else:  # a later chunk of a prompt, over what its heads can still see in the cache
                positions = [kept_positions(decision, hkv, length, first)]
                k, v, k_pos = gather(kv_cache, attn_metadata.block_table[r : r + 1], positions)
                args = {**kw, **pattern_args(decision, k.shape[2], True, True)}
                out = dispatch.attention(
                    q, k, v, q_pos=torch.arange(first, length)[None], k_pos=k_pos, **args
                )[0]
            output[q0:q1] = out[0].transpose(0, 1).reshape(output[q0:q1].shape)
        if decode:
            rows = torch.tensor(decode)
            ends = torch.tensor([lengths[r] for r in decode])
            positions = [kept_positions(decision, hkv, lengths[r], lengths[r] - 1) for r in decode]
            k, v, k_pos = gather(kv_cache, attn_metadata.block_table[rows], positions)
            at = torch.tensor([starts[r] for r in decode])
            q = query[at].unsqueeze(2)  # [R, H, 1, D]
            args = {**kw, **pattern_args(decision, k.shape[2], True, False)}
            out = dispatch.attention(q, k, v, q_pos=(ends - 1)[:, None], k_pos=k_pos, **args)[0]
            output[at] = out[:, :, 0].reshape(len(decode), *output.shape[1:])
        return output


class LlmpatchCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return LlmpatchCPUAttentionImpl
