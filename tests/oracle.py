"""A plain masked-softmax oracle, written independently of llmpatch's reference backend: loops over
(batch, head, query) and spells every rule out. Small shapes only."""

import math

import torch


def oracle_attention(
    q, k, v, *, scale=None, softcap=None, start=None, key_padding=None, sliding_window=None, sink=None,
    window=None, kv_count=None, kv_index=None, block_size=64, head_mask=None, calib=None, calib_beta=0.4,
    calib_threshold=0.1, calib_sinks=None,
):  # fmt: skip
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, Nq, D, dtype=torch.float64)
    for b in range(B):
        s0 = 0 if start is None else int(start[b])
        for h in range(H):
            kh = k[b, h // G].double()
            vh = v[b, h // G].double()
            P = torch.zeros(Nq, Nk, dtype=torch.float64)
            visible = torch.zeros(Nq, Nk, dtype=torch.bool)
            allowed = torch.zeros(Nq, Nk, dtype=torch.bool)
            for i in range(Nq):
                qpos = Nk - Nq + i - s0
                for j in range(Nk):
                    kpos = j - s0
                    vis = 0 <= kpos <= qpos
                    if sliding_window is not None and qpos - kpos >= sliding_window:
                        vis = False
                    if key_padding is not None and not bool(key_padding[b, j]):
                        vis = False
                    ok = vis
                    if window is not None and int(window[h]) >= 0:
                        ok = ok and (kpos < int(sink[h]) or qpos - kpos < int(window[h]))
                    if kv_index is not None:
                        qb = i // block_size
                        chosen = {int(x) for x in kv_index[b, h, qb, : int(kv_count[b, h, qb])]}
                        ok = ok and (j // block_size) in chosen
                    visible[i, j], allowed[i, j] = vis, ok
                if allowed[i].any():
                    s = (kh @ q[b, h, i].double()) * scale
                    if softcap is not None:
                        s = torch.tanh(s / softcap) * softcap
                    s = s.masked_fill(~allowed[i], -math.inf)
                    P[i] = torch.softmax(s, dim=0)
            if calib is not None and bool(calib[h]):
                if calib_sinks is not None:
                    S = [j for j in range(Nk) if j < calib_sinks.shape[-1] and bool(calib_sinks[b, h, j])]
                else:
                    S = []
                    for j in range(Nk):
                        n = int(allowed[:, j].sum())
                        if n and P[:, j].sum() / n > calib_threshold:
                            S.append(j)
                    S = S[1:]  # the initial sink is never calibrated
                for i in range(Nq):
                    m = sum(P[i, j] for j in S)
                    if 1 - m <= 1e-6:
                        continue
                    for j in range(Nk):
                        P[i, j] = P[i, j] * calib_beta if j in S else P[i, j] * (1 - calib_beta * m) / (1 - m)
            if head_mask is not None and int(head_mask[h]) == 1:
                for i in range(Nq):
                    n = int(visible[i].sum())
                    P[i] = visible[i].double() / n if n else 0
            if head_mask is not None and int(head_mask[h]) == 2:
                P.zero_()
            out[b, h] = P @ vh
    return out


def random_block_lists(shape, n_kb, gen):
    """Block lists of shape `shape` (e.g. [B, H, QB]): a random count of distinct key blocks per list, sorted,
    padded with the out-of-range id n_kb. Returns kv_count (int32) and kv_index (int32, [*shape, n_kb])."""
    count = torch.randint(0, n_kb + 1, tuple(shape), generator=gen)
    chosen = torch.stack([torch.randperm(n_kb, generator=gen) for _ in range(math.prod(shape))])
    chosen = chosen.view(*shape, n_kb)
    index = torch.where(torch.arange(n_kb) < count.unsqueeze(-1), chosen, n_kb).sort(-1).values.int()
    return count.int(), index
