"""Real weights, Gemma-3-270M: a sink + window pattern on every layer, its 512-token local layers included, gives
the logits of eager attention under explicit masks (transformers' own attention, one mask per layer type), on a
prompt long enough for the CPU band path's row chunks. A sink drops out of a local layer's view once it is 512
positions back; before the fix of stop 38 the band chunks shared one mask across that point."""

import pytest
import torch
from llmpatch.evals.suites import SUITES

import llmpatch

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def gemma3():
    return llmpatch.load_model("gemma3-270m", progress=lambda *a: None)


def eager_with_masks(model, ids, keep_full, keep_local):
    """Logits of the unpatched model under eager attention with the given [N, N] keep masks."""
    to_mask = lambda keep: torch.where(keep, 0.0, float("-inf"))[None, None]  # noqa: E731
    impl = model.config._attn_implementation
    configs = [model.config, *(layer.self_attn.config for layer in model.model.layers)]
    for c in configs:
        c._attn_implementation = "eager"
    try:
        masks = {"full_attention": to_mask(keep_full), "sliding_attention": to_mask(keep_local)}
        return model(ids, attention_mask=masks).logits[0, -1]
    finally:
        for c in configs:
            c._attn_implementation = impl


@pytest.mark.parametrize("method, sink, window", [("streamingllm", 64, 136), ("sink_window", 16, 400)])
def test_sink_window_on_the_local_layers_matches_eager_masks(gemma3, method, sink, window):
    model, tok = gemma3
    sample = SUITES["passkey"].sample(tok, 1024, 0)
    ids = tok(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    n = ids.shape[1]
    assert n > 900  # past the one-call fallback (768 keys): the band path's row chunks
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    pattern = (k <= q) & ((k < sink) | (q - k < window))
    with torch.no_grad():
        want = eager_with_masks(model, ids, pattern, pattern & (q - k < model.config.sliding_window))
        with llmpatch.patched(model, method, sink=sink, window=window):
            got = model(ids).logits[0, -1]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
