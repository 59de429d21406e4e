"""The dense prefill tail of the cache methods (moa, streamingllm, retrieval_kv): the last `tail` prompt queries
attend to every visible key, the others keep the pattern; decoding then reads the cut cache."""

import pytest
import torch

import llmpatch
from llmpatch.testing import FAMILIES, tiny_model
from tests.test_parity import PROMPTS, left_pad

ACTIVE = {
    "streamingllm": dict(window=4, sink=2),
    "moa": dict(sink=2, min_span=3, length=20),
    "retrieval_kv": dict(heads=[[1, 0]], sink=2, recent=4),
}


def params(method, model, **extra):
    p = dict(ACTIVE[method], **extra)
    if method == "moa":
        spec = llmpatch.detect(model)
        p["alphas"] = [[4.0] * spec.num_heads for _ in range(spec.num_layers)]
        p["betas"] = [[0.0] * spec.num_heads for _ in range(spec.num_layers)]
    return p


def first_attention_output(model, x, **kw):
    """The first attention module's output for input x (the layer whose inputs no patch changes)."""
    module = next(m for n, m in model.named_modules() if n.endswith("self_attn"))
    got = {}

    def keep(m, a, out):
        got["out"] = out[0]

    handle = module.register_forward_hook(keep)
    try:
        model(x, **kw)
    finally:
        handle.remove()
    return got["out"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_tail_covering_the_prompt_is_dense(method, family):
    model = tiny_model(family)
    x = torch.tensor([PROMPTS[0]])
    want = model(x).logits
    with llmpatch.patched(model, method, **params(method, model, tail=len(PROMPTS[0]))) as p:
        tracker = p.track_sparsity()
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)
    assert tracker.density == pytest.approx(1.0)


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_tail_rows_are_dense_and_the_rest_keep_the_pattern(method):
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0]])
    dense = first_attention_output(model, x)
    with llmpatch.patched(model, method, **params(method, model)):
        sparse = first_attention_output(model, x)
    with llmpatch.patched(model, method, **params(method, model, tail=5)) as p:
        tracker = p.track_sparsity()
        got = first_attention_output(model, x)
    torch.testing.assert_close(got[:, -5:], dense[:, -5:], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, :-5], sparse[:, :-5], atol=1e-5, rtol=0)
    assert not torch.allclose(sparse[:, -5:], dense[:, -5:], atol=1e-3)  # the pattern does narrow those rows
    n = len(PROMPTS[0])
    assert 0 < tracker.density < 1
    assert tracker.computed >= 5 * sum(range(n - 4, n + 1)) // 5  # the tail's rows count every key


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_tail_decodes_from_the_cut_cache_and_batches(method, family):
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    before = model(ids, attention_mask=mask).logits
    with llmpatch.patched(model, method, **params(method, model, tail=3)):
        batch = model.generate(ids, attention_mask=mask, **kw)
        alone = [model.generate(torch.tensor([p]), **kw)[0, len(p) :] for p in PROMPTS]
    for row, want in zip(batch[:, ids.shape[1] :], alone, strict=True):
        assert torch.equal(row, want)
    if method != "retrieval_kv":  # the masked twin over the full cache (ring off) gives the same tokens
        with llmpatch.patched(model, method, **params(method, model, tail=3, ring=False)):
            assert torch.equal(model.generate(ids, attention_mask=mask, **kw), batch)
    assert torch.equal(model(ids, attention_mask=mask).logits, before)


def test_tail_is_described_and_refuses_act():
    model = tiny_model("llama")
    with llmpatch.patched(model, "streamingllm", window=4, sink=2, tail=8) as p:
        assert "dense prefill tail 8" in p.describe()
    spec = llmpatch.detect(model)
    heads = [[li, hi] for li in range(spec.num_layers) for hi in range(spec.num_heads)]
    with pytest.raises(llmpatch.ParameterError, match="calibration"):
        llmpatch.apply(
            model, ["streamingllm", "act"], streamingllm={"window": 4, "tail": 8}, act={"heads": heads}
        )
    assert model.config._attn_implementation != "llmpatch"
