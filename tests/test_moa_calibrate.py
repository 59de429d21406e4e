"""MoA plan search: the profiled influence against autograd on explicit attention, the MILP's constraints, and a
small end-to-end search on a tiny model."""

import numpy as np
import pytest
import torch

import llmpatch
from llmpatch.calibrate import moa as cal
from llmpatch.errors import ParameterError
from llmpatch.testing import tiny_model


def explicit(q, k, v, scale, softcap, sw):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    n = q.shape[2]
    i = torch.arange(n)
    allowed = i[None] <= i[:, None]
    if sw is not None:
        allowed &= (i[:, None] - i[None]) < sw
    a = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    a.retain_grad()
    return a @ v, a


@pytest.mark.parametrize("rows", [256, 64])  # one chunk; several, with keys cut at a sliding window
@pytest.mark.parametrize("softcap,sw", [(None, None), (5.0, 70)])
def test_influence_and_gradients_match_autograd(softcap, sw, rows, monkeypatch):
    monkeypatch.setattr(cal, "ROWS", rows)
    torch.manual_seed(0)
    n, h, hkv, d = 150 if rows == 256 else 300, 4, 2, 8
    q, k, v = (torch.randn(1, x, n, d, dtype=torch.float64, requires_grad=True) for x in (h, hkv, hkv))
    w = torch.randn(1, h, n, d, dtype=torch.float64)
    out, a = explicit(q, k, v, 0.3, softcap, sw)
    (out * w).sum().backward()
    ga = a.grad
    e = -a * (ga - (a * ga).sum(-1, keepdim=True)) / (1 - a)
    e = torch.where(1 - a > 1e-6, e, 0.0).abs()
    want = cal.diagonal_sums(e[0])
    want_grads = [t.grad.clone() for t in (q, k, v)]
    got = torch.zeros(h, want.shape[-1], dtype=torch.float64)

    def sink(sl, dsum):
        got[sl] += dsum

    for t in (q, k, v):
        t.grad = None
    out2 = cal._Profiled.apply(q, k, v, 0.3, softcap, sw, sink)
    (out2 * w).sum().backward()
    torch.testing.assert_close(out2, out.detach(), rtol=1e-4, atol=1e-5)  # fp32 inside
    torch.testing.assert_close(got, want.float().double(), rtol=1e-4, atol=1e-6)
    for t, g in zip((q, k, v), want_grads, strict=True):
        torch.testing.assert_close(t.grad, g, rtol=1e-4, atol=1e-6)


def test_keep_share_and_config_losses():
    assert cal.keep_share(0, 64) == 1.0 and cal.keep_share(0, 1) == pytest.approx(2080 / 4096)
    assert cal.keep_share(5, 64) == 0.0 and cal.keep_share(1, 128) == 1.0
    diag = torch.ones(1, 1, 32)  # 2048 tokens
    losses = cal.config_losses(diag, [(0.0, 1.0), (256.0, 0.0)], 2048)
    assert losses[0, 0, 0] == 0.0  # dense drops nothing
    assert losses[0, 0, 1] == pytest.approx(32 - 3 - 2016 / 4096)  # window 192: 3 diagonals and half of one


def test_search_space_is_scaled_to_the_profiled_lengths():
    configs, s = cal.search_space([1024, 2048])
    assert s == 0.25
    assert (0.0, 1.0) in configs and (-512.0, 0.0) not in configs
    assert all(a + b * 512 > 0 and a + b * 2048 <= 2048 for a, b in configs)


def test_milp_respects_budget_and_two_configs_per_layer():
    rng = np.random.default_rng(0)
    configs, _ = cal.search_space([1024])
    losses = {1024: rng.random((3, 4, len(configs))) * np.array([1 - cal.density(c, 1024) for c in configs])}
    units = [(li, [h]) for li in range(3) for h in range(4)]
    choice = cal.solve(losses, configs, units, 0.3, {1024: 1.0})
    dens = np.mean([cal.density(configs[c], 1024) for c in choice])
    assert dens <= 0.3 + 1e-9
    for li in range(3):
        assert len({choice[u] for u, (lj, _) in enumerate(units) if lj == li}) <= 2


class Tok:
    pad_token_id, eos_token_id, chat_template = 0, 2, None

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        def enc(t):  # a word-level stand-in tokenizer
            return [3 + sum(map(ord, w)) % 120 for w in t.split()]

        ids = [enc(t) for t in text] if isinstance(text, list) else enc(text)

        class R:
            input_ids = torch.tensor([ids]) if return_tensors else ids

        return R()


def test_one_profile_gives_a_plan_per_budget_on_the_mix_dev_split():
    model = tiny_model("llama", max_position_embeddings=1024)
    res = cal.search(model, Tok(), density=[0.5, 0.3], lengths=[512], samples=2, data="mix")
    assert [r["density_budget"] for r in res] == [0.5, 0.3]
    assert {r["data"] for r in res} == {"mix"} and res[0]["profile_s"] == res[1]["profile_s"]
    for r in res:
        assert all(d <= r["density_budget"] + 1e-9 for d in r["candidates"][0]["density"].values())
    assert "dev split" in cal.to_plan(res[1], llmpatch.detect(model)).provenance["calibration_data"]["tasks"]
    with pytest.raises(ParameterError, match="data"):
        cal.search(model, Tok(), density=0.5, lengths=[256], data="test")


