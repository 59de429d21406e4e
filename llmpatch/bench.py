"""Benchmarks against dense SDPA, on the same machine in the same run (`llmpatch bench kernels|model`).

Kernels: causal SDPA against a sparse backend over lengths x densities. Density is the fraction of causal
key blocks listed (block lists) or of causal scores kept (sink + window). Throughput is "sparse-aware": only
the scores a backend computes count, 4 * D flops each (QK^T and PV).

Model: each configuration runs in its own subprocesses, so peak memory is not inflated by an earlier run's heap
(see `bench_model` for the two memory figures).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from .errors import LlmpatchError, ParameterError
from .kernels import api, layout


def random_blocks(b, h, n, block_size, density, seed=0):
    """A block list keeping about `density` of the causal blocks of every query block: the first block, the
    diagonal block, and random others (sorted). Returns kv_count, kv_index."""
    qb = layout.cdiv(n, block_size)
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(b, h, qb, qb, generator=g)
    causal = torch.arange(qb).view(-1, 1) >= torch.arange(qb).view(1, -1)
    score = score.masked_fill(~causal, -1.0)
    score[..., 0] = 2.0
    score[..., torch.arange(qb), torch.arange(qb)] = 3.0
    want = torch.minimum((density * (torch.arange(qb) + 1)).ceil().long().clamp(min=2), torch.arange(qb) + 1)
    max_k = int(want.max())
    idx = score.topk(max_k, dim=-1).indices
    keep = torch.arange(max_k).view(1, 1, 1, -1) < want.view(1, 1, -1, 1)
    idx = torch.where(keep, idx, qb).sort(-1).values
    idx = torch.where(idx == qb, 0, idx)
    return want.view(1, 1, qb).expand(b, h, qb).int().contiguous(), idx.int().contiguous()


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_kernels(lengths, densities, *, heads=8, kv_heads=8, head_dim=64, block_size=64, pattern="blocks",
                  dtype=torch.float32, device="cpu", backend=None, repeats=3, seed=0):  # fmt: skip
    """Rows of {length, density, sdpa_ms, sparse_ms, speedup, sdpa_gflops, sparse_gflops}."""
    rows = []
    for n in lengths:
        g = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(1, heads, n, head_dim, generator=g).to(device, dtype)
        k = torch.randn(1, kv_heads, n, head_dim, generator=g).to(device, dtype)
        v = torch.randn(1, kv_heads, n, head_dim, generator=g).to(device, dtype)
        gqa = heads != kv_heads
        t_dense = _time(
            partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=gqa), repeats
        )
        causal_scores = heads * n * (n + 1) / 2
        for dens in densities:
            if pattern == "blocks":
                cnt, idx = random_blocks(1, heads, n, block_size, dens, seed)
                cnt, idx = cnt.to(device), idx.to(device)
                achieved = layout.block_density(cnt.cpu(), idx.cpu(), block_size, n, n)
                fn = partial(api.block_sparse_attention, q, k, v, cnt, idx, block_size, backend=backend)
                fn()  # checked once; the timed calls skip the value checks (a device sync on CUDA)
                fn = partial(fn, check=False)
            else:  # sink + window at the density: (sink + window) ~ density * (n + 1) / 2
                sink = 64
                window = max(1, int(dens * (n + 1) / 2) - sink)
                achieved = min(1.0, (sink + window) * n / ((n + 1) * n / 2))
                fn = partial(api.sink_window_attention, q, k, v, sink, window, backend=backend)
                fn()
                fn = partial(fn, check=False)
            t = _time(fn, repeats)
            flops = 4 * head_dim * causal_scores
            rows.append({"length": n, "density": round(achieved, 4), "sdpa_ms": t_dense * 1e3, "sparse_ms": t * 1e3,
                         "speedup": t_dense / t, "sdpa_gflops": flops / t_dense / 1e9,
                         "sparse_gflops": flops * achieved / t / 1e9})  # fmt: skip
    return rows


def _prompt_ids(tokenizer, length: int) -> torch.Tensor:
    from llmpatch.evals.haystack import generated_sentences

    n = 64
    while True:
        ids = tokenizer(" ".join(generated_sentences(n)), add_special_tokens=False).input_ids
        if len(ids) >= length:
            return torch.tensor([ids[:length]])
        n *= 2


def model_one(
    model: str,
    method: str | None,
    params: dict,
    length: int,
    decode_tokens: int,
    repeats: int,
    compiled: bool = False,
) -> dict:
    """One configuration in this process: prefill seconds (best of `repeats`), decode tokens/s, peak RSS. With
    `compiled`, the forward runs under torch.compile, warmed up (prefill and decode) before anything is timed."""
    from . import apply
    from .caches import cache_argument, output_cache
    from .measure import PeakMemory
    from .models import load_model

    m, tok = load_model(model)
    cache_arg = cache_argument(m)
    ids = _prompt_ids(tok, length)
    patch = apply(m, method, **params) if method else None
    if compiled:
        m.forward = torch.compile(m.forward)
        with torch.inference_mode():  # compile the prefill, the first decode step and the dynamic-length one
            out = m(ids, use_cache=True, logits_to_keep=1)
            cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = m(nxt, use_cache=True, **{cache_arg: cache})
                cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
            out = cache = None
    best = math.inf
    with torch.inference_mode(), PeakMemory(m.device) as mem:
        out = None
        for _ in range(repeats):
            out = None  # drop the previous pass's cache first
            t0 = time.perf_counter()
            out = m(ids, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - t0)
        cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = m(nxt, use_cache=True, **{cache_arg: cache})
            cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
        decode = decode_tokens / (time.perf_counter() - t0)
    density = None
    if patch is not None:
        tracker = patch.track_sparsity()
        with torch.inference_mode():
            m(ids, logits_to_keep=1)
        density = tracker.density
    return {"method": (method or "dense") + (" (compiled)" if compiled else ""), "length": length,
            "prefill_s": best, "decode_tokens_per_s": decode, "peak_memory_mb": mem.mb, "density": density,
            "compiled": compiled}  # fmt: skip


ERROR = "LLMPATCH-ERROR "  # the subprocess's last line when apply() refused the configuration


def _subprocess(args: list, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "llmpatch.bench", json.dumps(args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = res.stdout.strip().splitlines()
    if res.returncode == 2 and lines and lines[-1].startswith(ERROR):  # bad input, named by apply()
        raise ParameterError(lines[-1][len(ERROR) :])
    if res.returncode:
        raise RuntimeError(f"bench subprocess failed:\n{res.stderr[-2000:]}")
    return json.loads(lines[-1])


def bench_model(model, method, params, length, decode_tokens=16, repeats=2, compiled=False):
    """Dense (unpatched) and patched, each in fresh subprocesses; returns both rows (and, with `compiled`, both
    again under torch.compile).

    Times and peak RSS come from a run with the default allocator. `peak_live_mb` comes from a second, shorter
    run with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): freed tensors leave the RSS at
    once, so its peak follows live memory rather than heap fragmentation (that setting slows the run, so no
    times are taken from it)."""
    rows = []
    live_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16))
    for comp in (False, True) if compiled else (False,):
        for meth in (None, method):
            row = _subprocess([model, meth, params, length, decode_tokens, repeats, comp])
            live = _subprocess([model, meth, params, length, 4, 1, comp], live_env) if not comp else None
            row["peak_live_mb"] = live["peak_memory_mb"] if live else None  # (compiled: not measured)
            rows.append(row)
    return rows


if __name__ == "__main__":
    try:
        print(json.dumps(model_one(*json.loads(sys.argv[1]))))
    except LlmpatchError as exc:  # the parent re-raises it: a clear error, no traceback
        print(ERROR + str(exc))
        sys.exit(2)
