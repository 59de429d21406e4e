"""Public kernel entry points (`llmpatch.kernels`).

Tensors: q [B, H, Nq, D]; k, v [B, Hkv, Nk, D]; the queries are the last Nq positions (causal, aligned at the
end). Output [B, H, Nq, D], or an AttentionResult (out, lse, calib_sinks) with `return_lse=True`.

Optional keywords, shared by both entry points:
- `lengths[B]`: real tokens per sequence, left-padded (the first Nk - lengths[b] key slots are padding);
- `sliding_window`: the layer's own window, applied on top of the pattern;
- `calib[H]` (bool), `calib_beta`, `calib_threshold`, `calib_sinks[B, H, Nk]`: ACT column calibration;
- `head_mask[H]`: HEAD_KEEP / HEAD_UNIFORM / HEAD_ZERO (or the strings "keep", "uniform", "zero");
- `backend`: "reference", "cpu", "triton" (or "sdpa"); None picks by device; LLMPATCH_BACKEND forces one;
- `check` (default True): also check the values of the index and length arguments (kv_index, kv_count, sink,
  window, lengths, head_mask); each such check reads the tensor (a device sync on CUDA), so timing loops that
  have checked their inputs once pass False. Shapes, dtypes, devices and the scalar arguments are always checked.

Every argument outside its range raises a ValueError that names it.
"""

from __future__ import annotations

import torch

from . import dispatch
from .rules import HEAD_MODES as _MODES

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _ints(name: str, x, device, shape=None, lo=None, hi=None, check: bool = True) -> torch.Tensor:
    """An integer tensor (Python ints, int tensors, or floats that are whole numbers), checked for shape and
    range; anything else is a ValueError naming `name`."""
    t = torch.as_tensor(x, device=device)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: must hold integers, got dtype {t.dtype}")
    if t.dtype.is_floating_point and check:
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            shown = t.flatten()[:8].tolist() if isinstance(x, torch.Tensor) else x
            raise ValueError(f"{name}: must hold integers, got {shown}")
    t = t.long()
    if shape is not None and tuple(t.shape) not in shape:
        raise ValueError(f"{name}: expected shape {' or '.join(map(str, shape))}, got {tuple(t.shape)}")
    if not check:
        return t
    if lo is not None and t.numel() and int(t.min()) < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {int(t.min())}")
    if hi is not None and t.numel() and int(t.max()) > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {int(t.max())}")
    return t


def _number(name: str, x, *, lo=None, hi=None, lo_open=False, none_ok=True):
    if x is None and none_ok:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: must be a finite number{' or None' if none_ok else ''}, got {x!r}")
    if lo is not None and (x <= lo if lo_open else x < lo) or hi is not None and x > hi:
        rng = (
            f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        )
        raise ValueError(f"{name}: must be in {rng}, got {x!r}")
    return x


def _common(q, k, v, lengths, head_mask, calib, kw, check):
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise ValueError("q, k, v: must be torch tensors")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"q, k, v: expected [B, H, N, D] and matching k/v, got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.dtype not in FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v: must share one floating dtype of {FLOATS}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v: must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, nq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"k: expected [B={b}, Hkv dividing {h}, Nk, D={d}], got {tuple(k.shape)}")
    nk = k.shape[2]
    if nq > nk:
        raise ValueError(f"q: Nq={nq} exceeds Nk={nk}; queries are the last Nq key positions")
    _number("scale", kw.get("scale"), lo=0, lo_open=True)
    _number("softcap", kw.get("softcap"), lo=0, lo_open=True)
    _number("calib_beta", kw.get("calib_beta"), lo=0, hi=1, none_ok=False)
    _number("calib_threshold", kw.get("calib_threshold"), lo=0, lo_open=True, none_ok=False)
    if kw.get("sliding_window") is not None:
        sw = kw["sliding_window"]
        if isinstance(sw, bool) or not isinstance(sw, int) or sw < 1:
            raise ValueError(f"sliding_window: must be an int >= 1 or None, got {sw!r}")
    if kw.get("calib_sinks") is not None:
        cs = kw["calib_sinks"]
        if (
            not isinstance(cs, torch.Tensor)
            or cs.dtype != torch.bool
            or cs.dim() != 3
            or cs.shape[:2] != (b, h)
        ):
            raise ValueError(f"calib_sinks: expected a bool tensor [B={b}, H={h}, Nk], got "
                             f"{getattr(cs, 'dtype', type(cs))} {tuple(getattr(cs, 'shape', ()))}")  # fmt: skip
    if lengths is not None:
        lengths = _ints("lengths", lengths, q.device, shape=[(b,)], lo=1, hi=nk, check=check)
        kw["start"] = nk - lengths
    if head_mask is not None:
        if isinstance(head_mask, (list, tuple)) and head_mask and isinstance(head_mask[0], str):
            bad = sorted(set(head_mask) - set(_MODES))
            if bad:
                raise ValueError(f"head_mask: entries must be one of {sorted(_MODES)}, got {bad}")
            head_mask = [_MODES[m] for m in head_mask]
        modes = sorted(_MODES.values())
        kw["head_mask"] = _ints(
            "head_mask", head_mask, q.device, shape=[(h,)], lo=modes[0], hi=modes[-1], check=check
        ).to(torch.int8)
    if calib is not None:
        t = torch.as_tensor(calib, device=q.device)
        if t.dtype != torch.bool or tuple(t.shape) != (h,):
            raise ValueError(
                f"calib: expected {h} booleans (one per query head), got {t.dtype} {tuple(t.shape)}"
            )
        kw["calib"] = t
    return kw


