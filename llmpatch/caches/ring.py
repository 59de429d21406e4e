"""A per-KV-head sink + ring-buffer cache layer: the decode cache of moa, streamingllm and retrieval_kv.

`RingLayer` is a transformers cache *layer* put into the model's own `DynamicCache` (`caches.install`), so
generate(), cache positions and masks work unchanged. When the first tokens arrive it reads its layer's decision
(the spans are fixed by then) and sizes each KV head for the union of its query heads' patterns (GQA):
- a KV head with a dense query head (window -1) keeps every token: slot = token position;
- the others keep sink = the group's largest sink and a ring of its largest window: token p goes to slot p while
  p < sink, else to sink + (p - sink) % ring. A decode token written before it attends evicts only the token
  one window back, which it may not see.
On a layer with the model's own sliding window W (Gemma-2/3, Mistral v0.1) no key older than W is ever read, so
a KV head keeps a plain ring of W (sink 0) wherever its sink + window would not be smaller; KV saved counts
against the model's own layer there (its last W - 1 tokens).
Storage is exact per KV head: one flat buffer per layer, k and v [B, S, D], where KV head h owns the segment
[off_h, off_h + cap_h) (cap_h = its sink + ring, or the tokens so far plus room to grow for a head that keeps
every token), and pos [B, S] holds the token position of every slot (-1 = empty). Positions are per row, so left
padding is never stored; `set_padding` (called by `caches.install` before each forward) says which slots are
padding. With `decision.pins` > 0 each compressed KV head also has that many pinned slots between its sink and
its ring, filled once after the prompt by the method's query-aware selection (`snapkv`, through `pin`).

`update()` keeps transformers' contract and returns tensors. The prompt (an empty cache) gets its own keys and
values back, which the backends read with the layer's analytic sink + window pattern; the survivors are then
written. A decode step (one token) is written first and gets the flat buffers back as one KV head,
[B, 1, S, D]; a longer call gets them with its tokens appended (a copy, once per such call), and is written
after. Either way the layer publishes, for that attention call (`LayerDecision.key_positions`), each KV head's
positions over the flat slots (-1 outside its segment) and the segments themselves, so every backend reads the
ring as it is: the reference and CPU paths by masks (the CPU one per segment), the Triton decode kernel on CUDA
by per-KV-head block lists over the segments.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import DynamicLayer

from ..attention import padding_start
from ..decisions import KeyPositions, Kind
from ..errors import PatchStateError

STEP = 1  # new tokens a call may bring and still be written before it attends (ring = window exactly)
GROW = 32  # slots added at once when a head that keeps every token runs out of room (KV saved counts them)


def ring_slots(pos: torch.Tensor, sink: torch.Tensor, ring: torch.Tensor, pins=None) -> torch.Tensor:
    """Slot of token positions pos [B, Hkv, N] for KV heads with sink[Hkv] and ring[Hkv] (-1: every token); the
    ring starts after `pins[Hkv]` pinned slots (none by default)."""
    s, r = sink.view(1, -1, 1), ring.view(1, -1, 1)
    k = 0 if pins is None else pins.view(1, -1, 1)
    return torch.where((r < 0) | (pos < s), pos, s + k + (pos - s) % r.clamp(min=1))


class RingLayer(DynamicLayer):
    def __init__(self, decision, num_kv_heads: int):
        super().__init__()
        self.decision, self.num_kv_heads = decision, num_kv_heads
        self.seen = 0
        self.start = None  # [B] first real slot of each row
        self.holes = False
        self.pos = None

    def set_padding(self, attention_mask) -> None:
        if attention_mask is None or attention_mask.dim() != 2:
            self.start, self.holes = None, False
            return
        self.start, left_padded = padding_start(attention_mask.to(torch.bool))
        self.holes = not left_padded

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        g = self.decision.num_heads // self.num_kv_heads
        sink = self.decision.sink.view(self.num_kv_heads, g)
        window = self.decision.window.view(self.num_kv_heads, g)
        full = (window < 0).any(-1)
        self.sink = torch.where(full, 0, sink.max(-1).values).tolist()
        self.ring = torch.where(full, -1, window.max(-1).values + STEP - 1).tolist()
        own = self.decision.sliding_window
        if own is not None:  # nothing older than the model's own window is read: a ring of it holds every key
            # a head's sink + ring is kept only where it is smaller than that ring
            cap = own + STEP - 1
            wide = [r < 0 or s + r >= cap for s, r in zip(self.sink, self.ring, strict=True)]
            self.sink = [0 if w else s for s, w in zip(self.sink, wide, strict=True)]
            self.ring = [cap if w else r for r, w in zip(self.ring, wide, strict=True)]
        self.pins = [0 if f else self.decision.pins for f in full.tolist()]
        # the method's selection writes here after the prompt (never into an older cache)
        self.decision.pin_to = weakref.ref(self) if any(self.pins) else None

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.holes:
            raise PatchStateError(
                "attention_mask: the ring-buffer cache takes left padding only (no holes inside a sequence)"
            )
        b, hkv, n, d = key_states.shape
        dev = key_states.device
        start = torch.zeros(b, dtype=torch.long, device=dev) if self.start is None else self.start.to(dev)
        new_pos = torch.arange(self.seen, self.seen + n, device=dev)[None] - start[:, None]  # [B, n]
        first, self.seen = self.seen == 0, self.seen + n
        if first:  # the prompt attends over its own keys (slot order, analytic pattern)
            self._write(key_states, value_states, new_pos)
            return key_states, value_states
        if n <= STEP:
            self._write(key_states, value_states, new_pos)
            keys, values, k_pos, spans = self.keys, self.values, self.head_positions(), self.spans()
        else:  # the buffers, then this call's tokens as one more segment per KV head
            keys = torch.cat([self.keys, key_states.transpose(1, 2).reshape(b, hkv * n, d)], 1)
            values = torch.cat([self.values, value_states.transpose(1, 2).reshape(b, hkv * n, -1)], 1)
            extra = torch.full((b, hkv, hkv, n), -1, dtype=torch.long, device=dev)
            extra[:, torch.arange(hkv), torch.arange(hkv)] = new_pos[:, None]
            k_pos = torch.cat([self.head_positions(), extra.transpose(2, 3).reshape(b, hkv, n * hkv)], 2)
            spans = None
            self._write(key_states, value_states, new_pos)
        self.decision.key_positions = KeyPositions(new_pos, k_pos, self.seen, spans)
        return keys.unsqueeze(1), values.unsqueeze(1)

    def head_positions(self) -> torch.Tensor:
        """[B, Hkv, S]: each KV head's token positions over the flat slots, -1 outside its segment."""
        return torch.where(self.owner[None, None, :] == torch.arange(self.num_kv_heads, device=self.pos.device)
                           [None, :, None], self.pos[:, None, :], -1)  # fmt: skip

    def spans(self) -> list[tuple[int, int]]:
        return [(o, o + c) for o, c in zip(self.offsets, self.caps, strict=True)]

    def _layout(self, caps: list[int], b: int, d: int, dv: int, like_k, like_v) -> None:
        """(Re)allocate the segments for capacities `caps`, moving what the old ones hold."""
        old = None if self.pos is None else (self.keys, self.values, self.pos, self.offsets, self.caps)
        dev = like_k.device
        self.caps, self.offsets = caps, [sum(caps[:i]) for i in range(len(caps))]
        total = sum(caps)
        self.keys, self.values = like_k.new_zeros(b, total, d), like_v.new_zeros(b, total, dv)
        self.pos = torch.full((b, total), -1, dtype=torch.long, device=dev)
        self.owner = torch.repeat_interleave(
            torch.arange(len(caps), device=dev), torch.tensor(caps, device=dev)
        )
        if old is not None:
            for h, (o_off, o_cap) in enumerate(zip(old[3], old[4], strict=True)):
                src, dst = slice(o_off, o_off + o_cap), slice(self.offsets[h], self.offsets[h] + o_cap)
                self.keys[:, dst], self.values[:, dst], self.pos[:, dst] = (
                    old[0][:, src],
                    old[1][:, src],
                    old[2][:, src],
                )

    def _write(self, k, v, pos) -> None:
        """Store the tokens at positions pos [B, n] (increasing) that each KV head keeps; padding never."""
        b, hkv, n, d = k.shape
        top = int(pos.max()) + 1
        need = [s + k + r if r >= 0 else top for s, k, r in zip(self.sink, self.pins, self.ring, strict=True)]
        if self.pos is None:
            self._layout(need, b, d, v.shape[-1], k, v)
        elif any(x > c for x, c in zip(need, self.caps, strict=True)):  # a head that keeps every token grew
            self._layout([c if x <= c else x + GROW for x, c in zip(need, self.caps, strict=True)], b, d,
                         v.shape[-1], k, v)  # fmt: skip
        dev = k.device
        sink = torch.tensor(self.sink, device=dev).view(1, -1, 1)
        ring = torch.tensor(self.ring, device=dev).view(1, -1, 1)
        p = pos[:, None].expand(b, hkv, n)
        last = pos[:, -1:, None]
        keep = (p >= 0) & ((ring < 0) | (p < sink) | (p > last - ring))  # each slot written once
        pins = torch.tensor(self.pins, device=dev)
        slot = ring_slots(p, sink.flatten(), ring.flatten(), pins) + torch.tensor(
            self.offsets, device=dev
        ).view(1, -1, 1)
        bi, hi, ti = keep.nonzero(as_tuple=True)
        s = slot[bi, hi, ti]
        self.keys[bi, s] = k[bi, hi, ti]
        self.values[bi, s] = v[bi, hi, ti]
        self.pos[bi, s] = p[bi, hi, ti]

    def set_pins(self, counts: list[int], keep_ring: bool = True, window: int | None = None) -> None:
        """Resize each compressed KV head's pinned slots to `counts[h]` (per-head budgets, `kvzip`), moving its
        ring after them (or emptying it: `keep_ring=False`, when the pins take over what it held, and then
        optionally resizing it for a new `window`: the slots later tokens keep); the new pinned slots start
        empty (filled by `pin`)."""
        if window is not None and keep_ring:
            raise ValueError("set_pins: a ring is resized only when emptied (keep_ring=False)")
        new = [0 if r < 0 else int(c) for r, c in zip(self.ring, counts, strict=True)]
        rings = [r if r < 0 or window is None else window + STEP - 1 for r in self.ring]
        keys, values, pos, offsets, caps, pins = self.keys, self.values, self.pos, self.offsets, self.caps, self.pins  # fmt: skip
        self.pos = None  # _layout: allocate only; the parts move below
        self._layout([c if r < 0 else s + k + r for s, k, r, c in zip(self.sink, new, rings, caps, strict=True)],
                     keys.shape[0], keys.shape[2], values.shape[2], keys, values)  # fmt: skip
        self.pins, self.ring = new, rings
        for h, (s, r) in enumerate(zip(self.sink, self.ring, strict=True)):
            # (from, to, size) within the segment: all of a full head; else the sink, then the ring after the pins
            parts = (
                [(0, 0, caps[h])] if r < 0 else [(0, 0, s), (s + pins[h], s + new[h], r if keep_ring else 0)]
            )
            for src, dst, size in parts:
                a = slice(offsets[h] + src, offsets[h] + src + size)
                z = slice(self.offsets[h] + dst, self.offsets[h] + dst + size)
                self.keys[:, z], self.values[:, z], self.pos[:, z] = keys[:, a], values[:, a], pos[:, a]

    def pin(self, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions=None) -> None:
        """Keep the prompt's key slots `index` [B, Hkv, K] (K <= pins; -1 = none) of keys / values [B, Hkv, N, D]
        in each KV head's pinned slots. A pinned key is published at position 0, so every rule reads it like a
        sink: visible to every later query (it is older than all of them); or at its token position `positions`
        [B, K], so that it leaves the model's own sliding window like any key (the method then lifts the pattern
        from the layer, `reform`)."""
        b, hkv, k = index.shape
        for h in range(hkv):
            n = min(k, self.pins[h])
            if n == 0:
                continue
            seg = slice(self.offsets[h] + self.sink[h], self.offsets[h] + self.sink[h] + n)
            idx = index[:, h, :n]
            ok = (idx >= 0)[..., None]
            rows = idx.clamp(min=0)[..., None]
            for buf, src in ((self.keys, keys), (self.values, values)):
                picked = src[:, h].gather(1, rows.expand(b, n, src.shape[-1]))
                buf[:, seg] = torch.where(ok, picked.to(buf.dtype), buf[:, seg])
            at = 0 if positions is None else positions[:, :n].to(self.pos.device)
            self.pos[:, seg] = torch.where(ok[..., 0], at, -1)

    def full_kv_heads(self) -> int:
        return sum(r < 0 for r in self.ring) if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(keys the mask spans, offset); transformers before 5.3 pass the queries' cache_position instead."""
        n = query_length.shape[0] if isinstance(query_length, torch.Tensor) else query_length
        return self.seen + n, 0

    def kv_bytes(self) -> int:
        if self.pos is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def dense_bytes(self) -> int:
        """What the model's own layer would hold for the same tokens (a DynamicSlidingWindowLayer keeps the last
        window - 1 on a layer with its own sliding window)."""
        if self.pos is None:
            return 0
        b, _, d = self.keys.shape
        own = self.decision.sliding_window
        tokens = self.seen if own is None else min(self.seen, own - 1)
        return 2 * b * self.num_kv_heads * tokens * d * self.keys.element_size()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the ring-buffer cache cannot be cropped (assisted decoding)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.pos is not None:
            self.keys, self.values, self.pos = self.keys[indices], self.values[indices], self.pos[indices]
            self.start = None if self.start is None else self.start[indices.to(self.start.device)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.pos is not None:
            rep = lambda t: t.repeat_interleave(repeats, 0)  # noqa: E731
            self.keys, self.values, self.pos = rep(self.keys), rep(self.values), rep(self.pos)
            self.start = None if self.start is None else rep(self.start)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))


def install(model, spec, layers):
    """Put RingLayers into every fresh DynamicCache the model runs with: on every full-attention layer, and on a
    layer with the model's own sliding window where a method sets the pattern (its spans may be narrower than
    the window; the others keep their own bounded cache). Returns the undo callback."""
    from . import install as install_layers

    chosen = [i for i in range(spec.num_layers)
              if spec.sliding_window[i] is None or Kind.PATTERN in layers[i].owners]  # fmt: skip

    def make():
        return {i: (lambda i=i: RingLayer(layers[i], spec.local_kv_heads)) for i in chosen}

    return install_layers(model, make)
