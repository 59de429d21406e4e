"""LongHeads: the vectorised run time against a per-token loop written from docs/METHODS.md §2, decode with the partial
chunk, batching, the dense configuration, and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmpatch
from llmpatch.attention import CompactMask
from llmpatch.decisions import LayerDecision
from llmpatch.errors import ParameterError, PatchStateError
from llmpatch.methods.longheads import LongHeads
from llmpatch.methods.longheads.runtime import ChunkLayer, Config, LongHeadsAttention
from llmpatch.testing import tiny_model
from tests.test_parity import PROMPTS, left_pad, positions


def rope(n, d, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    f = torch.arange(n).float()[:, None] * inv
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def rot(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def reference(q, k, v, w, kc, block, scale):
    """One row, per the paper: q [H, N, D], k/v [Hkv, N, D] un-rotated; selection shared by `block` queries (their
    mean query). Returns [H, N, D]."""
    h, n, d = q.shape
    g = h // k.shape[0]
    cos, sin = rope(kc * w, d)
    out = torch.zeros(h, n, d)
    for hh in range(h):
        kk, vv = k[hh // g], v[hh // g]
        khat = []
        for c in range(n // w):
            sl = slice(c * w, (c + 1) * w)
            qt, kt = rot(q[hh, sl], cos[:w], sin[:w]), rot(kk[sl], cos[:w], sin[:w])
            vbar = (torch.softmax(qt @ kt.T * scale, -1) @ vv[sl]).mean(0)
            khat.append(torch.softmax(vbar @ kt.T * scale, -1) @ kt)
        for t in range(n):
            c = t // w
            if c + 1 <= kc:
                chunks = list(range(c + 1))
            else:
                b0 = t // block * block
                qm = q[hh, b0 : min(b0 + block, n)].mean(0)
                scores = {j: float(qm @ khat[j]) for j in range(1, c - 1)}
                best = sorted(scores, key=lambda j: -scores[j])[: kc - 3]
                chunks = sorted({0, c - 1, c, *best})
            idx = torch.cat([torch.arange(j * w, min((j + 1) * w, t + 1)) for j in chunks])
            kr = rot(kk[idx], cos[: len(idx)], sin[: len(idx)])
            qr = rot(q[hh, t], cos[len(idx) - 1], sin[len(idx) - 1])
            out[hh, t] = torch.softmax(qr @ kr.T * scale, -1) @ vv[idx]
    return out


def attention_for(cfg, d):
    """LongHeads' attention of one layer as a function of (q, k, v, mask, scale, softcap) -> out."""
    cos, sin = rope(cfg.k * cfg.chunk_size, d)
    attend = LongHeadsAttention(cfg, lambda device, dtype: (cos.to(dtype), sin.to(dtype)))
    attend.holder = ChunkLayer()  # the per-cache state lives in this cache layer
    dec = LayerDecision(layer=0, num_heads=1)
    return lambda q, k, v, mask, scale, softcap: attend(dec, q, k, v, mask, scale, softcap)[0]


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(8, 60), w=st.sampled_from([2, 4]), kc=st.integers(3, 5), block=st.sampled_from([1, 2]),
    hkv=st.sampled_from([1, 2]), g=st.sampled_from([1, 2]), seed=st.integers(0, 99),
)  # fmt: skip
def test_prefill_matches_per_token_reference(n, w, kc, block, hkv, g, seed):
    gen = torch.Generator().manual_seed(seed)
    d = 8
    q, k, v = (torch.randn(1, hh, n, d, generator=gen) for hh in (hkv * g, hkv, hkv))
    cfg = Config(w, kc, block)
    got = attention_for(cfg, d)(q, k, v, CompactMask(0, None, None), d**-0.5, None)
    want = reference(q[0], k[0], v[0], w, kc, block, d**-0.5)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [1, 4])
