"""retrieval_kv's head choice by measured effect (`llmpatch calibrate retrieval-effect`) on a tiny model."""

import pytest
import torch

import llmpatch
from llmpatch.calibrate import effect
from llmpatch.errors import ParameterError
from llmpatch.testing import tiny_model
from tests.test_moa_calibrate import Tok


class DecodingTok(Tok):
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_effect_scores_cover_the_compressed_layers_and_choose_a_ranking():
    model = tiny_model("gemma3_text", max_position_embeddings=1024)  # has sliding layers: those stay 0
    spec = llmpatch.detect(model)
    g = spec.num_heads // spec.num_kv_heads
    scores = [[float(h) for h in range(spec.num_heads)] for _ in range(spec.num_layers)]
    res = effect.calibrate(model, DecodingTok(), {"scores": scores}, kv_heads=2, samples=1, dev_samples=2,
                           length=256, sink=4, recent=8)  # fmt: skip
    eff = res["params"]["effect_scores"]
    assert len(eff) == spec.num_layers and all(len(r) == spec.num_heads for r in eff)
    for li in range(spec.num_layers):
        if spec.sliding_window[li] is not None:
            assert set(eff[li]) == {0.0}
        for kv in range(spec.num_kv_heads):  # one figure per KV group
            assert len(set(eff[li][kv * g : (kv + 1) * g])) == 1
    assert any(v != 0 for r in eff for v in r)
    choice = res["provenance"]["ranking_choice"]
    assert set(choice["dev_accuracy"]) == {"effect", "copy"} and res["params"]["score"] == choice["chosen"]
    assert res["params"]["top_k"] == choice["top_k"][choice["chosen"]]
    for score, k in choice["top_k"].items():  # equal memory: every ranking keeps 2 full KV heads
        table = res["params"][{"effect": "effect_scores", "copy": "scores"}[score]]
        groups = {(li, h // g) for li, h in effect.ranked_heads(table)[:k] if spec.sliding_window[li] is None}
        assert len(groups) == 2
    with llmpatch.patched(model, "retrieval_kv", **res["params"], sink=4, recent=8):
        model(torch.tensor([[5] * 40]))
    with pytest.raises(ParameterError, match="plan"):
        effect.calibrate(model, DecodingTok(), {}, kv_heads=2)
    with pytest.raises(ParameterError, match="kv_heads"):
        effect.top_k_for(scores, spec, 10**6)


def test_sliding_measures_and_counts_the_local_layers():
    model = tiny_model("gemma3_text", max_position_embeddings=1024)
    spec = llmpatch.detect(model)
    local = [li for li in range(spec.num_layers) if spec.sliding_window[li] is not None]
    assert local
    g = spec.num_heads // spec.num_kv_heads
    # copy scores that rank a local layer's heads first: they count only with sliding
    scores = [[1.0 if li == local[0] else 0.5 / (1 + li)] * spec.num_heads for li in range(spec.num_layers)]
    assert effect.top_k_for(scores, spec, 1, sliding=True) == 1
    assert effect.top_k_for(scores, spec, 1) > g
    res = effect.calibrate(model, DecodingTok(), {"scores": scores}, kv_heads=1, samples=1, dev_samples=2,
                           length=256, sink=4, recent=8, sliding=True)  # fmt: skip
    assert res["provenance"]["effect"]["sliding"] is res["provenance"]["ranking_choice"]["sliding"] is True
    assert "sliding" not in res["params"]  # retrieval_mask and kvzip_heads read the same plan
    eff = res["params"]["effect_scores"]
    assert any(v != 0 for li in local for v in eff[li])  # the local layers were measured
    with llmpatch.patched(model, "retrieval_kv", **res["params"], sink=4, recent=8, sliding=True):
        model(torch.tensor([[5] * 40]))


def test_score_effect_needs_the_table():
    model = tiny_model("llama")
    spec = llmpatch.detect(model)
    scores = [[0.0] * spec.num_heads for _ in range(spec.num_layers)]
    with pytest.raises(ParameterError, match="effect_scores"):
        llmpatch.apply(model, "retrieval_kv", scores=scores, score="effect", top_k=1)
    with pytest.raises(ParameterError, match="'effect'"):
        llmpatch.apply(model, "retrieval_kv", scores=scores, score="bogus", top_k=1)
