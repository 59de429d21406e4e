"""CPU fast path: exact, and proportional to the pattern's density.

- Static patterns (dense, the layer's sliding window, per-head sink + window) run in query-row chunks. Each
  chunk reads only the keys its rows can see: the sink slots plus the band from the chunk's widest window to
  its last query, so the work is O(N x (sink + window + chunk)) instead of O(N^2). Inside a chunk a small
  [B, H, rows, keys] mask carries the exact token-level pattern. Per-head spans that differ a lot (MoA's plans)
  run once per group of heads with equal spans, each over its own band.
- Block lists run on `torch.compile(flex_attention)` with a BlockMask built from the compact layout, from
  CROSSOVER_KEYS keys up; below that they run as the same pattern through the row-chunked masked path.
  (Static patterns could run on flex too; measured on 2 cores the row chunks are within 5-10% of it and need
  no compilation, no inductor in memory and no (N/B)^2 block table, so they stay on the row chunks.)
- A plain causal prefill with no padding and no pattern is one `is_causal=True` SDPA call.
- Head masks: "zero" rows are 0; "uniform" rows average V over the visible keys with prefix sums (O(N x D)).
- Softcap, and any call that needs the LSE, uses an explicit fp32 softmax per chunk instead of SDPA.
ACT calibration needs column sums over every query row; it is not on this path (dispatch sends it to the
reference, chunked).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import rules, sdpa
from .layout import cdiv, to_flex_block_mask
from .reference import block_mask, per_query_head
from .rules import HEAD_KEEP

# Block lists run on flex_attention from this many keys. Measured on 2 cores (8 heads, d=64, fp32, densities
# 10-25%): flex 1.5-1.8 ms against 11 ms for masked row chunks at 512 keys, 49 ms against 390 ms at 4096; at 256
# keys flex (1.4-1.7 ms) is still faster than the masked chunks (5-6 ms). The first call per process compiles
# (about 10 s on 2 cores; inductor caches it on disk).
CROSSOVER_KEYS = 256
MASK_ELEMENTS = 1 << 22  # mask elements per row chunk (B x H x rows x keys)
DENSE_FALLBACK_KEYS = 768  # up to here a static pattern runs as one masked SDPA call (crossover measured
# end to end on SmolLM2, window 256: one call wins at 512 keys (1.13x vs 0.86x), the band at 1024 (1.04x vs 0.95x))
BAND_DIV = 4  # band chunks hold about window / BAND_DIV rows (measured: 4 beats 2 and 8 at 8k-16k)


def _use_flex(nq, nk, block, return_lse) -> bool:
    return nk >= CROSSOVER_KEYS and nq >= block and not return_lse  # (flex on CPU returns no LSE)


def supports(*, calib=None, **_) -> bool:
    return not (calib is not None and bool(calib.any()))


def attention(
    q, k, v, *, scale=None, softcap=None, start=None, key_padding=None, q_pos=None, k_pos=None, k_spans=None,
    sliding_window=None, sink=None, window=None, kv_count=None, kv_index=None, block_size=64, head_mask=None,
    return_lse=False, **_,
):  # fmt: skip
    """Same contract as `reference.attention` (without ACT); returns out, or (out, lse) with return_lse."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    static = k_pos is None and kv_index is None and head_mask is None and not return_lse
    if static and torch.compiler.is_compiling():  # traced: the same pattern without data-dependent Python
        return traced_static(q, k, v, scale=scale, softcap=softcap, start=start, key_padding=key_padding,
                             sliding_window=sliding_window, sink=sink, window=window)  # fmt: skip
    if k_pos is not None:  # a cache with explicit positions (a ring): few keys, one masked call per row chunk
        if k_spans is not None:  # each position head's slots lie in one span: attend per span
            out, lse = _spans(
                q, k, v, scale, softcap, q_pos, k_pos, k_spans, sliding_window, sink, window, return_lse
            )
        else:
            out, lse = _positioned(
                q, k, v, scale, softcap, q_pos, k_pos, sliding_window, sink, window, return_lse
            )
        if head_mask is not None and bool((head_mask != HEAD_KEEP).any()):
            out = rules.apply_head_mask(out, v, head_mask, q_pos, k_pos, sliding_window=sliding_window)
        return (out, lse) if return_lse else out
    if kv_index is not None:
        kv_count, kv_index = per_query_head(kv_count, kv_index, h)
    if sink is not None and window is not None and not any(0 <= w < nk for w in window.tolist()):
        sink = window = None  # every window reaches all keys: no pattern
    plain = sink is None and kv_index is None and sliding_window is None and key_padding is None
    plain &= start is None or not bool((start > 0).any())
    out, lse = None, None
    if nq == 1 and kv_index is None and key_padding is None and softcap is None and not return_lse:
        out = _decode_band(q, k, v, scale, start, sliding_window, sink, window)  # None if it does not apply
    if out is not None:
        pass  # the decode fast path ran
    elif plain and nq in (1, nk) and softcap is None and not return_lse:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=nq > 1, scale=scale, enable_gqa=h != k.shape[1]
        )
    elif kv_index is not None and _use_flex(nq, nk, block_size, return_lse):
        out, lse = _flex(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window,
                         kv_count, kv_index, block_size)  # fmt: skip
    elif kv_index is None and _split_pays(sink, window, nk):
        out, lse = _by_span(
            q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window, return_lse
        )
    else:
        out, lse = _row_chunks(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window,
                               kv_count, kv_index, block_size, return_lse)  # fmt: skip
    if head_mask is not None and bool((head_mask != HEAD_KEEP).any()):
        qp, kp = rules.token_positions(b, nq, nk, start, key_padding, q.device)
        out = rules.apply_head_mask(out, v, head_mask, qp, kp, sliding_window=sliding_window, ordered=True)
    return (out, lse) if return_lse else out


