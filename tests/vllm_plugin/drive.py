"""Run one vLLM engine (with the llmpatch plugin when a method is given) over the test prompts; print JSON.

python tests/vllm_plugin/drive.py '{"method": "moa", "plan": "auto", "params": {}}' [--tp 2] [--model smollm2-135m]
A config of "dense" runs vLLM without the plugin. Prompts: see `prompts()`; one engine serves the single prompts
one at a time, then the batch of concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def prompts(tokenizer) -> dict[str, list[str]]:
    """Chat prompts over prose that ships with Python: about 1k and 3k tokens, and a batch of four lengths."""
    import pydoc_data.topics as topics

    text = " ".join(v for _, v in sorted(topics.topics.items()))
    words = text.split()

    def chat(n_words: int, start: int) -> str:
        text = " ".join(words[start : start + n_words]) + "\n\nIn one sentence, what is the text above about?"
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip

    def of(n_tokens: int, start: int) -> str:
        lo, hi = 1, len(words) - start
        while lo < hi:  # the most words whose chat prompt stays within n_tokens
            mid = (lo + hi + 1) // 2
            fits = len(tokenizer(chat(mid, start), add_special_tokens=False).input_ids) <= n_tokens
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return chat(lo, start)

    return {
        "single": [of(1024, 0), of(3000, 5000)],
        "batch": [of(n, 20000 + n) for n in (600, 1100, 2000, 2900)],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prefix-caching", action="store_true")
    ap.add_argument(
        "--kv-gib", type=float, default=1.0, help="KV cache memory (fixed, so capacities compare)"
    )
    ap.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="vLLM's step budget (chunked prefill)"
    )
    ap.add_argument("--capacity-only", action="store_true", help="start the engine, report its KV capacity")
    args = ap.parse_args()
    if args.config != "dense":
        os.environ["LLMPATCH_VLLM"] = args.config
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from llmpatch.models import alias_dir

    path = str(alias_dir(args.model) / "hf")
    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.time()
    llm = LLM(model=path, dtype="float32", enable_prefix_caching=args.prefix_caching, seed=0,
              max_model_len=args.max_model_len, tensor_parallel_size=args.tp, gpu_memory_utilization=0.25,
              kv_cache_memory_bytes=int(args.kv_gib * (1 << 30)), max_num_batched_tokens=args.max_num_batched_tokens,
              distributed_executor_backend="mp" if args.tp > 1 else None)  # fmt: skip
    started = time.time() - t0
    cc = llm.llm_engine.vllm_config.cache_config
    capacity = {"kv_tokens": cc.kv_cache_size_tokens, "max_concurrency": cc.kv_cache_max_concurrency,
                "start_s": round(started, 1), "max_model_len": args.max_model_len}  # fmt: skip
    if args.capacity_only:
        print("RESULT " + json.dumps(capacity), flush=True)
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
