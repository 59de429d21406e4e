"""Reference attention backend: pure torch, exact, the oracle every other backend is tested against.

It materialises the full [B, H, Nq, Nk] score matrix, so it is for tests and short inputs only.

Layout conventions (shared by every backend):
- q is [B, H, Nq, D]; k and v are [B, Hkv, Nk, D]; H is a multiple of Hkv (GQA, query head h reads KV head
  h // (H // Hkv)).
- The queries are the last Nq key slots (causal, aligned at the end): query i sits at key index Nk - Nq + i.
- Padding is compact: `start[B]` is the key index of each sequence's first real token (left padding sits before
  it; it may be <= 0 when a sliding cache dropped the pads). Token positions are `index - start[b]`.
  An optional `key_padding[B, Nk]` (True = real token) covers masks with holes.
- Static per-head patterns are analytic: a key is kept if its position is < sink[h] or the query is less than
  window[h] positions after it (window < 0 means unlimited). `sliding_window` is the layer's own window.
- Dynamic patterns are block lists over key indices: kv_index[B, H, QB, MAX_K] (sorted block ids),
  kv_count[B, H, QB] valid entries (or [B, Hkv, ...]: one list per KV head, shared by its query heads); query block qb covers query rows [qb * block_size, (qb + 1) * block_size).
- A fully masked row outputs 0 and has lse -inf.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

HEAD_KEEP, HEAD_UNIFORM, HEAD_ZERO = 0, 1, 2


class AttentionResult(NamedTuple):
    out: torch.Tensor  # [B, H, Nq, D], dtype of q
    lse: torch.Tensor  # [B, H, Nq], fp32 (fp64 for fp64 inputs), natural log, -inf on fully masked rows
    calib_sinks: torch.Tensor | None  # [B, H, Nk] bool: the ACT sink set used per head (False for others)


def positions(
    b: int, nq: int, nk: int, start: torch.Tensor | None, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions of queries [B, Nq] and keys [B, Nk]."""
    if start is None:
        start = torch.zeros(b, dtype=torch.long, device=device)
    start = start.to(device=device, dtype=torch.long).view(b, 1)
    k_pos = torch.arange(nk, device=device).view(1, nk) - start
    q_pos = torch.arange(nk - nq, nk, device=device).view(1, nq) - start
    return q_pos, k_pos


def visible_mask(q_pos, k_pos, *, start=None, key_padding=None, sliding_window=None) -> torch.Tensor:
    """[B, 1, Nq, Nk] bool: causal, not padding, inside the layer's sliding window."""
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    mask = (kp <= qp) & (kp >= 0)
    if sliding_window is not None:
        mask &= (qp - kp) < sliding_window
    if key_padding is not None:
        mask &= key_padding[:, None, None, :].to(torch.bool)
    return mask