def sink_window_attention(
    q, k, v, sink, window, *, scale=None, softcap=None, backend=None, lengths=None, sliding_window=None,
    head_mask=None, calib=None, calib_beta=0.4, calib_threshold=0.1, calib_sinks=None, return_lse=False,
    check=True,
):  # fmt: skip
    """Per-query-head sink + window: key j is kept for query i if pos(j) < sink[h] or i - j < window[h]
    (window < 0: every key). `sink` and `window` are int tensors [H] (or scalars)."""
    h = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    device = q.device if isinstance(q, torch.Tensor) else "cpu"
    sink = _ints("sink", sink, device, shape=[(), (h,)], lo=0, check=check).expand(h).contiguous()
    window = _ints("window", window, device, shape=[(), (h,)], lo=-1, check=check).expand(h).contiguous()
    kw = dict(scale=scale, softcap=softcap, sliding_window=sliding_window, sink=sink, window=window,
              calib_beta=calib_beta, calib_threshold=calib_threshold, calib_sinks=calib_sinks)  # fmt: skip
    kw = _common(q, k, v, lengths, head_mask, calib, kw, check)
    return _run(q, k, v, backend, return_lse, kw)


def block_sparse_attention(
    q, k, v, kv_count, kv_index, block_size=64, *, scale=None, softcap=None, backend=None, lengths=None,
    sliding_window=None, head_mask=None, calib=None, calib_beta=0.4, calib_threshold=0.1, calib_sinks=None,
    return_lse=False, check=True,
):  # fmt: skip
    """Compact block lists: kv_count[B|1, H|Hkv, QB] and kv_index[B|1, H|Hkv, QB, MAX_K] (int32, sorted block
    ids); lists per KV head are shared by the query heads of the group (one K/V load on Triton)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: must be an int >= 1, got {block_size!r}")
    if (
        not all(isinstance(t, torch.Tensor) for t in (q, k, kv_count, kv_index))
        or q.dim() != 4
        or k.dim() != 4
    ):
        raise ValueError("q, k, kv_count, kv_index: must be tensors (q, k of shape [B, H, N, D])")
    b, h, nq, _ = q.shape
    qb = (nq + block_size - 1) // block_size
    nkb = (k.shape[2] + block_size - 1) // block_size
    for name, t in (("kv_count", kv_count), ("kv_index", kv_index)):
        if t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(
                f"{name}: must be an int32 / int64 tensor on {q.device}, got {t.dtype} on {t.device}"
            )
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
    if check and kv_count.numel() and (int(kv_count.min()) < 0 or int(kv_count.max()) > kv_index.shape[3]):
        raise ValueError(f"kv_count: must be in 0..MAX_K={kv_index.shape[3]}, got {int(kv_count.min())}.."
                         f"{int(kv_count.max())}")  # fmt: skip
    listed = (
        kv_index[torch.arange(kv_index.shape[3], device=q.device) < kv_count.unsqueeze(-1)] if check else None
    )
    if check and listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= nkb):
        raise ValueError(f"kv_index: listed blocks must be in 0..{nkb - 1} (Nk={k.shape[2]}, block_size="
                         f"{block_size}), got {int(listed.min())}..{int(listed.max())}")  # fmt: skip
    kw = dict(scale=scale, softcap=softcap, sliding_window=sliding_window, block_size=block_size,
              kv_count=kv_count.expand(b, -1, -1), kv_index=kv_index.expand(b, -1, -1, -1),
              calib_beta=calib_beta, calib_threshold=calib_threshold, calib_sinks=calib_sinks)  # fmt: skip
    kw = _common(q, k, v, lengths, head_mask, calib, kw, check)
    return _run(q, k, v, backend, return_lse, kw)


def _run(q, k, v, backend, return_lse, kw):
    if return_lse:
        return dispatch.attention_lse(q, k, v, backend=backend, **kw)
    return dispatch.attention(q, k, v, backend=backend, **kw)[0]
