"""reform and reform_zip: the chosen positions (whole chunks, sink and window always, the budget), reform_zip's
token scores from kvzip's repeat passes, the cache after the gather equal to a dense prefill of the gathered
tokens at their positions, the first answer token's logits from that pass, and bad input (the shared suite in
test_methods.py covers dense parity, batches and remove())."""

import pytest
import torch
from transformers import DynamicCache

import llmpatch
from llmpatch import caches
from llmpatch.errors import ParameterError
from llmpatch.methods.reform import Reform
from llmpatch.testing import FAMILIES, tiny_model
from tests.test_parity import PROMPTS


def test_choose_keeps_whole_chunks_with_their_neighbours_within_the_budget():
    m = Reform(ratio=0.5, sink=2, window=4, chunk=3, pool=3)
    scores = torch.zeros(40)
    scores[20] = 5.0  # chunk 6 (positions 18-20); pooling brings chunks 5 and 7 with it
    kept = m._choose(scores)
    assert kept[-4:].tolist() == [36, 37, 38, 39]  # the window
    middle = set(kept[:-4].tolist())
    assert set(range(15, 24)) <= middle and not middle & {0, 1}  # the sink keeps its own slots
    assert len(kept) + 2 <= 20  # (1 - ratio) of the prompt, sink included
    assert all(
        {p // 3 * 3 + i for i in range(3)} & set(range(2, 36)) <= middle for p in middle
    )  # whole chunks


LEAD = [5, 6, 7]


@pytest.mark.parametrize(
    "method,params",
    [("reform", {"observe": 4}), ("reform_zip", {"repeat": 16, "instruction": LEAD})],
)
def test_the_cache_is_a_dense_prefill_of_the_gathered_tokens(method, params):
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0] * 3])  # 60 tokens
    params = dict(ratio=0.5, sink=2, window=6, chunk=4, **params)
    chosen = {}
    with llmpatch.patched(model, method, **params) as patch:
        method = patch.methods[0]
        choose = method._choose
        method._choose = lambda s: chosen.setdefault("kept", choose(s))
        out = model.generate(x, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)  # fmt: skip
    pos = torch.cat([torch.arange(2), chosen["kept"]])
    dense = DynamicCache()
    with torch.no_grad():
        ref = model(x[:, pos], position_ids=pos[None], attention_mask=torch.ones(1, len(pos), dtype=torch.long),
                    **{caches.cache_argument(model): dense})  # fmt: skip
    torch.testing.assert_close(out.logits[0][0], ref.logits[0, -1], atol=1e-5, rtol=1e-5)
    cache = caches.output_cache(out)
    for i, layer in enumerate(cache.layers):
        for h in range(layer.num_kv_heads):
            seg = slice(layer.offsets[h] + layer.sink[h], layer.offsets[h] + layer.sink[h] + layer.pins[h])
            torch.testing.assert_close(
                layer.keys[0, seg], dense.layers[i].keys[0, h, 2:], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                layer.values[0, seg], dense.layers[i].values[0, h, 2:], atol=1e-5, rtol=1e-5
            )
    assert caches.kv_report(cache)["saved"] > 0.3


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sparse_pass_that_gathers_everything_decodes_as_the_unpatched_model(family):
    """ratio 0 after a sink 2 + window 4 pass: every token is recomputed densely, so the cache is the dense one;
    on a layer with its own sliding window (12 here, the prompt 40) only what the window still shows is pinned,
    at its position, and leaves the window during decode as in the model's own cache."""
    model = tiny_model(family)
    x = torch.tensor([PROMPTS[0] * 2])
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True)  # fmt: skip
    want = model.generate(x, **kw)
    with llmpatch.patched(model, "reform", ratio=0.0, sink=2, window=4, observe=3, chunk=2):
        for _ in range(2):  # the second prompt starts from the sparse pattern again
            got = model.generate(x, **kw)
            assert torch.equal(got.sequences, want.sequences)
            for a, b in zip(got.logits, want.logits, strict=True):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_decode_sizes_the_ring_after_the_gather_only():
    model = tiny_model("gemma3_text")
    x = torch.tensor([PROMPTS[0] * 2])
    kw = dict(
        max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    params = dict(ratio=0.5, sink=2, window=6, observe=4, chunk=4)
    with llmpatch.patched(model, "reform", **params):
        wide = model.generate(x, **kw)
    with llmpatch.patched(model, "reform", decode=2, **params):
        narrow = model.generate(x, **kw)
    torch.testing.assert_close(narrow.logits[0], wide.logits[0])  # the same gather and first token
    torch.testing.assert_close(narrow.logits[1], wide.logits[1])  # 2 slots hold the first 2 new tokens
    rings = {r for layer in caches.output_cache(narrow).layers if hasattr(layer, "ring") for r in layer.ring}
    assert rings == {2}
    saved = (caches.kv_report(caches.output_cache(c))["saved"] for c in (narrow, wide))
    assert next(saved) > next(saved)


def chosen_scores(model, x, name, **params):
    """The token scores a reform-like method hands its chunk choice for the prompt `x`, and the method."""
    seen = {}
    with llmpatch.patched(model, name, **params) as patch:
        method = patch.methods[0]
        choose = method._choose
        method._choose = lambda s: choose(seen.setdefault("scores", s))
        with torch.no_grad():
            model(x, use_cache=True)
    return seen["scores"], method


@pytest.mark.parametrize("top", [1, 3])
def test_reform_scores_a_token_by_its_best_heads(top):
    """reform's token scores: the sum of each token's `top` best (layer, query head) attention, summed over the
    last `observe` rows (a window as long as the prompt makes the scoring pass dense: eager attention is the
    reference)."""
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0] * 2])
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(x, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    per_head = torch.cat([a[0, :, -4:].sum(1) for a in att])  # [layers * heads, N]
    want = per_head.topk(top, dim=0).values.sum(0)
    got, _ = chosen_scores(model, x, "reform", ratio=0.5, sink=2, window=x.shape[1], observe=4, top=top)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_reform_zip_scores_a_token_by_its_best_repeat_scores():
    """reform_zip's token scores: the sum of each token's `top` best (layer, KV head) importances from kvzip's
    repeat passes (tested against eager attention in test_kvzip.py) over the dense prompt's keys and values."""
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0] * 2])
    spec = llmpatch.detect(model)
    with torch.no_grad():
        prompt = caches.output_cache(model(x, use_cache=True))
    stash = {i: (layer.keys, layer.values) for i, layer in enumerate(prompt.layers)}
    with llmpatch.patched(model, "kvzip", sink=2, chunk=16, instruction=LEAD) as p:
        per_head = p.methods[0]._score(model.model, x, stash, (LEAD, LEAD, []), spec)
    want = per_head.flatten(0, 1).topk(3, dim=0).values.sum(0)
    got, method = chosen_scores(model, x, "reform_zip", ratio=0.5, sink=2, window=4, chunk=2, repeat=16, top=3,
                                instruction=LEAD)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not method._stashed  # the dense prompt's keys are not held past the gather


@pytest.mark.parametrize(
    "method,params",
    [("reform", {"ratio": 1.0}), ("reform", {"pool": 2}), ("reform", {"chunk": 0}), ("reform", {"observe": 0}),
     ("reform", {"decode": 0}), ("reform", {"decode": 129}), ("reform", {"top": 0}), ("reform_zip", {"observe": 32}),
     ("reform_zip", {"repeat": 0}), ("reform_zip", {"top": 0}), ("reform_zip", {"decode": 129})],
)  # fmt: skip
def test_bad_reform_input_leaves_model_untouched(method, params):
    model = tiny_model("llama")
    x = torch.tensor([PROMPTS[0]])
    before = model(x).logits
    with pytest.raises(ParameterError, match=next(iter(params))):
        llmpatch.apply(model, method, **params)
    assert torch.equal(model(x).logits, before)