def _split_pays(sink, window, nk) -> bool:
    """Per-head sink + window on a long input (band chunks) whose heads read very different bands: one pass per
    group of equal spans reads under 3/4 of the keys one pass at the widest band would (MoA's plans)."""
    if sink is None or nk <= DENSE_FALLBACK_KEYS or len(_span_pairs(sink, window)) < 2:
        return False
    reach = [nk if w < 0 else min(nk, s + w) for s, w in _span_pairs(sink, window, unique=False)]
    return sum(reach) < 0.75 * len(reach) * max(reach)


def _span_pairs(sink, window, unique=True) -> list[tuple[int, int]]:
    pairs = list(zip(sink.tolist(), window.tolist(), strict=True))
    return sorted(set(pairs)) if unique else pairs


def _by_span(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window, need_lse):
    """`_row_chunks` once per group of query heads with the same (sink, window), each over its own band (its
    heads' keys and values picked per query head, so a group need not hold whole KV groups)."""
    b, h, nq, d = q.shape
    g = h // k.shape[1]
    out = torch.empty(b, h, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device) if need_lse else None
    pairs = _span_pairs(sink, window, unique=False)
    for s_w in _span_pairs(sink, window):
        heads = [i for i, p in enumerate(pairs) if p == s_w]
        idx, kv = torch.tensor(heads), torch.tensor(heads) // g
        o, part = _row_chunks(q[:, idx], k[:, kv], v[:, kv], scale, softcap, start, key_padding, sliding_window,
                              sink[idx], window[idx], None, None, 0, need_lse)  # fmt: skip
        out[:, idx] = o
        if need_lse:
            lse[:, idx] = part
    return out, lse


