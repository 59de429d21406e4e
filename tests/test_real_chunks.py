"""LongHeads and DHSA on real weights (SmolLM2-135M): short versions of the recorded runs in benchmarks/RESULTS.md
(there: LongHeads at 8k/16k with attention length 2048, DHSA at 4k with budget 1024)."""

import pytest
import torch
from llmpatch.evals.suites import SUITES

import llmpatch

pytestmark = pytest.mark.real


def passkey(model, tok, length, index):
    sample = SUITES["passkey"].sample(tok, length, index)
    ids = tok(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return SUITES["passkey"].score(sample, tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_longheads_reads_past_its_attention_length(smollm2):
    """Attention length 512 (k = 8 chunks of 64): the passkey at 2k, four times as far, is still found."""
    model, tok = smollm2
    with llmpatch.patched(model, "longheads", attention_length=512, chunk_size=64) as patch:
        tracker = patch.track_sparsity()
        assert [passkey(model, tok, 2048, i) for i in (0, 1)] == [1.0, 1.0]
        assert tracker.density < 0.5


def test_longheads_covering_every_chunk_is_dense(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is Paris. " * 60, return_tensors="pt").input_ids
    with torch.inference_mode():
        want = model(ids).logits
        with llmpatch.patched(model, "longheads", attention_length=2048, chunk_size=256):
            got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_dhsa_finds_the_passkey_at_a_quarter_budget(smollm2):
    model, tok = smollm2
    with llmpatch.patched(model, "dhsa", budget=256) as patch:
        tracker = patch.track_sparsity()
        assert [passkey(model, tok, 2048, i) for i in (0, 1)] == [1.0, 1.0]
        assert tracker.density < 0.5


def test_dhsa_full_budget_is_dense(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is Paris. " * 60, return_tensors="pt").input_ids
    with torch.inference_mode():
        want = model(ids).logits
        with llmpatch.patched(model, "dhsa", budget=ids.shape[1]):
            got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
