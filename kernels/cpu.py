"""CPU fast path: exact, and proportional to the pattern's density.

- Static patterns (dense, the layer's sliding window, per-head sink + window) run in query-row chunks. Each
  chunk reads only the keys its rows can see: the sink slots plus the band from the chunk's widest window to
  its last query, so the work is O(N x (sink + window + chunk)) instead of O(N^2). Inside a chunk a small
  [B, H, rows, keys] mask carries the exact token-level pattern.
- Block lists run on `torch.compile(flex_attention)` with a BlockMask built from the compact layout, from
  CROSSOVER_KEYS keys up; below that they run as the same pattern through the row-chunked masked path.
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

from .layout import cdiv, sink_window_blocks, to_flex_block_mask
from .reference import (
    HEAD_KEEP,
    HEAD_UNIFORM,
    HEAD_ZERO,
    block_mask,
    per_query_head,
    positions,
    static_mask,
    visible_mask,
)

# Block lists switch from the masked row-chunk path to flex_attention at this many keys. Measured with
# `llmpatch bench kernels` on 2 cores (benchmarks/RESULTS.md): flex wins from about 2k keys at 10-25% density.
CROSSOVER_KEYS = 2048
FLEX_BLOCK = 64  # block size of the lists built for static patterns
MASK_ELEMENTS = 1 << 22  # mask elements per row chunk (B x H x rows x keys)


def _use_flex(nq, nk, block, return_lse) -> bool:
    return nk >= CROSSOVER_KEYS and nq >= block and not return_lse  # (flex on CPU returns no LSE)


def supports(*, calib=None, **_) -> bool:
    return not (calib is not None and bool(calib.any()))


def attention(
    q, k, v, *, scale=None, softcap=None, start=None, key_padding=None, sliding_window=None, sink=None,
    window=None, kv_count=None, kv_index=None, block_size=64, head_mask=None, return_lse=False, **_,
):  # fmt: skip
    """Same contract as `reference.attention` (without ACT); returns out, or (out, lse) with return_lse."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    if kv_index is not None:
        kv_count, kv_index = per_query_head(kv_count, kv_index, h)
    if sink is not None and window is not None and not bool(((window >= 0) & (window < nk)).any()):
        sink = window = None  # every window reaches all keys: no pattern
    plain = sink is None and kv_index is None and sliding_window is None and key_padding is None
    plain &= start is None or not bool((start > 0).any())
    if plain and nq in (1, nk) and softcap is None and not return_lse:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=nq > 1, scale=scale, enable_gqa=h != k.shape[1]
        )
        lse = None
    elif (kv_index is not None or sink is not None or sliding_window is not None) and _use_flex(
        nq, nk, block_size if kv_index is not None else FLEX_BLOCK, return_lse
    ):
        if kv_index is None:  # the static pattern's own block list
            kv_count, kv_index = sink_window_blocks(
                b, nq, nk, sink if sink is not None else torch.zeros(h, dtype=torch.long),
                window if window is not None else torch.full((h,), -1), FLEX_BLOCK, start=start,
                sliding_window=sliding_window, device=q.device,
            )  # fmt: skip
            block_size = FLEX_BLOCK
        out, lse = _flex(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window,
                         kv_count, kv_index, block_size)  # fmt: skip
    else:
        out, lse = _row_chunks(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window,
                               kv_count, kv_index, block_size, return_lse)  # fmt: skip
    if head_mask is not None and bool((head_mask != HEAD_KEEP).any()):
        out = _apply_head_mask(out, v, head_mask, start, key_padding, sliding_window)
    return (out, lse) if return_lse else out


