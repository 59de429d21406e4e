"""Exact masked-SDPA backend for static patterns (dense, sliding window, per-head sink + window, padding).

It computes the same pattern as the reference, densely, with torch's scaled_dot_product_attention. Queries are
processed in row chunks whose keys end at the chunk's last query, so no N x N mask is ever built; a plain causal
prefill with no padding and no pattern is one `is_causal=True` call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import rules

CHUNK_ELEMENTS = 1 << 22  # mask elements per chunk (rows x keys x heads)


def supports(*, softcap=None, kv_index=None, head_mask=None, calib=None, k_pos=None, **_) -> bool:
    needs_probs = head_mask is not None and bool(head_mask.any())
    needs_probs |= calib is not None and bool(calib.any())
    return softcap is None and kv_index is None and k_pos is None and not needs_probs


def attention(
    q, k, v, *, scale=None, start=None, key_padding=None, sliding_window=None, sink=None, window=None, **_
):
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    gqa = h != hkv
    # A window reaching every key restricts nothing: such heads take the plain causal path.
    has_pattern = sink is not None and window is not None and bool(rules.narrows(window, nk).any())
    padded = key_padding is not None or (start is not None and bool((start > 0).any()))
    if not (has_pattern or padded or sliding_window is not None) and nq in (1, nk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=nq > 1, scale=scale, enable_gqa=gqa)

    pattern = dict(sink=sink, window=window) if has_pattern else {}
    return masked_chunks(q, k, v, scale, start, key_padding, sliding_window, **pattern)


def masked_chunks(q, k, v, scale, start=None, key_padding=None, sliding_window=None, sink=None, window=None,
                  softcap=None):  # fmt: skip
    """The pattern in query-row chunks whose keys end at the chunk's last query, with no data-dependent Python
    (so torch.compile traces it whole): at most CHUNK_ELEMENTS mask elements at once, never N x N."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    gqa = h != k.shape[1]
    q_pos_all, k_pos_all = rules.token_positions(b, nq, nk, start, key_padding, q.device)
    heads = h if sink is not None else 1
    # one chunk for a decode step (and no guard on the cache length, so a compiled decode does not recompile)
    rows = 1 if nq == 1 else max(1, CHUNK_ELEMENTS // max(1, nk * heads))
    out = torch.empty_like(q)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        kend = nk - nq + r1  # the chunk's last query sees keys [0, kend)
        mask = rules.keep_mask(
            q_pos_all[:, r0:r1],
            k_pos_all[:, :kend],
            h,
            sliding_window=sliding_window,
            sink=sink,
            window=window,
        )
        qc, kc, vc = q[:, :, r0:r1], k[:, :, :kend], v[:, :, :kend]
        if softcap is None:
            chunk = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=gqa)
        else:  # SDPA has no soft-cap: the explicit softmax
            g = h // k.shape[1]
            scores = torch.matmul(qc.float(), kc.float().repeat_interleave(g, 1).transpose(-1, -2)) * scale
            scores = rules.soft_cap(scores, softcap).masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, -1).nan_to_num(0.0)
            chunk = torch.matmul(probs, vc.float().repeat_interleave(g, 1)).to(q.dtype)
        # SDPA returns NaN on fully masked rows; the contract is 0.
        out[:, :, r0:r1] = torch.where(mask.any(-1, keepdim=True), chunk, torch.zeros_like(chunk))
    return out
