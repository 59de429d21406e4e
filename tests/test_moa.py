"""MoA and the StreamingLLM baseline: elastic per-head spans, the ring-buffer decode cache against masks over the
full cache, density 1.0 against the unpatched model, the official plan format and bad input."""

import json

import pytest
import torch

import llmpatch
from llmpatch import caches as kvcache
from llmpatch.errors import ParameterError, PlanError
from llmpatch.methods import moa
from llmpatch.testing import FAMILIES, tiny_model
from tests.test_parity import PROMPTS, left_pad

GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


def small_plan(model, per_query_head=False):
    """Spans of 4-12 tokens at N=20: per KV group (as our search makes them) or per query head (union cache)."""
    spec = llmpatch.detect(model)
    g = spec.num_heads // spec.num_kv_heads
    alphas, betas = [], []
    for li in range(spec.num_layers):
        key = (lambda h: h) if per_query_head else (lambda h: h // g)
        alphas.append([float(2 + 2 * ((li + key(h)) % 3)) for h in range(spec.num_heads)])
        betas.append([0.125 * ((li + key(h)) % 2) for h in range(spec.num_heads)])
    return dict(alphas=alphas, betas=betas, sink=2, min_span=3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_query_head", [False, True])
def test_ring_decode_matches_masked_full_cache(family, per_query_head):
    model = tiny_model(family)
    ids, mask = left_pad(PROMPTS)
    plan = small_plan(model, per_query_head)
    out = {}
    for ring in (True, False):
        with llmpatch.patched(model, "moa", **plan, length=20, ring=ring):
            res = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **GEN)
            single = model.generate(torch.tensor([PROMPTS[1]]), **GEN)
            out[ring] = (res.sequences, single, kvcache.kv_report(kvcache.output_cache(res)))
    assert torch.equal(out[True][0], out[False][0])
    assert torch.equal(out[True][1], out[False][1])
    assert out[True][0][1, -12:].tolist() == out[True][1][0, -12:].tolist()  # batch row == batch 1
    assert out[False][2]["saved"] == 0.0
    if any(w is None for w in llmpatch.detect(model).sliding_window):  # own sliding layers keep their cache
        assert out[True][2]["saved"] > 0.3


def test_multi_token_step_after_prompt_matches_masked():
    """A second forward of several tokens (chunked prefill) attends over ring + new tokens exactly."""
    model = tiny_model("llama")
    plan = small_plan(model)
    x = torch.tensor([PROMPTS[0]])
    logits = {}
    for ring in (True, False):
        with llmpatch.patched(model, "moa", **plan, length=20, ring=ring):
            out = model(x[:, :12], use_cache=True)
            cache = kvcache.output_cache(out)
            logits[ring] = model(x[:, 12:], **{kvcache.cache_argument(model): cache}, use_cache=True).logits
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=0)


def test_spans_follow_the_prompt_length():
    model = tiny_model("llama")
    plan = small_plan(model)
    with llmpatch.patched(model, "moa", **plan) as p:
        model(torch.tensor([PROMPTS[1]]))  # N = 6
        short = p.layers[1].window.clone()
        model(torch.tensor([PROMPTS[0]]))  # N = 20
        long = p.layers[1].window.clone()
    want = moa.spans_at(plan["alphas"], plan["betas"], 20, sink=2, min_span=3)[1][1]
    assert torch.equal(long, want) and not torch.equal(short, long)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_density_one_plan_gives_unpatched_logits(family):
    model = tiny_model(family)
    spec = llmpatch.detect(model)
    ones = dict(
        alphas=[[0.0] * spec.num_heads] * spec.num_layers, betas=[[1.0] * spec.num_heads] * spec.num_layers
    )
    assert moa.density_at(ones["alphas"], ones["betas"], 4096) == 1.0
    x = torch.tensor([PROMPTS[0]])
    want, want_gen = model(x).logits, model.generate(x, **GEN)
    with llmpatch.patched(model, "moa", **ones):
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)
        assert torch.equal(model.generate(x, **GEN), want_gen)


