"""Backend selection. Nothing here imports triton or CUDA at import time.

Backends:
- "reference": the exact oracle (pure torch, row-chunked here);
- "sdpa": the same pattern as masked SDPA (exact; static patterns only);
- "cpu": the CPU fast path (`cpu.py`): density-proportional row chunks, flex_attention for block lists;
- "triton": the Triton kernels (`triton_prefill.py`, `triton_decode.py`); CUDA tensors, or CPU tensors under
  TRITON_INTERPRET=1.
`None` picks by device: "triton" on CUDA, "cpu" on CPU, and "reference" for ACT calibration on CPU (it needs
column sums that only the reference and Triton compute). LLMPATCH_BACKEND forces one.
"""

from __future__ import annotations

import os

import torch

from . import cpu, reference, rules, sdpa

BACKENDS = ("reference", "sdpa", "cpu", "triton")
ROW_CHUNK_ELEMENTS = 1 << 24  # score elements per reference chunk (rows x keys x heads)


def check_backend(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)} or None, got {name!r}")
    return name


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick(backend: str | None, device: torch.device | str = "cpu", **kw) -> str:
    backend = check_backend(backend or os.environ.get("LLMPATCH_BACKEND") or None)
    on_cuda = torch.device(device).type == "cuda"
    if backend is None:
        if on_cuda:
            return "triton"
        return "cpu" if cpu.supports(**kw) else "reference"
    if backend == "sdpa" and not sdpa.supports(**kw):
        raise ValueError(
            "backend: 'sdpa' cannot run softcap, block lists, head masks, ACT calibration or caches with "
            "explicit key positions (moa, streamingllm, retrieval_kv decode); use 'cpu', 'triton', 'reference' or None"
        )
    if backend == "cpu" and not cpu.supports(**kw):
        raise ValueError("backend: 'cpu' cannot run ACT calibration; use 'reference', 'triton' or None")
    if backend == "triton" and not on_cuda and not interpreting():
        raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests)")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None, **kw):
    """Run one attention call; returns (out [B, H, Nq, D], calib_sinks or None)."""
    name = pick(backend, q.device, **kw)
    if name == "cpu":
        return _exact_if_not_finite(cpu.attention(q, k, v, **kw), q, k, v, kw), None
    if name == "sdpa":
        return _exact_if_not_finite(sdpa.attention(q, k, v, **kw), q, k, v, kw), None
    if name == "triton":
        from . import triton_decode, triton_prefill

        # Decode steps (a few queries, no holes in the mask) take the split-K kernel; ACT on decode needs the
        # prefill's sinks (without them the step is uncalibrated, as on every backend). Keys at explicit
        # positions (a ring cache) decode there too; longer calls over them take the reference, row-chunked.
        if kw.get("k_pos") is not None:
            if q.shape[2] <= triton_decode.MAX_Q and kw.get("calib") is None:
                return _exact_if_not_finite(triton_decode.attention(q, k, v, **kw), q, k, v, kw), None
            return _reference_chunked(q, k, v, **kw)
        if q.shape[2] <= triton_decode.MAX_Q < k.shape[2] and kw.get("key_padding") is None:
            calib_ok = (
                kw.get("calib") is None or kw.get("calib_sinks") is not None or not bool(kw["calib"].any())
            )
            if calib_ok:
                return _exact_if_not_finite(triton_decode.attention(q, k, v, **kw), q, k, v, kw), None
        res = triton_prefill.attention(q, k, v, **kw)
        return (res.out, res.calib_sinks) if _finite(res.out) else _reference_chunked(q, k, v, **kw)
    return _reference_chunked(q, k, v, **kw)


def attention_lse(q, k, v, *, backend: str | None = None, **kw) -> reference.AttentionResult:
    """Like `attention`, also returning the LSE [B, H, Nq] (fp32, natural log, -inf on empty rows)."""
    name = pick(backend, q.device, **kw)
    if name in ("cpu", "sdpa"):
        out, lse = cpu.attention(q, k, v, return_lse=True, **kw)
        if not _finite(out):
            out, _, lse = _reference_chunked(q, k, v, need_lse=True, **kw)
        return reference.AttentionResult(out, lse, None)
    if name == "triton" and kw.get("k_pos") is None:
        from . import triton_prefill

        res = triton_prefill.attention(q, k, v, **kw)
        if _finite(res.out):
            return res
        out, sinks, lse = _reference_chunked(q, k, v, need_lse=True, **kw)
        return reference.AttentionResult(out, lse, sinks)
    return reference.attention(q, k, v, **kw)


def _finite(out) -> bool:
    """NaN / Inf inputs: the fast paths can spread them past a row's pattern (SDPA's additive -inf mask meets a
    NaN key; a masked key's 0 weight meets a NaN value), so a fast path's non-finite output is recomputed on the
    reference (the same pattern, chunked), whose rules (reference.py) every backend then follows. Finite inputs
    cost this one check of the output; inside a compiled graph it is skipped (no data-dependent branch)."""
    return torch.compiler.is_compiling() or bool(torch.isfinite(out).all())


def _exact_if_not_finite(out, q, k, v, kw):
    return out if _finite(out) else _reference_chunked(q, k, v, **kw)[0]


def _reference_chunked(q, k, v, need_lse=False, **kw):
    """The reference over query-row chunks (exact: each chunk's keys end at its last query), so no call holds
    more than ROW_CHUNK_ELEMENTS scores. ACT at prefill runs two passes: column sums over all chunks give the
    sink set, then each chunk is calibrated with it."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    calib = kw.get("calib")
    block = kw.get("block_size", 64)
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, nk * h))
    if kw.get("kv_index") is not None:
        rows = max(block, rows // block * block)  # chunks hold whole query blocks
    if rows >= nq:
        res = reference.attention(q, k, v, **kw)
        return (res.out, res.calib_sinks, res.lse) if need_lse else (res.out, res.calib_sinks)

    positioned = kw.get("k_pos") is not None  # keys in any order: every chunk reads every key

    def chunks(extra):
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            kend = nk if positioned else nk - nq + r1
            part = {**kw, **extra}
            if positioned:
                part["q_pos"] = kw["q_pos"][:, r0:r1]
            if part.get("key_padding") is not None:
                part["key_padding"] = part["key_padding"][:, :kend]
            if part.get("kv_index") is not None:
                part["kv_index"] = part["kv_index"][:, :, r0 // block : (r1 + block - 1) // block]
                part["kv_count"] = part["kv_count"][:, :, r0 // block : (r1 + block - 1) // block]
            if part.get("calib_sinks") is not None:
                part["calib_sinks"] = part["calib_sinks"][..., :kend]
            yield kend, reference.attention(q[:, :, r0:r1], k[:, :, :kend], v[:, :, :kend], **part)

    sinks = kw.get("calib_sinks")
    if calib is not None and bool(calib.any()) and sinks is None:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        col_sum = torch.zeros(b, h, nk, dtype=acc, device=q.device)
        col_count = torch.zeros(b, h, nk, dtype=torch.long, device=q.device)
        for kend, (s, c) in chunks({"act_columns": True}):
            col_sum[..., :kend] += s
            col_count[..., :kend] += c
        sinks = rules.find_sinks(col_sum, col_count, kw.get("calib_threshold", 0.1))
    outs, lses, used = [], [], None
    for _, res in chunks({"calib_sinks": sinks} if sinks is not None else {}):
        outs.append(res.out)
        lses.append(res.lse)
        used = res.calib_sinks  # the last chunk sees every key
    if need_lse:
        return torch.cat(outs, dim=2), used, torch.cat(lses, dim=2)
    return torch.cat(outs, dim=2), used
