"""Per-head ring-buffer KV layout (for MoA and retrieval-head compression) and its reference attention.

Layout, per layer: k, v [B, Hkv, CAP, D] and slot_pos [B, Hkv, CAP] int32 (the token position a slot holds,
-1 = empty). KV head h keeps its first sink[h] tokens in slots [0, sink[h]) and the most recent tokens in a
ring over slots [sink[h], sink[h] + ring[h]): token p >= sink[h] goes to slot sink[h] + (p - sink[h]) % ring[h].
CAP >= max(sink + ring); heads with a smaller span leave their tail slots empty. Slots are unordered; attention
reads positions from slot_pos, so the order never matters. A decode step of n tokens is exact for every one of
them when ring[h] >= window[h] + n - 1 (`ring_size`).
"""

from __future__ import annotations

import torch

from .reference import HEAD_UNIFORM, HEAD_ZERO


def ring_size(window: torch.Tensor, max_step: int = 1) -> torch.Tensor:
    return window + max_step - 1


def ring_slots(pos: torch.Tensor, sink: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """Slot of token positions pos[..., N] for KV heads with sink[Hkv] and ring[Hkv] (broadcast on dim -2)."""
    s, r = sink.view(-1, 1), ring.view(-1, 1)
    return torch.where(pos < s, pos, s + (pos - s) % r.clamp(min=1))


def ring_append(k_cache, v_cache, slot_pos, k_new, v_new, pos, sink, ring):
    """Write new tokens k_new, v_new [B, Hkv, N, D] at positions pos [B, N] (in order), in place."""
    b, hkv, n, _ = k_new.shape
    p = pos.view(b, 1, n).expand(b, hkv, n)
    slot = ring_slots(p, sink.to(p.device), ring.to(p.device))  # [B, Hkv, N]
    for i in range(n):  # in order, so a later token overwrites an earlier one in the same slot
        idx = slot[:, :, i : i + 1]
        k_cache.scatter_(2, idx.unsqueeze(-1).expand(-1, -1, -1, k_new.shape[-1]), k_new[:, :, i : i + 1])
        v_cache.scatter_(2, idx.unsqueeze(-1).expand(-1, -1, -1, v_new.shape[-1]), v_new[:, :, i : i + 1])
        slot_pos.scatter_(2, idx, p[:, :, i : i + 1].to(slot_pos.dtype))


def ring_allowed(slot_pos, q_pos, h, *, sink=None, window=None, sliding_window=None):
    """[B, H, Nq, CAP] bool: slot holds a token, causal, within the layer's window and the head's pattern."""
    hkv = slot_pos.shape[1]
    kp = slot_pos.repeat_interleave(h // hkv, dim=1)[:, :, None, :].long()  # [B, H, 1, CAP]
    qp = q_pos[:, None, :, None].long()  # [B, 1, Nq, 1]
    allowed = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        allowed &= (qp - kp) < sliding_window
    if sink is not None and window is not None:
        s, w = sink.view(1, h, 1, 1).to(kp.device), window.view(1, h, 1, 1).to(kp.device)
        allowed &= (kp < s) | (w < 0) | ((qp - kp) < w)
    return allowed


def ring_reference(q, k, v, slot_pos, q_pos, *, scale=None, softcap=None, sink=None, window=None,
                   sliding_window=None, head_mask=None, calib=None, calib_beta=0.4, calib_sinks=None):  # fmt: skip
    """Exact attention of q [B, H, Nq, D] at positions q_pos [B, Nq] over a ring cache. ACT reuses the given
    calib_sinks [B, H, CAP] (sinks found at prefill, in slot order)."""
    b, h, nq, d = q.shape
    g = h // k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kk, vv = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
    s = torch.matmul(q.float(), kk.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    allowed = ring_allowed(slot_pos, q_pos, h, sink=sink, window=window, sliding_window=sliding_window)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.where(allowed, torch.exp(s - lse.clamp(min=-1e30)), 0.0)
    if calib is not None and calib_sinks is not None:
        sk = (calib_sinks.bool() & calib.view(1, h, 1).to(q.device)).unsqueeze(2)
        m = (p * sk).sum(-1, keepdim=True)
        guard = (1 - m) <= 1e-6
        f = torch.where(guard, 1.0, (1 - calib_beta * m) / (1 - m).clamp(min=1e-6))
        p = torch.where(guard, p, torch.where(sk, p * calib_beta, p * f))
    if head_mask is not None:
        hm = head_mask.view(1, h, 1, 1).to(q.device)
        vis = ring_allowed(slot_pos, q_pos, h, sliding_window=sliding_window).float()
        p = torch.where(hm == HEAD_UNIFORM, vis / vis.sum(-1, keepdim=True).clamp(min=1), p)
        p = torch.where(hm == HEAD_ZERO, 0.0, p)
    return torch.matmul(p, vv).to(q.dtype), lse.squeeze(-1)
