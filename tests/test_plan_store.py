"""Plans that ship and are found: plan="auto" uses the stored plan for the model's fingerprint, else the shipped
one, else names the calibrate command; `llmpatch calibrate` stores what it makes; `llmpatch plans` lists both."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import llmpatch
from llmpatch import plan_store
from llmpatch.cli import app
from llmpatch.errors import ParameterError
from llmpatch.methods import moa
from llmpatch.testing import per_head, tiny_model

ROOT = Path(__file__).resolve().parents[1]
# shipped plan -> the file the recipes and benchmarks/RESULTS.md use (the plan chosen on the dev split)
SHIPPED = {
    "smollm2-135m-act.json": "benchmarks/act/smollm2-135m-act.json",
    "smollm2-135m-moa.json": "benchmarks/moa/smollm2-135m-moa.json",
    "smollm2-135m-retrieval.json": "benchmarks/retrieval/smollm2-135m-heads-effect.json",
    "gemma3-270m-act.json": "benchmarks/act/gemma3-270m-act.json",
    "gemma3-270m-moa.json": "benchmarks/moa/gemma3-270m-moa-mix-47.json",
    "gemma3-270m-retrieval.json": "benchmarks/retrieval/gemma3-270m-heads-effect.json",
}
runner = CliRunner()


@pytest.fixture(scope="module")
def gemma3():
    return llmpatch.load_model("gemma3-270m", progress=lambda *a: None)


def test_shipped_plans_are_the_chosen_ones():
    assert {p.name for p in plan_store.SHIPPED.glob("*.json")} == set(SHIPPED)
    for name, source in SHIPPED.items():
        assert (plan_store.SHIPPED / name).read_bytes() == (ROOT / source).read_bytes(), name


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPATCH_PLANS", str(tmp_path / "plans"))
    return tmp_path / "plans"


def moa_plan(model, alpha: float) -> llmpatch.Plan:
    spec = llmpatch.detect(model)
    params = {
        "alphas": per_head(3, 4, lambda li, h: alpha),
        "betas": per_head(3, 4, lambda li, h: 0.0),
        "sink": 2,
    }
    return llmpatch.Plan(model=spec.fingerprint(), methods=[{"name": "moa", "params": params}])


def test_auto_uses_the_stored_plan_and_names_the_command_without_one(store):
    model = tiny_model("llama")
    with pytest.raises(ParameterError, match=r"plan: moa needs a plan .* `llmpatch calibrate moa --model "):
        llmpatch.apply(model, "moa", "auto")
    assert llmpatch.current_patch(model) is None
    (path,) = plan_store.store(moa_plan(model, 5.0))
    assert path == store / llmpatch.detect(model).fingerprint()["hash"] / "moa.json"
    with llmpatch.patched(model, "moa", "auto") as patch:
        assert [(f.entry, f.source, f.path) for f in patch.plan_sources] == [("moa", "stored", path)]
        assert patch.methods[0].alphas[0][0] == 5.0
    plan_store.store(moa_plan(model, 7.0))  # a newer calibration replaces the older one
    with llmpatch.patched(model, "moa", "auto") as patch:
        assert patch.methods[0].alphas[0][0] == 7.0
    given = moa_plan(model, 3.0).methods[0]["params"]
    with llmpatch.patched(model, "moa", "auto", **given) as patch:  # the data given: no plan looked up
        assert patch.plan_sources == [] and patch.methods[0].alphas[0][0] == 3.0
    with llmpatch.patched(model, "sink_window", "auto", window=4) as patch:  # a method that needs no plan
        assert patch.plan_sources == []


def test_a_broken_stored_file_is_listed_not_used(store):
    model = tiny_model("llama")
    folder = store / llmpatch.detect(model).fingerprint()["hash"]
    folder.mkdir(parents=True)
    (folder / "moa.json").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ParameterError, match="needs a plan"):
        llmpatch.apply(model, "moa", "auto")
    rows = [r for r in plan_store.listing() if r["source"] == "stored"]
    assert rows and "unreadable" in rows[0]["command"]


@pytest.mark.real
def test_calibrate_stores_and_apply_finds_it_from_the_cli(smollm2, store, tmp_path):
    """`calibrate moa --import-official` with no --out stores the plan; `plans` lists it beside the shipped
    ones; `apply --method moa` without --plan uses it and says so."""
    d = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(smollm2[1])).save_pretrained(d)
    smollm2[1].save_pretrained(d)
    official = tmp_path / "official.json"
    official.write_text(
        json.dumps(moa.export_official(moa_plan(tiny_model("llama"), 6.0).methods[0]["params"]))
    )
    result = runner.invoke(app, ["calibrate", "moa", "--model", str(d), "--import-official", str(official)])
    assert result.exit_code == 0, result.output
    (stored,) = store.glob("*/moa.json")
    result = runner.invoke(app, ["plans"])
    assert result.exit_code == 0 and "stored" in result.output and "shipped" in result.output, result.output
    args = ["apply", "--method", "moa", "--model", str(d), "--prompt", "Hello there", "--max-new-tokens", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "plan: moa: stored plan" in " ".join(result.output.split()), result.output


@pytest.mark.real
@pytest.mark.parametrize("method", ["act", "moa", "retrieval_mask", "retrieval_kv"])
def test_plan_driven_methods_work_as_written_on_both_models(smollm2, gemma3, method, store):
    """With an empty store, every plan-driven method finds its shipped plan on both built-in models."""
    for model, name in ((smollm2[0], "smollm2-135m"), (gemma3[0], "gemma3-270m")):
        with llmpatch.patched(model, method, "auto") as patch:
            (found,) = patch.plan_sources
            assert found.source == "shipped" and found.path.name.startswith(name), found


@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("method", ["act", "moa", "retrieval_mask", "retrieval_kv"])
def test_apply_without_a_plan_from_the_cli(smollm2, gemma3, store, model, method):
    result = runner.invoke(app, ["apply", "--method", method, "--model", model, "--prompt", "Hi there",
                                 "--max-new-tokens", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"shipped plan {plan_store.SHIPPED}" in " ".join(result.output.split()), result.output
