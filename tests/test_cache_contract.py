"""Caches keep transformers' contract: every cache method's attention call gets key and value tensors (never a
handle), and on backend="triton" their decode steps run on the Triton decode kernel (here under
TRITON_INTERPRET=1) with the reference backend's tokens."""

import pytest
import torch
from llmpatch.kernels import triton_decode

import llmpatch
from llmpatch import attention
from llmpatch.testing import tiny_model
from tests.test_parity import PROMPTS, left_pad

CACHE_METHODS = {
    "moa": dict(alphas=[[3.0, 9.0, 0.0, 5.0]] * 3, betas=[[0.1, 0.0, 1.0, 0.2]] * 3, sink=2, min_span=4),
    "streamingllm": dict(sink=2, window=5),
    "retrieval_kv": dict(heads=[[0, 1], [1, 3]], sink=2, recent=4),
}
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("method", CACHE_METHODS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_attention_always_gets_tensors(method, family, monkeypatch):
    seen = []
    real = attention.llmpatch_attention

    def spy(module, query, key, value, *args, **kwargs):
        seen.append((type(key), type(value), tuple(key.shape) == tuple(value.shape[:3]) + (key.shape[3],)))
        return real(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(attention, "llmpatch_attention", spy)
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    with llmpatch.patched(model, method, **CACHE_METHODS[method]):
        model.generate(ids, attention_mask=mask, **GEN)
    assert seen and all(k is torch.Tensor and v is torch.Tensor and same for k, v, same in seen)
    decode_calls = len(seen) - llmpatch.detect(model).num_layers
    assert decode_calls == (GEN["max_new_tokens"] - 1) * llmpatch.detect(model).num_layers


@pytest.mark.parametrize("method", CACHE_METHODS)
def test_cache_decode_runs_on_the_triton_kernel(method, monkeypatch):
    calls = []
    real = triton_decode.decode

    def counting(q, k, v, *args, **kwargs):
        calls.append(kwargs.get("slot_pos") is not None)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(triton_decode, "decode", counting)
    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    out = {}
    for backend in ("reference", "triton"):
        with llmpatch.patched(model, method, backend=backend, **CACHE_METHODS[method]):
            out[backend] = model.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(out["triton"], out["reference"])
    layers = llmpatch.detect(model).num_layers
    assert sum(calls) == (GEN["max_new_tokens"] - 1) * layers  # every decode step, over the ring's positions
