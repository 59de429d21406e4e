"""A per-KV-head compressed cache: some KV heads keep every token, the others only sink + recent slots.

Used by `retrieval_kv` (and meant for MoA's decode). It is a transformers cache *layer* (`SplitLayer`) placed into
the model's own `DynamicCache`, so generate(), cache positions and masks work unchanged:
- `full` KV heads hold [B, F, N, D] as a DynamicLayer would;
- `comp` KV heads hold only the slots some row still needs: slots before max(start) + sink (each row's first
  `sink` real tokens; left padding makes the union a little wider) and the last `recent` slots. `comp_pos`
  records which slot each kept entry is. Pruning runs after each attention call, once at least `PRUNE_EVERY`
  entries can go, so its copies are amortised; memory is bounded by sink + recent + PRUNE_EVERY (+ padding).
- `update()` returns `SplitKV` handles instead of tensors; llmpatch's attention function recognises them and
  attends per group: full heads densely, compressed heads through the analytic sink + window pattern while the
  slots are still contiguous, and through an explicit small attention over the kept slots after pruning.
The query heads of a GQA group share their KV head, so a KV head stays full if any of its query heads must.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

PRUNE_EVERY = 64
ROW_CHUNK_ELEMENTS = 1 << 22  # scores held per chunk of query rows in pos_attention (B x H x rows x keys)


class SplitKV:
    """What a SplitLayer's update() hands to the attention function (the key and the value slot)."""

    def __init__(self, layer: SplitLayer, shape):
        self.layer = layer
        self.shape = shape  # [B, Hkv, seen, D]: looks like the dense cache to shape-reading code

    def attend(self, decision, query, mask, scale, softcap, dispatch):
        return split_attention(decision, query, self, mask, scale, softcap, dispatch)


class SplitLayer(DynamicLayer):
    def __init__(self, num_kv_heads: int, full: list[int], sink: int, recent: int):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.full_idx = torch.tensor(sorted(full), dtype=torch.long)
        self.comp_idx = torch.tensor([i for i in range(num_kv_heads) if i not in set(full)], dtype=torch.long)
        self.sink, self.recent = sink, recent
        self.seen = 0
        self.contiguous = True  # comp still holds every slot 0..seen-1

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.comp_k = self.comp_v = None
        self.comp_pos = torch.zeros(0, dtype=torch.long, device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        fi, ci = self.full_idx.to(self.device), self.comp_idx.to(self.device)
        self.keys = (
            torch.cat([self.keys, key_states[:, fi]], dim=-2) if self.keys.numel() else key_states[:, fi]
        )
        self.values = (
            torch.cat([self.values, value_states[:, fi]], dim=-2)
            if self.values.numel()
            else value_states[:, fi]
        )
        ck, cv = key_states[:, ci], value_states[:, ci]
        self.comp_k = ck if self.comp_k is None else torch.cat([self.comp_k, ck], dim=-2)
        self.comp_v = cv if self.comp_v is None else torch.cat([self.comp_v, cv], dim=-2)
        self.comp_pos = torch.cat([self.comp_pos, torch.arange(self.seen, self.seen + n, device=self.device)])
        self.seen += n
        handle = SplitKV(self, (key_states.shape[0], self.num_kv_heads, self.seen, key_states.shape[-1]))
        return handle, handle

    def prune(self, start: torch.Tensor | None) -> None:
        """Drop compressed slots no later query can see (called after the layer's attention)."""
        first = 0 if start is None else int(start.max())
        keep = (self.comp_pos < first + self.sink) | (self.comp_pos > self.seen - self.recent)
        if int((~keep).sum()) < PRUNE_EVERY:
            return
        idx = keep.nonzero().squeeze(-1)
        self.comp_k, self.comp_v = self.comp_k[:, :, idx].clone(), self.comp_v[:, :, idx].clone()
        self.comp_pos = self.comp_pos[idx]
        self.contiguous = False

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        parts = [self.keys, self.values, self.comp_k, self.comp_v]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def dense_bytes(self) -> int:
        """What a DynamicLayer would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        t = self.keys if self.keys.numel() else self.comp_k
        return 2 * t.shape[0] * self.num_kv_heads * self.seen * t.shape[-1] * t.element_size()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("retrieval_kv: its compressed cache cannot be cropped (assisted decoding)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.comp_k, self.comp_v = self.comp_k[indices], self.comp_v[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rep = lambda t: t.repeat_interleave(repeats, dim=0)  # noqa: E731
            self.keys, self.values, self.comp_k, self.comp_v = map(rep, (self.keys, self.values, self.comp_k,
                                                                         self.comp_v))  # fmt: skip

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))


def kv_bytes(cache: Cache) -> int:
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "kv_bytes"):  # SplitLayer, ringcache.RingLayer
            total += layer.kv_bytes()
        elif getattr(layer, "is_initialized", False):
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


def dense_kv_bytes(cache: Cache) -> int:
    """What the model's own DynamicCache would hold for the same tokens (sliding layers as they are)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "dense_bytes"):
            total += layer.dense_bytes()
        elif getattr(layer, "is_initialized", False):
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


def kv_report(cache: Cache) -> dict:
    """Bytes the cache holds against the model's own dense cache for the same tokens, and how many KV heads the
    compressed layers keep in full."""
    used, dense = kv_bytes(cache), dense_kv_bytes(cache)
    split = [layer for layer in cache.layers if isinstance(layer, SplitLayer)]
    return {"kv_bytes": used, "dense_kv_bytes": dense, "saved": 1 - used / dense if dense else 0.0,
            "full_kv_heads": sum(len(layer.full_idx) for layer in split),
            "compressed_layers_kv_heads": sum(layer.num_kv_heads for layer in split)}  # fmt: skip


def pos_attention(q, k, v, pos, q_pos, sink, window, *, scale, softcap=None, sliding_window=None):
    """Exact attention of q [B, H, Nq, D] at token positions q_pos [B, Nq] over keys k, v [B, Hkv, L, D] at
    positions pos [B, L] (-1 = empty slot), under per-query-head sink [H] and window [H] (-1 = unlimited).
    Query rows go in chunks of at most ROW_CHUNK_ELEMENTS scores; fully masked rows give 0."""
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = h // hkv
    kf, vf = k.float(), v.float()
    kp = pos[:, None, None, :]  # [B, 1, 1, L]
    s_h, w_h = sink.view(1, h, 1, 1), window.view(1, h, 1, 1)
    out = torch.empty(b, h, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, b * h * nk))
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        qp = q_pos[:, None, r0:r1, None]  # [B, 1, rows, 1]
        allowed = (kp >= 0) & (kp <= qp) & ((kp < s_h) | (w_h < 0) | (qp - kp < w_h))
        if sliding_window is not None:
            allowed &= qp - kp < sliding_window
        qg = q[:, :, r0:r1].float().reshape(b, hkv, g * (r1 - r0), d)
        s = torch.matmul(qg, kf.transpose(-1, -2)).view(b, h, r1 - r0, nk) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        o = torch.matmul(p.view(b, hkv, g * (r1 - r0), nk), vf).view(b, h, r1 - r0, -1)
        out[:, :, r0:r1] = o.to(q.dtype)
    return out