def static_mask(q_pos, k_pos, sink: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """[B, H, Nq, Nk] bool for per-head sink + window (window < 0: unlimited)."""
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    sink = sink.view(1, -1, 1, 1).to(q_pos.device)
    window = window.view(1, -1, 1, 1).to(q_pos.device)
    return (kp < sink) | (window < 0) | ((qp - kp) < window)


def block_mask(kv_count, kv_index, block_size: int, nq: int, nk: int, r0: int = 0) -> torch.Tensor:
    """[B, H, Nq, Nk] bool from the compact block list, for query rows [r0, r0 + Nq) (dense: for the oracle,
    tests and row-chunked fallbacks only)."""
    b, h, qb, max_k = kv_index.shape
    n_kb = (nk + block_size - 1) // block_size
    valid = torch.arange(max_k, device=kv_index.device).view(1, 1, 1, max_k) < kv_count.unsqueeze(-1)
    valid &= (kv_index >= 0) & (kv_index < n_kb)  # blocks past the keys select nothing
    blocks = torch.zeros(b, h, qb, n_kb + 1, dtype=torch.bool, device=kv_index.device)
    idx = torch.where(valid, kv_index.long(), n_kb)  # invalid entries go to a spare column
    blocks.scatter_(-1, idx, True)
    blocks = blocks[..., :n_kb]
    rows = ((torch.arange(nq, device=kv_index.device) + r0) // block_size).clamp(max=qb - 1)
    cols = torch.arange(nk, device=kv_index.device) // block_size
    return blocks[:, :, rows][..., cols]


def per_query_head(kv_count, kv_index, h: int):
    """Block lists given per KV head ([B, Hkv, ...], shared by a GQA group) repeated to per query head."""
    if kv_index.shape[1] != h:
        g = h // kv_index.shape[1]
        kv_count, kv_index = kv_count.repeat_interleave(g, 1), kv_index.repeat_interleave(g, 1)
    return kv_count, kv_index


def find_sinks(col_sum: torch.Tensor, col_count: torch.Tensor, threshold: float) -> torch.Tensor:
    """ACT's sink set [B, H, Nk] from column sums of A and the number of queries that see each key: mean
    column score above `threshold`, minus the first such key (the initial sink is never calibrated)."""
    sinks = col_sum / col_count.clamp(min=1) > threshold
    first = torch.where(sinks.any(-1), sinks.float().argmax(-1), -1)
    return sinks & (torch.arange(sinks.shape[-1], device=sinks.device) != first.unsqueeze(-1))


def act_calibrate(probs, allowed, calib, beta: float, threshold: float, sinks=None):
    """ACT (METHODS.md §1) on post-softmax probabilities [B, H, Nq, Nk] for heads where calib[h] is True.

    With `sinks` [B, H, Nk] given (decode), they are reused; otherwise found online from column means.
    Returns (probs, sinks used).
    """
    b, h, nq, nk = probs.shape
    heads = calib.view(1, h, 1).to(probs.device)
    if sinks is None:
        sinks = find_sinks(probs.sum(dim=2), allowed.sum(dim=2), threshold)
    else:
        sinks = sinks[..., :nk].to(torch.bool)
        if sinks.shape[-1] < nk:
            sinks = torch.nn.functional.pad(sinks, (0, nk - sinks.shape[-1]))
    sinks = sinks & heads
    s = sinks.unsqueeze(2)
    m = (probs * s).sum(-1, keepdim=True)
    guard = (1 - m) <= 1e-6  # a row that is all sink mass is left unchanged
    factor = torch.where(guard, torch.ones_like(m), (1 - beta * m) / (1 - m).clamp(min=1e-6))
    calibrated = torch.where(s, probs * beta, probs * factor)
    return torch.where(guard, probs, calibrated), sinks


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    start: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    sliding_window: int | None = None,
    sink: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    kv_count: torch.Tensor | None = None,
    kv_index: torch.Tensor | None = None,
    block_size: int = 64,
    head_mask: torch.Tensor | None = None,
    calib: torch.Tensor | None = None,
    calib_beta: float = 0.4,
    calib_threshold: float = 0.1,
    calib_sinks: torch.Tensor | None = None,
    act_columns: bool = False,
) -> AttentionResult:
    """Attention of q over k, v (see the module docstring). With `act_columns`, returns instead ACT's column
    statistics before any calibration: (sum of A over rows, number of rows seeing each key), each [B, H, Nk]."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"q heads ({h}) must be a multiple of kv heads ({hkv})")
    scale = d**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 accumulation at least
    k = k.repeat_interleave(h // hkv, dim=1).to(acc)
    v = v.repeat_interleave(h // hkv, dim=1).to(acc)

    scores = torch.matmul(q.to(acc), k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap

    q_pos, k_pos = positions(b, nq, nk, start, q.device)
    visible = visible_mask(q_pos, k_pos, key_padding=key_padding, sliding_window=sliding_window)
    allowed = visible.expand(b, h, nq, nk)
    if sink is not None and window is not None:
        allowed = allowed & static_mask(q_pos, k_pos, sink, window)
    if kv_index is not None:
        kv_count, kv_index = per_query_head(kv_count, kv_index, h)
        allowed = allowed & block_mask(kv_count, kv_index, block_size, nq, nk)

    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp(min=-1e30))
    probs = torch.where(allowed, probs, torch.zeros_like(probs))

    if act_columns:
        return probs.sum(dim=2), allowed.sum(dim=2)
    used_sinks = None
    if calib is not None and bool(calib.any()):
        probs, used_sinks = act_calibrate(probs, allowed, calib, calib_beta, calib_threshold, calib_sinks)

    if head_mask is not None and bool((head_mask != HEAD_KEEP).any()):
        hm = head_mask.view(1, h, 1, 1).to(q.device)
        vis = visible.expand(b, h, nq, nk).to(probs.dtype)
        uniform = vis / vis.sum(-1, keepdim=True).clamp(min=1)
        probs = torch.where(hm == HEAD_UNIFORM, uniform, probs)
        probs = torch.where(hm == HEAD_ZERO, torch.zeros_like(probs), probs)

    out = torch.matmul(probs, v).to(q.dtype)
    return AttentionResult(out, lse, used_sinks)
