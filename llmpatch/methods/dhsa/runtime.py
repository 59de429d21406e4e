"""DHSA at run time: training-free chunk boundaries, chunk-level scores, a block list per query block.

All of it runs in token space (row b's token t at index t; `kernels.layout.to_tokens`), so a left-padded row selects
what it would alone. Nothing is N x N: boundary detection scores N/stride sampled queries, and the selection
table is [query blocks x key tokens] at most, in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels import density, dispatch, rules
from ...kernels.layout import to_tokens
from ...sharding import all_reduce_mean

TABLE_ELEMENTS = 1 << 24  # scores held at once (sampled queries x keys x heads, or query blocks x key tokens)


@dataclass
class Config:
    budget: int  # keys per query block, in tokens (rounded down to whole key blocks)
    block_size: int
    sink: int
    recent: int
    tail: int
    gap_window: int  # w of the boundary rule
    nms: int
    per_128: int  # at most per_128 boundaries per 128 tokens
    stride: int  # every stride-th query is sampled for the boundary rule


def boundaries(cfg: Config, q, k, n, scale, shard=None) -> torch.Tensor:
    """Chunk id per token [B, N] from the attention-ratio rule on sampled queries (docs/METHODS.md §4).

    For the gap after token c: a_past = attention mass (averaged over heads) that later sampled queries put on keys
    c-w+1..c, a_fut the same on c+1..c+w; r = (max + eps) / (min + eps). Gaps that are the largest r within
    +-nms and have r > 1 are kept, the best (N / 128) * per_128 of them per row."""
    b, h, nt, d = q.shape
    hkv, g, w, dev = k.shape[1], h // k.shape[1], cfg.gap_window, q.device
    picks = torch.arange(cfg.stride - 1, nt, cfg.stride, device=dev)
    mass = torch.zeros(b, nt, device=dev)  # S(j): mass on key j from sampled queries at or past j + 2w
    kf = k.float()
    rows = max(1, TABLE_ELEMENTS // max(1, b * h * nt))
    j = torch.arange(nt, device=dev)
    for r0 in range(0, len(picks), rows):
        pi = picks[r0 : r0 + rows]
        qs = q[:, :, pi].float().reshape(b, hkv, g * len(pi), d)
        s = torch.matmul(qs, kf.transpose(-1, -2)).view(b, h, len(pi), nt) * scale
        s = s.masked_fill(~rules.visible(pi.view(1, 1, -1, 1), j.view(1, 1, 1, -1)), float("-inf"))
        p = torch.softmax(s, -1).mean(1)  # [B, P, N]
        later = (pi.view(1, -1, 1) >= j.view(1, 1, -1) + 2 * w) & (pi.view(1, -1, 1) < n.view(-1, 1, 1))
        mass += (p * later).sum(1)
    mass = all_reduce_mean(mass, shard)  # tensor parallel: the mean over every rank's heads
    csum = torch.nn.functional.pad(mass.cumsum(-1), (1, 0))  # csum[i] = sum of mass[:i]
    c = torch.arange(nt, device=dev)
    lo, hi = (c - w + 1).clamp(min=0), (c + w + 1).clamp(max=nt)
    past = csum[:, c + 1] - csum[:, lo]
    fut = csum[:, hi] - csum[:, c + 1]
    eps = 1e-6
    r = (torch.maximum(past, fut) + eps) / (torch.minimum(past, fut) + eps)
    ok = (c >= w - 1) & (c.view(1, -1) < n.view(-1, 1) - w) & (r > 1.0 + 1e-3)
    r = torch.where(ok, r, 0.0) - c * 1e-9  # ties go to the earlier gap
    peak = torch.nn.functional.max_pool1d(r[:, None], 2 * cfg.nms + 1, 1, cfg.nms)[:, 0]
    keep = ok & (r >= peak)
    cap = (n * cfg.per_128 // 128).clamp(min=1)
    ranked = torch.where(keep, r, -torch.inf)
    order = ranked.argsort(-1, descending=True).argsort(-1)  # rank of each gap
    keep &= order < cap.view(-1, 1)
    split = torch.nn.functional.pad(keep[:, :-1], (1, 0))  # a boundary after c starts a chunk at c + 1
    return split.long().cumsum(-1)


def block_lists(cfg: Config, q, k, chunk, n, sliding_window, shard=None):
    """kv_count [B, 1, QB] and kv_index [B, 1, QB, MAX_K] for queries q [B, H, N, D] and keys in token space."""
    b, h, nt, d = q.shape
    bs, dev = cfg.block_size, q.device
    nb = (nt + bs - 1) // bs
    pad = nb * bs - nt
    real = (torch.arange(nt, device=dev)[None] < n[:, None]).float()  # [B, N]
    n_chunks = int(chunk.max()) + 1
    kmean = all_reduce_mean(k.float().mean(1), shard) * real[..., None]  # [B, N, D], heads averaged
    ksum = torch.zeros(b, n_chunks, d, device=dev).scatter_add_(1, chunk[..., None].expand(b, nt, d), kmean)
    size = torch.zeros(b, n_chunks, device=dev).scatter_add_(1, chunk, real)
    kbar = ksum / size.clamp(min=1)[..., None] * size.sqrt()[..., None]  # mean * sqrt(|c|)
    qmean = all_reduce_mean(q.float().mean(1), shard)  # [B, N, D]
    qm = torch.nn.functional.pad(qmean * real[..., None], (0, 0, 0, pad)).view(b, nb, bs, d)
    qcnt = torch.nn.functional.pad(real, (0, pad)).view(b, nb, bs).sum(-1)
    qbar = qm.sum(2) / qcnt.clamp(min=1)[..., None] * qcnt.sqrt()[..., None]
    chunk_score = torch.matmul(qbar, kbar.transpose(-1, -2))  # [B, QB, C]
    # key blocks take their best token's chunk score (token top-k rounded to blocks of block_size)
    kchunk = torch.nn.functional.pad(chunk, (0, pad), value=0).view(b, 1, nb * bs)
    n_keep = max(1, cfg.budget // bs)
    first_sink = (cfg.sink + bs - 1) // bs
    recent = (cfg.recent + bs - 1) // bs  # includes the diagonal block
    max_k = min(nb, max(n_keep, first_sink + recent))
    count = torch.zeros(b, 1, nb, dtype=torch.int32, device=dev)
    index = torch.zeros(b, 1, nb, max_k, dtype=torch.int32, device=dev)
    kb = torch.arange(nb, device=dev)
    rows = max(1, TABLE_ELEMENTS // max(1, b * nb * bs))
    tail_from = ((n - cfg.tail).clamp(min=0) // bs).view(b, 1, 1)  # query blocks holding the dense tail
    for r0 in range(0, nb, rows):
        qb = torch.arange(r0, min(nb, r0 + rows), device=dev)
        tok = torch.gather(chunk_score[:, r0 : r0 + len(qb)], 2, kchunk.expand(b, len(qb), -1))
        score = tok.view(b, len(qb), nb, bs).amax(-1)  # [B, R, KB]
        causal = kb.view(1, 1, -1) <= qb.view(1, -1, 1)
        if sliding_window is not None:
            causal &= kb.view(1, 1, -1) >= (qb * bs - sliding_window + 1).clamp(min=0).view(1, -1, 1) // bs
        forced = (kb.view(1, 1, -1) < first_sink) | (kb.view(1, 1, -1) > qb.view(1, -1, 1) - recent)
        forced = (forced | (qb.view(1, -1, 1) >= tail_from)) & causal
        rank = torch.where(forced, torch.inf, torch.where(causal, score, -torch.inf))
        take = torch.minimum(causal.sum(-1), torch.clamp(forced.sum(-1), min=n_keep))
        width = max_k
        if bool((qb.view(1, -1) >= tail_from.view(-1, 1)).any()):
            width = nb  # the dense tail lists every causal block
        # best first; equal scores (blocks of one chunk) go to the more recent block
        top = nb - 1 - rank.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :width]
        keep = torch.arange(width, device=dev).view(1, 1, -1) < take.unsqueeze(-1)
        chosen = torch.where(keep, top, nb).sort(-1).values
        if width > index.shape[-1]:
            index = torch.nn.functional.pad(index, (0, width - index.shape[-1]))
        index[:, 0, r0 : r0 + len(qb), :width] = torch.where(chosen == nb, 0, chosen).int()
        count[:, 0, r0 : r0 + len(qb)] = take.int()
    return count, index


class DHSAAttention:
    """A layer's DHSA attention (`LayerDecision.attend`): sparse block lists on a fresh prefill longer than the
    budget, dense otherwise. `shared` holds the prompt's boundaries, found at the `first` patched layer."""

    label = "dhsa dynamic chunks"

    def __init__(self, cfg: Config, shared: dict, first: bool):
        self.cfg, self.shared, self.first = cfg, shared, first

    def __call__(self, decision, q, k, v, mask, scale, softcap):
        cfg, shared = self.cfg, self.shared
        b, h, nq, d = q.shape
        nk, dev = k.shape[2], q.device
        scale = d**-0.5 if scale is None else scale
        start = mask.row_start(b, dev)
        n = nk - start
        dense = nq != nk or int(n.max()) <= cfg.budget or mask.key_padding is not None or mask.kv_offset
        if dense:  # decode steps, prompts within the budget: every key (the paper's decode is dense)
            out, _ = dispatch.attention(q, k, v, backend=decision.backend, scale=scale, softcap=softcap,
                                        start=mask.start, key_padding=mask.key_padding,
                                        sliding_window=decision.sliding_window)  # fmt: skip
            return out, None
        nt = int(n.max())
        qt, kt, vt = to_tokens(q, start, nt), to_tokens(k, start, nt), to_tokens(v, start, nt)
        if self.first or shared.get("shape") != (b, nt):
            shared["chunk"] = boundaries(cfg, qt, kt, n, scale, decision.shard)
            shared["shape"] = (b, nt)
        count, index = block_lists(cfg, qt, kt, shared["chunk"], n, decision.sliding_window, decision.shard)
        hkv = k.shape[1]
        count, index = count.expand(b, hkv, -1), index.expand(b, hkv, -1, -1)
        out, _ = dispatch.attention(qt, kt, vt, backend=decision.backend, scale=scale, softcap=softcap,
                                    kv_count=count, kv_index=index, block_size=cfg.block_size,
                                    sliding_window=decision.sliding_window)  # fmt: skip

        def computed():
            per_kv = density.computed_count(
                b, h, nt, nt, kv_count=count, kv_index=index, block_size=cfg.block_size
            )
            return per_kv * (h // hkv)

        if nt == nk and not bool(start.any()):
            return out, computed
        slot = (torch.arange(nk, device=dev)[None] - start[:, None]).clamp(0, nt - 1)  # token of each slot
        back = out.gather(2, slot[:, None, :, None].expand(b, h, nk, out.shape[-1]))
        return back * (torch.arange(nk, device=dev)[None] >= start[:, None])[:, None, :, None], computed
