"""Retrieval heads on real weights (SmolLM2-135M): detection finds a few copy-paste heads, and masking them on
decode steps breaks a needle answer that masking as many random non-retrieval heads leaves intact."""

import pytest
import torch
from llmpatch.evals.suites import SUITES

import llmpatch
from llmpatch.calibrate import retrieval

pytestmark = pytest.mark.real


def test_needle_span_covers_the_needle(smollm2):
    _, tok = smollm2
    prompt = "Some text. The best thing to do in Oslo is to swim. More text."
    ids, s0, s1 = retrieval.needle_span(tok, prompt, "The best thing to do in Oslo is to swim.")
    assert tok.decode(ids[s0:s1]).strip() == "The best thing to do in Oslo is to swim."


@pytest.fixture(scope="module")
def detection(smollm2):
    model, tok = smollm2
    return retrieval.detect(model, tok, lengths=[1024], depths=[0.3, 0.7])


def test_detection_finds_few_retrieval_heads(smollm2, detection):
    assert detection.counted == 2
    heads = detection.retrieval_heads()
    assert 1 <= len(heads) < 0.1 * 270
    assert all(15 <= li <= 25 for li, _, _ in heads)  # mid-to-late layers, as in the paper
    assert llmpatch.current_patch(smollm2[0]) is None


def test_masking_top_heads_breaks_retrieval_random_heads_do_not(smollm2, detection):
    model, tok = smollm2
    sample = SUITES["niah"].sample(tok, 1024, 0, depth=0.5)
    enc = tok(sample.prompt, return_tensors="pt", add_special_tokens=False)

    def answer(**params):
        with llmpatch.patched(model, "retrieval_mask", scores=detection.scores, **params):
            out = model.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        return SUITES["niah"].score(sample, tok.decode(out[0, enc.input_ids.shape[1] :]))

    assert answer(heads=[]) == 1.0
    assert answer(top_k=13) < 0.5
    assert answer(random=13, seed=0) == 1.0
    assert torch.is_grad_enabled()
