"""Reading vLLM's paged KV cache for llmpatch's patterns (no vLLM import: the default test suite checks it).

Cache layout (vLLM 0.32 CPU): `[blocks, kv_heads, block_size, 2 * D]`, each block and KV head holding
`block_size * D` keys and then as many values, in the order of the ISA vLLM picked for the layer (`layer.isa`;
`kv_views` has the rule for each, read off vLLM's `cpu_attn_reshape_and_cache`):
- "vec" / "vec16" (fp32, fp16, bf16 without AMX): keys `[D, block_size]`, values `[block_size, D]`;
- "amx" (bf16 with AMX tiles, blocks of a multiple of 32): keys `[block_size / 16, D / 2, 16, 2]` (16 tokens by
  pairs of channels), values `[D / 16, block_size / 2, 16, 2]` (16 channels by pairs of tokens).
A head mask comes only with every key visible (retrieval_mask; vLLM refuses composed methods), so a uniform
head's mean over the keys it may see is a mean over the keys read here.
"""

from __future__ import annotations

import torch

from ..attention import pattern_args
from ..kernels import dispatch, rules
from .served import group_spans


def keeps_every_key(decision, length: int | None = None) -> bool:
    """Whether a request of `length` tokens (None: of any length) sees its whole pattern as causal attention: no
    head mask and no window that drops a key (the largest query-key distance is length - 1). vLLM's own kernel
    computes it; at any length the layer is dense and the plugin leaves it alone."""
    if decision.head_mask is not None:
        return False
    narrowest = decision.narrowest_window()
    if narrowest is None:
        return True
    return length is not None and not bool(rules.narrows(narrowest, length))


LAYOUTS = ("vec", "vec16", "amx")  # the ISAs whose cache order `kv_views` knows


