"""The public API: patched(), describe(), save()/plan round trip, composition, decision seams, lazy imports."""

import json
import subprocess
import sys

import pytest
import torch
from llmpatch.kernels import HEAD_ZERO

import llmpatch
from llmpatch.methods.act import Calibration
from llmpatch.testing import tiny_model

X = torch.tensor([[5, 9, 17, 33, 8, 70, 12, 90, 4, 61, 27, 44]])


def test_methods_listing():
    assert {"dense", "sink_window"} <= set(llmpatch.methods())


def test_patched_removes_on_exception():
    m = tiny_model("mistral")
    before = m(X).logits
    with pytest.raises(RuntimeError, match="boom"):
        with llmpatch.patched(m, "sink_window", sink=1, window=3):
            assert m.config._attn_implementation == "llmpatch"
            raise RuntimeError("boom")
    assert m.config._attn_implementation == "eager"
    assert llmpatch.current_patch(m) is None
    assert torch.equal(m(X).logits, before)


def test_describe_and_plan_round_trip(tmp_path):
    m = tiny_model("gemma3_text")
    patch = llmpatch.apply(m, "sink_window", sink=2, window=5, layers=[0, 2])
    text = patch.describe()
    assert "sink_window on gemma3_text" in text and "layer   0" in text and "sink+window 2+5" in text
    assert "layer   1 model.layers.1.self_attn: dense" in text
    want = m(X).logits
    path = patch.save(tmp_path / "plan.json")
    patch.remove()
    data = json.loads(path.read_text())
    assert data["schema"] == "llmpatch.plan" and data["version"] == 1
    assert data["model"]["family"] == "gemma3_text" and len(data["model"]["hash"]) == 16
    assert data["methods"] == [{"name": "sink_window", "params": {"sink": 2, "window": 5, "layers": [0, 2]}}]
    assert {"llmpatch_version", "created", "command"} <= set(data["provenance"])
    with llmpatch.patched(m, "sink_window", plan=path):
        assert torch.equal(m(X).logits, want)
    with llmpatch.patched(m, "sink_window", plan=path, window=64) as p:  # overrides beat the plan
        assert p.methods[0].window == 64 and p.methods[0].sink == 2


def test_conflicting_composition_is_refused():
    m = tiny_model("llama")
    with pytest.raises(
        llmpatch.ParameterError, match="'sink_window' and 'dense' both set the static pattern"
    ):
        llmpatch.apply(m, ["dense", "sink_window"])
    assert llmpatch.current_patch(m) is None
    with pytest.raises(llmpatch.ParameterError, match="names a method twice"):
        llmpatch.apply(m, ["dense", "dense"])


def test_overrides_are_routed_to_composed_methods():
    route = llmpatch.patch._route_overrides
    names = ["dense", "sink_window"]
    assert route(names, {"window": 4}) == {"dense": {}, "sink_window": {"window": 4}}
    assert route(names, {"sink_window": {"sink": 1}}) == {"dense": {}, "sink_window": {"sink": 1}}
    with pytest.raises(llmpatch.ParameterError, match=r"beta: no method among \['dense', 'sink_window'\]"):
        route(names, {"beta": 0.5})


def test_head_mask_applies_on_decode_only():
    m = tiny_model("qwen3")
    prefill = m(X, use_cache=True)
    step = torch.tensor([[11]])
    want_step = m(step, past_key_values=prefill.past_key_values).logits
    with llmpatch.patched(m, "dense") as patch:
        for hi in range(4):
            patch.layers[1].mask_head("dense", hi, "zero", prefill=False)
        assert bool((patch.layers[1].head_mask.modes == HEAD_ZERO).all())
        out = m(X, use_cache=True)
        torch.testing.assert_close(out.logits, prefill.logits, atol=1e-5, rtol=0)
        got_step = m(step, past_key_values=out.past_key_values).logits
        assert not torch.allclose(got_step, want_step, atol=1e-3)


def test_act_sinks_found_at_prefill_are_reused_on_decode():
    m = tiny_model("llama")
    with llmpatch.patched(m, "dense") as patch:
        for layer in patch.layers:
            layer.calibration = Calibration(torch.ones(4, dtype=torch.bool), threshold=0.05)
        out = m(X, use_cache=True)
        offset, sinks = patch.layers[0].calibration.sinks
        assert offset == 0 and sinks.shape == (1, 4, X.shape[1])
        m(torch.tensor([[11]]), past_key_values=out.past_key_values)
        assert patch.layers[0].calibration.sinks[1] is sinks  # decode reuses, never overwrites