def _spans(q, k, v, scale, softcap, q_pos, k_pos, spans, sliding_window, sink, window, need_lse):
    """Keys at explicit positions where position head p's slots are k_pos[:, p, lo:hi] (`spans[p] = (lo, hi)`,
    the rest of its row -1): each group of query heads reads only its span."""
    b, h, nq, _ = q.shape
    hp, hkv = k_pos.shape[1], k.shape[1]
    g = h // hp
    out = torch.empty(b, h, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device) if need_lse else None
    for p, (lo, hi) in enumerate(spans):
        qs = slice(p * g, (p + 1) * g)
        kv = p // (hp // hkv) if hp >= hkv else 0
        pattern = (sink[qs], window[qs]) if sink is not None else (None, None)
        o, part_lse = _positioned(q[:, qs], k[:, kv : kv + 1, lo:hi], v[:, kv : kv + 1, lo:hi], scale, softcap,
                                  q_pos, k_pos[:, p : p + 1, lo:hi], sliding_window, *pattern, need_lse)  # fmt: skip
        out[:, qs] = o
        if need_lse:
            lse[:, qs] = part_lse
    return out, lse


def _positioned(q, k, v, scale, softcap, q_pos, k_pos, sliding_window, sink, window, need_lse):
    """Exact attention over keys at explicit positions, in query-row chunks of at most MASK_ELEMENTS."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    heads = h if (k_pos.dim() == 3 or sink is not None) else 1
    rows = max(1, MASK_ELEMENTS // max(1, b * heads * nk))
    out = torch.empty(b, h, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device) if need_lse else None
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        mask = rules.keep_mask(
            q_pos[:, r0:r1], k_pos, h, sliding_window=sliding_window, sink=sink, window=window
        )
        o, chunk_lse = _attend(q[:, :, r0:r1], k, v, mask, scale, softcap, need_lse)
        out[:, :, r0:r1] = o
        if need_lse:
            lse[:, :, r0:r1] = chunk_lse
    return out, lse


def _decode_band(q, k, v, scale, start, sliding_window, sink, window):
    """One decode query under a head-uniform sink + window, every sequence starting at the same slot: the
    visible keys are two slices (sinks, recent window), so attention needs no mask. None if it does not apply."""
    if sink is None:
        return None
    sinks, windows = set(sink.tolist()), set(window.tolist())  # python sets: cheaper than tensor ops per step
    starts = {0} if start is None else set(start.tolist())
    if len(sinks) != 1 or len(windows) != 1 or len(starts) != 1 or min(windows) < 0:
        return None
    nk = k.shape[2]
    st, s0, w0 = starts.pop(), sinks.pop(), windows.pop()
    reach = w0 if sliding_window is None else min(w0, int(sliding_window))
    lo = max(nk - reach, st, 0)  # the window: indices > last - reach, and real tokens only
    s_lo, s_hi = (
        max(st, 0),
        min(max(st + s0, 0), lo),
    )  # sinks: positions [0, sink) before the window
    if sliding_window is not None and s_hi > s_lo and nk - 1 - s_lo >= sliding_window:
        return None  # sinks outside the layer's own window: let the masked path decide per key
    if s_hi > s_lo:
        k, v = (
            torch.cat([k[:, :, s_lo:s_hi], k[:, :, lo:]], 2),
            torch.cat([v[:, :, s_lo:s_hi], v[:, :, lo:]], 2),
        )
    else:
        k, v = k[:, :, lo:], v[:, :, lo:]
    if k.shape[2] == 0:
        return torch.zeros_like(q)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _row_chunks(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window, kv_count, kv_index,
                bs, need_lse):  # fmt: skip
    b, h, nq, d = q.shape
    nk = k.shape[2]
    q_pos_all, k_pos_all = rules.token_positions(b, nq, nk, start, key_padding, q.device)
    st_lo = 0 if start is None else int(start.clamp(min=0).min())  # earliest real token of the batch
    st_hi = 0 if start is None else int(start.clamp(min=0).max())
    # Keys beyond a query's reach are skipped: reach = widest window (layer's sliding window included).
    reach = nk
    if sink is not None and bool((window >= 0).all()):
        reach = int(window.max())
    if sliding_window is not None:
        reach = min(reach, int(sliding_window))
    sink_end = st_hi + int(sink.max()) if sink is not None else 0
    if sink is not None and bool((sink == sink[0]).all() and (window == window[0]).all()):
        sink, window = sink[:1], window[:1]  # one pattern for every head: the mask broadcasts over heads
    per_head = (sink is not None and sink.numel() > 1) or kv_index is not None
    rows = max(1, MASK_ELEMENTS // max(1, b * (h if per_head else 1) * min(nk, reach + sink_end + 256)))
    if nk <= DENSE_FALLBACK_KEYS and kv_index is None and b * nq * nk <= MASK_ELEMENTS:
        rows = nq  # short input: the pattern as one masked SDPA call (its mask is shared by every layer)
    elif reach < nk:  # a band: short chunks keep the keys read per row near sink + window
        rows = min(rows, max(128, min(1024, reach // BAND_DIV // 64 * 64)))
    if kv_index is not None:
        rows = max(bs, rows // bs * bs) if nq > bs else nq
    start_free = start is None or not bool((start != 0).any())
    steady_masks = {}  # full band chunks past the sinks share one mask; kept for this call only, so no mask
    # stays alive between layers (it would add to the pass's peak, which sits in the MLP)
    sink_key = None if sink is None else (tuple(sink.tolist()), tuple(window.tolist()))
    out = torch.empty(b, nq, h, d, dtype=q.dtype, device=q.device).transpose(
        1, 2
    )  # [B, N, H, D] memory: no copy later
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device) if need_lse else None
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        kend = nk - nq + r1  # the chunk's last query sees keys [0, kend)
        lo = max(st_lo, nk - nq + r0 - reach + 1, 0)
        keys = torch.arange(kend, device=q.device) if lo <= sink_end else torch.cat(
            [torch.arange(min(sink_end, kend), device=q.device), torch.arange(lo, kend, device=q.device)]
        )  # fmt: skip
        contiguous = keys.numel() == kend
        s_end = min(sink_end, kend)  # two slices copy faster than an index gather
        kc = k[:, :, :kend] if contiguous else torch.cat([k[:, :, :s_end], k[:, :, lo:kend]], 2)
        vc = v[:, :, :kend] if contiguous else torch.cat([v[:, :, :s_end], v[:, :, lo:kend]], 2)
        # Past the sinks, with no padding and no block list, every full chunk has the same mask: build it once.
        steady = start_free and key_padding is None and kv_index is None and r1 - r0 == rows
        steady &= not contiguous or (r0 == 0 and r1 == nq)  # band chunks past the sinks, or the only chunk
        # ...except where the layer's own window hides sinks from some rows (absolute positions): the number of
        # sinks the chunk's first and last query no longer see is part of the mask's identity.
        hidden = None
        if sliding_window is not None and sink_end:
            hidden = tuple(min(sink_end, max(0, nk - nq + r - sliding_window + 1)) for r in (r0, r1 - 1))
        key = (
            b,
            rows,
            sink_end,
            kend - lo,
            kend if contiguous else None,
            reach,
            sliding_window,
            hidden,
            sink_key,
            q.dtype,
            q.device,
            softcap is None and not need_lse,
        )
        key = key if steady else None
        cached = steady_masks.get(key) if steady else None
        if cached is None:
            mask = rules.keep_mask(q_pos_all[:, r0:r1], k_pos_all[:, keys], h, sliding_window=sliding_window,
                                   sink=sink, window=window)  # fmt: skip
            if kv_index is not None:
                mask = mask & block_mask(kv_count, kv_index, bs, r1 - r0, kend, r0)[..., keys]
            sdpa_ready = softcap is None and not need_lse
            cached = (None if sdpa_ready else mask, _additive(mask, q.dtype) if sdpa_ready else None)
            if steady:
                steady_masks[key] = cached
        o, chunk_lse = _attend(q[:, :, r0:r1], kc, vc, cached[0], scale, softcap, need_lse, cached[1])
        out[:, :, r0:r1] = o
        if need_lse:
            lse[:, :, r0:r1] = chunk_lse
    return out, lse


def _additive(mask, dtype):
    """An additive float mask takes SDPA's fused CPU kernel without a per-call bool conversion."""
    seen = mask.any(-1, keepdim=True)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf")), (
        None if bool(seen.all()) else seen
    )