def _row_chunks(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window, kv_count, kv_index,
                bs, need_lse):  # fmt: skip
    b, h, nq, d = q.shape
    nk = k.shape[2]
    q_pos_all, k_pos_all = positions(b, nq, nk, start, q.device)
    st_lo = 0 if start is None else int(start.clamp(min=0).min())  # earliest real token of the batch
    st_hi = 0 if start is None else int(start.clamp(min=0).max())
    # Keys beyond a query's reach are skipped: reach = widest window (layer's sliding window included).
    reach = nk
    if sink is not None and bool((window >= 0).all()):
        reach = int(window.max())
    if sliding_window is not None:
        reach = min(reach, int(sliding_window))
    sink_end = st_hi + int(sink.max()) if sink is not None else 0
    per_head = sink is not None or kv_index is not None
    rows = max(1, MASK_ELEMENTS // max(1, b * (h if per_head else 1) * min(nk, reach + sink_end + 256)))
    if kv_index is not None:
        rows = max(bs, rows // bs * bs) if nq > bs else nq
    out = torch.empty_like(q)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device) if need_lse else None
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        kend = nk - nq + r1  # the chunk's last query sees keys [0, kend)
        lo = max(st_lo, nk - nq + r0 - reach + 1, 0)
        keys = torch.arange(kend, device=q.device) if lo <= sink_end else torch.cat(
            [torch.arange(min(sink_end, kend), device=q.device), torch.arange(lo, kend, device=q.device)]
        )  # fmt: skip
        contiguous = keys.numel() == kend
        kc = k[:, :, :kend] if contiguous else k[:, :, keys]
        vc = v[:, :, :kend] if contiguous else v[:, :, keys]
        q_pos, k_pos = q_pos_all[:, r0:r1], k_pos_all[:, keys]
        pad = key_padding[:, keys] if key_padding is not None else None
        mask = visible_mask(q_pos, k_pos, key_padding=pad, sliding_window=sliding_window)
        if sink is not None:
            mask = mask & static_mask(q_pos, k_pos, sink, window)
        if kv_index is not None:
            mask = mask & block_mask(kv_count, kv_index, bs, r1 - r0, kend, r0)[..., keys]
        o, chunk_lse = _attend(q[:, :, r0:r1], kc, vc, mask, scale, softcap, need_lse)
        out[:, :, r0:r1] = o
        if need_lse:
            lse[:, :, r0:r1] = chunk_lse
    return out, lse


def _attend(q, k, v, mask, scale, softcap, need_lse):
    """Exact attention of a chunk under a bool mask [B, 1|H, rows, keys]; fully masked rows give 0."""
    h, hkv = q.shape[1], k.shape[1]
    if softcap is None and not need_lse:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != hkv)
        return torch.where(mask.any(-1, keepdim=True), o, torch.zeros_like(o)), None
    b, _, rows, d = q.shape
    g = h // hkv
    qg = q.reshape(b, hkv, g * rows, d).float()
    s = torch.matmul(qg, k.float().transpose(-1, -2)).view(b, hkv, g, rows, -1) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    m = mask.view(b, -1, 1, rows, mask.shape[-1]) if mask.shape[1] == 1 else mask.view(b, hkv, g, rows, -1)
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse.clamp(min=-1e30))
    o = torch.matmul(p.view(b, hkv, g * rows, -1), v.float()).view(b, h, rows, d)
    return o.to(q.dtype), lse.view(b, h, rows)


def _apply_head_mask(out, v, head_mask, start, key_padding, sliding_window):
    """HEAD_ZERO rows -> 0; HEAD_UNIFORM rows -> mean of V over the visible keys (prefix sums, fp64)."""
    b, h, nq, d = out.shape
    hkv, nk = v.shape[1], v.shape[2]
    hm = head_mask.to(out.device)
    out = out.clone()
    out[:, hm == HEAD_ZERO] = 0
    uni = (hm == HEAD_UNIFORM).nonzero().flatten()
    if uni.numel():
        q_pos, k_pos = positions(b, nq, nk, start, v.device)
        real = (k_pos >= 0) if key_padding is None else (k_pos >= 0) & key_padding.to(torch.bool)
        w = real.to(torch.float64)  # [B, Nk]
        cs_v = F.pad(torch.cumsum(v.to(torch.float64) * w[:, None, :, None], dim=2), (0, 0, 1, 0))
        cs_n = F.pad(torch.cumsum(w, dim=1), (1, 0))
        hi = torch.arange(nk - nq, nk, device=v.device) + 1  # exclusive end per query
        lo = (hi - sliding_window).clamp(min=0) if sliding_window is not None else torch.zeros_like(hi)
        kv = uni // (h // hkv)
        total = cs_v[:, kv][:, :, hi] - cs_v[:, kv][:, :, lo]  # [B, U, Nq, D]
        count = (cs_n[:, hi] - cs_n[:, lo]).clamp(min=1)  # [B, Nq]
        out[:, uni] = (total / count[:, None, :, None]).to(out.dtype)
    return out


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, scale, softcap, start, key_padding, sliding_window, sink, window, kv_count, kv_index, bs):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    off = nk - nq
    st = torch.zeros(b, dtype=torch.long, device=q.device) if start is None else start.long().to(q.device)
    sink_t = sink.to(q.device) if sink is not None else None
    window_t = window.to(q.device) if window is not None else None
    pad = key_padding.to(torch.bool) if key_padding is not None else None

    def mask_mod(bi, hi, qi, ki):
        qk = qi + off
        keep = (ki <= qk) & (ki >= st[bi])
        if sliding_window is not None:
            keep = keep & (qk - ki < sliding_window)
        if sink_t is not None:
            keep = keep & ((ki - st[bi] < sink_t[hi]) | (window_t[hi] < 0) | (qk - ki < window_t[hi]))
        if pad is not None:
            keep = keep & pad[bi, ki]
        return keep

    def score_mod(score, bi, hi, qi, ki):
        return torch.tanh(score / softcap) * softcap

    qb_n = cdiv(nq, bs)
    if kv_count.shape[-1] != qb_n:
        raise ValueError(f"kv_count: expected {qb_n} query blocks for Nq={nq}, block_size={bs}")
    block = to_flex_block_mask(kv_count.expand(b, h, -1), kv_index.expand(b, h, -1, -1), bs, nq, nk, mask_mod)
    out = _compiled_flex()(
        q, k, v, score_mod=score_mod if softcap is not None else None, block_mask=block, scale=scale,
        enable_gqa=h != k.shape[1],
    )  # fmt: skip
    return torch.nan_to_num(out, nan=0.0), None  # (flex on CPU returns no LSE; empty rows are 0 already)
