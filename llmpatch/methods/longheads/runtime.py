"""LongHeads at run time: chunk summaries, per-head chunk selection, attention over re-positioned chunks.

Everything works in token space: token t of row b is key slot t + start[b] (left padding), so a row of a batch
computes what it would alone. The layer's keys arrive un-rotated (`methods/longheads.py` gives the attention
module identity position embeddings) and are rotated here with the positions LongHeads assigns:
- a call whose every query is inside the attention length A is ordinary attention (true positions, the backend's
  own kernel: dense-identical);
- otherwise queries go in groups (the tokens of one `block_size` block within the call: a prefill block, or one
  decode token). A group in chunk c gathers m = min(k, c + 1) chunks: all of 0..c when c < k, else chunk 0, c-1,
  c and the k-3 best by q.k_hat. Chunk i of the gathered list gets positions i*w..i*w+w-1, the query
  (m-1)*w + t mod w, so every distance stays below A. Causality inside the own chunk is a token mask.
State per (cache, layer), kept in LongHeads' own cache layer (`ChunkLayer`, put into the model's DynamicCache):
fp32 chunk keys k_hat for every complete chunk, and the un-rotated queries of each row's partial chunk, so a chunk
completed during decoding is summarised like one read in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ...errors import PatchStateError
from ...kernels import dispatch, rules
from ...kernels.layout import to_tokens

GATHER_ELEMENTS = 1 << 24  # gathered key elements per step (B x H x groups x keys x D)


@dataclass
class Config:
    chunk_size: int
    k: int  # chunks per query (attention_length / chunk_size)
    block_size: int


@dataclass
class State:
    seen: int  # key slots after the last call
    summ: torch.Tensor  # [B, H, C, D] fp32 chunk keys of complete chunks
    qpart: torch.Tensor  # [B, H, w, D] un-rotated queries of each row's partial chunk, at t mod w


def rotate(x, cos, sin):
    """RoPE as transformers applies it (same formula and dtype, so the same values)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class ChunkLayer(DynamicLayer):
    """A DynamicLayer that also keeps LongHeads' chunk state for its layer; reordering or cropping it would
    desynchronise the summaries, so those are refused."""

    def __init__(self):
        super().__init__()
        self.chunks: State | None = None

    def _refuse(self, *_):
        raise PatchStateError(
            "cache: longheads keeps per-chunk state; beam search and cache cropping are refused"
        )

    crop = batch_select_indices = batch_repeat_interleave = reorder_cache = _refuse


def _state(layer: int, holder: ChunkLayer | None, q, w, nk) -> State:
    b, h, nq, d = q.shape
    st = holder.chunks if holder is not None else None
    if st is None or nk == nq:
        st = State(0, q.new_zeros(b, h, 0, d, dtype=torch.float32), q.new_zeros(b, h, w, d))
    elif st.seen != nk - nq or st.summ.shape[0] != b:
        raise PatchStateError(
            f"cache: layer {layer} holds {nk - nq} tokens but longheads saw {st.seen} "
            f"(batch {st.summ.shape[0]}); the cache was changed outside the patched model (crop, beam "
            "reordering, another model). Start from an empty cache."
        )
    if holder is not None:
        holder.chunks = st
    return st


