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
    assert sum(14 <= li <= 26 for li, _, _ in heads) >= 0.8 * len(heads)  # mostly mid-to-late layers
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


def test_act_beta_one_gives_identical_logits(smollm2):
    model, tok = smollm2
    enc = tok(["Review: a delight from start to finish.\nSentiment:"], return_tensors="pt")
    want = model(**enc).logits
    with llmpatch.patched(model, "act", heads="all", beta=1.0):
        got = model(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # fp32 reference path vs SDPA
    with llmpatch.patched(model, "act", heads="all", beta=0.4):
        assert not torch.allclose(model(**enc).logits, want, atol=1e-3)


def test_act_search_runs_and_reports_both_splits(smollm2):
    from llmpatch.calibrate import act

    model, tok = smollm2
    res = act.search(model, tok, budget=2, train=8, heldout=8)
    assert len(res["tried"]) == 2 and res["heldout"]["baseline"]["n"] == 8
    assert set(res["heldout"]["calibrated"]) == {"n", "accuracy", "label_logprob"}
    assert llmpatch.current_patch(model) is None


@pytest.mark.slow
def test_retrieval_kv_keeps_the_passkey_and_saves_memory(smollm2, detection):
    model, tok = smollm2
    sample = SUITES["passkey"].sample(tok, 2048, 0)
    enc = tok(sample.prompt, return_tensors="pt", add_special_tokens=False)
    kw = dict(scores=detection.scores, mass_scores=detection.mass_scores, score="mass", top_k=13)
    with llmpatch.patched(model, "retrieval_kv", **kw) as p:
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             return_dict_in_generate=True)  # fmt: skip
        report = p.methods[0].kv_report(llmpatch.caches.output_cache(out))
    assert SUITES["passkey"].score(sample, tok.decode(out.sequences[0, enc.input_ids.shape[1] :])) == 1.0
    assert report["saved"] > 0.5
