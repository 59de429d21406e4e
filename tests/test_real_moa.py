"""MoA on real weights (SmolLM2-135M) with the shipped plan: the ring-buffer cache decodes the same tokens as masks
over the full cache while holding a fraction of its bytes, and a density-1.0 plan is the unpatched model."""

from pathlib import Path

import pytest
import torch
from llmpatch.evals.suites import SUITES

import llmpatch
from llmpatch import caches as kvcache

pytestmark = pytest.mark.real
PLAN = Path(__file__).parent.parent / "benchmarks" / "moa" / "smollm2-135m-moa.json"


def test_ring_cache_matches_masks_and_saves_memory(smollm2):
    model, tok = smollm2
    sample = SUITES["passkey"].sample(tok, 1536, 0)
    ids = tok(sample.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    kw = dict(max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    runs = {}
    for ring in (True, False):
        with llmpatch.patched(model, "moa", plan=PLAN, ring=ring):
            out = model.generate(ids, **kw)
            runs[ring] = (out.sequences, kvcache.kv_report(kvcache.output_cache(out)))
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1]["saved"] > 0.6 and runs[False][1]["saved"] == 0.0


def test_density_one_plan_is_the_unpatched_model(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is Paris. " * 40, return_tensors="pt").input_ids
    with torch.inference_mode():
        want = model(ids).logits
        ones = dict(alphas=[[0.0] * 9] * 30, betas=[[1.0] * 9] * 30)
        with llmpatch.patched(model, "moa", **ones):
            got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
