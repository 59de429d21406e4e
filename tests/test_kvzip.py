"""kvzip: the context-reconstruction scores against the model's own eager attention, the model-wide budget with
per-head counts, and real eviction (the shared suite in test_methods.py covers dense parity, batches, remove())."""

import copy

import pytest
import torch

import llmpatch
from llmpatch import caches
from llmpatch.errors import ParameterError
from llmpatch.testing import tiny_model
from tests.test_parity import PROMPTS

LEAD = [5, 6, 7]


def test_scores_are_the_repeat_queries_max_attention():
    """Softmax over sink + chunk + repeat keys (renormalised from eager attention over the whole cache), max over
    each KV group's query heads and the repeat queries."""
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0]])
    n, sink, chunk = x.shape[1], 2, 8
    with torch.no_grad():
        prompt = llmpatch.caches.output_cache(model(x, use_cache=True))
    spec = llmpatch.detect(model)
    stash = {i: (layer.keys, layer.values) for i, layer in enumerate(prompt.layers)}
    with llmpatch.patched(model, "kvzip", sink=sink, chunk=chunk, instruction=LEAD) as p:
        got = p.methods[0]._score(model.model, x, stash, (LEAD, LEAD, []), spec)
    model.set_attn_implementation("eager")
    g = spec.num_heads // spec.num_kv_heads
    for lo in range(sink, n, chunk):
        hi = min(lo + chunk, n)
        lead = LEAD if lo == sink else LEAD + x[0, max(sink, lo - 8) : lo].tolist()
        rep = torch.cat([torch.tensor([lead]), x[:, lo:hi]], 1)
        with torch.no_grad():
            out = model.model(input_ids=rep, **{caches.cache_argument(model.model): copy.deepcopy(prompt)},
                              output_attentions=True,
                              position_ids=torch.arange(n, n + rep.shape[1])[None])  # fmt: skip
        for li, att in enumerate(out.attentions):  # [1, H, nq, n + nq]
            cols = list(range(sink)) + list(range(lo, hi)) + list(range(n, n + rep.shape[1]))
            sub = att[0][..., cols]
            sub = sub / sub.sum(-1, keepdim=True)
            want = sub[..., sink : sink + hi - lo].view(spec.num_kv_heads, g, -1, hi - lo).amax(dim=(1, 2))
            torch.testing.assert_close(got[li, :, lo:hi], want, atol=1e-5, rtol=1e-4)
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("layerwise,decode", [(False, None), (True, None), (False, 7)])
def test_budget_is_model_wide_with_per_head_counts(layerwise, decode):
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0] * 3])  # 60 tokens
    n, ratio, sink, window = x.shape[1], 0.6, 2, 4
    with llmpatch.patched(model, "kvzip", ratio=ratio, sink=sink, window=window, instruction=LEAD,
                          layerwise=layerwise, decode=decode):  # fmt: skip
        out = model.generate(
            x, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
    cache = caches.output_cache(out)
    spec = llmpatch.detect(model)
    kept = [[s + k for s, k in zip(layer.sink, layer.pins, strict=True)] for layer in cache.layers]
    per_layer = [sum(row) for row in kept]
    total = spec.num_layers * spec.num_kv_heads * n
    assert sum(per_layer) == pytest.approx(int((1 - ratio) * total), abs=spec.num_layers)
    if layerwise:
        assert max(per_layer) - min(per_layer) <= 1
    assert len({k for row in kept for k in row}) > 1  # heads keep different numbers
    slots = sum(c for layer in cache.layers for c in layer.caps)
    ring = decode or window
    assert slots == sum(per_layer) + spec.num_layers * spec.num_kv_heads * ring  # real eviction: no more
    report = caches.kv_report(cache)
    assert report["saved"] == pytest.approx(1 - slots / (spec.num_layers * spec.num_kv_heads * (n + 2)))


def test_whole_heads_keep_the_prompt_inside_the_same_budget():
    """kvzip_heads: the KV heads of the chosen query heads pin every prompt token; the model-wide count is
    kvzip's, so the other heads keep fewer than under kvzip."""
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0] * 3])
    n, ratio, sink, window = x.shape[1], 0.6, 2, 4
    spec = llmpatch.detect(model)
    g = spec.num_heads // spec.num_kv_heads
    whole = [[0, 0], [1, g]]  # KV head 0 of layer 0, KV head 1 of layer 1
    kept = {}
    for method, extra in (("kvzip", {}), ("kvzip_heads", {"heads": whole})):
        with torch.no_grad(), llmpatch.patched(model, method, ratio=ratio, sink=sink, window=window,
                                               instruction=LEAD, **extra):  # fmt: skip
            cache = caches.output_cache(model(x, use_cache=True))
        kept[method] = [
            [s + k for s, k in zip(layer.sink, layer.pins, strict=True)] for layer in cache.layers
        ]
    assert kept["kvzip_heads"][0][0] == n and kept["kvzip_heads"][1][1] == n
    assert kept["kvzip"][0][0] < n
    assert sum(map(sum, kept["kvzip_heads"])) == sum(map(sum, kept["kvzip"]))
    others = [(li, h) for li in range(spec.num_layers) for h in range(spec.num_kv_heads) if (li, h) not in
              ((0, 0), (1, 1))]  # fmt: skip
    assert sum(kept["kvzip_heads"][li][h] for li, h in others) < sum(kept["kvzip"][li][h] for li, h in others)


@pytest.mark.parametrize("decode,kept", [(None, False), (16, True)])
def test_a_question_after_the_compression_stays_while_answering(decode, kept):
    """Protocol B: the context is compressed, a 10-token question comes through the cache, then 5 answer tokens.
    A decode ring of 16 holds all 15; the default (window 4) keeps only the last 4."""
    model = tiny_model("llama")
    ctx, question = torch.tensor([PROMPTS[0] * 3]), torch.tensor([PROMPTS[0][:10]])
    n = ctx.shape[1]
    with torch.no_grad(), llmpatch.patched(model, "kvzip", ratio=0.6, sink=2, window=4, decode=decode,
                                           instruction=LEAD):  # fmt: skip
        cache = caches.output_cache(model(ctx, use_cache=True))
        out = model(question, use_cache=True, **{caches.cache_argument(model): cache})
        ids = out.logits[:, -1:].argmax(-1)
        for _ in range(5):
            ids = (
                model(ids, use_cache=True, **{caches.cache_argument(model): cache}).logits[:, -1:].argmax(-1)
            )
    after = set(range(n, n + 15))
    for layer in cache.layers:
        held = set(layer.pos[0].tolist())
        assert after <= held if kept else len(after & held) == 4


def test_bad_kvzip_input_leaves_model_untouched():
    model = tiny_model("llama")
    for params, match in (({"ratio": 1.0}, "'ratio' must be a number in"), ({"chunk": 0}, "'chunk' must be"),
                          ({"instruction": "go"}, "'instruction' must be")):  # fmt: skip
        with pytest.raises(ParameterError, match=match):
            llmpatch.apply(model, "kvzip", **params)
    assert model.config._attn_implementation != "llmpatch"
    with llmpatch.patched(model, "kvzip"), pytest.raises(ParameterError, match="tokenizer"):
        model(torch.tensor([PROMPTS[0]]))  # a tiny random model has no tokenizer: say so, by name
