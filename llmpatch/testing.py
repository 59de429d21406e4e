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
