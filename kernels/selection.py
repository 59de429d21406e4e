"""Block selection for dynamic methods (LongHeads, DHSA): pooled q.k scores -> top-k -> compact block lists.

Vectorised torch, chunked over query blocks so the score table is at most [B, H, QB_CHUNK, KB] (a block-level
table, never token-level). Each query block always keeps its first `sink_blocks` key blocks and the
`local_blocks` blocks ending at its diagonal; then the `top_k` best-scoring other causal blocks. Pooling is the
mean over a block's real tokens (left padding excluded). The result is sorted and padded with 0 past kv_count.
"""

from __future__ import annotations

import torch

from .layout import cdiv

QB_CHUNK_ELEMENTS = 1 << 24  # score-table elements per query-block chunk


def pool_blocks(x: torch.Tensor, block_size: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x [B, H, N, D] over blocks of block_size tokens -> [B, H, NB, D] (fp32); `real` [B, N] masks
    padding out of the mean (an all-padding block pools to 0)."""
    b, h, n, d = x.shape
    nb = cdiv(n, block_size)
    pad = nb * block_size - n
    w = torch.ones(b, n, device=x.device) if real is None else real.float()
    xs = torch.nn.functional.pad(x.float() * w[:, None, :, None], (0, 0, 0, pad)).view(
        b, h, nb, block_size, d
    )
    cnt = torch.nn.functional.pad(w, (0, pad)).view(b, 1, nb, block_size).sum(-1).clamp(min=1)
    return xs.sum(3) / cnt.unsqueeze(-1)


def topk_blocks(q, k, block_size: int, top_k: int, *, sink_blocks: int = 1, local_blocks: int = 1, start=None,
                scale: float | None = None):  # fmt: skip
    """kv_count [B, H, QB] and kv_index [B, H, QB, MAX_K] (int32) for q [B, H, Nq, D], k [B, Hkv, Nk, D]."""
    if top_k < 0 or sink_blocks < 0 or local_blocks < 1:
        raise ValueError(
            f"top_k, sink_blocks: must be >= 0 and local_blocks >= 1; got {top_k}, {sink_blocks}, {local_blocks}"
        )
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    dev = q.device
    scale = d**-0.5 if scale is None else scale
    st = torch.zeros(b, dtype=torch.long, device=dev) if start is None else start.to(dev).long()
    k_real = torch.arange(nk, device=dev).view(1, nk) >= st.view(b, 1)
    q_real = torch.arange(nk - nq, nk, device=dev).view(1, nq) >= st.view(b, 1)
    kp = pool_blocks(k, block_size, k_real).repeat_interleave(h // hkv, 1)  # [B, H, KB, D]
    qp = pool_blocks(q, block_size, q_real)  # [B, H, QB, D]
    qb_n, kb_n = qp.shape[2], kp.shape[2]
    max_k = min(kb_n, sink_blocks + local_blocks + top_k)
    count = torch.zeros(b, h, qb_n, dtype=torch.int32, device=dev)
    index = torch.zeros(b, h, qb_n, max_k, dtype=torch.int32, device=dev)
    rows = max(1, QB_CHUNK_ELEMENTS // max(1, b * h * kb_n))
    kb = torch.arange(kb_n, device=dev)
    for r0 in range(0, qb_n, rows):
        r1 = min(qb_n, r0 + rows)
        qb = torch.arange(r0, r1, device=dev)
        diag = (nk - nq + torch.clamp((qb + 1) * block_size, max=nq) - 1) // block_size  # [R]
        first = st.clamp(min=0).view(b, 1, 1, 1) // block_size  # first block holding a real key
        causal = (kb.view(1, 1, 1, -1) <= diag.view(1, 1, -1, 1)) & (kb.view(1, 1, 1, -1) >= first)
        forced = (kb.view(1, 1, 1, -1) < first + sink_blocks) | (
            kb.view(1, 1, 1, -1) > diag.view(1, 1, -1, 1) - local_blocks
        )
        forced &= causal
        score = torch.matmul(qp[:, :, r0:r1], kp.transpose(-1, -2)) * scale  # [B, H, R, KB]
        # forced blocks rank above every scored block; non-causal blocks rank last
        rank = torch.where(forced, torch.inf, torch.where(causal, score, -torch.inf))
        n_causal = causal.sum(-1)
        n_take = torch.minimum(n_causal, forced.sum(-1) + top_k).clamp(max=max_k)
        top = rank.topk(max_k, dim=-1).indices
        keep = torch.arange(max_k, device=dev).view(1, 1, 1, -1) < n_take.unsqueeze(-1)
        chosen = torch.where(keep, top, kb_n).sort(-1).values
        index[:, :, r0:r1] = torch.where(chosen == kb_n, 0, chosen).int()
        count[:, :, r0:r1] = n_take.int().expand(b, h, r1 - r0)
    return count, index
