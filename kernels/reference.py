"""Reference attention backend: pure torch, exact, the oracle every other backend is tested against.

It materialises the full [B, H, Nq, Nk] score matrix, so it is for tests and short inputs only (dispatch runs
it in query-row chunks). Every rule comes from `rules.py`.

Layout conventions (shared by every backend):
- q is [B, H, Nq, D]; k and v are [B, Hkv, Nk, D]; H is a multiple of Hkv (GQA, query head h reads KV head
  h // (H // Hkv)).
- Contiguous caches: the queries are the last Nq key slots (causal, aligned at the end). Padding is compact:
  `start[B]` is each row's first real slot (it may be <= 0 when a sliding cache dropped the pads); an optional
  `key_padding[B, Nk]` (True = real token) covers masks with holes.
- Caches that keep tokens out of order (a ring): `q_pos[B, Nq]` and `k_pos[B, Nk]` or `[B, Hp, Nk]` give the
  token positions explicitly (-1 = an empty slot); `start` and `key_padding` are then unused. Hp (position
  heads) divides H; K may have fewer heads (one flat head holding every KV head's slots, each slot -1 for the
  heads it does not belong to). `k_spans[p] = (lo, hi)`, optional, says that head p's slots lie in [lo, hi): a
  hint that lets fast paths skip the rest (the reference ignores it).
- Static per-head patterns are analytic: sink[H], window[H] (window < 0 means unlimited). `sliding_window` is
  the layer's own window.
- Dynamic patterns are block lists over key slots: kv_index[B, H, QB, MAX_K] (sorted block ids),
  kv_count[B, H, QB] valid entries (or [B, Hkv, ...]: one list per KV head, shared by its query heads); query
  block qb covers query rows [qb * block_size, (qb + 1) * block_size).
- A fully masked row outputs 0 and has lse -inf.
- NaN / Inf inputs (the same on every backend; dispatch recomputes a fast path's non-finite output here):
  a non-finite query entry makes its row NaN; a key entry enters the scores as IEEE arithmetic gives it (a NaN
  or +inf score makes the rows that may see the key NaN, a -inf score drops the key); a non-finite value entry
  makes NaN every row that may see that key (in its pattern) and no other row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import rules
from .rules import HEAD_KEEP


class AttentionResult(NamedTuple):
    out: torch.Tensor  # [B, H, Nq, D], dtype of q
    lse: torch.Tensor  # [B, H, Nq], fp32 (fp64 for fp64 inputs), natural log, -inf on fully masked rows
    calib_sinks: torch.Tensor | None  # [B, H, Nk] bool: the ACT sink set used per head (False for others)


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


def query_key_positions(b, nq, nk, *, start=None, key_padding=None, q_pos=None, k_pos=None, device="cpu"):
    """The call's positions: the explicit ones, or those of a contiguous cache (`rules.token_positions`)."""
    if k_pos is not None:
        return q_pos.to(device).long(), k_pos.to(device).long()
    return rules.token_positions(b, nq, nk, start, key_padding, device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    start: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    k_spans: list | None = None,
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
    kk = k.repeat_interleave(h // hkv, dim=1).to(acc)
    vv = v.repeat_interleave(h // hkv, dim=1).to(acc)

    scores = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    scores = rules.soft_cap(scores, softcap)

    qp, kp = query_key_positions(b, nq, nk, start=start, key_padding=key_padding, q_pos=q_pos, k_pos=k_pos,
                                 device=q.device)  # fmt: skip
    allowed = rules.keep_mask(qp, kp, h, sliding_window=sliding_window, sink=sink, window=window)
    allowed = allowed.expand(b, h, nq, nk)
    if kv_index is not None:
        kv_count, kv_index = per_query_head(kv_count, kv_index, h)
        allowed = allowed & block_mask(kv_count, kv_index, block_size, nq, nk)

    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp(min=-1e30))
    probs = torch.where(allowed, probs, torch.zeros_like(probs))

    if act_columns:
        return probs.sum(dim=2), allowed.sum(dim=2)
    bad_v = ~torch.isfinite(vv).all(-1)  # [B, H, Nk]: a masked key's 0 weight must not meet its NaN (0 * NaN)
    poisoned = None
    if bool(bad_v.any()):
        poisoned = (allowed & bad_v.unsqueeze(2)).any(-1, keepdim=True)
        vv = torch.where(bad_v.unsqueeze(-1), torch.zeros_like(vv), vv)
        v = torch.where(~torch.isfinite(v).all(-1, keepdim=True), torch.zeros_like(v), v)
    out = torch.matmul(probs, vv)
    used_sinks = None
    if calib is not None and bool(calib.any()):
        if calib_sinks is None:
            calib_sinks = rules.find_sinks(probs.sum(dim=2), allowed.sum(dim=2), calib_threshold)
        used_sinks = fit_sinks(calib_sinks, nk) & calib.view(1, h, 1).to(q.device)
        s = used_sinks.unsqueeze(2).to(probs.dtype)
        out = rules.act_combine(out, torch.matmul(probs * s, vv), (probs * s).sum(-1), calib_beta)
    if head_mask is not None and bool((head_mask != HEAD_KEEP).any()):
        out = rules.apply_head_mask(out, v, head_mask, qp, kp, sliding_window=sliding_window,
                                    ordered=k_pos is None)  # fmt: skip
    if poisoned is not None:
        out = out.masked_fill(poisoned, float("nan"))
    return AttentionResult(out.to(q.dtype), lse, used_sinks)


def fit_sinks(sinks: torch.Tensor, nk: int) -> torch.Tensor:
    """A sink set [B, H, *] cut or zero-padded to Nk key slots (decode steps add keys past the prefill's)."""
    sinks = sinks[..., :nk].to(torch.bool)
    if sinks.shape[-1] < nk:
        sinks = torch.nn.functional.pad(sinks, (0, nk - sinks.shape[-1]))
    return sinks
