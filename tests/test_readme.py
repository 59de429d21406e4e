"""Every fenced Python block of README.md runs, in order, on a tiny model (load_model gives it; the plan files the
blocks name are made for it). Blocks that need torchrun are covered by tests/test_tp.py."""

import re
from pathlib import Path

import pytest

import llmpatch
from llmpatch import plan_store
from llmpatch.testing import per_head, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    model = tiny_model("llama", num_hidden_layers=4, max_position_embeddings=4096)
    spec = llmpatch.detect(model)
    grid = lambda f: per_head(4, 4, f)  # noqa: E731
    plans = {
        "moa.json": ("moa", {"alphas": grid(lambda li, h: 16.0 * (1 + h)), "betas": grid(lambda li, h: 0.1)}),
        "heads.json": ("retrieval_heads", {"scores": grid(lambda li, h: (li * 4 + h) / 16)}),
        "act.json": ("act", {"heads": [[2, 1]]}),
    }
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMPATCH_PLANS", str(tmp_path / "store"))
    for name, (entry, params) in plans.items():
        plan = llmpatch.Plan(model=spec.fingerprint(), methods=[{"name": entry, "params": params}])
        plan.save(name)
        if entry == "act":
            plan_store.store(plan)  # what `llmpatch calibrate act` leaves for plan="auto"
    monkeypatch.setattr(llmpatch, "load_model", lambda name, **kw: (model, None))
    return model


def test_every_python_block_runs(tiny):
    scope: dict = {}
    for block in BLOCKS:
        if "torchrun" in block:
            continue
        exec(compile(block, str(README), "exec"), scope)
    assert llmpatch.current_patch(tiny) is None  # every block leaves the model as it found it
