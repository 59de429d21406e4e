"""Triton prefill kernel: flash-style attention with online softmax over a sparse pattern.

One program owns one query block of GROUP query heads that share a KV head (GQA): its tile has
GROUP_PAD x BLOCK_M rows, and each K/V block is loaded once for all of them. Patterns (constexpr PATTERN):
- 0: causal (plus the layer's sliding window);
- 1: per-head analytic sink + window: one loop over the sink blocks, one over the band up to the diagonal;
- 2: compact block list kv_index[B, H or Hkv, QB, MAX_K] (per-KV-head lists let the group share loads).
Inside every block the token-level mask applies: causal, left padding (start[b]) or a key-padding vector,
sliding window, sink + window. Options: logit softcap, ACT column calibration (CALIB: a second accumulator
over the sink columns, then out = f (acc - acc_s) / l + beta acc_s / l), HEAD_ZERO rows, and a column-sum
pass (COLSUM) that finds ACT sinks from the first pass's LSE. Fully masked rows give 0 and LSE -inf.
Plain pointers and int64 offsets (Triton 3.9 has no make_block_ptr). Uniform head masks (mean of V over the
visible keys) are O(N x D) prefix sums, shared with the CPU path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import rules
from .dispatch import interpreting
from .reference import AttentionResult, fit_sinks
from .rules import HEAD_UNIFORM, HEAD_ZERO


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _keep(
    qp, kp, row_ok, kmask, sink_r, window_r, sliding_window, SLIDING: tl.constexpr, STATIC: tl.constexpr
):
    """Token-level mask [rows, keys] from query and key positions: causal, real keys, the layer's sliding
    window and the per-row sink + window."""
    keep = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]) & kmask[None, :] & row_ok[:, None]
    if SLIDING:
        keep = keep & (qp[:, None] - kp[None, :] < sliding_window)
    if STATIC:
        keep = keep & ((kp[None, :] < sink_r[:, None]) | (window_r[:, None] < 0)
                       | (qp[:, None] - kp[None, :] < window_r[:, None]))  # fmt: skip
    return keep


@triton.jit
def _online_softmax(acc, acc_s, l_i, l_s, m_i, s, v, CALIB_SINKS, b, H, row_h, NK, kidx, row_ok, kmask,
                    CALIB: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """One key block of online softmax (base 2); with CALIB, a second accumulator over the ACT sink columns.
    Fully masked rows keep max -inf and weigh 0. Returns the new (acc, acc_s, l_i, l_s, m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2((s - m_use[:, None]) * 1.4426950408889634)
    alpha = tl.exp2((m_i - m_use) * 1.4426950408889634)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if CALIB:
        snk = tl.load(CALIB_SINKS + (b.to(tl.int64) * H + row_h)[:, None] * NK + kidx[None, :],
                      mask=row_ok[:, None] & kmask[None, :], other=0)  # fmt: skip
        ps = tl.where(snk != 0, p, 0.0)
        acc_s = acc_s * alpha[:, None] + tl.dot(ps.to(v.dtype), v, input_precision=PRECISION)
        l_s = l_s * alpha + tl.sum(ps, axis=1)
    return acc, acc_s, l_i, l_s, m_new


@triton.jit
def _block(
    acc, acc_s, l_i, l_s, m_i, q, kb, b, kvh, row_h, qi, row_ok, st, sink_r, window_r, lse_r,
    K, V, KEY_PAD, CALIB_SINKS, COLSUM, COLCNT, sm_scale, softcap, sliding_window,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, H, NK, D,
    h0, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    STATIC: tl.constexpr, HAS_PAD: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    CALIB: tl.constexpr, COLSUM_PASS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    kidx = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    kmask = kidx < NK
    kv_off = kidx.to(tl.int64)[:, None]
    ld_mask = kmask[:, None] & (dims[None, :] < D)
    k = tl.load(
        K + b * stride_kb + kvh * stride_kh + kv_off * stride_kn + dims[None, :], mask=ld_mask, other=0.0
    )
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    keep = _keep(qi - st, kidx - st, row_ok, kmask, sink_r, window_r, sliding_window, SLIDING, STATIC)
    if HAS_PAD:
        pad = tl.load(KEY_PAD + b.to(tl.int64) * NK + kidx, mask=kmask, other=0)
        keep = keep & (pad[None, :] != 0)
    s = tl.where(keep, s, float("-inf"))
    if COLSUM_PASS:
        # ACT sink detection: column sums of the softmax probabilities (from the first pass's LSE), per head.
        p = tl.where(keep, tl.exp(s - tl.where(lse_r == float("-inf"), 0.0, lse_r)[:, None]), 0.0)
        for g in tl.static_range(GROUP):
            sel = (row_h == h0 + g)[:, None]
            col = tl.sum(tl.where(sel, p, 0.0), axis=0)
            cnt = tl.sum(tl.where(sel & keep, 1.0, 0.0), axis=0)
            base = (b.to(tl.int64) * H + h0 + g) * NK
            tl.atomic_add(COLSUM + base + kidx, col, mask=kmask)
            tl.atomic_add(COLCNT + base + kidx, cnt, mask=kmask)
        return acc, acc_s, l_i, l_s, m_i
    v = tl.load(
        V + b * stride_vb + kvh * stride_vh + kv_off * stride_vn + dims[None, :], mask=ld_mask, other=0.0
    )
    return _online_softmax(acc, acc_s, l_i, l_s, m_i, s, v, CALIB_SINKS, b, H, row_h, NK, kidx, row_ok, kmask,
                           CALIB, PRECISION)  # fmt: skip


@triton.jit
def prefill_kernel(
    Q, K, V, Out, LSE, START, SINK, WINDOW, KV_COUNT, KV_INDEX, KEY_PAD, CALIB_SINKS, COLSUM, COLCNT, HEAD_MODE,
    sm_scale, softcap, calib_beta, sliding_window,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, H, HKV, NQ, NK, D, QB, MAX_K,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LIST_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, PATTERN: tl.constexpr, STATIC: tl.constexpr, LIST_PER_KV: tl.constexpr, HAS_START: tl.constexpr,
    HAS_PAD: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, CALIB: tl.constexpr,
    COLSUM_PASS: tl.constexpr, HEAD_ZERO_ROWS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_hg = H // GROUP
    b = pid_bh // n_hg
    h0 = (pid_bh % n_hg) * GROUP
    kvh = h0 // (H // HKV)

    rows = tl.arange(0, GROUP_PAD * BLOCK_M)
    g = rows // BLOCK_M
    qrow = pid_m * BLOCK_M + rows % BLOCK_M
    row_h = h0 + g
    row_ok = (g < GROUP) & (qrow < NQ)
    qi = NK - NQ + qrow  # key index of each query
    dims = tl.arange(0, HEAD_DIM)
    q_off = (
        b.to(tl.int64) * stride_qb
        + row_h.to(tl.int64)[:, None] * stride_qh
        + qrow.to(tl.int64)[:, None] * stride_qm
    )
    q = tl.load(Q + q_off + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)

    st = 0
    if HAS_START:
        st = tl.load(START + b).to(tl.int32)
    st0 = tl.maximum(st, 0)
    sink_r = tl.zeros([GROUP_PAD * BLOCK_M], dtype=tl.int32)
    window_r = tl.zeros([GROUP_PAD * BLOCK_M], dtype=tl.int32) - 1
    if STATIC:
        sink_r = tl.load(SINK + row_h, mask=g < GROUP, other=0).to(tl.int32)
        window_r = tl.load(WINDOW + row_h, mask=g < GROUP, other=0).to(tl.int32)
    lse_r = tl.zeros([GROUP_PAD * BLOCK_M], dtype=tl.float32)
    if COLSUM_PASS:
        lse_r = tl.load(LSE + (b.to(tl.int64) * H + row_h) * NQ + qrow, mask=row_ok, other=float("-inf"))

    acc = tl.zeros([GROUP_PAD * BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_s = tl.zeros([GROUP_PAD * BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD * BLOCK_M], dtype=tl.float32)
    l_s = tl.zeros([GROUP_PAD * BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([GROUP_PAD * BLOCK_M], dtype=tl.float32) - float("inf")

    q_first = NK - NQ + pid_m * BLOCK_M
    q_last = tl.minimum(q_first + BLOCK_M, NK) - 1
    hi = q_last // BLOCK_N + 1  # blocks up to the diagonal
    # The key blocks to visit: the listed ones (PATTERN 2), or the sink blocks then the band up to the diagonal.
    if PATTERN == 2:
        if LIST_PER_KV:
            list_off = (b.to(tl.int64) * HKV + kvh) * QB + pid_m * BLOCK_M // LIST_BLOCK
        else:
            list_off = (b.to(tl.int64) * H + h0) * QB + pid_m * BLOCK_M // LIST_BLOCK
        n_sink = 0
        n_iter = tl.load(KV_COUNT + list_off)
    else:
        lo = st0
        if SLIDING:
            lo = tl.maximum(lo, q_first - sliding_window + 1)
        band_lo = lo // BLOCK_N
        sink_lo = st0 // BLOCK_N
        n_sink = 0
        if PATTERN == 1:
            wmax = tl.max(tl.where(g < GROUP, tl.where(window_r < 0, NK, window_r), 0), axis=0)
            smax = tl.max(tl.where(g < GROUP, sink_r, 0), axis=0)
            band_lo = tl.maximum(lo, q_first - wmax + 1) // BLOCK_N
            n_sink = tl.maximum(tl.minimum((st0 + smax + BLOCK_N - 1) // BLOCK_N, band_lo) - sink_lo, 0)
        n_iter = n_sink + tl.maximum(hi - band_lo, 0)
    for j in range(0, n_iter):
        if PATTERN == 2:
            kb = tl.load(KV_INDEX + list_off * MAX_K + j)
        else:
            kb = tl.where(j < n_sink, sink_lo + j, band_lo + j - n_sink)
        acc, acc_s, l_i, l_s, m_i = _block(
            acc, acc_s, l_i, l_s, m_i, q, kb, b, kvh, row_h, qi, row_ok, st, sink_r, window_r, lse_r,
            K, V, KEY_PAD, CALIB_SINKS, COLSUM, COLCNT, sm_scale, softcap, sliding_window,
            stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, H, NK, D, h0,
            GROUP, BLOCK_M, BLOCK_N, HEAD_DIM, STATIC, HAS_PAD, SLIDING, SOFTCAP, CALIB, COLSUM_PASS, PRECISION,
        )  # fmt: skip

    if not COLSUM_PASS:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        if CALIB:
            mass = l_s / l_safe
            guard = ((1.0 - mass) <= 1e-6) | (l_i == 0.0)
            factor = (1.0 - calib_beta * mass) / tl.maximum(1.0 - mass, 1e-6)
            calibrated = (factor[:, None] * (acc - acc_s) + calib_beta * acc_s) / l_safe[:, None]
            out = tl.where(guard[:, None], out, calibrated)
        if HEAD_ZERO_ROWS:
            mode = tl.load(HEAD_MODE + row_h, mask=g < GROUP, other=0)
            out = tl.where((mode == 2)[:, None], 0.0, out)
        o_off = (
            b.to(tl.int64) * stride_ob
            + row_h.to(tl.int64)[:, None] * stride_oh
            + qrow.to(tl.int64)[:, None] * stride_om
        )
        tl.store(
            Out + o_off + dims[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & (dims[None, :] < D),
        )
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
        tl.store(LSE + (b.to(tl.int64) * H + row_h) * NQ + qrow, lse, mask=row_ok)


_TUNED = None


def _tuned():
    """On GPUs: autotune warps and pipeline stages per shape class (tile sizes stay fixed: block lists and GQA
    groups define them). The column-sum buffers are zeroed before every trial. Unverified on hardware so far."""
    global _TUNED
    if _TUNED is None:
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]
        _TUNED = triton.autotune(configs, key=["HEAD_DIM", "GROUP", "PATTERN", "CALIB", "COLSUM_PASS", "BLOCK_M"],
                                 reset_to_zero=["COLSUM", "COLCNT"])(prefill_kernel)  # fmt: skip
    return _TUNED


def config(
    h: int, hkv: int, d: int, pattern: int, list_per_kv: bool, block_size: int, calib: bool = False
) -> dict:
    """Tile sizes: one configuration (the interpreter cannot autotune). A tile holds GROUP_PAD x BLOCK_M rows:
    128 at d <= 64, 64 at d = 128, 32 at d = 256, halved for ACT's second accumulator (register budget on sm_90,
    checked by compile_check). Block lists keep BLOCK_N = block_size; BLOCK_M divides it."""
    group = h // hkv if (pattern != 2 or list_per_kv) else 1
    group_pad = triton.next_power_of_2(group)
    rows = (128 if d <= 64 else 64 if d <= 128 else 32) // (2 if calib else 1)
    if pattern == 2:
        block_n = block_size
        block_m = min(block_size, max(16, rows // group_pad))
    else:
        block_n = 64 if d <= 128 else 32
        block_m = max(16, rows // group_pad)
    return dict(GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=block_n,
                HEAD_DIM=max(16, triton.next_power_of_2(d)), num_warps=4 if d <= 64 else 8, num_stages=2)  # fmt: skip


def _launch(q, k, v, *, scale, softcap, start, key_padding, sliding_window, sink, window, kv_count, kv_index,
            block_size, head_mask, calib_sinks, calib_beta, colsum_pass=False, lse_in=None):  # fmt: skip
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    pattern = 2 if kv_index is not None else (1 if sink is not None else 0)
    list_per_kv = kv_index is not None and kv_index.shape[1] == hkv and hkv != h
    cfg = config(h, hkv, d, pattern, list_per_kv, block_size, calib_sinks is not None or colsum_pass)
    if pattern == 2 and (kv_index.shape[2] != triton.cdiv(nq, block_size) or block_size < 16):
        raise ValueError(
            f"kv_index: expected {triton.cdiv(nq, block_size)} query blocks and block_size >= 16"
        )
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    lse = lse_in if colsum_pass else torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    colsum = torch.zeros(b, h, nk, dtype=torch.float32, device=q.device) if colsum_pass else dummy
    colcnt = torch.zeros(b, h, nk, dtype=torch.float32, device=q.device) if colsum_pass else dummy
    i32 = lambda t: dummy if t is None else t.to(device=q.device, dtype=torch.int32).contiguous()  # noqa: E731
    zero_rows = head_mask is not None and bool((head_mask == HEAD_ZERO).any())
    grid = (triton.cdiv(nq, cfg["BLOCK_M"]), b * (h // cfg["GROUP"]))
    kernel = prefill_kernel
    if q.device.type == "cuda" and not interpreting():
        kernel = _tuned()
        cfg = {key: val for key, val in cfg.items() if key not in ("num_warps", "num_stages")}
    kernel[grid](
        q, k, v, out, lse, i32(start), i32(sink), i32(window), i32(kv_count), i32(kv_index),
        i32(key_padding), dummy if calib_sinks is None else calib_sinks.to(q.device, torch.int8).contiguous(),
        colsum, colcnt, i32(head_mask),
        float(scale), float(softcap or 0.0), float(calib_beta), int(sliding_window or 0),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, hkv, nq, nk, d, 1 if kv_index is None else kv_index.shape[2], 1 if kv_index is None else kv_index.shape[3],
        LIST_BLOCK=block_size, PATTERN=pattern, STATIC=sink is not None, LIST_PER_KV=list_per_kv, HAS_START=start is not None, HAS_PAD=key_padding is not None,
        SLIDING=sliding_window is not None, SOFTCAP=softcap is not None, CALIB=calib_sinks is not None,
        COLSUM_PASS=colsum_pass, HEAD_ZERO_ROWS=zero_rows, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **cfg,
    )  # fmt: skip
    return (colsum, colcnt) if colsum_pass else (out, lse)


def attention(
    q, k, v, *, scale=None, softcap=None, start=None, key_padding=None, sliding_window=None, sink=None,
    window=None, kv_count=None, kv_index=None, block_size=64, head_mask=None, calib=None, calib_beta=0.4,
    calib_threshold=0.1, calib_sinks=None, **_,
) -> AttentionResult:  # fmt: skip
    """Same contract as `reference.attention`; returns AttentionResult(out, lse, calib_sinks)."""
    if q.device.type != "cuda" and not interpreting():
        raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    if q.dtype == torch.float64:
        raise ValueError("q: the triton backend takes fp16, bf16 or fp32, not fp64")
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    if sink is not None and window is not None and not bool((window >= 0).any()):
        sink = window = None
    kw = dict(scale=scale, softcap=softcap, start=start, key_padding=key_padding, sliding_window=sliding_window,
              sink=sink, window=window, kv_count=kv_count, kv_index=kv_index, block_size=block_size,
              head_mask=head_mask)  # fmt: skip
    used = None
    if calib is not None and bool(calib.any()):
        if calib_sinks is None:  # pass 1: LSE; pass 2: column means; sinks = columns above the threshold
            _, lse = _launch(q, k, v, calib_sinks=None, calib_beta=calib_beta, **kw)
            colsum, colcnt = _launch(q, k, v, calib_sinks=None, calib_beta=calib_beta, colsum_pass=True,
                                     lse_in=lse, **kw)  # fmt: skip
            sinks = rules.find_sinks(colsum, colcnt, calib_threshold)
        else:
            sinks = fit_sinks(calib_sinks.to(q.device), k.shape[2])
        used = sinks & calib.view(1, -1, 1).to(q.device)
    out, lse = _launch(q, k, v, calib_sinks=used, calib_beta=calib_beta, **kw)
    if head_mask is not None and bool((head_mask == HEAD_UNIFORM).any()):
        qp, kp = rules.token_positions(q.shape[0], q.shape[2], k.shape[2], start, key_padding, q.device)
        out = rules.apply_head_mask(out, v, head_mask, qp, kp, sliding_window=sliding_window, ordered=True)
    return AttentionResult(out, lse, used)
