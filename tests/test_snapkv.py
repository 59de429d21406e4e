"""snapkv and chunkkv: the observation window's top tokens (chunkkv: whole top chunks) are pinned in the ring
cache; decoding reads sink + pinned + window; keep=0 is streamingllm; pinning every droppable token gives a dense
decode over the sparse prefill."""

import pytest
import torch

import llmpatch
from llmpatch import caches
from llmpatch.testing import FAMILIES, tiny_model
from tests.test_parity import PROMPTS, left_pad

KW = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
PROMPT = [(7 * i + 3) % 97 + 3 for i in range(48)]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_zero_is_streamingllm_with_the_same_tail(family):
    model = tiny_model(family)
    x = torch.tensor([PROMPT])
    with llmpatch.patched(model, "streamingllm", sink=2, window=6, tail=4):
        want = model.generate(x, **KW)
    with llmpatch.patched(model, "snapkv", sink=2, window=6, keep=0, tail=4, sliding=True):
        assert torch.equal(model.generate(x, **KW), want)


@pytest.mark.parametrize(
    "family,sliding", [("llama", False), ("qwen3", False), ("gemma3_text", False), ("gemma3_text", True)]
)
def test_pinning_every_dropped_token_gives_a_dense_decode_over_the_sparse_prefill(family, sliding):
    """Gemma-3's own sliding-window layers are left as they are unless `sliding` (then they are cut too)."""
    model = tiny_model(family)
    spec = llmpatch.detect(model)
    x = torch.tensor([PROMPT])
    kw = dict(sink=2, window=6, keep=len(PROMPT), tail=4, observe=3, sliding=sliding)
    with llmpatch.patched(model, "snapkv", **kw):
        got = model.generate(x, **KW)
        own = [type(layer).__name__ for layer in caches.output_cache(model(x, use_cache=True)).layers]
    local = [i for i, w in enumerate(spec.sliding_window) if w is not None]
    assert (family == "gemma3_text") == bool(local)
    assert all((own[i] == "RingLayer") == sliding for i in local)
    # the twin: the same sparse prefill over a full cache, then every decode step dense
    with llmpatch.patched(model, "streamingllm", sink=2, window=6, tail=4, ring=False) as p:
        for i in [] if sliding else local:  # the model's own window only
            p.layers[i].window = torch.full_like(p.layers[i].window, -1)
        out = model(x, use_cache=True)
        cache, ids = caches.output_cache(out), x
        for layer in p.layers:
            layer.window = torch.full_like(layer.window, -1)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(KW["max_new_tokens"]):
            ids = torch.cat([ids, nxt], 1)
            out = model(nxt, **{caches.cache_argument(model): cache}, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
    assert torch.equal(got, ids)


@pytest.mark.parametrize("method", ["snapkv", "chunkkv"])
def test_pins_are_the_observation_windows_top_tokens(method):
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    x = torch.tensor([PROMPT])
    seen = {}
    extra = {"pool": 1} if method == "snapkv" else {"chunk": 3, "keep": 6}
    keep = extra.get("keep", 3)
    with llmpatch.patched(
        model, method, **{"sink": 2, "window": 6, "keep": 3, "tail": 4, "observe": 4, **extra}
    ) as p:
        first = p.layers[0]
        select = first.select

        def spy(decision, q, k, v, mask, scale, softcap):
            seen.update(q=q, k=k, scale=scale)
            select(decision, q, k, v, mask, scale, softcap)

        first.select = spy
        out = model(x, use_cache=True)
        layer = caches.output_cache(out).layers[0]
    q, k = seen["q"].detach().float(), seen["k"].detach().float()
    g = spec.num_heads // spec.num_kv_heads
    n = len(PROMPT)
    logits = q[:, :, -4:] @ k.repeat_interleave(g, 1).transpose(-1, -2) * seen["scale"]
    causal = torch.arange(n)[None, :] <= torch.arange(n - 4, n)[:, None]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1).sum(2)
    scores = probs.view(1, spec.num_kv_heads, g, n).sum(2)[0]
    for h in range(spec.num_kv_heads):
        droppable = scores[h, 2 : n - 6]  # positions 2 .. n - 7
        if method == "snapkv":
            want = set((droppable.topk(3).indices + 2).tolist())
        else:  # chunks of 3 positions: [0, 3) holds one droppable token (2), then [3, 6), ...
            chunks = {c: [i for i in range(3 * c, 3 * c + 3) if 2 <= i <= n - 7] for c in range(n // 3)}
            total = {c: float(scores[h, ix].sum()) for c, ix in chunks.items() if ix}
            best = sorted(total, key=lambda c: -total[c])[
                :2
            ]  # the first two fill keep = 6 when both are whole
            assert all(len(chunks[c]) == 3 for c in best)
            want = {i for c in best for i in chunks[c]}
        seg = slice(layer.offsets[h] + 2, layer.offsets[h] + 2 + keep)
        got = {int((k[0, h] == row).all(-1).nonzero()[0]) for row in layer.keys[0, seg]}
        assert got == want
        assert (layer.pos[0, seg] == 0).all()  # read like sinks


def test_left_padded_batch_matches_each_prompt_and_bytes_are_bounded():
    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    with llmpatch.patched(model, "snapkv", sink=2, window=4, keep=3, tail=3):
        batch = model.generate(ids, attention_mask=mask, **KW)
        alone = [model.generate(torch.tensor([p]), **KW)[0, len(p) :] for p in PROMPTS]
        out = model(torch.tensor([PROMPT]), use_cache=True)
        report = caches.kv_report(caches.output_cache(out))
    for row, want in zip(batch[:, ids.shape[1] :], alone, strict=True):
        assert torch.equal(row, want)
    spec = llmpatch.detect(model)
    d = spec.head_dim
    per_layer = 2 * spec.num_kv_heads * (2 + 3 + 4) * d * 4  # k and v, sink + keep + window slots, fp32
    assert report["kv_bytes"] == per_layer * spec.num_layers


def test_bad_parameters_name_themselves():
    model = tiny_model("llama")
    for bad, key in [
        ({"pool": 4}, "pool"),
        ({"sink": 0}, "sink"),
        ({"tail": 0}, "tail"),
        ({"keep": -1}, "keep"),
    ]:
        with pytest.raises(llmpatch.ParameterError, match=key):
            llmpatch.apply(model, "snapkv", **bad)
    assert model.config._attn_implementation != "llmpatch"


def test_moa_chunkkv_keep_zero_is_moa_and_full_heads_get_no_pins(tmp_path):
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    h = spec.num_heads
    alphas = [[10_000.0] * h] + [[4.0] * h for _ in range(spec.num_layers - 1)]  # layer 0 dense
    betas = [[0.25] * h for _ in range(spec.num_layers)]
    plan = {"alphas": alphas, "betas": betas, "sink": 2, "min_span": 3}
    x = torch.tensor([PROMPT])
    with llmpatch.patched(model, "moa", **plan, tail=4):
        want = model.generate(x, **KW)
    with llmpatch.patched(model, "moa_chunkkv", **plan, tail=4, keep=0):
        assert torch.equal(model.generate(x, **KW), want)
    with llmpatch.patched(model, "moa_chunkkv", **plan, tail=4, keep=4, chunk=2, observe=3):
        layers = caches.output_cache(model(x, use_cache=True)).layers
    assert layers[0].pins == [0] * spec.num_kv_heads and all(layer.pins == [4] * spec.num_kv_heads
                                                             for layer in layers[1:])  # fmt: skip
    path = llmpatch.plan.Plan(spec.fingerprint(), [{"name": "moa", "params": plan}]).save(
        tmp_path / "moa.json"
    )
    with llmpatch.patched(model, "moa_chunkkv", plan=path, keep=0, tail=4):  # a moa plan file serves
        assert torch.equal(model.generate(x, **KW), want)
    with pytest.raises(llmpatch.ParameterError, match="ring"):
        llmpatch.apply(model, "moa_chunkkv", **plan, ring=False)


def test_retrieval_kv_pins_chunks_on_its_compressed_heads_only():
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    x = torch.tensor([PROMPT])
    full = [[0, 0]]  # layer 0's first KV group stays full
    with llmpatch.patched(model, "retrieval_kv", heads=full, sink=2, recent=6, keep=4, chunk=2, observe=3):
        layers = caches.output_cache(model(x, use_cache=True)).layers
    assert layers[0].pins == [0] + [4] * (spec.num_kv_heads - 1)
    assert all(layer.pins == [4] * spec.num_kv_heads for layer in layers[1:])
    with llmpatch.patched(model, "retrieval_kv", heads=full, sink=2, recent=6):
        assert all(not any(layer.pins) for layer in caches.output_cache(model(x, use_cache=True)).layers)
