"""Public kernel entry points (`llmpatch.kernels`).

Tensors: q [B, H, Nq, D]; k, v [B, Hkv, Nk, D]; the queries are the last Nq positions (causal, aligned at the
end). Output [B, H, Nq, D], or an AttentionResult (out, lse, calib_sinks) with `return_lse=True`.

Optional keywords, shared by both entry points:
- `lengths[B]`: real tokens per sequence, left-padded (the first Nk - lengths[b] key slots are padding);
- `sliding_window`: the layer's own window, applied on top of the pattern;
- `calib[H]` (bool), `calib_beta`, `calib_threshold`, `calib_sinks[B, H, Nk]`: ACT column calibration;
- `head_mask[H]`: HEAD_KEEP / HEAD_UNIFORM / HEAD_ZERO (or the strings "keep", "uniform", "zero");
- `backend`: "reference", "cpu", "triton" (or "sdpa"); None picks by device; LLMPATCH_BACKEND forces one.
"""

from __future__ import annotations

import torch

from . import dispatch
from .rules import HEAD_MODES as _MODES


def _common(q, k, v, lengths, head_mask, calib, kw):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"q, k, v: expected [B, H, N, D] and matching k/v, got {q.shape}, {k.shape}, {v.shape}"
        )
    b, h, nq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"k: expected [B={b}, Hkv dividing {h}, Nk, D={d}], got {tuple(k.shape)}")
    if nq > k.shape[2]:
        raise ValueError(f"q: Nq={nq} exceeds Nk={k.shape[2]}; queries are the last Nq key positions")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=q.device).long()
        kw["start"] = k.shape[2] - lengths
    if head_mask is not None:
        if isinstance(head_mask, (list, tuple)) and head_mask and isinstance(head_mask[0], str):
            bad = sorted(set(head_mask) - set(_MODES))
            if bad:
                raise ValueError(f"head_mask: entries must be one of {sorted(_MODES)}, got {bad}")
            head_mask = [_MODES[m] for m in head_mask]
        kw["head_mask"] = torch.as_tensor(head_mask, dtype=torch.int8, device=q.device).view(h)
    if calib is not None:
        kw["calib"] = torch.as_tensor(calib, dtype=torch.bool, device=q.device).view(h)
    return kw


def sink_window_attention(
    q, k, v, sink, window, *, scale=None, softcap=None, backend=None, lengths=None, sliding_window=None,
    head_mask=None, calib=None, calib_beta=0.4, calib_threshold=0.1, calib_sinks=None, return_lse=False,
):  # fmt: skip
    """Per-query-head sink + window: key j is kept for query i if pos(j) < sink[h] or i - j < window[h]
    (window < 0: every key). `sink` and `window` are int tensors [H] (or scalars)."""
    h = q.shape[1]
    sink = torch.as_tensor(sink, device=q.device).long().expand(h).contiguous()
    window = torch.as_tensor(window, device=q.device).long().expand(h).contiguous()
    if bool((sink < 0).any()):
        raise ValueError("sink: must be >= 0")
    kw = dict(scale=scale, softcap=softcap, sliding_window=sliding_window, sink=sink, window=window,
              calib_beta=calib_beta, calib_threshold=calib_threshold, calib_sinks=calib_sinks)  # fmt: skip
    kw = _common(q, k, v, lengths, head_mask, calib, kw)
    return _run(q, k, v, backend, return_lse, kw)


def block_sparse_attention(
    q, k, v, kv_count, kv_index, block_size=64, *, scale=None, softcap=None, backend=None, lengths=None,
    sliding_window=None, head_mask=None, calib=None, calib_beta=0.4, calib_threshold=0.1, calib_sinks=None,
    return_lse=False,
):  # fmt: skip
    """Compact block lists: kv_count[B|1, H|Hkv, QB] and kv_index[B|1, H|Hkv, QB, MAX_K] (int32, sorted block
    ids); lists per KV head are shared by the query heads of the group (one K/V load on Triton)."""
    b, h, nq, _ = q.shape
    qb = (nq + block_size - 1) // block_size
    if (
        kv_index.dim() != 4
        or kv_index.shape[1] not in (h, k.shape[1])
        or kv_index.shape[2] != qb
        or kv_count.shape != kv_index.shape[:3]
    ):
        raise ValueError(
            f"kv_index: expected [B, H={h} or Hkv={k.shape[1]}, QB={qb}, MAX_K] with kv_count [B, H, QB] for Nq={nq}, "
            f"block_size={block_size}; got {tuple(kv_index.shape)} and {tuple(kv_count.shape)}"
        )  # fmt: skip
    kw = dict(scale=scale, softcap=softcap, sliding_window=sliding_window, block_size=block_size,
              kv_count=kv_count.expand(b, -1, -1), kv_index=kv_index.expand(b, -1, -1, -1),
              calib_beta=calib_beta, calib_threshold=calib_threshold, calib_sinks=calib_sinks)  # fmt: skip
    kw = _common(q, k, v, lengths, head_mask, calib, kw)
    return _run(q, k, v, backend, return_lse, kw)


def _run(q, k, v, backend, return_lse, kw):
    if return_lse:
        return dispatch.attention_lse(q, k, v, backend=backend, **kw)
    return dispatch.attention(q, k, v, backend=backend, **kw)[0]