def test_attention_without_decisions_gives_clear_error():
    m = tiny_model("llama")
    llmpatch.attention.register()
    m.set_attn_implementation("llmpatch")
    with pytest.raises(llmpatch.PatchStateError, match="carries no llmpatch decisions; use llmpatch.apply"):
        m(X)


def test_import_needs_neither_triton_nor_cuda():
    code = (
        "import sys, llmpatch, llmpatch.kernels, llmpatch.evals; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "import torch; assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packed_sequences_are_refused_not_ignored():
    m = tiny_model("llama")
    packed = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])  # two sequences in one row
    want_error = "attention_mask: llmpatch supports causal attention with padding masks"
    with llmpatch.patched(m, "dense"):
        m(X, position_ids=torch.arange(12).unsqueeze(0))  # ordinary positions are fine
        with pytest.raises(llmpatch.PatchStateError, match=want_error):
            m(X, position_ids=packed, use_cache=False)  # transformers only detects packing without a cache


def test_own_attention_seam():
    """A method's own attention (`LayerDecision.attend`) replaces the backend call: block lists of every causal
    block give dense logits, the diagonal block alone does not; its reported count reaches the tracker."""
    from llmpatch.kernels import dispatch

    m = tiny_model("qwen2")
    want = m(X).logits

    class Blocks:
        label = "test blocks"

        def __init__(self, every):
            self.every = every

        def __call__(self, decision, q, k, v, mask, scale, softcap):
            b, h, nq, nk, bs = q.shape[0], q.shape[1], q.shape[2], k.shape[2], 4
            n_qb, n_kb = -(-nq // bs), -(-nk // bs)
            index = torch.arange(n_kb, dtype=torch.int32).expand(b, h, n_qb, n_kb).contiguous()
            count = torch.full((b, h, n_qb), n_kb, dtype=torch.int32)
            if not self.every:
                index, count = (
                    index[..., -1:] * 0 + torch.arange(n_qb, dtype=torch.int32).view(1, 1, -1, 1),
                    count * 0 + 1,
                )
            out, _ = dispatch.attention(q, k, v, scale=scale, kv_count=count, kv_index=index, block_size=bs,
                                        start=mask.start, sliding_window=decision.sliding_window)  # fmt: skip
            return out, lambda: 7

    with llmpatch.patched(m, "dense") as patch:
        for layer in patch.layers:
            layer.attend = Blocks(True)
        tracker = patch.track_sparsity()
        torch.testing.assert_close(m(X).logits, want, atol=1e-5, rtol=0)
        assert "own attention (test blocks)" in patch.describe()
        assert tracker.computed == 7 * len(patch.layers)
        for layer in patch.layers:
            layer.attend = Blocks(False)
        assert not torch.allclose(m(X).logits, want, atol=1e-3)


def test_sparsity_tracking():
    m = tiny_model("gemma3_text")  # sliding layers (window 12) and a full layer
    x = torch.randint(3, 128, (1, 40))
    with llmpatch.patched(m, "dense") as patch:
        tracker = patch.track_sparsity()
        m(x)
        assert tracker.density == 1.0 and tracker.causal > 0
    with llmpatch.patched(m, "sink_window", sink=2, window=4) as patch:
        tracker = patch.track_sparsity()
        m(x)
        # per layer and head: rows see min(p+1, 4) window keys plus up to 2 sinks, against the causal count
        p = torch.arange(40)
        full, sliding = (p + 1).sum(), torch.minimum(p + 1, torch.tensor(12)).sum()
        window = torch.minimum(p + 1, torch.tensor(4))
        sinks_full = (p - 3).clamp(0, 2)  # sink keys 0 and 1 when outside the window
        sinks_sliding = (torch.minimum(torch.tensor(2), p - 3) - (p - 11).clamp(min=0)).clamp(min=0)
        assert tracker.causal == 4 * int(2 * sliding + full)
        assert tracker.computed == 4 * int(3 * window.sum() + sinks_full.sum() + 2 * sinks_sliding.sum())
        assert 0 < tracker.density < 0.35


def test_per_method_overrides_also_work_with_one_method():
    """`--set sink_window.window=4` (parse_sets: {"sink_window": {"window": 4}}) with a single method."""
    m = tiny_model("llama")
    with llmpatch.patched(m, "sink_window", sink_window={"window": 4}) as patch:
        assert patch.methods[0].window == 4
