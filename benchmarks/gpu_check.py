"""One GPU session's checks (issue: kernels), in one short script. Run it once on a lent GPU:

    python benchmarks/gpu_check.py --out benchmarks/gpu          # about 5 minutes on one H200

and on a CPU, as a smoke test at small sizes, under the Triton interpreter:

    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --small

It checks bf16 (and fp16) correctness of the Triton prefill and decode kernels against SDPA / the reference, then
measures sparse-aware TFLOP/s and the speedup over causal SDPA at 8k, 32k and 128k tokens x densities
100/50/20/10% (block lists, H=32, Hkv=8, d=128), and decode bandwidth (bytes of K/V read per second) at 32k and
128k. Every figure is printed and written as JSON with the run metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F


def _time(fn, repeats, cuda):
    fn()
    if cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny sizes (interpreter smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from llmpatch.kernels import layout, reference, triton_decode, triton_prefill

    from llmpatch.bench import random_blocks
    from llmpatch.meta import run_metadata

    cuda = torch.cuda.is_available() and not args.small
    dev = "cuda" if cuda else "cpu"
    small = args.small
    h, hkv, d = (4, 2, 32) if small else (32, 8, 128)
    lengths = [128, 256] if small else [8192, 32768, 131072]
    densities = [1.0, 0.5, 0.2, 0.1]
    dtypes = [torch.float16] if small else [torch.bfloat16, torch.float16]
    report = {
        "correctness": [],
        "prefill": [],
        "decode": [],
        "metadata": run_metadata(arguments=vars(args) | {"out": str(args.out)}),
    }
    gen = torch.Generator(device=dev).manual_seed(0)

    # 1. correctness: dense pattern vs SDPA, sparse patterns vs the fp32 reference
    n = 256 if small else 2048
    for dt in dtypes:
        q = torch.randn(2, h, n, d, device=dev, dtype=dt, generator=gen)
        k = torch.randn(2, hkv, n, d, device=dev, dtype=dt, generator=gen)
        v = torch.randn(2, hkv, n, d, device=dev, dtype=dt, generator=gen)
        got = triton_prefill.attention(q, k, v).out
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        cnt, idx = random_blocks(2, hkv, n, 64, 0.3)
        sparse = triton_prefill.attention(
            q, k, v, kv_count=cnt.to(dev), kv_index=idx.to(dev), block_size=64
        ).out
        sparse_ref = reference.attention(
            q.float(), k.float(), v.float(), kv_count=cnt.to(dev), kv_index=idx.to(dev)
        ).out
        sw = dict(
            sink=torch.full((h,), 64, device=dev), window=torch.full((h,), n // 4, device=dev), softcap=30.0
        )
        sw_got = triton_prefill.attention(q, k, v, **sw).out
        sw_ref = reference.attention(q.float(), k.float(), v.float(), **sw).out
        dk = torch.arange(layout.cdiv(n, 64), dtype=torch.int32, device=dev).expand(2, hkv, -1).contiguous()
        dec, _ = triton_decode.decode(
            q[:, :, -1:], k, v, torch.full((2, hkv), dk.shape[-1], dtype=torch.int32, device=dev), dk, 64
        )
        dec_want = F.scaled_dot_product_attention(q[:, :, -1:], k, v, enable_gqa=True)
        row = {"dtype": str(dt), "n": n,
               "dense_vs_sdpa_max_err": (got.float() - want.float()).abs().max().item(),
               "blocks_vs_reference_max_err": (sparse.float() - sparse_ref).abs().max().item(),
               "sink_window_softcap_vs_reference_max_err": (sw_got.float() - sw_ref).abs().max().item(),
               "decode_vs_sdpa_max_err": (dec.float() - dec_want.float()).abs().max().item()}  # fmt: skip
        row["ok"] = all(val < 2e-2 for key, val in row.items() if key.endswith("err"))
        report["correctness"].append(row)
        print(json.dumps(row), flush=True)

    # 2. prefill speed, bf16 block lists (per KV head, shared by the group)
    dt = dtypes[0]
    for n in lengths:
        q = torch.randn(1, h, n, d, device=dev, dtype=dt, generator=gen)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=dt, generator=gen)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=dt, generator=gen)
        reps = 1 if small or n > 65536 else 3
        t_sdpa = _time(
            partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True), reps, cuda
        )
        causal = h * n * (n + 1) / 2 * 4 * d
        for dens in densities:
            cnt, idx = random_blocks(1, hkv, n, 64 if small else 128, dens)
            cnt, idx = cnt.to(dev), idx.to(dev)
            bsz = 64 if small else 128
            got = layout.block_density(cnt.cpu(), idx.cpu(), bsz, n, n)
            fn = partial(triton_prefill.attention, q, k, v, kv_count=cnt, kv_index=idx, block_size=bsz)
            t = _time(fn, reps, cuda)
            row = {"n": n, "density": got, "sdpa_ms": t_sdpa * 1e3, "triton_ms": t * 1e3, "speedup": t_sdpa / t,
                   "sdpa_tflops": causal / t_sdpa / 1e12, "sparse_aware_tflops": causal * got / t / 1e12}  # fmt: skip
            report["prefill"].append(row)
            print(json.dumps(row), flush=True)

    # 3. decode bandwidth: one token against the whole cache, all blocks listed
    for n in lengths[-2:]:
        k = torch.randn(8 if not small else 1, hkv, n, d, device=dev, dtype=dt, generator=gen)
        v = torch.randn_like(k)
        q = torch.randn(k.shape[0], h, 1, d, device=dev, dtype=dt, generator=gen)
        nb = layout.cdiv(n, 64)
        idx = torch.arange(nb, dtype=torch.int32, device=dev).expand(k.shape[0], hkv, nb).contiguous()
        cnt = torch.full((k.shape[0], hkv), nb, dtype=torch.int32, device=dev)
        t = _time(partial(triton_decode.decode, q, k, v, cnt, idx, 64), 1 if small else 10, cuda)
        t_sdpa = _time(
            partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True), 1 if small else 10, cuda
        )
        nbytes = 2 * k.numel() * k.element_size()
        row = {"n": n, "batch": k.shape[0], "triton_ms": t * 1e3, "sdpa_ms": t_sdpa * 1e3,
               "triton_GBps": nbytes / t / 1e9, "sdpa_GBps": nbytes / t_sdpa / 1e9}  # fmt: skip
        report["decode"].append(row)
        print(json.dumps(row), flush=True)

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["ok"] for r in report["correctness"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
