"""A per-KV-head sink + ring-buffer cache (MoA's decode cache; also the StreamingLLM baseline's).

`RingLayer` is a transformers cache *layer* put into the model's own `DynamicCache` (as `kvcache.SplitLayer`
is), so generate(), cache positions and masks work unchanged. It reads its layer's `LayerDecision` when the
first tokens arrive (the spans are fixed by then) and groups the KV heads by the span they must serve:
- a KV head serves the union of its query heads' patterns (GQA): sink = the largest sink of the group's query
  heads, ring = the largest window; a KV head with any dense query head (window -1) keeps every token;
- each group holds k, v [B, Hg, sink + ring, D] and the token position of every slot, pos [B, sink + ring]
  (-1 = empty). Token p of a row goes to slot p while p < sink, else to sink + (p - sink) % ring: the ring
  layout of `llmpatch.kernels.ring`, with positions per row so left padding is never stored.
Memory is exact per group: B x Hg x (sink + ring) x D per tensor, whatever the prompt length.

`update()` hands the attention function a `RingKV` handle holding the new keys and values. The first call
(the prompt) attends over them with the layer's sink + window pattern on the kernel backends, then writes the
survivors into the ring; later calls attend over ring + new tokens (`kvcache.pos_attention`, in query-row chunks,
exact for any number of new tokens because the ring holds each query's last `window` tokens) and then write.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from . import kvcache
from .errors import PatchStateError


class RingKV:
    """What a RingLayer's update() hands to the attention function (as both key and value)."""

    def __init__(self, layer: RingLayer, k, v, first: int):
        self.layer, self.k, self.v, self.first = layer, k, v, first
        b, _, n, d = k.shape
        self.shape = (b, layer.num_kv_heads, first + n, d)  # looks like the dense cache to shape readers

    def attend(self, decision, query, mask, scale, softcap, dispatch):
        return self.layer.attend(decision, query, self, mask, scale, softcap, dispatch)


class _Group:
    def __init__(self, idx: list[int], g: int, sink: int, ring: int | None):
        self.idx = torch.tensor(idx, dtype=torch.long)
        self.qidx = (self.idx.view(-1, 1) * g + torch.arange(g).view(1, -1)).flatten()  # their query heads
        self.sink, self.ring = sink, ring  # ring None: keep every token (contiguous slots)
        self.k = self.v = self.pos = None


