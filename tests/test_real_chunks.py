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


@pytest.mark.parametrize(
    "method, params",
    [
        # attention length 512 (k = 8 chunks of 64): the passkey at 2k, four times as far, is still found
        ("longheads", {"attention_length": 512, "chunk_size": 64}),
        ("dhsa", {"budget": 256}),  # a quarter of the prompt
    ],
)
def test_finds_the_passkey_reading_a_quarter_of_the_prompt(smollm2, method, params):
    model, tok = smollm2
    with llmpatch.patched(model, method, **params) as patch:
        tracker = patch.track_sparsity()
        assert [passkey(model, tok, 2048, i) for i in (0, 1)] == [1.0, 1.0]
        assert tracker.density < 0.5


@pytest.fixture(scope="module")
def short_prompt(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is Paris. " * 60, return_tensors="pt").input_ids
    with torch.inference_mode():
        return ids, model(ids).logits


@pytest.mark.parametrize(
    "method, params",
    [
        ("longheads", {"attention_length": 2048, "chunk_size": 256}),  # k chunks cover the whole prompt
        ("dhsa", {"budget": 2048}),  # the budget covers the whole prompt
    ],
)
def test_covering_configuration_is_dense(smollm2, short_prompt, method, params):
    model, _ = smollm2
    ids, want = short_prompt
    assert ids.shape[1] < 2048
    with torch.inference_mode(), llmpatch.patched(model, method, **params):
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