def test_streamingllm_density_and_window():
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0]])
    with llmpatch.patched(model, "streamingllm", density=0.5, sink=2) as p:
        model(x)
        assert p.layers[0].window.tolist() == [8] * 4  # span 10 of 20, sink 2 included
    with llmpatch.patched(model, "streamingllm", window=5, sink=2) as p:
        out = model.generate(x, return_dict_in_generate=True, **GEN)
        rep = kvcache.kv_report(kvcache.output_cache(out))
        assert p.layers[0].window.tolist() == [5] * 4
    assert (
        rep["kv_bytes"] == 3 * 2 * 2 * 7 * 16 * 4
    )  # layers x (k, v) x KV heads x (sink + window) x D x fp32


def test_ring_cache_narrows_the_models_own_sliding_layers():
    """Gemma-3 (window 12 on layers 0 and 2): spans narrower than the model's window get the ring cache there
    too, and KV saved counts against the model's own cache (its sliding layers keep window - 1 tokens)."""
    model = tiny_model("gemma3_text")
    x = torch.tensor([PROMPTS[0]])  # 20 tokens, then 11 decoded into the cache
    outs = {}
    for ring in (True, False):
        with llmpatch.patched(model, "streamingllm", window=5, sink=2, ring=ring):
            outs[ring] = model.generate(x, return_dict_in_generate=True, **GEN)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    cache = kvcache.output_cache(outs[True])
    assert all(isinstance(layer, kvcache.RingLayer) for layer in cache.layers)
    assert kvcache.kv_report(cache)["saved"] == pytest.approx(1 - 3 * 7 / (11 + 31 + 11))
    with llmpatch.patched(model, "streamingllm", window=50, sink=2):  # wider than the window: a ring of 12
        cache = kvcache.output_cache(model.generate(x, return_dict_in_generate=True, **GEN))
    assert kvcache.kv_report(cache)["saved"] == pytest.approx(
        1 - (2 * 12 + 52) / (11 + 31 + 11)
    )  # 2 + 50 slots on the full layer


def test_official_plan_round_trip(tmp_path):
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    plan = small_plan(model)
    path = tmp_path / "official.json"
    path.write_text(json.dumps(moa.export_official(plan)))
    params = moa.import_official(path, spec)
    assert params["alphas"] == plan["alphas"] and params["betas"] == plan["betas"]


@pytest.mark.parametrize(
    "data",
    [{"alphas": [[1, 2]]}, {"alphas": "x", "betas": []}, [1, 2], {"alphas": [[1, 2]], "betas": [[0.5]]}],
)
def test_malformed_official_plan_is_refused(data, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="moa: .*official plan"):
        moa.import_official(path)
    path.write_text("{not json")
    with pytest.raises(PlanError, match="moa: cannot read"):
        moa.import_official(path)


def test_bad_moa_input_leaves_model_untouched():
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0]])
    before = model(x).logits
    plan = small_plan(model)
    other = small_plan(tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    cases = [
        (dict(other), "'alphas' must be \\[3\\]\\[4\\].*another model"),
        (
            {**plan, "betas": [[1.5] * 4] * 3},
            "'betas' must be a \\[layers\\]\\[heads\\] list of numbers in \\[0, 1\\]",
        ),
        ({}, "'alphas' and 'betas' are required"),
        ({**plan, "sink": -1}, "'sink' must be an int >= 0"),
    ]
    for params, msg in cases:
        with pytest.raises(ParameterError, match=msg):
            llmpatch.apply(model, "moa", **params)
    for params, msg in [
        ({"density": 0.0}, "'density' must be a number in \\(0, 1\\]"),
        ({"density": 1.5}, "'density' must be a number in \\(0, 1\\]"),
        ({}, "exactly one of 'density'"),
        ({"density": 0.5, "window": 8}, "exactly one of 'density'"),
    ]:
        with pytest.raises(ParameterError, match=msg):
            llmpatch.apply(model, "streamingllm", **params)
    with pytest.raises(ParameterError, match="both set the static pattern"):
        llmpatch.apply(model, ["moa", "sink_window"], moa=plan)
    assert torch.equal(model(x).logits, before)
    assert model.config._attn_implementation != "llmpatch"
