"""The bad-input table: every parameter of every method, given a value of the wrong type and a NaN, is refused with
a message that names the method and the parameter, and the model is left exactly as it was; plan files that are
not plans are refused as such. (Kernel arguments: tests/test_kernels.py::test_every_kernel_argument_is_checked;
CLI: tests/test_cli.py; recipes: tests/test_evals.py::test_malformed_recipes_name_the_key.)"""

import json
import pickle

import pytest
from conftest import state_hash

import llmpatch
from llmpatch.methods import REGISTRY
from llmpatch.testing import per_head, tiny_model

CASES = [
    *[
        (m, p, {"not": "this"}, "wrong type")
        for m, cls in REGISTRY.items()
        for p, _, _ in cls.describe_params()
    ],
    *[(m, p, float("nan"), "nan") for m, cls in REGISTRY.items() for p, _, _ in cls.describe_params()],
    *[(m, "no_such_parameter", 1, "unknown") for m in REGISTRY],
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def unchanged(model):
    before = (state_hash(model), model.config._attn_implementation)
    yield model
    assert (state_hash(model), model.config._attn_implementation) == before
    assert llmpatch.current_patch(model) is None
    assert not any(hasattr(mod, "llmpatch_layer") for mod in model.modules())


def test_the_table_is_large():
    assert len(CASES) >= 100


@pytest.mark.parametrize("method, param, value, kind", CASES, ids=[f"{m}-{p}-{k}" for m, p, _, k in CASES])
def test_every_parameter_refuses_bad_values(unchanged, method, param, value, kind):
    with pytest.raises(llmpatch.ParameterError) as info:
        llmpatch.apply(unchanged, method, **{param: value})
    message = str(info.value)
    assert message.startswith(f"{method}: ") and repr(param) in message, message


def _moa_plan(model, alpha):
    grid = per_head(3, 4, lambda li, h: alpha)
    spec = llmpatch.detect(model).fingerprint()
    return {"schema": "llmpatch.plan", "version": 1, "model": spec,
            "methods": [{"name": "moa", "params": {"alphas": grid, "betas": per_head(3, 4, lambda li, h: 0.1)}}]}  # fmt: skip


PLANS = [
    (b"\x80\x04\x95garbage", "moa", r"plan: .* is not a JSON plan: not UTF-8 text"),
    (pickle.dumps({"schema": "llmpatch.plan"}), "moa", r"plan: .* is not a JSON plan"),
    (b"", "moa", r"plan: .* is not a JSON plan"),
    (b"[1, 2]", "moa", r"plan: .* must hold a JSON object"),
    (b'{"schema": "other"}', "moa", r"plan: .* has schema 'other'"),
    (b'{"schema": "llmpatch.plan", "version": 2}', "moa", r"plan: .* has version 2"),
    (b'{"schema": "llmpatch.plan", "version": 1, "model": {}}', "moa", r"plan: .* missing the 'methods' key"),
    (
        b'{"schema": "llmpatch.plan", "version": 1, "model": {}, "methods": 5}',
        "moa",
        r"plan: .* 'methods' must be",
    ),
    ("NAN", "moa", r"moa: parameter 'alphas' must hold finite numbers"),
    ("OTHER", "moa", r"plan: made for another model"),
    ("NAN", "act", r"plan: has no entry for method 'act'"),
]


@pytest.mark.parametrize("content, method, match", PLANS)
def test_bad_plan_files_are_refused(unchanged, tmp_path, content, method, match):
    path = tmp_path / "plan.json"
    if content == "NAN":
        content = json.dumps(_moa_plan(unchanged, float("nan"))).encode()
    elif content == "OTHER":
        content = json.dumps(_moa_plan(tiny_model("qwen2"), 8.0)).encode()
    path.write_bytes(content)
    with pytest.raises(llmpatch.LlmpatchError, match=match):
        llmpatch.apply(unchanged, method, plan=path)
