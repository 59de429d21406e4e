"""The vLLM plugin's reads of the paged cache (llmpatch/vllm/paged.py, no vLLM needed): a prompt's later chunk
and a batch of decode steps over a cache in vLLM's CPU layouts ("vec", "amx"), with blocks in any order, equal
the reference over the contiguous keys, for per-head sinks and windows, head masks, GQA and a layer's own sliding
window. Where each layout puts an element is checked against elements read off vLLM's own writer here, and
against the writer itself in tests/vllm_plugin."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from llmpatch.kernels import reference

from llmpatch.decisions import HeadMask, LayerDecision
from llmpatch.vllm import paged

D = 8
LAYOUTS = {"vec": (D, [4, 16]), "amx": (32, [32, 64])}  # head size, block sizes (amx: multiples of 32 and 16)


def paged_cache(kvs, block_size, g, isa="vec"):
    """Per request its k, v [2, Hkv, L_r, D], written into one cache [blocks, Hkv, block_size, 2D] in `isa`'s
    order at shuffled blocks (spare blocks hold NaN: never read); returns the cache and the block table."""
    hkv, d = kvs[0].shape[1], kvs[0].shape[3]
    blocks = -(-max(x.shape[2] for x in kvs) // block_size)
    spare = len(kvs) * blocks + 3
    table = torch.randperm(spare, generator=g)[: len(kvs) * blocks].view(len(kvs), blocks)
    cache = torch.full((spare, hkv, block_size, 2 * d), float("nan"))
    (keys, lk), (values, lv) = paged.kv_views(cache, isa)
    for r, (k, v) in enumerate(kvs):
        for i in range(k.shape[1]):
            b, t = table[r, i // block_size], i % block_size
            keys[b, :, t // lk, t % lk] = k[:, i].reshape(keys[b, :, 0, 0].shape)
            values[b, :, t // lv, t % lv] = v[:, i].reshape(values[b, :, 0, 0].shape)
    return cache, table


def test_kv_views_place_elements_where_vllm_writes_them():
    """Offsets within one block and KV head, read off vLLM 0.32's `cpu_attn_reshape_and_cache` (bf16, block 32,
    D 64): (token, channel) -> element, for keys and for values (values after the block's 32 * 64 keys)."""
    seen = {
        "vec": {"keys": {(0, 0): 0, (1, 0): 1, (0, 1): 32, (31, 63): 2047},
                "values": {(0, 0): 2048, (0, 1): 2049, (1, 0): 2112, (31, 63): 4095}},
        "amx": {"keys": {(0, 0): 0, (0, 1): 1, (1, 0): 2, (0, 2): 32, (16, 0): 1024, (31, 63): 2047},
                "values": {(0, 0): 2048, (1, 0): 2049, (0, 1): 2050, (2, 0): 2080, (0, 16): 2560, (31, 63): 4095}},
    }  # fmt: skip
    cache = torch.arange(2 * 32 * 64).view(1, 1, 32, 128)  # each element holds its own offset
    for isa, where in seen.items():
        (keys, lk), (values, lv) = paged.kv_views(cache, isa)
        key_at = torch.stack([keys[0, 0, t // lk, t % lk].flatten() for t in range(32)])
        value_at = torch.stack([values[0, 0, t // lv, t % lv].flatten() for t in range(32)])
        for (t, j), at in where["keys"].items():
            assert key_at[t, j] == at, (isa, "key", t, j)
        for (t, j), at in where["values"].items():
            assert value_at[t, j] == at, (isa, "value", t, j)
        every = torch.cat([key_at.flatten(), value_at.flatten()]).sort().values
        assert torch.equal(every, torch.arange(2 * 32 * 64))  # each element once


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="isa: one of vec, vec16, amx"):
        paged.kv_views(torch.zeros(1, 1, 32, 128), "neon")


@st.composite
def layers(draw):
    hkv = draw(st.sampled_from([1, 2, 3]))
    h = hkv * draw(st.sampled_from([1, 2]))
    sink = draw(st.lists(st.integers(0, 6), min_size=h, max_size=h))
    window = draw(st.lists(st.sampled_from([-1, 1, 2, 5, 9, 17, 33]), min_size=h, max_size=h))
    sliding = draw(st.sampled_from([None, None, 7, 20]))
    d = LayerDecision(layer=0, num_heads=h, sliding_window=sliding)
    if draw(st.booleans()):
        d.set_static("sink_window", sink, window)
    else:  # retrieval_mask: every key visible, head masks (keep / uniform / zero), on prompts too or not
        modes = draw(st.lists(st.integers(0, 2), min_size=h, max_size=h))
        d.head_mask = HeadMask(torch.tensor(modes, dtype=torch.int8), prefill=draw(st.booleans()))
    return d, hkv


def want(d, q, k, v, kw, prefill):
    mask = {} if d.head_mask is None else d.head_mask.kernel_args(prefill)
    return reference.attention(q, k, v, sink=d.sink, window=d.window, **mask, **kw).out


@settings(max_examples=60, deadline=None)
@given(layers(), st.integers(2, 70), st.data(), st.sampled_from(sorted(LAYOUTS)), st.integers(0, 9))
def test_prompt_chunk_equals_the_reference(layer, length, data, isa, seed):
    d, hkv = layer
    first = data.draw(st.integers(1, length - 1))
    dim, sizes = LAYOUTS[isa]
    block_size = data.draw(st.sampled_from(sizes))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, d.num_heads, length - first, dim, generator=g)
    kv = torch.randn(2, hkv, length, dim, generator=g)
    cache, table = paged_cache([kv], block_size, g, isa)
    kw = dict(scale=dim**-0.5, softcap=None, sliding_window=d.sliding_window)
    got = paged.prompt_chunk(d, q, cache, isa, table, length, kw)
    k, v = kv
    torch.testing.assert_close(got, want(d, q, k[None], v[None], kw, True), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(layers(), st.lists(st.integers(1, 60), min_size=1, max_size=4), st.sampled_from(sorted(LAYOUTS)),
       st.integers(0, 9))  # fmt: skip
def test_batched_decode_equals_the_reference(layer, lengths, isa, seed):
    d, hkv = layer
    dim, sizes = LAYOUTS[isa]
    g = torch.Generator().manual_seed(seed)
    caches = [torch.randn(2, hkv, n, dim, generator=g) for n in lengths]
    cache, table = paged_cache(caches, sizes[0], g, isa)
    q = torch.randn(len(lengths), d.num_heads, 1, dim, generator=g)
    kw = dict(scale=dim**-0.5, softcap=None, sliding_window=d.sliding_window)
    got = paged.decode(d, q, cache, isa, table, lengths, kw)
    for r, (kr, vr) in enumerate(caches):
        want_r = want(d, q[r : r + 1], kr[None], vr[None], kw, False)
        torch.testing.assert_close(got[r : r + 1], want_r, atol=1e-5, rtol=1e-5)


def test_a_later_chunk_reads_one_run_of_keys():
    """Sinks 4 and windows up to 9 from position 40 on: the run is positions [0, 4) and [32, 48), not the cache."""
    d = LayerDecision(layer=0, num_heads=4)
    d.set_static("sink_window", [4, 2, 0, 4], [9, 5, 9, 2])
    assert paged.chunk_keys(d, 2, 40) == (4, 32)
    d.sliding_window = 20  # the layer's own window would have to cut the moved sinks: positioned path
    assert paged.chunk_keys(d, 2, 40) is None
    assert paged.chunk_keys(d, 2, 5) == (0, 0)  # the windows reach back to 0: the whole prefix


@settings(max_examples=60, deadline=None)
@given(layers(), st.data(), st.integers(0, 9))
def test_a_request_that_keeps_every_key_is_causal_attention(layer, data, seed):
    """`keeps_every_key` sends a request to vLLM's own kernel (causal attention, the layer's sliding window
    applied by that kernel): only where the pattern equals exactly that."""
    d, hkv = layer
    length = data.draw(st.integers(1, d.narrowest_window() or 60))  # mostly lengths the rule accepts
    if not paged.keeps_every_key(d, length):
        return
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, d.num_heads, length, D, generator=g)
    k, v = torch.randn(2, 1, hkv, length, D, generator=g)
    kw = dict(scale=D**-0.5, softcap=None, sliding_window=d.sliding_window)
    causal = reference.attention(q, k, v, **kw).out
    torch.testing.assert_close(want(d, q, k, v, kw, True), causal, atol=1e-5, rtol=1e-5)


def test_keeps_every_key_only_below_the_narrowest_window():
    d = LayerDecision(layer=0, num_heads=2)
    d.set_static("sink_window", [4, 0], [-1, 64])
    assert paged.keeps_every_key(d, 64) and not paged.keeps_every_key(d, 65)
    assert not paged.keeps_every_key(d)  # at any length: the layer is not dense
    d.set_static("sink_window", [4, 0], [-1, -1])
    assert paged.keeps_every_key(d) and paged.keeps_every_key(d, 10**6)
    d.head_mask = HeadMask(torch.tensor([0, 0], dtype=torch.int8), prefill=False)
    assert not paged.keeps_every_key(d, 1)