class RingLayer(DynamicLayer):
    def __init__(self, decision, num_kv_heads: int):
        super().__init__()
        self.decision, self.num_kv_heads = decision, num_kv_heads
        self.seen = 0
        self.groups: list[_Group] = []

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        g = self.decision.num_heads // self.num_kv_heads
        sink = self.decision.sink.view(self.num_kv_heads, g)
        window = self.decision.window.view(self.num_kv_heads, g)
        spans = {}
        for kv in range(self.num_kv_heads):
            full = bool((window[kv] < 0).any())
            key = (0, None) if full else (int(sink[kv].max()), int(window[kv].max()))
            spans.setdefault(key, []).append(kv)
        self.groups = [_Group(idx, g, s, r) for (s, r), idx in sorted(spans.items(), key=lambda x: x[1])]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        handle = RingKV(self, key_states, value_states, self.seen)
        self.seen += key_states.shape[-2]
        return handle, handle

    def attend(self, decision, query, handle: RingKV, mask, scale, softcap, dispatch):
        if mask.key_padding is not None:
            raise PatchStateError(
                "attention_mask: the ring-buffer cache takes left padding only (no holes inside a sequence)"
            )
        b, h, nq, d = query.shape
        scale = d**-0.5 if scale is None else scale
        dev = query.device
        start = mask.row_start(b, dev)
        new_pos = torch.arange(handle.first, handle.first + handle.k.shape[2], device=dev) - start[:, None]
        out = query.new_empty(b, h, nq, handle.v.shape[-1])
        for grp in self.groups:
            qi, kvi = grp.qidx.to(dev), grp.idx.to(dev)
            q, kn, vn = query[:, qi], handle.k[:, kvi], handle.v[:, kvi]
            sink, window = decision.sink[grp.qidx].to(dev), decision.window[grp.qidx].to(dev)
            common = dict(scale=scale, softcap=softcap, sliding_window=decision.sliding_window)
            if grp.ring is None:  # every token kept: the slots are contiguous, as in a DynamicLayer
                k = kn if grp.k is None else torch.cat([grp.k, kn], 2)
                v = vn if grp.v is None else torch.cat([grp.v, vn], 2)
                o, _ = dispatch.attention(q, k, v, sink=sink, window=window, start=mask.start,
                                          backend=decision.backend, **common)  # fmt: skip
                grp.k, grp.v = k, v
            elif handle.first == 0:  # the prompt: the kernels' analytic pattern over its own keys
                o, _ = dispatch.attention(q, kn, vn, sink=sink, window=window, start=mask.start,
                                          backend=decision.backend, **common)  # fmt: skip
                self._write(grp, kn, vn, new_pos)
            else:
                k, v = torch.cat([grp.k, kn], 2), torch.cat([grp.v, vn], 2)
                pos = torch.cat([grp.pos, new_pos], 1)
                o = kvcache.pos_attention(q, k, v, pos, new_pos, sink, window, **common)
                self._write(grp, kn, vn, new_pos)
            out[:, qi] = o
        return out

    def _write(self, grp: _Group, k, v, pos) -> None:
        """Store the tokens at positions pos [B, n] (increasing) that the ring keeps; padding (pos < 0) never."""
        b, hg, n, d = k.shape
        cap = grp.sink + grp.ring
        if grp.k is None:
            grp.k = k.new_zeros(b, hg, cap, d)
            grp.v = v.new_zeros(b, hg, cap, v.shape[-1])
            grp.pos = torch.full((b, cap), -1, dtype=torch.long, device=k.device)
        last = pos[:, -1:]
        keep = (pos >= 0) & ((pos < grp.sink) | (pos > last - grp.ring))  # each kept slot is written once
        slot = torch.where(pos < grp.sink, pos, grp.sink + (pos - grp.sink) % grp.ring)
        for row in range(b):
            sel = keep[row].nonzero().squeeze(-1)
            if sel.numel():
                s = slot[row, sel]
                grp.k[row, :, s] = k[row, :, sel]
                grp.v[row, :, s] = v[row, :, sel]
                grp.pos[row, s] = pos[row, sel]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def kv_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for grp in self.groups for t in (grp.k, grp.v) if t is not None
        )

    def dense_bytes(self) -> int:
        """What a DynamicLayer would hold for the same tokens."""
        for grp in self.groups:
            if grp.k is not None:
                per_head = grp.k.shape[0] * grp.k.shape[-1] * grp.k.element_size() * 2
                return per_head * self.num_kv_heads * self.seen
        return 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the ring-buffer cache cannot be cropped (assisted decoding)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for grp in self.groups:
            if grp.k is not None:
                grp.k, grp.v = grp.k[indices], grp.v[indices]
                grp.pos = grp.pos[indices] if grp.pos is not None else None

    def batch_repeat_interleave(self, repeats: int) -> None:
        for grp in self.groups:
            if grp.k is not None:
                grp.k, grp.v = grp.k.repeat_interleave(repeats, 0), grp.v.repeat_interleave(repeats, 0)
                if grp.pos is not None:
                    grp.pos = grp.pos.repeat_interleave(repeats, 0)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))


def install(model, spec, layers):
    """Put RingLayers into every fresh DynamicCache the model runs with (layers with the model's own sliding
    window keep their bounded cache); returns the undo callback."""
    chosen = [i for i in range(spec.num_layers) if spec.sliding_window[i] is None]

    def make():
        return {i: (lambda i=i: RingLayer(layers[i], spec.num_kv_heads)) for i in chosen}

    return kvcache.install(model, make)


def input_length(args, kwargs) -> int | None:
    """The sequence length of a model forward's input (input_ids or inputs_embeds)."""
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is None:
        x = kwargs.get("inputs_embeds")
    return None if x is None else int(x.shape[1])


def install_elastic(model, layers, spans, length: int | None):
    """Spans that grow with the input (MoA's S = alpha + beta * N): before each prompt (a forward with an empty
    cache), set every layer's sink and window from `spans(N)` -> {layer: (sink [H], window [H])}, with N the
    prompt length (in a batch, the padded length) or the fixed `length`. Decode steps keep the prompt's spans.
    Returns the undo callback."""
    name = kvcache.cache_argument(model)

    def hook(module, args, kwargs):
        cache = kvcache.find_cache(kwargs, name)
        n = input_length(args, kwargs)
        if n is None or (cache is not None and cache.get_seq_length() > 0):
            return None
        with torch.inference_mode(False):  # decision tensors keep version counters
            for i, (sink, window) in spans(length or n).items():
                layers[i].sink, layers[i].window = sink, window
        return None

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return handle.remove
