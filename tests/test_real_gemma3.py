"""Real weights: Gemma-3-270M (sliding window 512, a full layer every 6th, one KV head). Slow: the first fetch
downloads 253 MB and dequantises for about a minute."""

import pytest
import torch
from llmpatch.evals.suites import SUITES

import llmpatch

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def gemma3():
    return llmpatch.load_model("gemma3-270m", progress=lambda *a: None)


def test_gemma3_dense_parity_past_the_sliding_window(gemma3):
    model, tok = gemma3
    spec = llmpatch.detect(model)
    assert spec.family == "gemma3_text" and spec.sliding_window[:6] == [512] * 5 + [None]
    sample = SUITES["passkey"].sample(tok, 900, 0)  # longer than the 512-token window
    enc = tok(sample.prompt, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits
        with llmpatch.patched(model, "dense"):
            got = model(**enc).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert torch.equal(model(**enc).logits, want)
    out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    with llmpatch.patched(model, "dense"):
        patched = model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, patched)
    answer = tok.decode(out[0, enc.input_ids.shape[1] :])
    assert SUITES["passkey"].score(sample, answer) == 1.0, answer


def test_gemma3_streamingllm_ring_on_its_sliding_layers(gemma3):
    """A window narrower than Gemma's own 512 bounds the sliding layers' cache too: the same tokens as the same
    pattern masked over the model's own cache, and KV saved counted against that cache (sliding layers included)."""
    from llmpatch import caches

    model, tok = gemma3
    enc = tok(SUITES["passkey"].sample(tok, 900, 0).prompt, return_tensors="pt")
    n = enc.input_ids.shape[1]
    out = {}
    for ring in (True, False):
        with llmpatch.patched(model, "streamingllm", window=256, sink=64, ring=ring):
            out[ring] = model.generate(
                **enc, max_new_tokens=10, do_sample=False, return_dict_in_generate=True
            )
    assert torch.equal(out[True].sequences, out[False].sequences)
    report = caches.kv_report(caches.output_cache(out[True]))
    seen = n + 9
    assert report["saved"] == pytest.approx(1 - 18 * 320 / (15 * 511 + 3 * seen))


def test_gemma3_reform_that_gathers_everything_decodes_as_dense(gemma3):
    """reform's sparse pass (sink 16 + window 32) then a gather of every token (ratio 0): the sliding layers pin
    what their window shows at its positions, so the tokens are the unpatched model's past the 512 window; a
    real ratio then saves KV on the sliding layers too."""
    from llmpatch import caches

    model, tok = gemma3
    enc = tok(SUITES["passkey"].sample(tok, 900, 0).prompt, return_tensors="pt")
    want = model.generate(**enc, max_new_tokens=10, do_sample=False)
    with llmpatch.patched(model, "reform", ratio=0.0, window=32, observe=32):
        assert torch.equal(model.generate(**enc, max_new_tokens=10, do_sample=False), want)
    with llmpatch.patched(model, "reform", ratio=0.8, window=32, observe=32):
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    cache = caches.output_cache(out)
    assert caches.kv_report(cache)["saved"] > 0.6
    sliding = [layer for layer in cache.layers if getattr(layer.decision, "sliding_window", None)]
    assert sliding and all(max(layer.pins) < 511 for layer in sliding)
