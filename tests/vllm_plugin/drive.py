"""Run one vLLM engine (with the llmpatch plugin when a method is given) over the test prompts; print JSON.

python tests/vllm_plugin/drive.py '{"method": "moa", "plan": "auto", "params": {}}' [--tp 2] [--model smollm2-135m]
    [--additional-config]
A config of "dense" runs vLLM without the plugin. Prompts: see `prompts()`; one engine serves the single prompts
one at a time, then the batch of concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import time


def prompts(tokenizer) -> dict[str, list[str]]:
    """Chat prompts over prose that ships with Python: about 1k and 3k tokens, and a batch of four lengths."""
    of = chat_prompt(tokenizer)
    return {
        "single": [of(1024, 0), of(3000, 5000)],
        "batch": [of(n, 20000 + n) for n in (600, 1100, 2000, 2900)],
    }


def chat_prompt(tokenizer):
    """of(n_tokens, start): the chat prompt over the pydoc topics' words from `start` that fits in n_tokens."""
    import pydoc_data.topics as topics

    text = " ".join(v for _, v in sorted(topics.topics.items()))
    words = text.split()

    def chat(n_words: int, start: int) -> str:
        text = " ".join(words[start : start + n_words]) + "\n\nIn one sentence, what is the text above about?"
        if tokenizer.chat_template is None:  # gemma3-270m's GGUF ships none: plain text
            return text + "\n"
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip

    def of(n_tokens: int, start: int) -> str:
        lo, hi = 1, len(words) - start
        while lo < hi:  # the most words whose chat prompt stays within n_tokens
            mid = (lo + hi + 1) // 2
            fits = len(tokenizer(chat(mid, start), add_special_tokens=False).input_ids) <= n_tokens
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return chat(lo, start)

    return of


def throughput(llm, tok, spec: str, new_tokens: int) -> dict:
    """N concurrent prompts of about L tokens (spec "NxL"), after one untimed pass of the same requests: the wall
    time of their prefill (one new token each), then a pass with `new_tokens` more (EOS ignored), whose time per
    output token after the first is vLLM's own per-request figure (TPOT: first to last token timestamps), mean
    over the requests; steps shared with other requests' prompt chunks count in it, on every plan alike."""
    from vllm import SamplingParams

    n, length = (int(x) for x in spec.split("x"))
    of = chat_prompt(tok)
    reqs = [
        {"prompt_token_ids": tok(of(length, i * 4000), add_special_tokens=False).input_ids} for i in range(n)
    ]
    # warm-up: the same requests once, untimed (the first calls of a shape compile kernels on both paths)
    llm.generate(reqs, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate(reqs, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(
        reqs, SamplingParams(temperature=0, max_tokens=1 + new_tokens, ignore_eos=True), use_tqdm=False
    )
    whole = time.perf_counter() - t0
    tpot = [(m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1)
            for o in outs if (m := o.metrics) is not None and m.num_generation_tokens > 1]  # fmt: skip
    tokens = sum(len(r["prompt_token_ids"]) for r in reqs)
    return {"requests": n, "prompt_tokens": tokens, "prefill_s": round(prefill, 2),
            "prefill_tok_s": round(tokens / prefill, 1), "decode_steps": new_tokens, "whole_s": round(whole, 2),
            "tpot_ms": round(1000 * sum(tpot) / len(tpot), 1) if tpot else None}  # fmt: skip


def cache_isa(llm) -> str:
    """The cache layout vLLM's CPU attention picked for this engine's layers (what the plugin reads)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    cfg = llm.llm_engine.vllm_config
    mc = cfg.model_config
    return _get_attn_isa(
        mc.dtype, cfg.cache_config.block_size, mc.get_head_size(), cfg.cache_config.cache_dtype
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument(
        "--kv-gib", type=float, default=1.0, help="KV cache memory (fixed, so capacities compare)"
    )
    ap.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="vLLM's step budget (chunked prefill)"
    )
    ap.add_argument("--additional-config", action="store_true",
                    help="configure the plugin through vLLM's additional_config instead of LLMPATCH_VLLM")  # fmt: skip
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (vLLM's default: 128 on CPU)")
    ap.add_argument("--capacity-only", action="store_true", help="start the engine, report its KV capacity")
    ap.add_argument("--throughput", default=None, help="NxL: time N concurrent prompts of about L tokens")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from llmpatch.models import alias_dir
    from llmpatch.vllm.engine import capacity as kv_capacity
    from llmpatch.vllm.engine import make_llm

    path = str(alias_dir(args.model) / "hf")
    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.time()
    llm = make_llm(path, None if args.config == "dense" else json.loads(args.config), max_model_len=args.max_model_len,
                   tensor_parallel_size=args.tp, kv_gib=args.kv_gib, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
                   prefix_caching=args.prefix_caching, via_env=not args.additional_config,
                   block_size=args.block_size, stats=bool(args.throughput))  # fmt: skip
    capacity = {
        **kv_capacity(llm),
        "start_s": round(time.time() - t0, 1),
        "max_model_len": args.max_model_len,
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "isa": cache_isa(llm),
    }
    if args.capacity_only:
        print("RESULT " + json.dumps(capacity), flush=True)
        return
    if args.throughput:
        print(
            "RESULT " + json.dumps({**capacity, **throughput(llm, tok, args.throughput, args.new_tokens)}),
            flush=True,
        )
        return
    sp = SamplingParams(temperature=0, max_tokens=args.new_tokens)  # both stop at EOS, as HF generate does
    ps = {
        k: [tok(p, add_special_tokens=False).input_ids for p in v] for k, v in prompts(tok).items()
    }  # token ids: one tokenization

    def run(ids):
        return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": x} for x in ids], sp,
                                                                    use_tqdm=False)]  # fmt: skip

    single = [run([x])[0] for x in ps["single"]]
    batch = run(ps["batch"])
    print("RESULT " + json.dumps({"single": single, "batch": batch, "prompts": ps, **capacity}), flush=True)


if __name__ == "__main__":
    main()
