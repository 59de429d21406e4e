"""The dense patch equals the unpatched model on every family; remove() restores it bit for bit."""

import pytest
import torch

import llmpatch
from llmpatch.testing import FAMILIES, tiny_model

PROMPTS = [[5, 9, 17, 33, 8, 70, 12, 90, 4, 61, 27, 44, 19, 101, 7, 56, 88, 3, 120, 66],
           [40, 22, 73, 11, 95, 6],
           [14, 83, 29, 50, 117, 9, 31, 77, 62, 18, 25, 99, 47]]  # fmt: skip


def left_pad(prompts, pad_id=0):
    n = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.mark.parametrize("backend", [None, "reference"])
def test_dense_matches_eager_and_sdpa(family, backend):
    x = torch.tensor([PROMPTS[0]])
    eager = tiny_model(family, attn_implementation="eager")
    want_eager = eager(x).logits
    # Gemma2 has no SDPA path in transformers (softcap): eager is its only reference.
    want_sdpa = tiny_model(family, attn_implementation="sdpa")(x).logits if family != "gemma2" else want_eager
    with llmpatch.patched(eager, "dense", backend=backend):
        got = eager(x).logits
    torch.testing.assert_close(got, want_eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want_sdpa, atol=1e-5, rtol=0)


def test_remove_restores_bit_for_bit(family):
    impl = "eager" if family == "gemma2" else "sdpa"
    model = tiny_model(family, attn_implementation=impl)
    x = torch.tensor([PROMPTS[0]])
    before = model(x).logits
    patch = llmpatch.apply(model, "sink_window", sink=2, window=4)
    assert model.config._attn_implementation == "llmpatch"
    changed = model(x).logits
    assert not torch.allclose(changed, before, atol=1e-3)
    patch.remove()
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "llmpatch_layer") for m in model.modules())
    assert torch.equal(model(x).logits, before)


def test_greedy_generation_with_cache_matches(family):
    model = tiny_model(family)
    x = torch.tensor([PROMPTS[2]])
    kw = dict(max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    want = model.generate(x, **kw)  # 13 + 16 tokens: crosses the sliding window of 12
    with llmpatch.patched(model, "dense"):
        got = model.generate(x, **kw)
    assert torch.equal(got, want)


def test_left_padded_batch_matches_single(family):
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    with llmpatch.patched(model, "dense"):
        batch = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(batch[row, -len(prompt) :], alone, atol=1e-5, rtol=0)
        kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        gen = model.generate(ids, attention_mask=mask, **kw)
        for row, prompt in enumerate(PROMPTS):
            alone = model.generate(torch.tensor([prompt]), **kw)[0]
            assert torch.equal(gen[row, -10:], alone[-10:])


def test_sink_window_left_padded_batch_matches_single(family):
    """A non-trivial pattern counts sink and window in token positions, so padding does not shift it."""
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    with llmpatch.patched(model, "sink_window", sink=2, window=5):
        batch = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(batch[row, -len(prompt) :], alone, atol=1e-5, rtol=0)


def test_window_covering_prompt_is_dense(family):
    model = tiny_model(family)
    x = torch.tensor([PROMPTS[0]])
    want = model(x).logits
    with llmpatch.patched(model, "sink_window", sink=0, window=len(PROMPTS[0])):
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)


def test_sink_window_decode_with_cache_matches_recompute(family):
    """Decode steps (including sliding caches that drop keys) see the same pattern as a full recompute."""
    model = tiny_model(family)
    ids = torch.tensor([PROMPTS[2]])
    with llmpatch.patched(model, "sink_window", sink=3, window=6):
        cached = model.generate(ids, max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0)
        recomputed = model.generate(
            ids, max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(cached, recomputed)


@pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"
)
@pytest.mark.parametrize("method,params", [("dense", {}), ("sink_window", {"sink": 2, "window": 5})])
def test_triton_backend_in_the_model_matches_reference(family, method, params):
    """The model path on the Triton kernels (prefill kernel, then the split-K decode kernel for cached steps),
    run by the interpreter on CPU tensors, equals the reference backend: logits and greedy tokens."""
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS[:2])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)  # fmt: skip
    outs = {}
    for backend in ("reference", "triton"):
        with llmpatch.patched(model, method, backend=backend, **params):
            outs[backend] = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(outs["triton"].sequences, outs["reference"].sequences)
    for got, want in zip(outs["triton"].logits, outs["reference"].logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
