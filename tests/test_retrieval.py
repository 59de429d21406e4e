"""Retrieval heads: the argmax recorder, needle spans, the official format, head selection and bad input."""

import json

import pytest
import torch
from llmpatch.kernels import reference

import llmpatch
from llmpatch.attention import CompactMask
from llmpatch.calibrate import retrieval
from llmpatch.decisions import LayerDecision
from llmpatch.errors import ParameterError, PlanError
from llmpatch.methods import REGISTRY
from llmpatch.testing import tiny_model


@pytest.mark.parametrize("window", [None, 5])
def test_top_keys_is_the_argmax_of_the_attention_probabilities(window):
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, nk, d = 2, 4, 2, 11, 8
    q, k = torch.randn(b, h, 1, d, generator=gen), torch.randn(b, hkv, nk, d, generator=gen)
    start = torch.tensor([0, 3])
    decision = LayerDecision(layer=0, num_heads=h, sliding_window=window)
    got = retrieval.top_keys(q, k, CompactMask(7, start, None), decision, None)
    eye = torch.eye(nk).expand(b, hkv, nk, nk)  # values = one-hot keys: the output rows are the probabilities
    probs = reference.attention(q, k, eye, start=start, sliding_window=window).out[:, :, 0]
    assert torch.equal(got, probs.argmax(-1) + 7)


def scores_for(spec, hot=()):
    s = [[0.01 * ((li * 7 + hi) % 5) for hi in range(spec.num_heads)] for li in range(spec.num_layers)]
    for li, hi, v in hot:
        s[li][hi] = v
    return s


def test_official_format_round_trip(tmp_path):
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    scores = scores_for(spec, [(1, 2, 0.7)])
    retrieval.export_official(scores, tmp_path / "o.json")
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["1-2"] == [0.7]
    plan = retrieval.import_official(tmp_path / "o.json", spec)
    assert plan.methods[0]["params"]["scores"] == scores
    (tmp_path / "bad.json").write_text(json.dumps({"99-0": [0.5]}))
    with pytest.raises(PlanError, match="another model"):
        retrieval.import_official(tmp_path / "bad.json", spec)


def test_top_k_and_random_selection():
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    scores = scores_for(spec, [(1, 2, 0.7), (0, 3, 0.5), (2, 1, 0.3)])
    with llmpatch.patched(model, "retrieval_mask", scores=scores, top_k=2) as p:
        assert p.methods[0].selected(spec) == [(0, 3), (1, 2)]
        assert int((p.layers[1].head_mask.modes != 0).sum()) == 1
    drawn = [set(REGISTRY["retrieval_mask"](scores=scores, random=3, seed=s).selected(spec))
             for s in range(3)]  # fmt: skip
    for heads in drawn:
        assert len(heads) == 3 and not heads & {(1, 2), (0, 3), (2, 1)}
    assert len({frozenset(x) for x in drawn}) > 1


def test_plan_entry_drives_the_mask(tmp_path):
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    det = retrieval.Detection(scores_for(spec, [(2, 0, 0.9)]))
    retrieval.to_plan(det, spec).save(tmp_path / "heads.json")
    with llmpatch.patched(model, "retrieval_mask", plan=tmp_path / "heads.json", top_k=1) as p:
        assert p.layers[2].head_mask.modes.tolist()[0] == 1


def test_retrieval_mask_defaults_to_the_heads_above_the_threshold():
    model = tiny_model("llama")
    scores = scores_for(llmpatch.detect(model), hot=[(0, 1, 0.5), (2, 3, 0.3)])
    want = sorted((li, hi) for li, row in enumerate(scores) for hi, s in enumerate(row) if s > 0.1)
    with llmpatch.patched(model, "retrieval_mask", scores=scores) as p:
        assert p.methods[0].selected(p.spec) == want == [(0, 1), (2, 3)]


@pytest.mark.parametrize(
    "params,match",
    [
        ({"top_k": 10_000}, "'top_k' must be in 1..12"),
        ({"random": 12}, "'random' must be in"),
        ({"top_k": 2, "random": 2}, "at most one of"),
        ({"threshold": 5.0}, "no head scores above 'threshold' 5.0"),
        ({"heads": [[0, 99]]}, "head in 0..3"),
        ({"heads": [[7, 0]]}, "layer in 0..2"),
        ({"top_k": 0}, "'top_k' must be an int >= 1"),
        ({"mode": "half"}, "'uniform' or 'zero'"),
    ],
)
def test_bad_retrieval_mask_input(params, match):
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    params = {"scores": scores_for(spec), **params} if "heads" not in params else params
    before = model.config._attn_implementation
    with pytest.raises(ParameterError, match=match):
        llmpatch.apply(model, "retrieval_mask", **params)
    assert model.config._attn_implementation == before and llmpatch.current_patch(model) is None


def test_scores_from_another_model_are_refused():
    other = [[0.5] * 9 for _ in range(30)]  # a 30 x 9 model's scores
    with pytest.raises(PlanError, match="3 x 4 .* another model"):
        llmpatch.apply(tiny_model("llama"), "retrieval_mask", scores=other, top_k=1)


def test_top_k_needs_scores():
    with pytest.raises(ParameterError, match="calibrate retrieval"):
        llmpatch.apply(tiny_model("llama"), "retrieval_mask", top_k=1)


def test_mass_score_ranking_and_its_errors():
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    copy, mass = scores_for(spec, [(0, 0, 0.9)]), scores_for(spec, [(2, 3, 0.8)])
    by_mass = REGISTRY["retrieval_mask"](scores=copy, mass_scores=mass, score="mass", top_k=1).selected(spec)
    assert by_mass == [(2, 3)]
    kv = REGISTRY["retrieval_kv"](scores=copy, mass_scores=mass, score="mass", top_k=1)
    assert kv.full_kv_heads(spec)[2] == [1]  # query head 3 of 4 sits in KV head 1 of 2
    with pytest.raises(ParameterError, match="needs 'mass_scores'"):
        REGISTRY["retrieval_kv"](scores=copy, score="mass", top_k=1).kept(spec)


def test_recorder_mass_is_the_probability_on_the_needle():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 1, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen)
    rec = retrieval._Recorder(1, 3, 6)
    rec(LayerDecision(layer=0, num_heads=4), q, k, CompactMask(0, None, None), None)
    eye = torch.eye(10).expand(1, 2, 10, 10)
    probs = reference.attention(q, k, eye).out[0, :, 0]
    torch.testing.assert_close(rec.mass[0], probs[:, 3:6].sum(-1))
