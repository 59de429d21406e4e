"""Tiny random models for every supported family (GQA, small windows so that sliding layers matter).

model = llmpatch.testing.tiny_model("gemma2")
"""

from __future__ import annotations

import torch

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 12}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": (
        "Gemma2Config",
        {
            "sliding_window": 12,
            "attn_logit_softcapping": 20.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "sliding_window": 12,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_config(family: str, **overrides):
    import transformers

    if family not in FAMILY_CONFIGS:
        raise ValueError(f"family: must be one of {', '.join(FAMILIES)}, got {family!r}")
    cls_name, extra = FAMILY_CONFIGS[family]
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    return getattr(transformers, cls_name)(**{**base, **extra, **overrides})


def tiny_model(family: str, *, seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A randomly initialised causal LM of `family` in fp32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.float().eval()


def per_head(layers: int, heads: int, f) -> list[list[float]]:
    return [[f(li, h) for h in range(heads)] for li in range(layers)]


def method_cases(layers: int, heads: int, backend: str | None) -> dict[str, tuple[str, dict]]:
    """{label: (method, params)}: every method, active on a 64-token prompt of a tiny model, with parameters that
    vary by head (the sharding and placement tests run each one)."""
    dhsa = dict(budget=16, block_size=4, sink=4, recent=4, tail=4, stride=2, nms=2, per_128=32)
    if backend == "triton":  # its block lists take blocks of >= 16
        dhsa = dict(budget=32, block_size=16, sink=0, recent=16, tail=4, stride=2, nms=2, per_128=32)
    moa = dict(alphas=per_head(layers, heads, lambda li, h: float(2 + 3 * ((li + h) % 4))),
               betas=per_head(layers, heads, lambda li, h: 0.1 * ((li * 3 + h) % 3)), sink=2, min_span=3)  # fmt: skip
    scores = per_head(layers, heads, lambda li, h: ((li * 5 + h * 3) % 7) / 7)
    return {
        "dense": ("dense", {}),
        "sink_window": ("sink_window", dict(sink=2, window=6)),
        "streamingllm": ("streamingllm", dict(density=0.4, sink=2)),
        "moa-ring": ("moa", moa),
        "moa-noring": ("moa", {**moa, "ring": False}),
        "retrieval_mask": ("retrieval_mask", dict(heads=[[0, 1], [1, 2], [2, 3], [2, 0]], prefill=True)),
        "retrieval_kv": ("retrieval_kv", dict(scores=scores, top_k=4, sink=2, recent=5)),
        "act": ("act", dict(heads=[[0, 1], [1, 2], [2, 0], [2, 3]], threshold=0.02)),
        "longheads": ("longheads", dict(chunk_size=4, attention_length=12, block_size=2)),
        "dhsa": ("dhsa", dhsa),
        "kvzip": ("kvzip", dict(ratio=0.5, sink=2, window=4, chunk=16, instruction=[5, 6, 7])),
        "kvzip_heads": (
            "kvzip_heads",
            dict(ratio=0.5, sink=2, window=4, chunk=16, instruction=[5, 6, 7], scores=scores, top_k=3),
        ),  # fmt: skip
        "reform": ("reform", dict(ratio=0.5, sink=2, window=6, observe=4, chunk=4)),
        "reform_zip": (
            "reform_zip",
            dict(ratio=0.5, sink=2, window=6, chunk=4, repeat=16, instruction=[5, 6, 7]),
        ),
    }