def split_attention(decision, query, handle: SplitKV, mask, scale, softcap, dispatch) -> torch.Tensor:
    layer = handle.layer
    b, h, nq, d = query.shape
    g = h // layer.num_kv_heads
    scale = d**-0.5 if scale is None else scale
    out = query.new_empty(b, h, nq, layer.keys.shape[-1] if layer.keys.numel() else layer.comp_v.shape[-1])
    common = dict(scale=scale, softcap=softcap, start=mask.start, key_padding=mask.key_padding,
                  sliding_window=decision.sliding_window, backend=decision.backend)  # fmt: skip
    for idx, is_full in ((layer.full_idx, True), (layer.comp_idx, False)):
        if not idx.numel():
            continue
        qi = (idx.view(-1, 1) * g + torch.arange(g).view(1, -1)).flatten().to(query.device)
        q = query[:, qi]
        if is_full:
            o, _ = dispatch.attention(q, layer.keys, layer.values, **common)
        else:  # the pattern of these heads: decision sink and window (retrieval_kv sets sink and recent)
            sink, window = (
                decision.sink[qi.cpu()].to(query.device),
                decision.window[qi.cpu()].to(query.device),
            )
            if layer.contiguous:
                o, _ = dispatch.attention(q, layer.comp_k, layer.comp_v, sink=sink, window=window, **common)
            else:
                dev = query.device
                st = mask.row_start(b, dev)
                pos = layer.comp_pos.to(dev).view(1, -1) - st.view(b, 1)  # token positions per row
                if mask.key_padding is not None:  # holes in the mask: those slots count as empty
                    pos = torch.where(mask.key_padding.to(dev)[:, layer.comp_pos], pos, -1)
                q_pos = torch.arange(layer.seen - nq, layer.seen, device=dev).view(1, -1) - st.view(b, 1)
                o = pos_attention(q, layer.comp_k, layer.comp_v, pos, q_pos, sink, window, scale=scale,
                                  softcap=softcap)  # fmt: skip
        out[:, qi] = o
    layer.prune(mask.start)
    return out


def cache_argument(model) -> str:
    """The name of the forward's cache keyword ('cache' in recent transformers, 'past_key_values' before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The cache in a model or generate() output ('cache' in recent transformers, 'past_key_values' before)."""
    return out["cache"] if "cache" in out else out.get("past_key_values")


def find_cache(kwargs: dict, name: str):
    """The cache a forward was called with, under its keyword `name` or either spelling; None if none."""
    return next((kwargs[k] for k in (name, "cache", "past_key_values") if kwargs.get(k) is not None), None)


def install(model, make_layers) -> callable:
    """Put SplitLayers (from `make_layers()`: {layer index: SplitLayer factory}) into every fresh DynamicCache
    the model runs with; returns the undo callback."""
    name = cache_argument(model)

    def convert(cache):
        for i, factory in make_layers().items():
            if i < len(cache.layers) and type(cache.layers[i]) is DynamicLayer:
                cache.layers[i] = factory()
        return cache

    def hook(module, args, kwargs):
        cache = find_cache(kwargs, name)
        if isinstance(cache, DynamicCache):
            if cache.get_seq_length() == 0:
                convert(cache)
            return args, kwargs
        use = kwargs.get("use_cache")
        if cache is None and (use if use is not None else getattr(model.config, "use_cache", True)):
            kwargs[name] = convert(DynamicCache(config=model.config))
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return handle.remove
