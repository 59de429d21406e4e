"""The attention vocabulary: what a query may see, and the two probability edits. Defined once here; every
backend (reference, cpu, flex, the Triton host code), every cache and every method renders these functions
(docs/ARCHITECTURE.md, "One vocabulary"). The Triton kernels keep an in-kernel copy of `keep` and `act_combine`
(`triton_prefill._keep`, the CALIB epilogue), tested against these.

Positions, not slots: `q_pos` and `k_pos` are token positions (0 = a sequence's first real token). A key slot
that holds no token (left padding, a hole in the mask, an empty ring slot) has position -1. All functions take
broadcasting tensors, so one rule serves a [B, H, Nq, Nk] mask, a row chunk, a ring of slots and flex's
per-element `mask_mod`.
"""

from __future__ import annotations

import torch

HEAD_KEEP, HEAD_UNIFORM, HEAD_ZERO = 0, 1, 2
HEAD_MODES = {"keep": HEAD_KEEP, "uniform": HEAD_UNIFORM, "zero": HEAD_ZERO}
EMPTY = -1  # the position of a slot without a token


# --- positions --------------------------------------------------------------------------------------------------


def token_positions(b: int, nq: int, nk: int, start=None, key_padding=None, device="cpu"):
    """Positions of queries [B, Nq] and keys [B, Nk] for a contiguous cache: slot index minus the row's first
    real slot `start[b]`; the queries are the last Nq slots. `key_padding` [B, Nk] (True = real) marks holes."""
    st = torch.zeros(b, 1, dtype=torch.long, device=device)
    if start is not None:
        st = start.to(device=device, dtype=torch.long).view(b, 1)
    k_pos = torch.arange(nk, device=device).view(1, nk) - st
    q_pos = torch.arange(nk - nq, nk, device=device).view(1, nq) - st
    if key_padding is not None:
        k_pos = torch.where(key_padding.to(device=device, dtype=torch.bool), k_pos, EMPTY)
    return q_pos, k_pos.clamp(min=EMPTY)


# --- scores -----------------------------------------------------------------------------------------------------


def soft_cap(scores, cap=None):
    """The model's logit soft-capping (Gemma-2): cap * tanh(scores / cap); unchanged where cap is None."""
    return scores if cap is None else torch.tanh(scores / cap) * cap


# --- what a query may see ---------------------------------------------------------------------------------------


def visible(qp, kp, sliding_window=None):
    """The model's own rule: a real key (kp >= 0), causal, inside the layer's sliding window."""
    keep = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        keep = keep & (qp - kp < sliding_window)
    return keep


def narrows(window, nk: int):
    """Whether a window (-1: unlimited) drops any key of a call over `nk` contiguous keys, whose largest
    query-key distance is nk - 1; one that does not keeps every key, so the call is dense."""
    return (window >= 0) & (window < nk)


def in_pattern(qp, kp, sink, window):
    """The per-head static pattern: the first `sink` positions, or the last `window` (the query included);
    window < 0 is unlimited."""
    return (kp < sink) | (window < 0) | (qp - kp < window)


def keep(qp, kp, *, sliding_window=None, sink=None, window=None):
    """Everything a query sees: `visible`, and the static pattern when one is given."""
    allowed = visible(qp, kp, sliding_window)
    if sink is not None and window is not None:
        allowed = allowed & in_pattern(qp, kp, sink, window)
    return allowed


def keep_mask(q_pos, k_pos, h: int, *, sliding_window=None, sink=None, window=None):
    """[B, 1|H, Nq, Nk] bool: `keep` for query positions [B, Nq] and key positions [B, Nk] (shared by every
    head) or [B, Hp, Nk] (per position head, Hp dividing H: a ring cache, where a slot belongs to one KV head and
    is -1 for the others), with per-query-head sink [H] and window [H]."""
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, None, None, :] if k_pos.dim() == 2 else _per_query_head(k_pos, h)[:, :, None, :]
    if sink is not None and window is not None:
        sink, window = (t.to(q_pos.device).view(1, -1, 1, 1) for t in (sink, window))
    return keep(qp, kp, sliding_window=sliding_window, sink=sink, window=window)


