"""DHSA: boundary rule, chunk-level selection against a loop written from docs/METHODS.md §4, dense equivalence at full
budget, batching and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmpatch
from llmpatch.errors import ParameterError
from llmpatch.methods.dhsa import runtime as dynchunks
from llmpatch.testing import tiny_model
from tests.test_parity import left_pad, positions


def cfg(**kw):
    base = dict(budget=12, block_size=4, sink=4, recent=4, tail=2, gap_window=2, nms=2, per_128=32, stride=2)
    return dynchunks.Config(**{**base, **kw})


def test_boundaries_find_a_planted_segment():
    """Later queries attend to keys 40..59 only: the gaps before 40 and after 59 have the largest ratios."""
    n, d = 120, 16
    u = torch.zeros(d)
    u[0] = 1.0
    q = (u * 8).expand(1, 2, n, d).clone()
    k = torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(0)) * 0.1
    k[0, 0, :, 0] = 0.0
    k[0, 0, 40:60, 0] = 1.0
    chunk = dynchunks.boundaries(cfg(per_128=3, nms=8, gap_window=4), q, k, torch.tensor([n]), 1.0)
    starts = set((torch.nonzero(chunk[0, 1:] != chunk[0, :-1]).flatten() + 1).tolist())
    assert {40, 60} <= starts
    assert len(starts) <= n * 3 // 128


@settings(max_examples=15, deadline=None)
@given(n=st.integers(20, 140), nms=st.integers(1, 6), per=st.integers(1, 40), seed=st.integers(0, 99))
def test_boundaries_respect_cap_and_spacing(n, nms, per, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 4, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
    lens = torch.tensor([n, max(1, n // 2)])
    chunk = dynchunks.boundaries(cfg(nms=nms, per_128=per), q, k, lens, 8**-0.5)
    for b in range(2):
        row = chunk[b, : int(lens[b])]
        assert int(row[0]) == 0 and bool((row[1:] - row[:-1] >= 0).all())
        starts = (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
        assert len(starts) <= max(1, int(lens[b]) * per // 128)
        assert all(b_ - a > nms for a, b_ in zip(starts, starts[1:], strict=False))
    # a row's boundaries do not depend on the other rows of the batch
    alone = dynchunks.boundaries(cfg(nms=nms, per_128=per), q[1:, :, : int(lens[1])], k[1:, :, : int(lens[1])],
                                 lens[1:], 8**-0.5)  # fmt: skip
    assert torch.equal(alone[0], chunk[1, : int(lens[1])])


def reference_lists(c, q, k, chunk):
    """Per query block: the chosen key blocks, one row, from the paper's steps written as loops."""
    h, n, d = q.shape
    bs = c.block_size
    qm, km = q.float().mean(0), k.float().mean(0)
    kbar = {}
    for cid in chunk.unique().tolist():
        sel = km[chunk == cid]
        kbar[cid] = sel.mean(0) * math.sqrt(len(sel))
    nb = math.ceil(n / bs)
    out = []
    for qb in range(nb):
        rows = qm[qb * bs : min(n, (qb + 1) * bs)]
        qbar = rows.mean(0) * math.sqrt(len(rows))
        tok = [float(qbar @ kbar[int(chunk[j])]) for j in range(n)]
        score = {kb: max(tok[kb * bs : min(n, (kb + 1) * bs)]) for kb in range(qb + 1)}
        sink_b, rec_b = math.ceil(c.sink / bs), math.ceil(c.recent / bs)
        if qb >= max(0, n - c.tail) // bs:
            out.append(set(range(qb + 1)))
            continue
        forced = {kb for kb in range(qb + 1) if kb < sink_b or kb > qb - rec_b}
        rest = sorted(set(range(qb + 1)) - forced, key=lambda kb: (-score[kb], -kb))
        out.append(forced | set(rest[: max(0, c.budget // bs - len(forced))]))
    return out


@settings(max_examples=20, deadline=None)
@given(n=st.integers(8, 90), budget=st.sampled_from([8, 12, 20]), seed=st.integers(0, 99))
def test_block_lists_match_reference(n, budget, seed):
    gen = torch.Generator().manual_seed(seed)
    c = cfg(budget=budget)
    q, k = torch.randn(1, 4, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)
    chunk = dynchunks.boundaries(c, q, k, torch.tensor([n]), 8**-0.5)
    count, index = dynchunks.block_lists(c, q, k, chunk, torch.tensor([n]), None)
    want = reference_lists(c, q[0], k[0], chunk[0])
    for qb, blocks in enumerate(want):
        got = set(index[0, 0, qb, : int(count[0, 0, qb])].tolist())
        assert got == blocks, (qb, got, blocks)


PROMPT = [(7 * i + 3) % 120 + 3 for i in range(70)]
ACTIVE = dict(budget=16, block_size=4, sink=4, recent=4, tail=4, stride=2, nms=2, per_128=32)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3_text"])
def test_full_budget_gives_unpatched_logits_and_sparse_differs(family):
    model = tiny_model(family)
    x = torch.tensor([PROMPT])
    want = model(x).logits
    with llmpatch.patched(model, "dhsa", budget=len(PROMPT), block_size=4, sink=4, recent=4):
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)
    with llmpatch.patched(model, "dhsa", **ACTIVE) as patch:
        tracker = patch.track_sparsity()
        got = model(x).logits
        assert 0.2 < tracker.density < 0.9
    assert (got - want).abs().max() > 1e-3
    assert torch.equal(model(x).logits, want)


def test_left_padded_batch_matches_rows():
    model = tiny_model("llama")
    prompts = [PROMPT, PROMPT[5:47], PROMPT[:61]]
    ids, mask = left_pad(prompts)
    with llmpatch.patched(model, "dhsa", **ACTIVE):
        batch = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        for row, p in enumerate(prompts):
            alone = model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(batch[row, -len(p) :], alone, atol=5e-5, rtol=0)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(budget=200, sink=128, recent=128), "at least the forced tokens sink \\+ recent = 256"),
        (dict(budget=32, block_size=64, sink=0, recent=16), "at least block_size=64"),
        (dict(block_size=48), "one of 4, 8, 16"),
        (dict(layers=[0]), "full-attention layers only"),
    ],
)
def test_bad_parameters(params, match):
    model = tiny_model("gemma3_text")
    with pytest.raises(ParameterError, match=match):
        llmpatch.apply(model, "dhsa", **params)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_block_lists_run_on_every_backend(backend):
    """The selection feeds the block-list kernels: CPU fast path and Triton (interpreter here) agree with the
    reference backend."""
    model = tiny_model("llama")
    x = torch.tensor([PROMPT])
    params = dict(budget=48, block_size=16, sink=16, recent=16, tail=4, stride=2, nms=2, per_128=32)
    with llmpatch.patched(model, "dhsa", backend="reference", **params):
        want = model(x).logits
    with llmpatch.patched(model, "dhsa", backend=backend, **params):
        torch.testing.assert_close(model(x).logits, want, atol=1e-4, rtol=0)
