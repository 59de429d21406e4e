"""One attention call of a fresh prompt, as the vLLM plugin makes it, against vLLM's own CPU kernel in the same run:
SmolLM2-135M's shapes (9 query heads, 3 KV heads, D 64, fp32), one thread, best of `--repeats`.

Rows: vLLM's `cpu_attention_with_kv_cache` over the paged cache (causal, and with its sliding window of the plan's
span, which has no sink), torch's SDPA (causal; the kernel llmpatch's band path runs on), and llmpatch's
`kernels.dispatch.attention` for one layer of each plan (the plugin's call for a fresh prompt). The share of the
causal scores each computes is printed beside its time, so the per-score cost of each kernel can be compared.

Run in the vLLM venv, on an otherwise idle machine:
  .venv-vllm/bin/python benchmarks/vllm_attention_call.py --length 2048 --out benchmarks/vllm-attention-call-2k.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vllm_capacity import save  # noqa: E402


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * min(times), 2)


def vllm_kernel(q, k, v, window: int):
    """vLLM's CPU kernel over k, v written to a paged cache ("vec" layout, blocks of 128): a callable."""
    from vllm import _custom_ops as ops

    n, hkv, d = k.shape[2], k.shape[1], k.shape[3]
    bs = 128
    nb = -(-n // bs)
    cache = torch.zeros(nb, hkv, bs, 2 * d)
    kc, vc = cache.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous(), kc, vc,
                                   torch.arange(n), "vec", k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")  # fmt: skip
    query = q[0].transpose(0, 1).contiguous()
    out = torch.empty_like(query)
    loc, lens = torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    table = torch.arange(nb, dtype=torch.int32)[None]
    meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=1, num_heads=q.shape[1], num_kv_heads=hkv, head_dim=d,
                                               seq_lens=lens, dtype=q.dtype, query_start_loc=loc, causal=True,
                                               sliding_window_size=window, isa="vec", enable_kv_split=False,
                                               kv_cache_dtype="auto")  # fmt: skip
    return lambda: ops.cpu_attention_with_kv_cache(
        query=query, key_cache=kc, value_cache=vc, output=out, query_start_loc=loc, seq_lens=lens,
        scale=d**-0.5, causal=True, alibi_slopes=None, sliding_window=window, block_table=table, softcap=0.0,
        scheduler_metadata=meta, s_aux=None, dynamic_causal=None,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument(
        "--max-model-len", type=int, default=4096, help="where the default elastic plans are evaluated"
    )
    ap.add_argument(
        "--layer", type=int, default=5, help="the plan's layer timed (MoA's spans differ per layer)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from llmpatch.kernels import dispatch
    from llmpatch.kernels.density import causal_count, computed_count
    from transformers import AutoConfig

    from llmpatch.attention import pattern_args
    from llmpatch.models import alias_dir
    from llmpatch.vllm.served import resolve

    torch.set_num_threads(1)
    n = args.length
    hf = AutoConfig.from_pretrained(str(alias_dir(args.model) / "hf"))
    h, hkv, d = hf.num_attention_heads, hf.num_key_value_heads, hf.hidden_size // hf.num_attention_heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, h, n, d, generator=g)
    k, v = torch.randn(1, hkv, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g)
    kw = dict(scale=d**-0.5, softcap=None, sliding_window=None)
    dense = causal_count(1, h, n, n)
    rows = [
        {
            "call": "vLLM kernel, causal",
            "ms": best_ms(vllm_kernel(q, k, v, -1), args.repeats),
            "computed": 1.0,
        }
    ]
    kx, vx = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True)  # noqa: E731
    rows.append({"call": "torch SDPA, causal", "ms": best_ms(sdpa, args.repeats), "computed": 1.0})
    plans = {
        f"streamingllm 25% at {n}": ("streamingllm", None, {"density": 0.25, "length": n}),
        f"streamingllm 25% at {args.max_model_len}": ("streamingllm", None, {"density": 0.25}),
        f"moa (shipped plan) at {n}": ("moa", "auto", {"length": n}),
    }
    for label, (method, plan, params) in plans.items():
        cfg = {"method": method, "plan": plan, "params": params}
        dec = resolve(cfg, hf, args.max_model_len).layers[args.layer]
        call = lambda dec=dec: dispatch.attention(q, k, v, **kw, **pattern_args(dec, n, False, True))  # noqa: E731
        share = computed_count(1, h, n, n, sink=dec.sink, window=dec.window) / dense
        rows.append({"call": f"llmpatch, {label}", "ms": best_ms(call, args.repeats), "computed": share})
        span = int(dec.sink.max() + dec.window.max())
        rows.append({"call": f"vLLM kernel, sliding window {span} (no sink)",
                     "ms": best_ms(vllm_kernel(q, k, v, span), args.repeats),
                     "computed": computed_count(1, h, n, n, sink=torch.zeros(h), window=torch.full((h,), span))
                     / dense})  # fmt: skip
    base = rows[0]["ms"]
    print(f"one fresh prompt of {n} tokens, {h}/{hkv} heads, D {d}, fp32, one thread\n")
    print("| call | ms | vs vLLM causal | scores computed | ms per computed share |\n|---|---|---|---|---|")
    for r in rows:
        r["vs_vllm"] = round(r["ms"] / base, 2)
        print(
            f"| {r['call']} | {r['ms']} | {r['vs_vllm']:.2f}x | {r['computed']:.1%} | {r['ms'] / r['computed']:.1f} |"
        )
    save(args, rows)


if __name__ == "__main__":
    main()