def _per_query_head(k_pos, h: int):
    return k_pos.repeat_interleave(h // k_pos.shape[1], dim=1)


# --- the probability edits --------------------------------------------------------------------------------------


def find_sinks(col_sum: torch.Tensor, col_count: torch.Tensor, threshold: float) -> torch.Tensor:
    """ACT's sink set [B, H, Nk] (docs/METHODS.md §1): keys whose mean column score (the sum of A over the rows
    that see the key, over their number) is above `threshold`, minus the first such key (never calibrated)."""
    sinks = col_sum / col_count.clamp(min=1) > threshold
    first = torch.where(sinks.any(-1), sinks.float().argmax(-1), -1)
    return sinks & (torch.arange(sinks.shape[-1], device=sinks.device) != first.unsqueeze(-1))


def act_combine(acc, acc_s, mass, beta: float):
    """ACT's row edit on outputs: with acc = sum_j p_j v_j, acc_s the same over the sink keys and mass the
    sinks' share of p, sinks weigh beta p_j and the rest f p_j, f = (1 - beta mass) / (1 - mass), so rows still
    sum to 1. A row whose mass is all on sinks is left unchanged. Shapes [..., D] and [...]."""
    m = mass.unsqueeze(-1)
    guard = (1 - m) <= 1e-6
    factor = (1 - beta * m) / (1 - m).clamp(min=1e-6)
    return torch.where(guard, acc, factor * (acc - acc_s) + beta * acc_s)


def apply_head_mask(out, v, head_mask, q_pos, k_pos, *, sliding_window=None, ordered=False):
    """Head masks on outputs [B, H, Nq, D]: HEAD_ZERO rows give 0; HEAD_UNIFORM rows give the mean of V over the
    keys the query may see (`visible`: the static pattern is not applied; Wu et al. 2024's uniform mask).
    `ordered`: key slot j holds position j - start (a contiguous cache), so the mean is a difference of prefix
    sums, O(N x D); otherwise (a ring, a few decode queries) it is an explicit small mask."""
    b, h, nq, d = out.shape
    hkv = v.shape[1]
    hm = head_mask.to(out.device)
    out = torch.where((hm == HEAD_ZERO).view(1, h, 1, 1), torch.zeros_like(out), out)
    uni = (hm == HEAD_UNIFORM).nonzero().flatten()
    if not uni.numel():
        return out
    kv = uni // (h // hkv)
    if ordered:
        real = (k_pos >= 0).to(torch.float64)  # [B, Nk]
        cs_v = torch.nn.functional.pad(
            torch.cumsum(v.to(torch.float64) * real[:, None, :, None], 2), (0, 0, 1, 0)
        )
        cs_n = torch.nn.functional.pad(torch.cumsum(real, 1), (1, 0))
        nk = v.shape[2]
        hi = torch.arange(nk - nq, nk, device=v.device) + 1  # exclusive end per query
        lo = (hi - sliding_window).clamp(min=0) if sliding_window is not None else torch.zeros_like(hi)
        total = cs_v[:, kv][:, :, hi] - cs_v[:, kv][:, :, lo]  # [B, U, Nq, D]
        mean = total / (cs_n[:, hi] - cs_n[:, lo]).clamp(min=1)[:, None, :, None]
    else:
        kp = k_pos[:, None, :] if k_pos.dim() == 2 else k_pos[:, uni // (h // k_pos.shape[1])]
        vis = visible(q_pos[:, None, :, None], kp.expand(b, len(kv), -1)[:, :, None, :], sliding_window)
        vis = vis.to(torch.float32)
        mean = torch.matmul(vis / vis.sum(-1, keepdim=True).clamp(min=1), v[:, kv].float())
    out = out.clone()
    out[:, uni] = mean.to(out.dtype)
    return out
