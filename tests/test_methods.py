"""One suite over every registered method (kvpress style): each method has a dense configuration that must give
the unpatched logits, and an active one that must batch with left padding like batch 1 and remove cleanly."""

import pytest
import torch

import llmpatch
from llmpatch.methods import REGISTRY
from llmpatch.testing import FAMILIES, tiny_model
from tests.test_parity import PROMPTS, left_pad, positions

ALL_HEADS = "all heads"  # expanded per model below

# method -> (dense params, active params). A new method adds one line here.
CONFIGS = {
    "dense": ({}, {}),
    "sink_window": ({"sink": 0, "window": 10_000}, {"sink": 2, "window": 5}),
    "retrieval_mask": ({"heads": []}, {"heads": ALL_HEADS, "prefill": True}),
    "act": ({"heads": ALL_HEADS, "beta": 1.0}, {"heads": ALL_HEADS, "beta": 0.0, "threshold": 0.02}),
    "retrieval_kv": ({"heads": ALL_HEADS}, {"heads": [[1, 0]], "sink": 2, "recent": 5}),
    "moa": (
        {"alphas": "zeros", "betas": "ones"},
        {"alphas": "fours", "betas": "quarters", "sink": 2, "min_span": 3, "length": 20},
    ),
    "moa_chunkkv": (
        {"alphas": "zeros", "betas": "ones"},
        {
            "alphas": "fours",
            "betas": "quarters",
            "sink": 2,
            "min_span": 3,
            "length": 20,
            "keep": 4,
            "chunk": 2,
            "observe": 3,
            "tail": 3,
        },
    ),
    "streamingllm": ({"density": 1.0}, {"window": 5, "sink": 2}),
    "snapkv": ({"window": 10_000}, {"sink": 2, "window": 5, "keep": 3, "tail": 3}),
    "chunkkv": ({"window": 10_000}, {"sink": 2, "window": 5, "keep": 4, "tail": 3, "chunk": 2}),
    "kvzip": (
        {"ratio": 0.0, "instruction": [5, 6, 7]},
        {"ratio": 0.5, "sink": 2, "window": 3, "chunk": 16, "instruction": [5, 6, 7]},
    ),
    "kvzip_heads": (
        {"ratio": 0.0, "instruction": [5, 6, 7], "heads": []},
        {"ratio": 0.5, "sink": 2, "window": 3, "chunk": 16, "instruction": [5, 6, 7], "heads": [[1, 0]]},
    ),
    "reform": ({"ratio": 0.0}, {"ratio": 0.5, "sink": 2, "window": 3, "observe": 3, "chunk": 2}),
    "reform_zip": (
        {"ratio": 0.0, "instruction": [5, 6, 7]},
        {"ratio": 0.5, "sink": 2, "window": 3, "chunk": 2, "repeat": 16, "top": 3, "instruction": [5, 6, 7]},
    ),
    "longheads": (
        {"chunk_size": 4, "attention_length": 32, "block_size": 2},
        {"chunk_size": 4, "attention_length": 12, "block_size": 2},
    ),
    "dhsa": (
        {"budget": 64, "block_size": 4, "sink": 4, "recent": 4},
        {
            "budget": 12,
            "block_size": 4,
            "sink": 4,
            "recent": 4,
            "tail": 2,
            "stride": 2,
            "nms": 2,
            "per_128": 32,
        },
    ),
}
MATRICES = {"zeros": 0.0, "ones": 1.0, "fours": 4.0, "quarters": 0.25}  # a [layers][heads] plan of one value


def expand(params, model):
    spec = llmpatch.detect(model)
    every = [[li, hi] for li in range(spec.num_layers) for hi in range(spec.num_heads)]
    full = lambda x: [[x] * spec.num_heads for _ in range(spec.num_layers)]  # noqa: E731
    return {
        k: every if v == ALL_HEADS else full(MATRICES[v]) if isinstance(v, str) else v
        for k, v in params.items()
    }


def test_every_method_has_configs():
    assert set(CONFIGS) == set(REGISTRY)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_dense_configuration_gives_unpatched_logits(method, family):
    model = tiny_model(family)
    x = torch.tensor([PROMPTS[0]])
    want = model(x).logits
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    want_gen = model.generate(x, **kw)
    with llmpatch.patched(model, method, **expand(CONFIGS[method][0], model)):
        torch.testing.assert_close(model(x).logits, want, atol=1e-5, rtol=0)
        assert torch.equal(model.generate(x, **kw), want_gen)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_active_configuration_batches_and_removes(method, family):
    model = tiny_model(family)
    x = torch.tensor([PROMPTS[0]])
    before = model(x).logits
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with llmpatch.patched(model, method, **expand(CONFIGS[method][1], model)):
        batch = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        gen = model.generate(ids, attention_mask=mask, **kw)
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(batch[row, -len(prompt) :], alone, atol=5e-5, rtol=0)
            assert torch.equal(gen[row, -6:], model.generate(torch.tensor([prompt]), **kw)[0, -6:])
    assert torch.equal(model(x).logits, before)