def _chunk_keys(q, k, v, cos, sin, scale, softcap):
    """k_hat per query head for chunks q [B, H, C, w, D], k/v [B, Hkv, C, w, D]: in-chunk non-causal attention
    with chunk-local positions, the mean output row v_bar, then the v_bar-attention-pooled rotated key."""
    b, h, c, w, d = q.shape
    hkv = k.shape[1]
    qt = rotate(q.float(), cos, sin).view(b, hkv, h // hkv, c, w, d)
    kt = rotate(k.float(), cos, sin)
    s = torch.einsum("bkgcid,bkcjd->bkgcij", qt, kt) * scale
    s = rules.soft_cap(s, softcap)
    vbar = torch.einsum("bkgcij,bkcjd->bkgcd", torch.softmax(s, -1), v.float()) / w
    s2 = torch.einsum("bkgcd,bkcjd->bkgcj", vbar, kt) * scale
    return torch.einsum("bkgcj,bkcjd->bkgcd", torch.softmax(s2, -1), kt).reshape(b, h, c, d)


def _summarise(cfg, st, q, k, v, start, n, cos, sin, scale, softcap):
    """Summarise the chunks this call completes; keep the queries of each row's partial chunk."""
    b, h, nq, d = q.shape
    nk, w, dev = k.shape[2], cfg.chunk_size, q.device
    prior = (n - nq).clamp(min=0)  # tokens each row had before this call
    c0, done = prior // w, n // w
    bi = torch.arange(b, device=dev)
    n_new = int((done - c0).max())
    if n_new > 0:
        if st.summ.shape[2] < int(done.max()):
            grow = int(done.max()) - st.summ.shape[2]
            st.summ = torch.cat([st.summ, st.summ.new_zeros(b, h, grow, d)], dim=2)
        step = max(1, GATHER_ELEMENTS // max(1, b * h * w * d * 4))
        for a0 in range(0, n_new, step):
            ci = torch.arange(a0, min(n_new, a0 + step), device=dev)
            tok = (c0[:, None, None] + ci[None, :, None]) * w + torch.arange(w, device=dev)  # [B, C, w]
            in_call = (tok + start[:, None, None] - (nk - nq)).clamp(0, nq - 1)
            qs = q[
                bi[:, None, None, None], torch.arange(h, device=dev)[None, :, None, None], in_call[:, None]
            ]
            old = st.qpart[:, :, None].expand(-1, -1, len(ci), -1, -1)
            qs = torch.where((tok < prior[:, None, None])[:, None, ..., None], old.to(qs.dtype), qs)
            slot = (tok + start[:, None, None]).clamp(max=nk - 1)[:, None]  # [B, 1, C, w]
            kvi = torch.arange(k.shape[1], device=dev)[None, :, None, None]
            ks = k[bi[:, None, None, None], kvi, slot]
            vs = v[bi[:, None, None, None], kvi, slot]
            kh = _chunk_keys(qs, ks, vs, cos[:w], sin[:w], scale, softcap)
            valid = (c0[:, None] + ci[None]) < done[:, None]  # [B, C]
            rows, cols = valid.nonzero(as_tuple=True)
            st.summ[rows, :, c0[rows] + ci[cols]] = kh[rows, :, cols]
    # the partial chunk's queries that arrived in this call
    tok = done[:, None] * w + torch.arange(w, device=dev)  # [B, w]
    fresh = (tok >= prior[:, None]) & (tok < n[:, None])
    in_call = (tok + start[:, None] - (nk - nq)).clamp(0, nq - 1)
    got = q[bi[:, None, None], torch.arange(h, device=dev)[None, :, None], in_call[:, None]]  # [B, H, w, D]
    st.qpart = torch.where(fresh[:, None, :, None], got, st.qpart)


def _select(cfg, st, q_mean, c):
    """Chunk ids [B, H, G, k] (ascending; past m unused) for groups in own chunk c [B, G]."""
    kc = cfg.k
    b, h, g, _ = q_mean.shape
    width = max(int(c.max()) + 1, st.summ.shape[2])
    score = torch.zeros(b, h, g, width, device=q_mean.device)
    if st.summ.shape[2]:
        score[..., : st.summ.shape[2]] = torch.matmul(q_mean.float(), st.summ.transpose(-1, -2))
    ids = torch.arange(width, device=q_mean.device).view(1, 1, 1, -1)
    cc = c[:, None, :, None]
    full = cc + 1 <= kc  # every chunk fits: take 0..c
    forced = (ids == 0) | (ids == cc) | (ids == cc - 1) | (full & (ids <= cc))
    cand = (ids >= 1) & (ids <= cc - 2) & ~full
    rank = torch.where(forced, torch.inf, torch.where(cand, score, -torch.inf))
    vals, idx = rank.topk(min(kc, width), dim=-1)
    idx = torch.where(vals == -torch.inf, width, idx).sort(-1).values
    if idx.shape[-1] < kc:
        idx = torch.nn.functional.pad(idx, (0, kc - idx.shape[-1]), value=width)
    return torch.where(idx == width, 0, idx)


def _ordinary(decision, q, k, v, start, mask, cos, sin, scale, softcap):
    nq, nk = q.shape[2], k.shape[2]
    tk = (torch.arange(nk, device=q.device)[None] - start[:, None]).clamp(min=0)
    tq = tk[:, nk - nq :]
    qr = rotate(q, cos[tq][:, None], sin[tq][:, None])
    kr = rotate(k, cos[tk][:, None], sin[tk][:, None])
    out, _ = dispatch.attention(
        qr, kr, v, backend=decision.backend, scale=scale, softcap=softcap, start=mask.start
    )
    return out


def _token_chunks(x, start, n_chunks, w):
    b, h, _, d = x.shape
    return to_tokens(x, start, n_chunks * w).reshape(b, h, n_chunks, w, d)


def _selective(cfg, st, q, k, v, start, n, cos, sin, scale, softcap):
    b, h, nq, d = q.shape
    hkv, nk, dev = k.shape[1], k.shape[2], q.device
    w, bs, kc = cfg.chunk_size, cfg.block_size, cfg.k
    r = min(bs, nq)
    first = (n - nq).clamp(min=0)
    g0 = first // bs
    ng = int(((n + bs - 1) // bs - g0).max())
    blk = (g0[:, None] + torch.arange(ng, device=dev)) * bs  # [B, G] first token of each group's block
    lo = torch.maximum(blk, first[:, None])
    hi = torch.minimum(blk + bs, n[:, None])
    tq = lo[..., None] + torch.arange(r, device=dev)  # [B, G, R]
    qvalid = tq < hi[..., None]
    c = blk // w
    m = (c + 1).clamp(max=kc)
    qpos = (m[..., None] - 1) * w + tq % w  # [B, G, R]
    qslot = (tq + start[:, None, None] - (nk - nq)).clamp(0, nq - 1)
    qg = q[torch.arange(b, device=dev)[:, None, None, None], torch.arange(h, device=dev)[None, :, None, None],
           qslot[:, None]]  # [B, H, G, R, D]  # fmt: skip
    cnt = qvalid.sum(-1).clamp(min=1)[:, None, :, None]
    q_mean = (qg.float() * qvalid[:, None, ..., None]).sum(-2) / cnt
    sel = _select(cfg, st, q_mean, c)  # [B, H, G, k]
    kpos = torch.arange(kc * w, device=dev).view(1, 1, 1, -1)
    kpos = torch.where(
        kpos < (m * w)[..., None, None], kpos, rules.EMPTY
    )  # slots past the m chunks hold nothing
    allowed = rules.visible(qpos[..., None], kpos)  # [B, G, R, L]
    kvh = torch.arange(h, device=dev) // (h // hkv)
    # Many groups (prefill): rotate every chunk once per list slot i (positions i*w .. i*w+w-1), then copy whole
    # chunks. Few groups (decode): copy the chosen keys, then rotate only those.
    pre_rotate = hkv * nk < h * ng * w
    if pre_rotate:
        n_chunks = int(c.max()) + 1
        kt, vt = _token_chunks(k, start, n_chunks, w), _token_chunks(v, start, n_chunks, w)
        cs, sn = cos[: kc * w].view(kc, 1, 1, 1, w, d), sin[: kc * w].view(kc, 1, 1, 1, w, d)
        kslot, vflat = rotate(kt.unsqueeze(0), cs, sn).reshape(-1, w, d), vt.reshape(-1, w, d)
        base = (torch.arange(b, device=dev)[:, None] * hkv + kvh[None]) * n_chunks  # [B, H]
        sel_f = sel.permute(0, 2, 1, 3) + base[:, None, :, None]  # [B, G, H, k] flat (b, kvh) chunk rows
        slot_off = (torch.arange(kc, device=dev) * (b * hkv * n_chunks)).view(1, 1, 1, kc)
    out = q.new_zeros(b, h, nq, v.shape[-1])
    step = max(1, GATHER_ELEMENTS // max(1, b * h * kc * w * d))
    for g_lo in range(0, ng, step):
        gs = slice(g_lo, min(ng, g_lo + step))
        gn = gs.stop - gs.start
        if pre_rotate:
            rows = sel_f[:, gs]
            kg = kslot.index_select(0, (rows + slot_off).flatten()).view(b * gn, h, kc * w, d)
            vg = vflat.index_select(0, rows.flatten()).view(b * gn, h, kc * w, d)
        else:
            tok = (sel[:, :, gs, :, None] * w + torch.arange(w, device=dev)).flatten(-2)  # [B, H, g, L]
            slots = (tok + start.view(b, 1, 1, 1)).clamp(max=nk - 1).transpose(1, 2)  # [B, g, H, L]
            bi, hh = torch.arange(b, device=dev).view(b, 1, 1, 1), kvh.view(1, 1, h, 1)
            kg = rotate(k[bi, hh, slots], cos[: kc * w], sin[: kc * w]).view(b * gn, h, kc * w, d)
            vg = v[bi, hh, slots].view(b * gn, h, kc * w, d)
        qr = rotate(qg[:, :, gs], cos[qpos[:, gs]][:, None], sin[qpos[:, gs]][:, None])
        qr = qr.transpose(1, 2).reshape(b * gn, h, r, d)
        o = _attend(qr, kg, vg, allowed[:, gs].reshape(b * gn, 1, r, kc * w), scale, softcap)
        o = o.view(b, gn, h, r, -1)
        valid = qvalid[:, gs]
        rb, gg, rr = valid.nonzero(as_tuple=True)
        out[rb, :, qslot[:, gs][rb, gg, rr]] = o[rb, gg, :, rr]
    return out, int((((qpos + 1) * qvalid).sum()) * h)


def _attend(q, k, v, allowed, scale, softcap):
    """Attention over gathered keys: q [N, H, R, D], k/v [N, H, L, D], allowed [N, 1, R, L]."""
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    s = rules.soft_cap(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, softcap)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return torch.matmul(p, v.float()).to(q.dtype)


class LongHeadsAttention:
    """A layer's LongHeads attention (`LayerDecision.attend`): q [B, H, Nq, D], k/v [B, Hkv, Nk, D], all
    un-rotated. `rope(device, dtype)` gives the model's (cos, sin) tables over the attention length; `holder` is
    the cache layer of the current forward (set by the module's pre-hook; None without a cache)."""

    label = "longheads chunks"

    def __init__(self, cfg: Config, rope):
        self.cfg, self.rope, self.holder = cfg, rope, None

    def __call__(self, decision, q, k, v, mask, scale, softcap):
        cfg = self.cfg
        if mask.key_padding is not None or mask.kv_offset:
            raise PatchStateError(
                "attention_mask: longheads supports left padding only (no holes in the mask, no sliding cache)"
            )
        b, h, nq, d = q.shape
        nk, dev = k.shape[2], q.device
        scale = d**-0.5 if scale is None else scale
        start = mask.row_start(b, dev)
        n = nk - start
        cos, sin = self.rope(q.device, q.dtype)  # [A, D]
        st = _state(decision.layer, self.holder, q, cfg.chunk_size, nk)
        _summarise(cfg, st, q, k, v, start, n, cos, sin, scale, softcap)
        st.seen = nk
        if int(n.max()) <= cfg.k * cfg.chunk_size:  # inside the attention length: ordinary attention
            return _ordinary(decision, q, k, v, start, mask, cos, sin, scale, softcap), None
        out, computed = _selective(cfg, st, q, k, v, start, n, cos, sin, scale, softcap)
        return out, lambda: computed