def _attend(q, k, v, mask, scale, softcap, need_lse, prepared=None):
    """Exact attention of a chunk under a bool mask [B, 1|H, rows, keys]; fully masked rows give 0."""
    h, hkv = q.shape[1], k.shape[1]
    if softcap is None and not need_lse:
        additive, seen = prepared if prepared is not None else _additive(mask, q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale, enable_gqa=h != hkv)
        return (o if seen is None else torch.where(seen, o, torch.zeros_like(o))), None
    b, _, rows, d = q.shape
    g = h // hkv
    qg = q.reshape(b, hkv, g * rows, d).float()
    s = torch.matmul(qg, k.float().transpose(-1, -2)).view(b, hkv, g, rows, -1) * scale
    s = rules.soft_cap(s, softcap)
    m = mask.view(b, -1, 1, rows, mask.shape[-1]) if mask.shape[1] == 1 else mask.view(b, hkv, g, rows, -1)
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse.clamp(min=-1e30))
    o = torch.matmul(p.view(b, hkv, g * rows, -1), v.float()).view(b, h, rows, d)
    return o.to(q.dtype), lse.view(b, h, rows)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # shapes turn dynamic after the first recompile


def _mask_mod(q, k, start, key_padding, sliding_window, sink, window):
    """flex's per-element rule (rules.keep) for queries that are the last Nq of Nk contiguous key slots."""
    b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
    off = nk - nq
    st = torch.zeros(b, dtype=torch.long, device=q.device) if start is None else start.long().to(q.device)
    pad = key_padding.to(torch.bool) if key_padding is not None else None

    def mask_mod(bi, hi, qi, ki):
        kp = ki - st[bi]
        if pad is not None:
            kp = torch.where(pad[bi, ki], kp, rules.EMPTY)
        pattern = (sink[hi], window[hi]) if sink is not None else (None, None)
        return rules.keep(
            qi + off - st[bi], kp, sliding_window=sliding_window, sink=pattern[0], window=pattern[1]
        )

    return mask_mod


