"""Backend selection. Nothing here imports triton or CUDA at import time.

Backends: "reference" (the exact oracle), "sdpa" (exact masked SDPA for static patterns). `None` picks the
fastest exact backend that supports the decision; LLMPATCH_BACKEND forces one.
"""

from __future__ import annotations

import os

import torch

from . import reference, sdpa

BACKENDS = ("reference", "sdpa")
ROW_CHUNK_ELEMENTS = 1 << 24  # score elements per reference chunk (rows x keys x heads)


def check_backend(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)} or None, got {name!r}")
    return name


def pick(backend: str | None, **kw) -> str:
    backend = check_backend(backend or os.environ.get("LLMPATCH_BACKEND") or None)
    if backend is None:
        return "sdpa" if sdpa.supports(**kw) else "reference"
    if backend == "sdpa" and not sdpa.supports(**kw):
        raise ValueError(
            "backend: 'sdpa' cannot run softcap, block lists, head masks or ACT calibration; "
            "use backend='reference' or None"
        )
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None, **kw):
    """Run one attention call; returns (out [B, H, Nq, D], calib_sinks or None)."""
    name = pick(backend, **kw)
    if name == "sdpa":
        return sdpa.attention(q, k, v, **kw), None
    return _reference_chunked(q, k, v, **kw)


def _reference_chunked(q, k, v, **kw):
    """The reference over query-row chunks (exact: each chunk's keys end at its last query).

    ACT needs column sums over all rows, so a calibrated call runs as one chunk.
    """
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    calib = kw.get("calib")
    block = kw.get("block_size", 64)
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, nk * h))
    if kw.get("kv_index") is not None:
        rows = max(block, rows // block * block)  # chunks hold whole query blocks
    if rows >= nq or (calib is not None and bool(calib.any())):
        res = reference.attention(q, k, v, **kw)
        return res.out, res.calib_sinks
    outs = []
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        kend = nk - nq + r1
        part = dict(kw)
        if part.get("key_padding") is not None:
            part["key_padding"] = part["key_padding"][:, :kend]
        if part.get("kv_index") is not None:
            part["kv_index"] = part["kv_index"][:, :, r0 // block : (r1 + block - 1) // block]
            part["kv_count"] = part["kv_count"][:, :, r0 // block : (r1 + block - 1) // block]
        outs.append(reference.attention(q[:, :, r0:r1], k[:, :, :kend], v[:, :, :kend], **part).out)
    return torch.cat(outs, dim=2), None
