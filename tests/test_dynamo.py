"""torch.compile: the patched attention traces without graph breaks on the static paths (dense, sink_window,
and the streamingllm / moa prefill), and a compiled generate() gives the eager tokens within the recompile
limit."""

import pytest
import torch

import llmpatch
from llmpatch.testing import method_cases, tiny_model

PROMPT = torch.tensor([[(7 * i + 3) % 120 + 3 for i in range(64)]])
GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
CASES = method_cases(3, 4, None)
TRACED = {
    "dense": True,
    "sink_window": True,
    "streamingllm": False,
    "moa-ring": False,
}  # case: with the cache


@pytest.mark.parametrize("case", TRACED)
def test_one_patched_forward_has_no_graph_break(case):
    model = tiny_model("llama")
    method, params = CASES[case]
    torch._dynamo.reset()
    with torch.no_grad(), llmpatch.patched(model, method, **params):
        want = model(PROMPT, use_cache=TRACED[case]).logits
        # model.forward: the forward hooks (moa / streamingllm set their spans per prompt there) stay eager
        explained = torch._dynamo.explain(model.forward)(PROMPT, use_cache=TRACED[case])
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    with torch.no_grad(), llmpatch.patched(model, method, **params):
        forward = model.forward
        model.forward = torch.compile(forward, backend="eager")
        try:
            got = model(PROMPT, use_cache=TRACED[case]).logits
        finally:
            model.forward = forward
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["dense", "sink_window"])
def test_compiled_generate_gives_the_eager_tokens(case):
    model = tiny_model("llama")
    method, params = CASES[case]
    torch._dynamo.reset()
    with torch.no_grad(), llmpatch.patched(model, method, **params):
        want = model.generate(PROMPT, **GEN)
        forward = model.forward
        model.forward = torch.compile(forward)
        try:  # prefill, a decode step, then decode with a dynamic cache length: 2 recompiles
            with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
                got = model.generate(PROMPT, **GEN)
        finally:
            model.forward = forward
    assert torch.equal(got, want)


def test_compiled_forward_refuses_packed_sequences():
    """The mask-function check runs inside the compiled graph (an in-graph assertion): packed sequences are
    refused there as in eager, and ordinary positions pass, with no graph break."""
    model = tiny_model("llama")
    ids = PROMPT[:, :12]
    packed = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])  # two sequences in one row
    torch._dynamo.reset()
    with torch.no_grad(), llmpatch.patched(model, "dense"):
        positions = torch.arange(12).unsqueeze(0)
        explained = torch._dynamo.explain(model.forward)(ids, position_ids=positions, use_cache=False)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        forward = model.forward
        model.forward = torch.compile(forward, backend="eager", dynamic=False)
        try:
            model(ids, position_ids=positions, use_cache=False)
            with pytest.raises(RuntimeError, match="attention_mask: llmpatch supports causal attention"):
                model(ids, position_ids=packed, use_cache=False)
        finally:
            model.forward = forward