def _flex(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window, kv_count, kv_index, bs):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    mask_mod = _mask_mod(q, k, start, key_padding, sliding_window, sink, window)

    def score_mod(score, bi, hi, qi, ki):
        return rules.soft_cap(score, softcap)

    qb_n = cdiv(nq, bs)
    if kv_count.shape[-1] != qb_n:
        raise ValueError(f"kv_count: expected {qb_n} query blocks for Nq={nq}, block_size={bs}")
    block = to_flex_block_mask(kv_count.expand(b, h, -1), kv_index.expand(b, h, -1, -1), bs, nq, nk, mask_mod)
    out = _compiled_flex()(
        q, k, v, score_mod=score_mod if softcap is not None else None, block_mask=block, scale=scale,
        enable_gqa=h != k.shape[1],
    )  # fmt: skip
    return torch.nan_to_num(out, nan=0.0), None  # (flex on CPU returns no LSE; empty rows are 0 already)


def traced_static(q, k, v, *, scale, softcap, start, key_padding, sliding_window, sink, window):
    """A static pattern (dense, sliding window, per-head sink + window, padding) with no data-dependent Python,
    for torch.compile: the masked SDPA row chunks of `sdpa.masked_chunks` (never an N x N mask; the work is
    the dense causal one), or one causal SDPA call when nothing restricts it."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    plain = (
        sink is None and key_padding is None and start is None and sliding_window is None and softcap is None
    )
    if plain and (nq == 1 or nq == nk):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=nq > 1, scale=scale, enable_gqa=h != k.shape[1]
        )
    return sdpa.masked_chunks(q, k, v, scale, start, key_padding, sliding_window, sink, window, softcap)
