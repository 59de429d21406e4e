"""accelerate placement: every method on a model dispatched with disk offload, or wrapped by `cpu_offload`, gives
the tokens of the same method on the plain model; remove() leaves the dispatched model as it was."""

import pytest
import torch
from accelerate import cpu_offload

import llmpatch
from llmpatch.testing import method_cases, tiny_model

PROMPT = torch.tensor([[(7 * i + 3) % 120 + 3 for i in range(64)]])
GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
CASES = method_cases(3, 4, None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("accel") / "llama"
    tiny_model("llama").save_pretrained(d)
    return d


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


@pytest.fixture(scope="module")
def placed(saved, tmp_path_factory):
    """The plain model; one with layers 1-2 on disk; one under cpu_offload."""
    disk = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}  # fmt: skip
    offload = tmp_path_factory.mktemp("offload")
    return {
        "plain": load(saved),
        "disk": load(saved, device_map=disk, offload_folder=str(offload)),
        "cpu_offload": cpu_offload(load(saved), execution_device=torch.device("cpu")),
    }


def generate(model, method, params):
    with torch.no_grad(), llmpatch.patched(model, method, **params):
        return model.generate(PROMPT, **GEN)


@pytest.mark.parametrize("placement", ["disk", "cpu_offload"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_is_token_equal_under_offload(placed, placement, case):
    method, params = CASES[case]
    want = generate(placed["plain"], method, params)
    assert torch.equal(generate(placed[placement], method, params), want)


def test_remove_restores_a_dispatched_model(placed):
    model = placed["disk"]
    before = model(PROMPT).logits
    impl = model.config._attn_implementation
    patch = llmpatch.apply(model, "sink_window", sink=2, window=4)
    assert not torch.allclose(model(PROMPT).logits, before, atol=1e-3)
    patch.remove()
    assert model.config._attn_implementation == impl
    assert torch.equal(model(PROMPT).logits, before)


@pytest.mark.real
def test_load_model_offloads_smollm2_to_disk_with_the_same_answer(smollm2, tmp_path):
    """load_model(device_map="auto", max_memory=..., offload_folder=...): part of SmolLM2 on disk, the patched
    1k passkey answer of the plain patched model."""
    from llmpatch.evals.suites import SUITES

    plain, tok = smollm2
    sample = SUITES["passkey"].sample(tok, 1024, 0)
    enc = tok(sample.prompt, return_tensors="pt", add_special_tokens=False)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    model, _ = llmpatch.load_model("smollm2-135m", device_map="auto", max_memory={"cpu": "300MB"},
                                   offload_folder=str(tmp_path), progress=lambda *a: None)  # fmt: skip
    assert "disk" in set(model.hf_device_map.values())
    answers = []
    for m in (plain, model):
        with torch.no_grad(), llmpatch.patched(m, "sink_window", sink=64, window=256):
            answers.append(m.generate(**enc, **kw)[0, enc.input_ids.shape[1] :])
    assert torch.equal(answers[0], answers[1]) and "48155" in tok.decode(answers[0])
