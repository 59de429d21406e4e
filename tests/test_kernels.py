"""The kernel backends (CPU fast path, Triton under the interpreter) against the reference, on random shapes,
plus the public entry points and the layout converters."""

import os
from unittest import mock

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from llmpatch.kernels import (
    block_sparse_attention,
    cpu,
    dispatch,
    layout,
    reference,
    sink_window_attention,
)
from oracle import random_block_lists

EXAMPLES = int(os.environ.get("LLMPATCH_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
TRITON_SETTINGS = settings(max_examples=max(8, EXAMPLES // 2), deadline=None, derandomize=True)
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@st.composite
def problems(
    draw, max_n=160, dims=(16, 24, 64), block_sizes=(16, 32), kinds=("static", "blocks", "mask", "calib")
):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2, 3]))
    h = hkv * g
    nk = draw(st.integers(1, max_n))
    nq = min(nk, draw(st.sampled_from([1, 3, nk, nk])))
    d = draw(st.sampled_from(dims))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(b, n, m, d, generator=gen) for n, m in ((h, nq), (hkv, nk), (hkv, nk)))
    kw = {"scale": draw(st.sampled_from([None, 0.2])), "softcap": draw(st.sampled_from([None, 4.0]))}
    if draw(st.booleans()):
        kw["start"] = torch.tensor([draw(st.integers(-3, nk - 1)) for _ in range(b)])
    elif draw(st.booleans()):
        kw["key_padding"] = torch.rand(b, nk, generator=gen) > 0.3
    if draw(st.booleans()):
        kw["sliding_window"] = draw(st.integers(1, max_n))
    if "static" in kinds and draw(st.booleans()):
        kw["sink"] = torch.tensor([draw(st.integers(0, 20)) for _ in range(h)])
        kw["window"] = torch.tensor([draw(st.integers(-1, max_n // 2)) for _ in range(h)])
    if "blocks" in kinds and draw(st.booleans()):
        bs = draw(st.sampled_from(block_sizes))
        lists = draw(st.sampled_from([h, hkv]))  # per query head, or per KV head (GQA sharing)
        n_qb, n_kb = (nq + bs - 1) // bs, (nk + bs - 1) // bs
        count, index = random_block_lists((b, lists, n_qb), n_kb, gen)
        kw.update(kv_count=count, kv_index=index, block_size=bs)
    if "mask" in kinds and draw(st.booleans()):
        kw["head_mask"] = torch.tensor([draw(st.integers(0, 2)) for _ in range(h)], dtype=torch.int8)
    if "calib" in kinds and draw(st.booleans()):
        kw["calib"] = torch.tensor([draw(st.booleans()) for _ in range(h)])
        kw["calib_beta"] = draw(st.sampled_from([0.0, 0.4, 1.0]))
        kw["calib_threshold"] = draw(st.sampled_from([0.05, 0.2]))
        if nq < nk:
            kw["calib_sinks"] = torch.rand(b, h, nk, generator=gen) < 0.2
    return q, k, v, kw


def _check(got, want, atol):
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


@SETTINGS
@given(problems(kinds=("static", "blocks", "mask")))
def test_cpu_backend_matches_reference(problem):
    q, k, v, kw = problem
    want = reference.attention(q, k, v, **kw)
    out, lse = cpu.attention(q, k, v, return_lse=True, **kw)
    _check(out, want.out, 1e-5)
    _check(cpu.attention(q, k, v, **kw), want.out, 1e-5)  # the SDPA chunks (no LSE asked)
    assert torch.equal(torch.isinf(lse), torch.isinf(want.lse))
    torch.testing.assert_close(
        torch.nan_to_num(lse, 0, 0, 0), torch.nan_to_num(want.lse, 0, 0, 0), atol=1e-5, rtol=0
    )


@SETTINGS
@given(problems(max_n=200, kinds=("static",)), st.data())
def test_cpu_per_head_spans_by_group_match_reference(problem, data):
    """Long-input rules at short lengths (no one-call fallback, so band chunks): per-head spans from a few
    distinct (sink, window) pairs run once per group of equal spans, against the reference, LSE included."""
    q, k, v, kw = problem
    h, nk = q.shape[1], k.shape[2]
    pairs = data.draw(st.lists(st.tuples(st.integers(0, 8), st.integers(1, nk + 2)), min_size=2, max_size=3))
    pick = data.draw(st.lists(st.integers(0, len(pairs) - 1), min_size=h, max_size=h))
    kw["sink"] = torch.tensor([pairs[i][0] for i in pick])
    kw["window"] = torch.tensor([pairs[i][1] for i in pick])
    want = reference.attention(q, k, v, **kw)
    with mock.patch.object(cpu, "DENSE_FALLBACK_KEYS", 0):
        out, lse = cpu.attention(q, k, v, return_lse=True, **kw)
        _check(cpu.attention(q, k, v, **kw), want.out, 1e-5)
    _check(out, want.out, 1e-5)
    torch.testing.assert_close(
        torch.nan_to_num(lse, 0, 0, 0), torch.nan_to_num(want.lse, 0, 0, 0), atol=1e-5, rtol=0
    )


@settings(max_examples=max(10, EXAMPLES // 2), deadline=None, derandomize=True)
@given(
    st.integers(300, 900), st.sampled_from([0, 1, 37]), st.integers(0, 70), st.integers(8, 600),
    st.integers(32, 700), st.sampled_from([(2, 1), (3, 3)]), st.integers(0, 2**16),
)  # fmt: skip
def test_cpu_band_chunks_under_the_layers_own_window_match_reference(
    nk, back, sink, window, own, heads, seed
):
    """Band chunks past the sinks reuse one mask; under the layer's own sliding window (Gemma's local layers) a
    row sees a sink only while it is inside that window, which depends on the row's absolute position, so
    chunks whose rows see different sinks must not share a mask. Long enough for several band chunks (the
    one-call fallback off), queries at the end of a longer cache too, LSE included."""
    h, hkv = heads
    nq = nk - back
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, m, 16, generator=g) for n, m in ((h, nq), (hkv, nk), (hkv, nk)))
    kw = {"sink": torch.full((h,), sink), "window": torch.full((h,), window), "sliding_window": own}
    want = reference.attention(q, k, v, **kw)
    with mock.patch.object(cpu, "DENSE_FALLBACK_KEYS", 0):
        out, lse = cpu.attention(q, k, v, return_lse=True, **kw)
        _check(cpu.attention(q, k, v, **kw), want.out, 1e-5)
    _check(out, want.out, 1e-5)
    torch.testing.assert_close(lse, want.lse, atol=1e-5, rtol=0)


def test_moa_like_spans_run_per_group_and_match_reference():
    """SmolLM2's shapes (9 query heads on 3 KV heads) past the one-call length, two spans mixed across KV groups,
    as in a MoA plan: the per-group path runs and equals the reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 9, 1000, 32, generator=g), *torch.randn(2, 1, 3, 1000, 32, generator=g)
    sink, window = torch.full((9,), 64), torch.tensor([700, 700, 190, 700, 190, 190, 700, 190, 190])
    with mock.patch.object(cpu, "_by_span", wraps=cpu._by_span) as spy:
        out = cpu.attention(q, k, v, sink=sink, window=window)
    assert spy.call_count == 1
    _check(out, reference.attention(q, k, v, sink=sink, window=window).out, 1e-5)


def test_cpu_splits_per_head_spans_only_when_it_pays():
    wide, narrow = torch.tensor([0, 0, 0]), torch.tensor([1000, 100, 100])
    assert cpu._split_pays(wide, narrow, 4096)  # 1200 of 3000 keys read
    assert not cpu._split_pays(wide, torch.tensor([1000, 900, 1000]), 4096)  # 2900 of 3000
    assert not cpu._split_pays(wide, narrow, cpu.DENSE_FALLBACK_KEYS)  # short: one masked call
    assert not cpu._split_pays(wide, torch.tensor([100, 100, 100]), 4096)  # one span: nothing to split


@SETTINGS
@given(problems(kinds=("static",)))
def test_traced_static_path_matches_reference(problem):
    """The path torch.compile traces (no data-dependent Python), run eagerly, against the reference."""
    q, k, v, kw = problem
    want = reference.attention(q, k, v, **kw)
    scale = kw.get("scale") or q.shape[-1] ** -0.5
    got = cpu.traced_static(q, k, v, scale=scale, softcap=kw.get("softcap"), start=kw.get("start"),
                            key_padding=kw.get("key_padding"), sliding_window=kw.get("sliding_window"),
                            sink=kw.get("sink"), window=kw.get("window"))  # fmt: skip
    _check(got, want.out, 1e-5)


FLEX_CASES = {
    "blocks": dict(blocks=True),
    "blocks per kv head": dict(blocks=True, per_kv=True),
    "sink+window with padding": dict(sink=True, start=True),
    "sliding + softcap": dict(sliding=True, softcap=True),
    "blocks + sink+window + key padding + head mask": dict(blocks=True, sink=True, pad=True, mask=True),
}


@pytest.mark.parametrize("case", FLEX_CASES)
def test_cpu_flex_path_matches_reference(case, monkeypatch):
    """Above the crossover the CPU path runs flex_attention; below it, masked row chunks. Both are exact."""
    c = FLEX_CASES[case]
    monkeypatch.setattr(cpu, "CROSSOVER_KEYS", 0)
    gen = torch.Generator().manual_seed(1)
    b, h, hkv, n, d, bs = 2, 4, 2, 200, 32, 64
    q, k, v = (
        torch.randn(b, h, n, d, generator=gen),
        torch.randn(b, hkv, n, d, generator=gen),
        torch.randn(b, hkv, n, d, generator=gen),
    )
    kw = {}
    if c.get("blocks"):
        kw.update(
            zip(
                ("kv_count", "kv_index"),
                layout.sink_window_blocks(
                    b, n, n, torch.tensor([0, 64, 0, 1]), torch.tensor([64, 30, -1, 100]), bs
                ),
                strict=True,
            )
        )
        if c.get("per_kv"):
            kw["kv_count"], kw["kv_index"] = kw["kv_count"][:, ::2], kw["kv_index"][:, ::2]
        kw["block_size"] = bs
    if c.get("sink"):
        kw.update(sink=torch.tensor([4, 0, 2, 1]), window=torch.tensor([16, 40, -1, 7]))
    if c.get("start"):
        kw["start"] = torch.tensor([0, 37])
    if c.get("pad"):
        kw["key_padding"] = torch.rand(b, n, generator=gen) > 0.2
    if c.get("sliding"):
        kw["sliding_window"] = 50
    if c.get("softcap"):
        kw["softcap"] = 5.0
    if c.get("mask"):
        kw["head_mask"] = torch.tensor([0, 1, 2, 0], dtype=torch.int8)
    _check(cpu.attention(q, k, v, **kw), reference.attention(q, k, v, **kw).out, 1e-5)  # fmt: skip


@interpreter
@TRITON_SETTINGS
@given(problems(max_n=130, dims=(16, 24)), st.sampled_from([torch.float32, torch.float16]))
def test_triton_prefill_matches_reference(problem, dtype):
    from llmpatch.kernels import triton_prefill

    q, k, v, kw = problem
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    want = reference.attention(q, k, v, **kw)
    got = triton_prefill.attention(q, k, v, **kw)
    if want.calib_sinks is not None:
        assert torch.equal(got.calib_sinks, want.calib_sinks)
    _check(got.out, want.out, 1e-4 if dtype == torch.float32 else 4e-3)
    assert torch.equal(torch.isinf(got.lse), torch.isinf(want.lse))
    torch.testing.assert_close(
        torch.nan_to_num(got.lse, 0, 0, 0), torch.nan_to_num(want.lse, 0, 0, 0), atol=1e-3, rtol=0
    )


@interpreter
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_entry_points_agree_and_empty_rows_are_zero(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 96, 16, generator=gen),
        torch.randn(2, 2, 96, 16, generator=gen),
        torch.randn(2, 2, 96, 16, generator=gen),
    )
    lengths = torch.tensor([96, 60])  # sequence 1 is left-padded by 36
    sw = sink_window_attention(
        q,
        k,
        v,
        torch.tensor([4, 0, 2, 8]),
        torch.tensor([16, 32, -1, 8]),
        lengths=lengths,
        head_mask=["keep", "uniform", "zero", "keep"],
        backend=backend,
    )
    ref = sink_window_attention(
        q,
        k,
        v,
        torch.tensor([4, 0, 2, 8]),
        torch.tensor([16, 32, -1, 8]),
        lengths=lengths,
        head_mask=["keep", "uniform", "zero", "keep"],
        backend="reference",
        return_lse=True,
    )
    _check(sw, ref.out, 1e-5)
    assert sw[1, :, :36].abs().max() == 0 and sw[:, 2].abs().max() == 0
    cnt, idx = layout.causal_blocks(2, 2, 96, 96, 32)
    bsa = block_sparse_attention(q, k, v, cnt, idx, 32, lengths=lengths, backend=backend)
    dense = block_sparse_attention(q, k, v, cnt, idx, 32, lengths=lengths, backend="reference")
    _check(bsa, dense, 1e-5)


def test_entry_points_reject_bad_input():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="head_mask: entries must be one of"):
        sink_window_attention(q, k, v, 0, 4, head_mask=["keep", "mute", "keep", "keep"])
    with pytest.raises(ValueError, match="kv_index: expected"):
        block_sparse_attention(
            q, k, v, torch.ones(1, 3, 1, dtype=torch.int32), torch.zeros(1, 3, 1, 1, dtype=torch.int32), 16
        )
    with pytest.raises(ValueError, match="backend: must be one of"):
        sink_window_attention(q, k, v, 0, 4, backend="flash")
    with pytest.raises(ValueError, match="backend: 'cpu' cannot run ACT"):
        sink_window_attention(q, k, v, 0, 4, calib=[True] * 4, backend="cpu")
    with pytest.raises(ValueError, match="sink: must be >= 0"):
        sink_window_attention(q, k, v, -1, 4)


I32 = torch.int32


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k, v: sink_window_attention(q, k, v, 1.9, 4), r"sink: must hold integers, got 1.9"),
        (lambda q, k, v: sink_window_attention(q, k, v, torch.tensor([1, 2, 3]), 4), r"sink: expected shape \(\) or \(4,\)"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, -2), r"window: must be >= -1, got -2"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, lengths=[100]), r"lengths: must be <= 32, got 100"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, lengths=[0]), r"lengths: must be >= 1, got 0"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, lengths=[3, 4]), r"lengths: expected shape \(1,\)"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, calib=[True] * 4, calib_beta=5), r"calib_beta: must be in \[0, 1\], got 5"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, calib_threshold=0), r"calib_threshold: must be in \(0, inf\]"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, softcap=0), r"softcap: must be in \(0, inf\], got 0"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, softcap=-3.0), r"softcap: must be in \(0, inf\]"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, scale=float("nan")), r"scale: must be a finite number"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, sliding_window=0), r"sliding_window: must be an int >= 1"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, head_mask=[0, 1]), r"head_mask: expected shape \(4,\)"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, head_mask=[0, 0, 0, 7]), r"head_mask: must be <= 2"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, calib=[1, 0, 1, 0]), r"calib: expected 4 booleans"),
        (lambda q, k, v: sink_window_attention(q, k.double(), v, 0, 4), r"q, k, v: must share one floating dtype"),
        (lambda q, k, v: sink_window_attention(q.long(), k, v, 0, 4), r"q, k, v: must share one floating dtype"),
        (lambda q, k, v: sink_window_attention(q, k, v, 0, 4, calib_sinks=torch.zeros(1, 4, 32)), r"calib_sinks: expected a bool tensor"),
        (lambda q, k, v: block_sparse_attention(q, k, v, torch.ones(1, 2, 1, dtype=I32), torch.full((1, 2, 1, 2), 999, dtype=I32), 16), r"kv_index: listed blocks must be in 0..1 \(Nk=32, block_size=16\), got 999"),
        (lambda q, k, v: block_sparse_attention(q, k, v, torch.ones(1, 2, 1, dtype=I32), torch.full((1, 2, 1, 2), -1, dtype=I32), 16), r"kv_index: listed blocks must be in 0..1 .* got -1"),
        (lambda q, k, v: block_sparse_attention(q, k, v, torch.full((1, 2, 1), 3, dtype=I32), torch.zeros(1, 2, 1, 2, dtype=I32), 16), r"kv_count: must be in 0..MAX_K=2, got 3..3"),
        (lambda q, k, v: block_sparse_attention(q, k, v, torch.ones(1, 2, 1, dtype=I32), torch.zeros(1, 2, 1, 2), 16), r"kv_index: must be an int32 / int64 tensor"),
        (lambda q, k, v: block_sparse_attention(q, k, v, torch.ones(1, 2, 1, dtype=I32), torch.zeros(1, 2, 1, 2, dtype=I32), 0), r"block_size: must be an int >= 1, got 0"),
    ],
)  # fmt: skip
def test_every_kernel_argument_is_checked(call, match):
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


@SETTINGS
@given(st.integers(1, 300), st.integers(0, 300), st.sampled_from([16, 64]), st.integers(-1, 40), st.integers(0, 70),
       st.integers(-5, 40), st.sampled_from([None, 33]))  # fmt: skip
def test_sink_window_blocks_cover_the_pattern(nk, extra, bs, window, sink, start, sliding):
    """The block list built for a static pattern holds every block the token mask touches."""
    nq = max(1, nk - extra)
    st_ = torch.tensor([start])
    cnt, idx = layout.sink_window_blocks(
        1, nq, nk, torch.tensor([sink]), torch.tensor([window]), bs, start=st_, sliding_window=sliding
    )
    want = layout.dense_mask(
        1,
        1,
        nq,
        nk,
        start=st_,
        sink=torch.tensor([sink]),
        window=torch.tensor([window]),
        sliding_window=sliding,
    )
    covered = want & reference.block_mask(cnt, idx, bs, nq, nk)
    assert torch.equal(covered, want)
    assert int(cnt.max()) <= (sink + (window if window >= 0 else nk) + 2 * bs) // bs + 2


@st.composite
def decode_problems(draw):
    b, hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3, 4]))
    h = hkv * g
    nk = draw(st.integers(1, 200))
    nq = min(nk, draw(st.sampled_from([1, 2, 4])))
    d = draw(st.sampled_from([16, 40, 64]))
    bs = draw(st.sampled_from([16, 32]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(b, n, m, d, generator=gen) for n, m in ((h, nq), (hkv, nk), (hkv, nk)))
    kw = {"softcap": draw(st.sampled_from([None, 4.0]))}
    if draw(st.booleans()):
        kw["start"] = torch.tensor([draw(st.integers(-3, nk - 1)) for _ in range(b)])
    if draw(st.booleans()):
        kw["sliding_window"] = draw(st.integers(1, 200))
    if draw(st.booleans()):
        kw["sink"] = torch.tensor([draw(st.integers(0, 20)) for _ in range(h)])
        kw["window"] = torch.tensor([draw(st.integers(-1, 100)) for _ in range(h)])
    if draw(st.booleans()):
        kw["head_mask"] = torch.tensor([draw(st.integers(0, 2)) for _ in range(h)], dtype=torch.int8)
    if draw(st.booleans()):
        kw["calib"] = torch.tensor([draw(st.booleans()) for _ in range(h)])
        kw["calib_sinks"] = torch.rand(b, h, nk, generator=gen) < 0.2
    n_kb = (nk + bs - 1) // bs
    lists = draw(st.sampled_from([h, hkv]))
    count, index = random_block_lists((b, lists), n_kb, gen)  # includes empty lists and empty splits
    splits = draw(st.sampled_from([None, 1, 3, 8]))
    return q, k, v, count, index, bs, splits, kw


@interpreter
@TRITON_SETTINGS
@given(decode_problems(), st.sampled_from([torch.float32, torch.float16]))
def test_triton_decode_matches_reference(problem, dtype):
    from llmpatch.kernels import triton_decode

    q, k, v, count, index, bs, splits, kw = problem
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    want = reference.attention(
        q, k, v, kv_count=count.unsqueeze(2), kv_index=index.unsqueeze(2), block_size=bs, **kw
    )
    out, lse = triton_decode.decode(q, k, v, count, index, bs, splits=splits, **kw)
    _check(out, want.out, 1e-4 if dtype == torch.float32 else 4e-3)
    assert torch.equal(torch.isinf(lse), torch.isinf(want.lse))


@interpreter
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_ring_cache_decode_equals_full_cache(step, backend):
    """Keys at explicit positions (a per-KV-head ring buffer sized sink + window + step - 1, one KV head keeping
    every token) give the full cache's sink+window attention on every backend."""
    from llmpatch.caches.ring import ring_slots

    gen = torch.Generator().manual_seed(step)
    b, hkv, g, d, n = 2, 3, 2, 32, 120
    sink, window = torch.tensor([4, 0, 0]), torch.tensor([10, 33, -1])
    ring = torch.where(window < 0, -1, window + step - 1)
    cap = max(int((sink + ring)[window >= 0].max()), n)
    k, v = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    kc, vc = torch.zeros(b, hkv, cap, d), torch.zeros(b, hkv, cap, d)
    slot_pos = torch.full((b, hkv, cap), -1)
    for p in range(n):  # written in order: a later token overwrites an earlier one in the same slot
        slot = ring_slots(torch.full((b, hkv, 1), p), sink, ring)[..., 0]
        for kv in range(hkv):
            kc[:, kv, slot[0, kv]], vc[:, kv, slot[0, kv]] = k[:, kv, p], v[:, kv, p]
            slot_pos[:, kv, slot[0, kv]] = p
    q = torch.randn(b, hkv * g, step, d, generator=gen)
    q_pos = torch.arange(n - step, n).expand(b, -1)
    sq, wq = sink.repeat_interleave(g), window.repeat_interleave(g)
    full = reference.attention(q, k, v, sink=sq, window=wq).out
    out, _ = dispatch.attention(q, kc, vc, q_pos=q_pos, k_pos=slot_pos, sink=sq, window=wq, backend=backend)
    _check(out, full, 1e-5)
    assert (slot_pos[:, :2] >= 0).sum() * 3 < 2 * b * n  # the bounded heads hold fewer slots than tokens
    # the same slots as one flat KV head (the ring cache's layout): head h owns segment h, -1 elsewhere
    caps = [int((sink + ring)[h]) if ring[h] >= 0 else n for h in range(hkv)]
    spans = [(sum(caps[:h]), sum(caps[: h + 1])) for h in range(hkv)]
    kf = torch.cat([kc[:, h, : caps[h]] for h in range(hkv)], 1).unsqueeze(1)
    vf = torch.cat([vc[:, h, : caps[h]] for h in range(hkv)], 1).unsqueeze(1)
    flat_pos = torch.full((b, hkv, sum(caps)), -1)
    for h, (lo, hi) in enumerate(spans):
        flat_pos[:, h, lo:hi] = slot_pos[:, h, : caps[h]]
    for hint in (None, spans):
        out, _ = dispatch.attention(q, kf, vf, q_pos=q_pos, k_pos=flat_pos, k_spans=hint, sink=sq, window=wq,
                                    backend=backend)  # fmt: skip
        _check(out, full, 1e-5)


@pytest.mark.parametrize("start", [None, 0, 5, -7])
@pytest.mark.parametrize("sliding", [None, 40, 8])
@pytest.mark.parametrize("sink,window", [(4, 16), (0, 16), (30, 10), (4, 200)])
def test_cpu_decode_band_fast_path(start, sliding, sink, window):
    """One decode query, head-uniform sink + window: the two-slice path equals the reference."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 6, 1, 32, generator=gen),
        torch.randn(2, 2, 90, 32, generator=gen),
        torch.randn(2, 2, 90, 32, generator=gen),
    )
    kw = dict(sink=torch.full((6,), sink), window=torch.full((6,), window), sliding_window=sliding)
    if start is not None:
        kw["start"] = torch.tensor([start, start])
    _check(cpu.attention(q, k, v, **kw), reference.attention(q, k, v, **kw).out, 1e-5)


@interpreter
def test_gpu_check_script_passes_at_small_sizes(tmp_path):
    """The prepared GPU script runs end to end under the interpreter (correctness rows must be ok)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    res = subprocess.run([sys.executable, str(script), "--small", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["correctness"] and all(r["ok"] for r in report["correctness"])
    assert len(report["prefill"]) == 8 and len(report["decode"]) == 2


@interpreter
@TRITON_SETTINGS
@given(
    st.integers(16, 64), st.integers(0, 40), st.sampled_from(["q", "k", "v"]), st.integers(0, 10_000),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.integers(0, 8), st.integers(-1, 24),
    st.booleans(), st.integers(0, 2**16),
)  # fmt: skip
def test_nan_and_inf_give_the_same_nan_rows_on_every_backend(
    nk, extra, where, at, value, sink, window, blocks, seed
):
    """A non-finite entry in q, k or v: every backend gives NaN on exactly the reference's rows (those whose own
    query, or a key they may see, carries it) and the same finite values elsewhere."""
    nq = max(1, nk - extra)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h, n in ((4, nq), (2, nk), (2, nk)))
    t = {"q": q, "k": k, "v": v}[where]
    t.view(-1)[at % t.numel()] = value
    if blocks:
        cnt, idx = random_block_lists([1, 2, (nq + 15) // 16], (nk + 15) // 16, g)
        run = lambda b: block_sparse_attention(q, k, v, cnt, idx, 16, backend=b)  # noqa: E731
        backends = ("reference", "cpu", "triton")
    else:
        run = lambda b: sink_window_attention(q, k, v, sink, window, backend=b)  # noqa: E731
        backends = ("reference", "cpu", "sdpa", "triton")
    want = run("reference")
    for backend in backends[1:]:
        got = run(backend)
        assert torch.equal(got.isnan(), want.isnan()), (backend, got.isnan().any(-1), want.isnan().any(-1))
        fin = ~want.isnan()
        torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=1e-4)


def test_the_checkouts_kernels_folder_does_not_shadow_the_kernels_package(tmp_path):
    """`python -m ...` in a checkout puts its root on sys.path, where kernels/ (llmpatch.kernels) would take the
    name `kernels` from the package transformers >= 5.25 imports: imported by that name it hands it over (and
    loads as itself when none is installed, as transformers <= 5.24's probe expects)."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = "import kernels, llmpatch.kernels; print(kernels.__file__); print(llmpatch.kernels.attention.__module__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    where, attention = done.stdout.split()
    assert attention == "llmpatch.kernels.dispatch"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # none installed: the folder loads as itself (no version)
        assert Path(where).resolve() == root / "kernels" / "__init__.py"
        return
    assert not Path(where).resolve().is_relative_to(root / "kernels")