def kv_views(kv_cache: torch.Tensor, isa: str):
    """(keys, L), (values, L'): views [blocks, kv_heads, block_size / L, L, ...] of the cache, token t of a block at
    [t // L, t % L], its D channels in order in the trailing dims (no copy)."""
    nb, hkv, bs, two_d = kv_cache.shape
    d = two_d // 2
    halves = kv_cache.view(nb, hkv, 2, bs * d)
    k, v = halves[:, :, 0], halves[:, :, 1]
    if isa in ("vec", "vec16"):  # keys [D, bs], values [bs, D]
        return (k.view(nb, hkv, 1, d, bs).transpose(3, 4), bs), (v.view(nb, hkv, 1, bs, d), bs)
    if isa == "amx":  # keys [bs/16, D/2, 16 tokens, 2 channels], values [D/16, bs/2, 16 channels, 2 tokens]
        keys = k.view(nb, hkv, bs // 16, d // 2, 16, 2).transpose(3, 4)
        values = v.view(nb, hkv, d // 16, bs // 2, 16, 2).permute(0, 1, 3, 5, 2, 4)
        return (keys, 16), (values, 2)
    raise ValueError(f"isa: one of {', '.join(LAYOUTS)}; got {isa!r}")


def kept_positions(decision, hkv: int, length: int, first_query: int) -> list[torch.Tensor]:
    """Per KV head: the positions < `length` that one of its query heads can see from a query at or after
    `first_query` (its sink, its window; every position for a dense head)."""
    starts = window_starts(decision, hkv, first_query)
    out = []
    for (sink, window), start in zip(kv_spans(decision, hkv), starts, strict=True):
        sinks = torch.arange(0, 0 if window is None else min(sink, start))
        out.append(torch.cat([sinks, torch.arange(start, length)]))
    return out


def chunk_keys(decision, hkv: int, first: int) -> tuple[int, int] | None:
    """A later prompt chunk's keys for the whole layer (the chunk's queries start at `first`, its keys end at the
    prompt's length) as positions [0, s) and [start, length), read as one run:
    `start` is the earliest position some KV head still sees from `first` on, `s` the sinks before it. Inside
    the run, query-key distances are the real ones, so the chunk's queries at the run's end see exactly their
    pattern (a sink moves closer, but stays a sink; a narrower window cannot reach back to the sinks' slots).
    None when the layer's own sliding window would have to cut sinks that moved closer."""
    start = min(window_starts(decision, hkv, first))
    sinks = max(sink for sink, _ in kv_spans(decision, hkv))  # every head's (a dense head's group holds some)
    s = min(sinks, start)
    if decision.sliding_window and 0 < s < start:
        return None
    return s, start


def window_starts(decision, hkv: int, first_query: int) -> list[int]:
    """Per KV head: the earliest position its widest window (or the layer's sliding window, for a dense head)
    still reaches from a query at or after `first_query`."""
    lo = max(0, first_query - decision.sliding_window + 1) if decision.sliding_window else 0
    return [lo if w is None else max(first_query - w + 1, lo) for _, w in kv_spans(decision, hkv)]


def kv_spans(decision, hkv: int) -> list[tuple[int, int | None]]:
    """Per KV head: `served.group_spans`, read once per decision (the spans are fixed for the engine's life)."""
    cached = getattr(decision, "_vllm_kv_spans", None)
    if cached is None:
        cached = decision._vllm_kv_spans = group_spans(decision, hkv)
    return cached


def gather(kv_cache, isa: str, block_rows: torch.Tensor, positions: list[list[torch.Tensor]]):
    """For R requests (their block-table rows [R, blocks]) and per request, per KV head positions: keys, values
    [R, Hkv, M, D] and their positions [R, Hkv, M] (-1 = padding, zeros), in one indexing each."""
    (keys, lk), (values, lv) = kv_views(kv_cache, isa)
    hkv, bs, d = kv_cache.shape[1], kv_cache.shape[2], kv_cache.shape[3] // 2
    m = max(len(p) for rows in positions for p in rows)
    pos = torch.full((len(positions), hkv, m), -1, dtype=torch.long)
    for r, rows in enumerate(positions):
        for h, p in enumerate(rows):
            pos[r, h, : len(p)] = p
    safe = pos.clamp(min=0)
    blocks = torch.gather(block_rows.long(), 1, (safe // bs).flatten(1)).view_as(safe)
    heads = torch.arange(hkv).view(1, hkv, 1).expand_as(safe)
    slot, pad = safe % bs, (pos < 0).unsqueeze(-1)
    k = keys[blocks, heads, slot // lk, slot % lk].reshape(*pos.shape, d).masked_fill(pad, 0)
    v = values[blocks, heads, slot // lv, slot % lv].reshape(*pos.shape, d).masked_fill(pad, 0)
    return k, v, pos


def prompt_chunk(decision, q, kv_cache, isa: str, block_row, length: int, kw: dict) -> torch.Tensor:
    """A later chunk of one prompt: q [1, H, C, D] at positions [length - C, length), over the cache (its block
    table row [1, blocks]); out [1, H, C, D]. One run of keys (`chunk_keys`) on the kernels' band path, or, under
    a sliding window with sinks before the run, every kept key at its position."""
    hkv, first = kv_cache.shape[1], length - q.shape[2]
    run = chunk_keys(decision, hkv, first)
    if run is not None:
        keys = torch.cat([torch.arange(run[0]), torch.arange(run[1], length)])
        k, v, _ = gather(kv_cache, isa, block_row, [[keys] * hkv])
        return dispatch.attention(q, k, v, **kw, **pattern_args(decision, k.shape[2], False, True))[0]
    k, v, k_pos = gather(kv_cache, isa, block_row, [kept_positions(decision, hkv, length, first)])
    args = {**kw, **pattern_args(decision, k.shape[2], True, True)}
    return dispatch.attention(q, k, v, q_pos=torch.arange(first, length)[None], k_pos=k_pos, **args)[0]


def decode(decision, q, kv_cache, isa: str, block_rows, lengths: list[int], kw: dict) -> torch.Tensor:
    """R decode steps in one gather and one call: q [R, H, 1, D], each the last of its `lengths[r]` tokens;
    per KV head only the tokens one of its heads can still see, at their positions. Out [R, H, 1, D]."""
    hkv = kv_cache.shape[1]
    positions = [kept_positions(decision, hkv, n, n - 1) for n in lengths]
    k, v, k_pos = gather(kv_cache, isa, block_rows, positions)
    args = {**kw, **pattern_args(decision, k.shape[2], True, False)}
    q_pos = torch.tensor(lengths)[:, None] - 1
    return dispatch.attention(q, k, v, q_pos=q_pos, k_pos=k_pos, **args)[0]