def test_search_on_tiny_model_writes_a_valid_plan(tmp_path):
    model = tiny_model("llama", max_position_embeddings=1024)

    res = cal.search(model, Tok(), density=0.5, lengths=[256, 384], validate_length=448, samples=2)
    spec = llmpatch.detect(model)
    plan = cal.to_plan(res, spec)
    path = plan.save(tmp_path / "moa.json")
    p = llmpatch.plan.Plan.load(path)
    params = p.params_for("moa")
    assert all(d <= 0.5 + 1e-9 for d in res["candidates"][0]["density"].values())
    with llmpatch.patched(model, "moa", plan=path):
        model(torch.tensor([[5] * 300]))
    with pytest.raises(ParameterError, match="lengths: .*model's context"):
        cal.search(model, Tok(), density=0.5, lengths=[2048])
    with pytest.raises(ParameterError, match="density: must be a number in \\(0, 1\\]"):
        cal.search(model, Tok(), density=1.5, lengths=[256])
    assert len(params["alphas"]) == spec.num_layers


def test_ties_go_to_the_elastic_config():
    configs, _ = cal.search_space([1024, 2048])
    losses = {n: np.zeros((1, 1, len(configs))) for n in (1024, 2048)}
    units = [(0, [0])]
    fixed = configs.index((2048.0, 0.0))  # dense at 1k and 2k, as (0, 1) is
    assert configs[cal._most_elastic([fixed], configs, losses, units)[0]] == (0.0, 1.0)
    local = configs.index((0.0, 0.125))  # nothing else has its densities: it stays
    assert cal._most_elastic([local], configs, losses, units) == [local]


def test_sliding_layers_count_in_the_budget():
    """Gemma-3: the sliding-window layers are not searched, but their heads count at their window's density, so
    the whole model meets the budget and the global layers get what the sliding ones leave."""
    from llmpatch.methods.moa import density_at

    model = tiny_model("gemma3_text", max_position_embeddings=1024, sliding_window=64)
    spec = llmpatch.detect(model)
    searched = [li for li in range(spec.num_layers) if spec.sliding_window[li] is None]
    assert 0 < len(searched) < spec.num_layers
    res = cal.search(model, Tok(), density=0.4, lengths=[512], samples=1)
    p = res["params"]
    whole = res["candidates"][0]["density"][512]
    assert whole <= 0.4 + 1e-9
    assert whole == pytest.approx(cal._plan_density(p, spec, 512))
    inner = density_at([p["alphas"][i] for i in searched], [p["betas"][i] for i in searched], 512)
    assert inner > 0.4  # the sliding heads (64 / 512) leave the global layers more than the budget
    assert cal._fixed(spec, 512) == (spec.num_heads * (spec.num_layers - len(searched)),
                                     spec.num_heads * (spec.num_layers - len(searched)) * 64 / 512)  # fmt: skip


def test_sliding_search_narrows_the_local_layers():
    """`sliding=True` searches the sliding-window layers too (a span there counts up to the window), so a budget
    below their own share is met; without it the same budget has no plan."""
    model = tiny_model("gemma3_text", max_position_embeddings=1024, sliding_window=256)
    spec = llmpatch.detect(model)
    local = [li for li, w in enumerate(spec.sliding_window) if w is not None]
    # at 512 the 8 local heads alone hold 0.5 each: with the global heads' floor (128 / 512) at least 0.4167
    with pytest.raises(ParameterError, match="density: no plan meets a density budget of 0.35"):
        cal.search(model, Tok(), density=0.35, lengths=[512], samples=1)
    res = cal.search(model, Tok(), density=0.35, lengths=[512], samples=1, sliding=True)
    p = res["params"]
    assert res["searched_layers"] == list(range(spec.num_layers)) and res["sliding"] is True
    assert res["candidates"][0]["density"][512] == pytest.approx(cal._plan_density(p, spec, 512))
    assert cal._plan_density(p, spec, 512) <= 0.35 + 1e-9
    narrowed = [cal.span((p["alphas"][li][h], p["betas"][li][h]), 512) for li in local for h in range(4)]
    assert min(narrowed) < 256  # some local head keeps less than its window
    assert cal._kv_fraction(p, spec, 512) < (2 * 256 + 512) / (3 * 512)
    # a span past the window costs the window, so the MILP counts a dense local head at 256 / 512, not 1
    assert cal.density((0.0, 1.0), 512, 256) == 0.5 and cal.density((0.0, 1.0), 512) == 1.0
    with llmpatch.patched(model, "moa", **p):
        model(torch.tensor([[5] * 300]))
