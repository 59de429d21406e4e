"""Achieved sparsity: how many attention scores a call computes, against the causal total, without N x N.

Static patterns are counted exactly per query row from intervals (left padding and the layer's sliding window
included; masks with holes in the middle are counted as if left-padded). Block lists are counted per chosen block
pair with the causal rule in key-index space (padding and sliding windows inside chosen blocks are not
subtracted, so the figure is an upper bound there).
"""

from __future__ import annotations

import torch

from .rules import token_positions


def _row_bounds(b, nq, nk, start, sliding_window, device):
    q_pos, k_pos = token_positions(b, nq, nk, start, device=device)  # [B, Nq], [B, Nk]
    lo = k_pos[:, :1].clamp(min=0).expand_as(q_pos)  # the first key present (a sliding cache may drop some)
    if sliding_window is not None:
        lo = torch.maximum(lo, q_pos - sliding_window + 1)
    return q_pos, lo


def causal_count(b, h, nq, nk, *, start=None, sliding_window=None, device="cpu") -> int:
    """Scores the unpatched model computes: every visible (query, key) pair, over all heads."""
    q_pos, lo = _row_bounds(b, nq, nk, start, sliding_window, device)
    return int((q_pos - lo + 1).clamp(min=0).sum()) * h


def gathered_count(pos: torch.Tensor, h: int, *, sliding_window=None) -> int:
    """Scores of dense causal attention among the tokens at the sorted positions `pos` [N] (a gathered subset of
    one sequence, `reform`'s recompute), over h heads, inside the layer's sliding window."""
    n = pos.numel()
    if sliding_window is None:
        return n * (n + 1) // 2 * h
    lo = torch.searchsorted(pos, pos - sliding_window + 1)
    return int((torch.arange(n, device=pos.device) - lo + 1).sum()) * h


def computed_count(
    b, h, nq, nk, *, start=None, sliding_window=None, sink=None, window=None, kv_count=None, kv_index=None,
    block_size=64, device="cpu", **_,
) -> int:  # fmt: skip
    """Scores a decision computes (head masks and ACT change probabilities, not the pattern)."""
    if kv_index is not None:
        return _block_count(nq, nk, kv_count, kv_index, block_size)
    if sink is None or window is None:
        return causal_count(b, h, nq, nk, start=start, sliding_window=sliding_window, device=device)
    q_pos, lo = _row_bounds(b, nq, nk, start, sliding_window, device)
    p, lo = q_pos[:, None, :], lo[:, None, :]  # [B, 1, Nq]
    win = window.to(device).view(1, -1, 1)
    snk = sink.to(device).view(1, -1, 1)
    w_lo = torch.where(win < 0, lo, torch.maximum(lo, p - win + 1))
    in_window = (p - w_lo + 1).clamp(min=0)
    in_sink = (torch.minimum(snk, w_lo) - lo).clamp(min=0)
    return int(torch.where(p >= 0, in_window + in_sink, 0).sum())


def _block_count(nq, nk, kv_count, kv_index, block_size) -> int:
    b, h, n_qb, max_k = kv_index.shape
    dev = kv_index.device
    rows = torch.arange(n_qb * block_size, device=dev).view(n_qb, block_size)
    q_idx = (nk - nq + rows).view(1, 1, n_qb, 1, block_size)  # key index of each query row
    valid_row = (rows < nq).view(1, 1, n_qb, 1, block_size)
    c0 = kv_index.long().unsqueeze(-1) * block_size
    c1 = (c0 + block_size).clamp(max=nk)
    per_row = (torch.minimum(q_idx + 1, c1) - c0).clamp(min=0) * valid_row
    chosen = (torch.arange(max_k, device=dev).view(1, 1, 1, max_k) < kv_count.unsqueeze(-1)).unsqueeze(-1)
    return int((per_row * chosen).sum())


class SparsityTracker:
    """Accumulates computed and causal score counts over every attention call of a patched model."""

    def __init__(self):
        self.computed = 0
        self.causal = 0

    def add(self, computed: int, causal: int) -> None:
        self.computed += computed
        self.causal += causal

    def reset(self) -> None:
        self.computed = self.causal = 0

    @property
    def density(self) -> float:
        """Fraction of the causal attention scores actually computed (1.0 = dense)."""
        return self.computed / self.causal if self.causal else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density
