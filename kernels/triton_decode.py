"""Triton decode kernel: 1 to 16 query tokens against a long cache, split-K over key blocks, then an LSE merge.

Every pattern becomes a key-block list for the step (`kv_index[B, H|Hkv, MAX_K]`): the static sink + window
blocks, the selected blocks of a dynamic method, or every block of a ring-buffer cache (`ring.py`). Program
(b, head group, split) walks its share of the list for the GROUP query heads of one KV head (one K/V load for
the group) and writes a partial (acc, max, sum); empty splits write max -inf and weigh 0 in the merge.
Key positions come from slot_pos (ring layout) or from the slot index minus start[b] (contiguous cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import rules
from .dispatch import interpreting
from .reference import per_query_head
from .triton_prefill import _keep, _online_softmax, _tanh


@triton.jit
def decode_kernel(
    Q, K, V, Q_POS, SLOT_POS, START, SINK, WINDOW, KV_COUNT, KV_INDEX, CALIB_SINKS,
    ACC, ACC_S, M, L, L_S, sm_scale, softcap, sliding_window,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, HKV, HL, NQ, NK, D, MAX_K, SPLITS, PER_SPLIT,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NQ_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, LIST_PER_KV: tl.constexpr, RING: tl.constexpr, HAS_START: tl.constexpr,
    STATIC: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, CALIB: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_hg = H // GROUP
    b = pid_bh // n_hg
    h0 = (pid_bh % n_hg) * GROUP
    kvh = h0 // (H // HKV)  # the KV head whose keys this program reads
    kvl = h0 // (H // HL)  # the head its block list and slot positions belong to (= kvh unless K is flat)

    rows = tl.arange(0, GROUP_PAD * NQ_PAD)
    g = rows // NQ_PAD
    qrow = rows % NQ_PAD
    row_h = h0 + g
    row_ok = (g < GROUP) & (qrow < NQ)
    dims = tl.arange(0, HEAD_DIM)
    q_off = (
        b.to(tl.int64) * stride_qb
        + row_h.to(tl.int64)[:, None] * stride_qh
        + qrow.to(tl.int64)[:, None] * stride_qm
    )
    q = tl.load(Q + q_off + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    qp = tl.load(Q_POS + b * NQ + qrow, mask=row_ok, other=-1)
    st = 0
    if HAS_START:
        st = tl.load(START + b)
    sink_r = tl.zeros([GROUP_PAD * NQ_PAD], dtype=tl.int32)
    window_r = tl.zeros([GROUP_PAD * NQ_PAD], dtype=tl.int32) - 1
    if STATIC:
        sink_r = tl.load(SINK + row_h, mask=g < GROUP, other=0)
        window_r = tl.load(WINDOW + row_h, mask=g < GROUP, other=-1)

    acc = tl.zeros([GROUP_PAD * NQ_PAD, HEAD_DIM], dtype=tl.float32)
    acc_s = tl.zeros([GROUP_PAD * NQ_PAD, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD * NQ_PAD], dtype=tl.float32)
    l_s = tl.zeros([GROUP_PAD * NQ_PAD], dtype=tl.float32)
    m_i = tl.zeros([GROUP_PAD * NQ_PAD], dtype=tl.float32) - float("inf")

    if LIST_PER_KV:
        list_off = b.to(tl.int64) * HL + kvl
    else:
        list_off = b.to(tl.int64) * H + h0
    count = tl.load(KV_COUNT + list_off)
    j_end = tl.minimum((split + 1) * PER_SPLIT, count)
    for j in range(split * PER_SPLIT, j_end):
        kb = tl.load(KV_INDEX + list_off * MAX_K + j)
        kidx = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        kmask = kidx < NK
        kv_off = kidx.to(tl.int64)[:, None]
        ld_mask = kmask[:, None] & (dims[None, :] < D)
        k = tl.load(
            K + b * stride_kb + kvh * stride_kh + kv_off * stride_kn + dims[None, :], mask=ld_mask, other=0.0
        )
        v = tl.load(
            V + b * stride_vb + kvh * stride_vh + kv_off * stride_vn + dims[None, :], mask=ld_mask, other=0.0
        )
        if RING:
            kp = tl.load(SLOT_POS + (b.to(tl.int64) * HL + kvl) * NK + kidx, mask=kmask, other=-1)
        else:
            kp = tl.where(kmask, kidx - st, -1)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        keep = _keep(qp, kp, row_ok, kmask, sink_r, window_r, sliding_window, SLIDING, STATIC)
        s = tl.where(keep, s, float("-inf"))
        acc, acc_s, l_i, l_s, m_i = _online_softmax(acc, acc_s, l_i, l_s, m_i, s, v, CALIB_SINKS, b, H, row_h, NK,
                                                    kidx, row_ok, kmask, CALIB, PRECISION)  # fmt: skip

    part = ((b.to(tl.int64) * H + row_h) * NQ + qrow) * SPLITS + split  # [B, H, NQ, SPLITS]
    tl.store(M + part, m_i, mask=row_ok)
    tl.store(L + part, l_i, mask=row_ok)
    tl.store(ACC + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
    if CALIB:
        tl.store(L_S + part, l_s, mask=row_ok)
        tl.store(ACC_S + part[:, None] * HEAD_DIM + dims[None, :], acc_s, mask=row_ok[:, None])


def _merge(acc, m, lsum, acc_s=None, l_s=None, beta=0.4):
    """Combine split partials [B, H, NQ, S(, D)] with their maxima; empty splits (m = -inf) weigh 0."""
    top = m.amax(-1, keepdim=True)
    w = torch.exp(m - torch.where(torch.isinf(top), 0.0, top))  # exp(-inf) = 0 for empty splits
    l_t = (w * lsum).sum(-1)
    a_t = (w.unsqueeze(-1) * acc).sum(-2)
    safe = torch.where(l_t == 0, 1.0, l_t)
    out = a_t / safe.unsqueeze(-1)
    if acc_s is not None:
        a_s = (w.unsqueeze(-1) * acc_s).sum(-2) / safe.unsqueeze(-1)
        out = rules.act_combine(out, a_s, (w * l_s).sum(-1) / safe, beta)
    lse = torch.where(l_t == 0, float("-inf"), top.squeeze(-1) + torch.log(safe))
    return out, lse


def decode(q, k, v, kv_count, kv_index, block_size, *, q_pos=None, slot_pos=None, start=None, scale=None,
           softcap=None, sliding_window=None, sink=None, window=None, head_mask=None, calib=None, calib_beta=0.4,
           calib_sinks=None, splits=None):  # fmt: skip
    """Decode attention over the key blocks listed in kv_index [B, H|Hkv, MAX_K] (kv_count [B, H|Hkv]).

    Contiguous cache: q_pos defaults to the last Nq slots minus start[b]. Ring cache: pass slot_pos and q_pos.
    Returns (out [B, H, Nq, D], lse [B, H, Nq])."""
    if q.device.type != "cuda" and not interpreting():
        raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if nq > 16:
        raise ValueError(f"q: decode takes at most 16 query tokens, got {nq}; use the prefill kernel")
    if q_pos is None:
        st = torch.zeros(b, dtype=torch.long, device=q.device) if start is None else start.long()
        q_pos = torch.arange(nk - nq, nk, device=q.device).view(1, nq) - st.view(b, 1)
    # Lists per KV head (or per position head of a flat ring, K with one head) let a GQA group share its loads.
    n_lists = kv_index.shape[1]
    list_per_kv = n_lists != h and h % n_lists == 0 and n_lists % hkv == 0
    if not list_per_kv and n_lists != h:
        kv_count, kv_index = per_query_head(kv_count.unsqueeze(-1), kv_index.unsqueeze(-2), h)
        kv_count, kv_index = kv_count.squeeze(-1), kv_index.squeeze(-2)
    group = h // n_lists if list_per_kv else 1
    hl = n_lists if list_per_kv else (slot_pos.shape[1] if slot_pos is not None else hkv)
    if slot_pos is not None and slot_pos.shape[1] != hl:
        raise ValueError(
            f"slot_pos: expected {hl} position heads (those of the block lists), got {slot_pos.shape[1]}"
        )
    max_k = kv_index.shape[-1]
    splits = splits or max(1, min(16, triton.cdiv(max_k, 4)))
    per_split = triton.cdiv(max_k, splits)
    f32 = dict(dtype=torch.float32, device=q.device)
    head_dim = max(16, triton.next_power_of_2(d))
    acc = torch.empty(b, h, nq, splits, head_dim, **f32)
    m, l_ = torch.empty(b, h, nq, splits, **f32), torch.empty(b, h, nq, splits, **f32)
    calibrating = calib is not None and calib_sinks is not None and bool(calib.any())
    acc_s = torch.empty_like(acc) if calibrating else m
    l_s = torch.empty_like(l_) if calibrating else m
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    i32 = lambda t: dummy if t is None else t.to(device=q.device, dtype=torch.int32).contiguous()  # noqa: E731
    sinks8 = None
    if calibrating:
        sinks8 = (calib_sinks[..., :nk].bool() & calib.view(1, h, 1).to(q.device)).to(torch.int8).contiguous()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    decode_kernel[(b * (h // group), splits)](
        q, k, v, i32(q_pos), i32(slot_pos), i32(start), i32(sink), i32(window), i32(kv_count), i32(kv_index),
        dummy if sinks8 is None else sinks8, acc, acc_s, m, l_, l_s,
        float(d**-0.5 if scale is None else scale), float(softcap or 0.0), int(sliding_window or 0),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), h, hkv, hl, nq, nk, d, max_k, splits, per_split,
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), NQ_PAD=max(16 // triton.next_power_of_2(group), triton.next_power_of_2(nq)),
        BLOCK_N=block_size, HEAD_DIM=head_dim, LIST_PER_KV=list_per_kv, RING=slot_pos is not None,
        HAS_START=start is not None and slot_pos is None, STATIC=sink is not None, SLIDING=sliding_window is not None,
        SOFTCAP=softcap is not None, CALIB=calibrating, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip
    out, lse = _merge(acc, m, l_, acc_s if calibrating else None, l_s if calibrating else None, calib_beta)
    out = out[..., :d]
    if head_mask is not None and bool((head_mask != rules.HEAD_KEEP).any()):
        k_pos = slot_pos
        if k_pos is None:
            st = torch.zeros(b, dtype=torch.long, device=q.device) if start is None else start.long()
            k_pos = torch.arange(nk, device=q.device).view(1, nk) - st.view(b, 1)
        out = rules.apply_head_mask(out, v, head_mask, q_pos, k_pos.long(), sliding_window=sliding_window)
    return out.to(q.dtype), lse


MAX_Q = 16
DECODE_BLOCK = 64


def attention(q, k, v, *, start=None, key_padding=None, q_pos=None, k_pos=None, sliding_window=None, sink=None,
              window=None, kv_count=None, kv_index=None, block_size=64, scale=None, softcap=None, head_mask=None,
              calib=None, calib_beta=0.4, calib_sinks=None, **_):  # fmt: skip
    """Decode steps through the split-K kernel with the model path's arguments. The step's block list comes from
    the dynamic selector, from the static pattern (contiguous cache), or, for keys at explicit positions (`k_pos`
    [B, Hp, Nk], a ring cache, whose K may be one flat head holding every KV head's slots), covers the blocks
    holding each position head's tokens."""
    from .layout import sink_window_blocks

    if key_padding is not None:
        raise ValueError("key_padding: the decode kernel takes left padding (start) only")
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    slot_pos = None
    if k_pos is not None:  # keys at explicit positions: each position head's list covers its filled slots
        bs = DECODE_BLOCK
        slot_pos = (k_pos if k_pos.dim() == 3 else k_pos[:, None].expand(b, hkv, nk)).contiguous()
        filled = torch.where(slot_pos >= 0, torch.arange(nk, device=q.device), -1)
        lo = (
            torch.where(slot_pos >= 0, torch.arange(nk, device=q.device), nk).amin(-1).clamp(max=nk - 1) // bs
        )
        hi = filled.amax(-1) // bs + 1  # [B, Hp]: blocks [lo, hi) hold the head's tokens
        count = (hi - lo).clamp(min=0).to(torch.int32)
        j = torch.arange(max(1, int(count.max())), device=q.device)
        index = (lo.unsqueeze(-1) + j).clamp(max=triton.cdiv(nk, bs) - 1).to(torch.int32)
        start = None
    elif kv_index is not None:
        if kv_index.shape[2] != 1:
            raise ValueError(f"kv_index: a decode step has one query block, got {kv_index.shape[2]}")
        count, index, bs = kv_count[:, :, 0], kv_index[:, :, 0], block_size
    else:
        bs = DECODE_BLOCK
        s = sink if sink is not None else torch.zeros(h, dtype=torch.long, device=q.device)
        w = window if window is not None else torch.full((h,), -1, dtype=torch.long, device=q.device)
        shared = bool((s == s[0]).all() and (w == w[0]).all())  # one list per KV head: the group shares loads
        heads = hkv if shared else h
        count, index = sink_window_blocks(b, nq, nk, s[:1].expand(heads) if shared else s,
                                          w[:1].expand(heads) if shared else w, bs, start=start,
                                          sliding_window=sliding_window, device=q.device)  # fmt: skip
        count, index = count[:, :, 0], index[:, :, 0]
    use_calib = calib if calib_sinks is not None else None
    out, _ = decode(q, k, v, count, index.contiguous(), bs, q_pos=q_pos, slot_pos=slot_pos, start=start,
                    scale=scale, softcap=softcap, sliding_window=sliding_window, sink=sink, window=window,
                    head_mask=head_mask, calib=use_calib, calib_beta=calib_beta, calib_sinks=calib_sinks)  # fmt: skip
    return out