def test_decode_with_partial_chunk_matches_reference(block):
    """Prefill 13 tokens, then one token per call: decode steps select per token over the partial chunk, and the
    chunks completed while decoding are summarised from the queries kept since."""
    gen = torch.Generator().manual_seed(0)
    n, n0, d, w, kc = 40, 13, 8, 4, 4
    q, k, v = (
        torch.randn(1, 4, n, d, generator=gen),
        torch.randn(1, 2, n, d, generator=gen),
        torch.randn(1, 2, n, d, generator=gen),
    )
    cfg = Config(w, kc, block)
    run = attention_for(cfg, d)
    mask = CompactMask(0, None, None)
    outs = [run(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], mask, d**-0.5, None)]
    for t in range(n0, n):
        outs.append(run(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], mask, d**-0.5, None))
    got = torch.cat(outs, 2)[0]
    want = reference(q[0], k[0], v[0], w, kc, block, d**-0.5)
    torch.testing.assert_close(got[:, :n0], want[:, :n0], atol=1e-5, rtol=1e-5)
    # each decode token selects alone (block 1), whatever the prefill block
    want_dec = reference(q[0], k[0], v[0], w, kc, 1, d**-0.5)
    torch.testing.assert_close(got[:, n0:], want_dec[:, n0:], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_rows():
    gen = torch.Generator().manual_seed(1)
    d, w, kc, lens = 8, 4, 3, [30, 17, 23]
    n = max(lens)
    q, k, v = (
        torch.randn(3, 4, n, d, generator=gen),
        torch.randn(3, 2, n, d, generator=gen),
        torch.randn(3, 2, n, d, generator=gen),
    )
    start = torch.tensor([n - x for x in lens])
    cfg = Config(w, kc, 2)
    got = attention_for(cfg, d)(q, k, v, CompactMask(0, start, None), d**-0.5, None)
    for b, x in enumerate(lens):
        want = reference(q[b, :, n - x :], k[b, :, n - x :], v[b, :, n - x :], w, kc, 2, d**-0.5)
        torch.testing.assert_close(got[b, :, n - x :], want, atol=1e-5, rtol=1e-5)
        assert not got[b, :, : n - x].any()  # padding rows output 0


def test_cache_changed_outside_is_refused():
    d, w, kc = 8, 4, 3
    x = torch.randn(1, 2, 20, d)
    run = attention_for(Config(w, kc, 2), d)
    mask = CompactMask(0, None, None)
    run(x, x, x, mask, None, None)
    with pytest.raises(PatchStateError, match="cache"):
        run(x[:, :, :1], x[:, :, :15], x[:, :, :15], mask, None, None)


ACTIVE = dict(chunk_size=4, attention_length=12, block_size=2)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_model_decode_matches_longer_prefill(family):
    """generate() (prefill + decode steps over the cache) gives the logits a full per-token prefill gives."""
    model = tiny_model(family)
    x = torch.tensor([PROMPTS[0]])
    with llmpatch.patched(model, "longheads", chunk_size=4, attention_length=12, block_size=1):
        out = model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
        full = model(out.sequences[:, :-1]).logits[0, x.shape[1] - 1 :]
        torch.testing.assert_close(torch.stack(out.logits, 1)[0], full, atol=2e-5, rtol=0)


def test_describe_and_remove_restore_rope():
    model = tiny_model("gemma3_text")
    x = torch.tensor([PROMPTS[0]])
    want = model(x).logits
    patch = llmpatch.apply(model, "longheads", **ACTIVE)
    assert "own attention" in patch.describe()
    assert "layer   0" in patch.describe() and patch.layers[0].attend is None  # a sliding layer: untouched
    patch.remove()
    assert torch.equal(model(x).logits, want)
    assert not any(m._forward_pre_hooks for m in model.modules() if hasattr(m, "q_proj"))


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(chunk_size=6, block_size=4), "multiple of block_size"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=4, block_size=2, attention_length=1024), "trained length 512"),
        (dict(chunk_size=4, block_size=2, attention_length=8), r"at least 3 \* chunk_size"),
        (dict(chunk_size=4, block_size=2, attention_length=14), "multiple of chunk_size"),
        (dict(chunk_size=4, block_size=2, layers=[0]), "full-attention layers only"),
    ],
)
def test_bad_parameters(params, match):
    model = tiny_model("gemma3_text")
    with pytest.raises(ParameterError, match=match):
        llmpatch.apply(model, "longheads", **params)
    assert model.config._attn_implementation == "eager"


def test_refuses_composition_with_a_pattern():
    with pytest.raises(ParameterError, match="longheads"):
        llmpatch.apply(tiny_model("llama"), ["longheads", "sink_window"], longheads=ACTIVE)


def test_default_attention_length_is_trained_or_4096():
    spec = llmpatch.detect(tiny_model("llama"))
    assert LongHeads().resolved_length(spec) == 512
    spec.max_position_embeddings = 32768
    assert LongHeads().resolved_length(spec) == 4096


def test_density_reported():
    model = tiny_model("llama")
    ids, mask = left_pad(PROMPTS)
    with llmpatch.patched(model, "longheads", **ACTIVE) as patch:
        tracker = patch.track_sparsity()
        model(ids, attention_mask=mask, position_ids=positions(mask))
        # rows of 20, 6, 13 tokens, k*w = 12: queries past 12 see at most 12 keys
        assert 0 < tracker.density < 1
        assert math.isclose(tracker.density, tracker.computed / tracker.causal)
