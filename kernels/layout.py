"""Sparse layouts: converters between the analytic sink + window form, compact block lists, dense masks (tests
only) and FlexAttention's BlockMask (the CPU path). Nothing here builds an N x N tensor except `dense_mask`.

Block lists (docs/ARCHITECTURE.md): kv_count[B, H, QB] int32 and kv_index[B, H, QB, MAX_K] int32,
sorted key-block ids; query block qb covers query rows [qb * bs, (qb + 1) * bs) and key block j covers key
indices [j * bs, (j + 1) * bs). Entries at or past kv_count are ignored. A block list may be a superset of the
pattern; the token-level mask (causal, padding, sink + window) is always applied inside the blocks.
"""

from __future__ import annotations

import torch

from . import rules
from .reference import block_mask


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def dense_mask(
    b, h, nq, nk, *, start=None, key_padding=None, sliding_window=None, sink=None, window=None,
    kv_count=None, kv_index=None, block_size=64, device="cpu",
) -> torch.Tensor:  # fmt: skip
    """[B, H, Nq, Nk] bool of the keys each query attends (for tests and the reference only)."""
    q_pos, k_pos = rules.token_positions(b, nq, nk, start, key_padding, device)
    mask = rules.keep_mask(q_pos, k_pos, h, sliding_window=sliding_window, sink=sink, window=window)
    mask = mask.expand(b, h, nq, nk)
    if kv_index is not None:
        mask = mask & block_mask(kv_count, kv_index, block_size, nq, nk)
    return mask


def sink_window_blocks(
    b, nq, nk, sink, window, block_size, *, start=None, sliding_window=None, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block list [B, H, QB(, MAX_K)] covering a per-head sink + window pattern (window < 0: all keys).

    Each query block gets the sink blocks and the band from its first query's window start to its diagonal.
    O(B x H x QB x MAX_K): MAX_K is about (sink + window) / block_size + 2, not Nk / block_size.
    """
    bs = block_size
    sink = torch.as_tensor(sink, device=device).long().view(1, -1, 1)
    window = torch.as_tensor(window, device=device).long().view(1, -1, 1)
    h = sink.shape[1]
    qb_n = cdiv(nq, bs)
    st = torch.zeros(b, device=device, dtype=torch.long) if start is None else start.to(device).long()
    st = st.clamp(min=0).view(b, 1, 1)  # first key slot that can be a real token
    qb = torch.arange(qb_n, device=device).view(1, 1, qb_n)
    first_q = nk - nq + qb * bs  # key index of each query block's first query
    last_q = (nk - nq + torch.clamp((qb + 1) * bs, max=nq) - 1).expand(b, h, qb_n)
    reach = torch.where(window < 0, torch.full_like(window, 1 << 40), window)
    if sliding_window is not None:
        reach = reach.clamp(max=sliding_window)
    band_lo = torch.maximum(first_q - reach + 1, st) // bs  # [B, H, QB]
    band_hi = last_q // bs
    sink_lo = st // bs
    sink_hi = torch.minimum(cdiv_t(st + sink, bs), band_lo)  # exclusive, stops where the band starts
    sink_hi = torch.maximum(sink_hi, sink_lo)
    n_sink = (sink_hi - sink_lo).expand(b, h, qb_n)
    n_band = (band_hi - band_lo + 1).clamp(min=0)
    count = n_sink + n_band
    max_k = max(1, int(count.max()))
    j = torch.arange(max_k, device=device).view(1, 1, 1, max_k)
    in_sink = j < n_sink.unsqueeze(-1)
    idx = torch.where(in_sink, sink_lo.unsqueeze(-1) + j, band_lo.unsqueeze(-1) + j - n_sink.unsqueeze(-1))
    idx = torch.where(j < count.unsqueeze(-1), idx, 0)
    return count.to(torch.int32), idx.to(torch.int32)


def cdiv_t(x: torch.Tensor, d: int) -> torch.Tensor:
    return (x + d - 1) // d


def causal_blocks(b, h, nq, nk, block_size, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Every causal block: the dense pattern as a block list (density 1)."""
    return sink_window_blocks(
        b, nq, nk, torch.zeros(h, dtype=torch.long), torch.full((h,), -1), block_size, device=device
    )


def block_density(kv_count, kv_index, block_size, nq, nk) -> float:
    """Fraction of causal key blocks listed (a block-level density, for benchmarks)."""
    qb_n = kv_count.shape[-1]
    last = (nk - nq + torch.clamp((torch.arange(qb_n) + 1) * block_size, max=nq) - 1) // block_size
    causal = (last + 1).sum() * kv_count.shape[0] * kv_count.shape[1]
    return float(kv_count.sum()) / float(causal)


def to_flex_block_mask(kv_count, kv_index, block_size, nq, nk, mask_mod, *, full_count=None, full_index=None):
    """FlexAttention BlockMask from a compact block list; `mask_mod` is applied inside every listed block
    except the optional `full_*` ones. No Q-side transpose (inference only).

    flex_attention's CPU lowering wants kv_indices as wide as the key blocks, so the lists are padded to
    [B, H, QB, Nk / block_size] here (int32; 2 MB per 8 heads at 16k tokens and block 64).
    """
    from torch.nn.attention.flex_attention import BlockMask

    width = cdiv(nk, block_size)
    kv_index = torch.nn.functional.pad(kv_index, (0, max(0, width - kv_index.shape[-1])))
    if full_index is not None:
        full_index = torch.nn.functional.pad(full_index, (0, max(0, width - full_index.shape[-1])))

    return BlockMask.from_kv_blocks(
        kv_count.int().contiguous(),
        kv_index.int().contiguous(),
        None if full_count is None else full_count.int().contiguous(),
        None if full_index is None else full_index.int().contiguous(),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(nq, nk),
        compute_q_blocks=False,
    )


def to_tokens(x, start, length: int):
    """x [B, H, N, D] in key slots -> [B, H, length, D] in token space (token t of row b is slot t + start[b]);
    past a row's last token the contents are filler (a copy of its last slot)."""
    b, h, n, d = x.shape
    if length == n and not bool(start.any()):
        return x
    tok = torch.arange(length, device=x.device)[None] + start[:, None]
    return x.gather(2, tok.clamp(max=n - 1)[:, None, :, None].expand(b, h, length, d))
