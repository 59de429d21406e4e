"""ACT: the calibration formula on random attention maps, the method's bad input, and the head search plumbing."""

import pytest
import torch
from llmpatch.kernels.rules import act_combine, find_sinks

import llmpatch
from llmpatch.errors import ParameterError
from llmpatch.testing import tiny_model


def act_calibrate(probs, allowed, calib, beta, threshold, sinks=None):
    """ACT on probability maps through the product's one definition: with V the identity, the output rows of
    `act_combine` are the calibrated probabilities."""
    if sinks is None:
        sinks = find_sinks(probs.sum(2), allowed.sum(2), threshold)
    sinks = sinks & calib.view(1, -1, 1)
    s = sinks.unsqueeze(2).to(probs.dtype)
    return act_combine(probs, probs * s, (probs * s).sum(-1), beta), sinks


def random_maps(b=2, h=3, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.ones(n, n, dtype=torch.bool).tril().expand(b, h, n, n)
    logits = torch.randn(b, h, n, n, generator=gen, dtype=torch.float64) * 2
    logits[..., 0] += 3  # an initial sink
    logits[..., 5] += 2.5  # a hidden sink
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    return probs, allowed


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_calibrated_rows_follow_the_formula(beta):
    probs, allowed = random_maps()
    calib = torch.tensor([True, False, True])
    out, sinks = act_calibrate(probs, allowed, calib, beta, 0.1)
    torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:-1], dtype=out.dtype), atol=1e-12, rtol=0)
    assert not sinks[:, 1].any()  # uncalibrated head: no sinks, rows unchanged
    assert torch.equal(out[:, 1], probs[:, 1])
    want = find_sinks(probs.sum(2), allowed.sum(2), 0.1)
    assert torch.equal(sinks[:, [0, 2]], want[:, [0, 2]])
    assert not sinks[..., 0].any() and sinks[..., 5].any()  # the first sink is never calibrated
    s = sinks.unsqueeze(2)
    m = (probs * s).sum(-1, keepdim=True)
    torch.testing.assert_close(torch.where(s, out, 0), torch.where(s, beta * probs, 0))
    nonsink = torch.where(s, 0, probs * (1 - beta * m) / (1 - m))
    torch.testing.assert_close(torch.where(s, 0, out), nonsink)
    first = (probs * (1 - beta * m) / (1 - m))[:, [0, 2], :, 0]  # the first sink follows the non-sink rule
    torch.testing.assert_close(out[:, [0, 2], :, 0], first)


def test_zero_denominator_guard_leaves_the_row_unchanged():
    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]]])  # rows 1, 2: all on key 1
    allowed = torch.ones(3, 3, dtype=torch.bool).tril().expand(1, 1, 3, 3)
    sinks = torch.tensor([[[False, True, False]]])
    out, _ = act_calibrate(probs, allowed, torch.tensor([True]), 0.4, 0.1, sinks)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 0, 1:], probs[0, 0, 1:])


def test_beta_one_is_the_identity():
    probs, allowed = random_maps(seed=1)
    out, _ = act_calibrate(probs, allowed, torch.ones(3, dtype=torch.bool), 1.0, 0.05)
    torch.testing.assert_close(out, probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"heads": "all", "beta": 1.5}, "'beta' must be a number in \\[0, 1\\]"),
        ({"heads": "all", "beta": -0.1}, "'beta' must be a number in \\[0, 1\\]"),
        ({"heads": "all", "threshold": 0}, "'threshold' must be a number > 0"),
        ({"heads": [[0, 4]]}, "head in 0..3"),
        ({"heads": [[3, 0]]}, "layer in 0..2"),
        ({"heads": "some"}, "or 'all'"),
        ({}, "'heads' is required"),
    ],
)
def test_bad_act_input(params, match):
    model = tiny_model("llama")
    with pytest.raises(ParameterError, match=match):
        llmpatch.apply(model, "act", **params)
    assert llmpatch.current_patch(model) is None and model.config._attn_implementation != "llmpatch"


def test_act_composes_with_a_sparse_pattern():
    model = tiny_model("llama")
    with llmpatch.patched(model, ["sink_window", "act"], sink=1, window=4, heads=[[1, 0]]) as p:
        assert "ACT heads [0]" in p.describe() and "sink+window 1+4" in p.describe()
        model(torch.tensor([[5, 9, 17, 33, 8, 70, 12]]))
