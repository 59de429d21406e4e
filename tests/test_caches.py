"""The per-KV-head ring cache (retrieval_kv's; moa and streamingllm have their own tests): decoding from it gives
the same tokens as the masked pattern over a full cache, it really holds fewer bytes, and it goes away with
remove()."""

import pytest
import torch

import llmpatch
from llmpatch import caches
from llmpatch.caches.ring import STEP
from llmpatch.testing import FAMILIES, tiny_model
from tests.test_parity import PROMPTS, left_pad


def sink_window_twin(model, full_pairs, sink, recent, sliding=False):
    """The same per-head pattern as retrieval_kv, through sink_window's analytic masks over the full cache."""
    spec = llmpatch.detect(model)
    g = spec.num_heads // spec.num_kv_heads
    full = {(li, hi // g) for li, hi in full_pairs}
    sinks, windows = [], []
    for li in range(spec.num_layers):
        dense = spec.sliding_window[li] is not None and not sliding
        keep = [dense or (li, h // g) in full for h in range(spec.num_heads)]
        sinks.append([0 if k else sink for k in keep])
        windows.append([-1 if k else recent for k in keep])
    return sinks, windows


SLIDING = [f for f in FAMILIES if f in ("gemma2", "gemma3_text", "mistral", "qwen2")]


@pytest.mark.parametrize("family,sliding", [(f, False) for f in FAMILIES] + [(f, True) for f in SLIDING])
def test_compressed_decode_matches_masked_full_cache(family, sliding):
    """sliding=True also compresses the model's own sliding-window layers (their full heads keep its window)."""
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    heads = [[0, 1], [2, 3]]
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with llmpatch.patched(model, "retrieval_kv", heads=heads, sink=2, recent=4, sliding=sliding):
        got = model.generate(ids, attention_mask=mask, **kw)
        single = model.generate(torch.tensor([PROMPTS[1]]), **kw)
    want = []
    sinks, windows = sink_window_twin(model, heads, 2, 4, sliding)
    spec = llmpatch.detect(model)
    with llmpatch.patched(model, "dense") as p:
        for layer in p.layers:
            layer.sink = torch.tensor(sinks[layer.layer])
            layer.window = torch.tensor(windows[layer.layer])
        want = model.generate(ids, attention_mask=mask, **kw)
        want_single = model.generate(torch.tensor([PROMPTS[1]]), **kw)
    assert torch.equal(got, want)
    assert torch.equal(single, want_single)
    assert spec.num_layers == 3


def test_cache_holds_fewer_bytes_and_reports_them():
    model = tiny_model("llama")
    x = torch.tensor([list(range(3, 103))])  # 100 tokens
    with llmpatch.patched(model, "retrieval_kv", heads=[[0, 0]], sink=4, recent=8) as p:
        out = model(x, use_cache=True)
        cache = caches.output_cache(out)
        assert any(isinstance(layer, caches.RingLayer) for layer in cache.layers)
        report = p.methods[0].kv_report(cache)
    spec = llmpatch.detect(model)
    dense = 2 * spec.num_layers * spec.num_kv_heads * 100 * spec.head_dim * 4
    assert report["dense_kv_bytes"] == dense
    # layer 0 keeps KV head 0 in full (100 slots); every other KV head keeps 4 + 8 slots, exactly
    assert report["kv_bytes"] < 0.5 * dense and report["saved"] > 0.5
    slot = 2 * spec.head_dim * 4
    assert report["kv_bytes"] == slot * (100 + 5 * (4 + 8 + STEP - 1))
    assert report["full_kv_heads"] == 1
    after = caches.output_cache(model(x, use_cache=True))
    assert not any(isinstance(layer, caches.RingLayer) for layer in after.layers)


def test_output_cache_reads_the_cache_without_a_deprecation_warning(caplog):
    """Recent transformers log a warning when an output is asked for 'past_key_values', even with no cache."""
    model = tiny_model("llama")
    x = torch.tensor([list(range(3, 13))])
    with caplog.at_level("WARNING"):
        assert caches.output_cache(model(x, use_cache=False)) is None
        assert caches.output_cache(model(x, use_cache=True)).get_seq_length() == 10
    assert "deprecated" not in caplog.text


@pytest.mark.parametrize(
    "params,match",
    [
        ({"top_k": 2}, "needs per-head scores"),
        ({"heads": [[0, 9]]}, "head in 0..3"),
        ({"heads": [[0, 0]], "recent": 0}, "'recent' must be an int >= 1"),
        ({"heads": [[0, 0]], "sink": -1}, "'sink' must be an int >= 0"),
        ({"heads": [[0, 0]], "top_k": 1}, "not both"),
        ({"scores": [[0.5] * 4] * 3, "top_k": 13}, "'top_k' must be in 0..12"),
    ],
)
def test_bad_retrieval_kv_input(params, match):
    model = tiny_model("llama")
    with pytest.raises(llmpatch.errors.ParameterError, match=match):
        llmpatch.apply(model, "retrieval_kv", **params)
    assert llmpatch.current_patch(model) is None and not model._forward_pre_hooks


def test_retrieval_kv_does_not_compose_with_act():
    with pytest.raises(llmpatch.errors.ParameterError, match="both set the calibration decision"):
        llmpatch.apply(
            tiny_model("llama"),
            ["retrieval_kv", "act"],
            retrieval_kv={"heads": [[0, 0]]},
            act={"heads": [[1, 1]]},
        )


def test_a_whole_head_grows_in_steps_and_decodes_the_same():
    """A KV head that keeps every token grows GROW slots at a time: decoding across several regrowths gives the
    masked twin's tokens, and the cache holds less than GROW slots of room past the tokens."""
    from llmpatch.caches.ring import GROW

    model = tiny_model("llama")
    x = torch.tensor([list(range(3, 43))])  # 40 tokens
    kw = dict(max_new_tokens=2 * GROW + 5, min_new_tokens=2 * GROW + 5, do_sample=False, pad_token_id=0)
    with llmpatch.patched(model, "retrieval_kv", heads=[[0, 0]], sink=2, recent=4) as p:
        out = model.generate(x, return_dict_in_generate=True, **kw)
        report = p.methods[0].kv_report(caches.output_cache(out))
    sinks, windows = sink_window_twin(model, [[0, 0]], 2, 4)
    with llmpatch.patched(model, "dense") as p:
        for layer in p.layers:
            layer.sink, layer.window = torch.tensor(sinks[layer.layer]), torch.tensor(windows[layer.layer])
        want = model.generate(x, **kw)
    assert torch.equal(out.sequences, want)
    spec = llmpatch.detect(model)
    seen = x.shape[1] + kw["max_new_tokens"] - 1  # the last token is never written
    slot = 2 * spec.head_dim * 4
    held = report["kv_bytes"] // slot - (spec.num_layers * spec.num_kv_heads - 1) * (2 + 4 + STEP - 1)
    assert seen <= held < seen + GROW
