"""Every decision kind of the reference backend (and the SDPA backend where it applies) against the oracle."""

import os

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from llmpatch.kernels import dispatch, reference, rules, sdpa
from oracle import oracle_attention, random_block_lists

EXAMPLES = int(os.environ.get("LLMPATCH_HYPOTHESIS_EXAMPLES", "40"))  # raise it for a deeper search
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)


@st.composite
def problems(draw, kinds=("static", "blocks", "mask", "calib")):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    h = hkv * g
    nk = draw(st.integers(1, 20))
    nq = draw(st.sampled_from(sorted({1, 2, nk})))  # decode steps, a short chunk, or prefill
    nq = min(nq, nk)
    d = draw(st.sampled_from([4, 8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(b, h, nq, d, generator=gen) * 2
    k = torch.randn(b, hkv, nk, d, generator=gen) * 2
    v = torch.randn(b, hkv, nk, d, generator=gen)
    kw = {"scale": draw(st.sampled_from([None, 0.3]))}
    kw["softcap"] = draw(st.sampled_from([None, 3.0]))
    if draw(st.booleans()):
        kw["start"] = torch.tensor([draw(st.integers(-2, nk - 1)) for _ in range(b)])
    if draw(st.booleans()):
        kw["sliding_window"] = draw(st.integers(1, 8))
    if "static" in kinds and draw(st.booleans()):
        kw["sink"] = torch.tensor([draw(st.integers(0, 4)) for _ in range(h)])
        kw["window"] = torch.tensor([draw(st.integers(-1, 6)) for _ in range(h)])
    if "blocks" in kinds and draw(st.booleans()):
        bs = draw(st.sampled_from([2, 4]))
        n_qb, n_kb = (nq + bs - 1) // bs, (nk + bs - 1) // bs
        count, index = random_block_lists((b, h, n_qb), n_kb, gen)
        kw.update(kv_count=count, kv_index=index, block_size=bs)
    if "mask" in kinds and draw(st.booleans()):
        kw["head_mask"] = torch.tensor([draw(st.integers(0, 2)) for _ in range(h)], dtype=torch.int8)
    if "calib" in kinds and draw(st.booleans()):
        kw["calib"] = torch.tensor([draw(st.booleans()) for _ in range(h)])
        kw["calib_beta"] = draw(st.sampled_from([0.0, 0.4, 1.0]))
        kw["calib_threshold"] = draw(st.sampled_from([0.05, 0.1, 0.3]))
        if nq < nk and draw(st.booleans()):
            kw["calib_sinks"] = torch.rand(b, h, nk, generator=gen) < 0.3
    return q, k, v, kw


@SETTINGS
@given(problems())
def test_reference_matches_oracle(problem):
    q, k, v, kw = problem
    # fp64 on both sides: ACT's (1 - beta m) / (1 - m) amplifies rounding when m is near 1.
    q, k, v = q.double(), k.double(), v.double()
    got = reference.attention(q, k, v, **kw).out
    want = oracle_attention(q, k, v, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


@SETTINGS
@given(problems(kinds=("static", "blocks", "mask")))
def test_reference_fp32_matches_oracle(problem):
    q, k, v, kw = problem
    got = reference.attention(q, k, v, **kw).out
    assert got.dtype == torch.float32 and not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), oracle_attention(q, k, v, **kw), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(problems(kinds=("static",)))
def test_sdpa_backend_matches_reference(problem):
    q, k, v, kw = problem
    kw.pop("softcap")
    want = reference.attention(q, k, v, **kw).out
    got = sdpa.attention(q, k, v, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(problems())
def test_row_chunked_reference_is_exact(problem):
    q, k, v, kw = problem
    old = dispatch.ROW_CHUNK_ELEMENTS
    dispatch.ROW_CHUNK_ELEMENTS = 1  # one row (or one block of rows) per chunk
    try:
        got, sinks = dispatch.attention(q, k, v, backend="reference", **kw)
    finally:
        dispatch.ROW_CHUNK_ELEMENTS = old
    want = reference.attention(q, k, v, **kw)
    tol = 1e-5 if want.calib_sinks is not None else 1e-6  # ACT's (1 - beta m) / (1 - m) amplifies rounding
    torch.testing.assert_close(got, want.out, atol=tol, rtol=tol)
    if want.calib_sinks is not None:  # ACT: the two-pass chunked sink set equals the one-pass one
        assert torch.equal(sinks, want.calib_sinks)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    start = torch.tensor([3])  # the first three queries are padding
    for backend in ("reference", "sdpa"):
        out, _ = dispatch.attention(q, k, v, backend=backend, start=start)
        assert not torch.isnan(out).any()
        assert out[:, :, :3].abs().max() == 0


def test_act_reuses_prefill_sinks_on_decode():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    k[:, :, [0, 3]] *= 0  # make keys 0 and 3 sinks for some heads
    calib = torch.tensor([True, True])
    pre = reference.attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], calib=calib, calib_threshold=0.05)
    assert pre.calib_sinks is not None and pre.calib_sinks.shape == (1, 2, 8)
    dec = reference.attention(q[:, :, 8:], k, v, calib=calib, calib_sinks=pre.calib_sinks)
    want = oracle_attention(q[:, :, 8:], k, v, calib=calib, calib_sinks=pre.calib_sinks)
    torch.testing.assert_close(dec.out.double(), want, atol=1e-5, rtol=1e-5)


def test_sdpa_backend_refuses_what_it_cannot_run():
    q = k = v = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        dispatch.attention(q, k, v, backend="sdpa", softcap=5.0)
    with pytest.raises(ValueError, match="backend: must be one of"):
        dispatch.attention(q, k, v, backend="flash")


@SETTINGS
@given(problems(kinds=("static", "blocks")))
def test_density_counts_match_the_dense_masks(problem):
    from llmpatch.kernels import density

    q, k, v, kw = problem
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    q_pos, k_pos = rules.token_positions(b, nq, nk, kw.get("start"))
    vis = rules.keep_mask(q_pos, k_pos, h, sliding_window=kw.get("sliding_window")).expand(b, h, nq, nk)
    assert density.causal_count(
        b, h, nq, nk, start=kw.get("start"), sliding_window=kw.get("sliding_window")
    ) == int(vis.sum())
    if "kv_index" in kw:  # counted in key-index space, causal rule only
        causal = rules.keep_mask(*rules.token_positions(b, nq, nk), h)
        want = causal & reference.block_mask(kw["kv_count"], kw["kv_index"], kw["block_size"], nq, nk)
    else:
        want = vis
        if "sink" in kw:
            want = want & rules.keep_mask(q_pos, k_pos, h, sink=kw["sink"], window=kw["window"])
    assert density.computed_count(b, h, nq, nk, **kw) == int(want.sum())


@SETTINGS
@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=25, unique=True),
    st.integers(1, 3),
    st.one_of(st.none(), st.integers(1, 30)),
)
def test_gathered_count_matches_the_mask_over_positions(positions, h, window):
    from llmpatch.kernels import density

    pos = torch.tensor(sorted(positions))
    vis = rules.keep_mask(pos[None], pos[None], h, sliding_window=window)  # [1, 1, N, N]
    assert density.gathered_count(pos, h, sliding_window=window) == int(vis.sum()) * h
