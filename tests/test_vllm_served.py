"""The engine-independent half of the vLLM plugin (llmpatch/vllm/served.py), without vLLM: the configuration it
reads, the decisions it serves (apply()'s own), the KV spans it gives vLLM, and `llmpatch serve`'s refusals."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from typer.testing import CliRunner

import llmpatch
from llmpatch.cli import app
from llmpatch.errors import ParameterError
from llmpatch.vllm import PINNED, check_version
from llmpatch.vllm.served import read_config, resolve

pytestmark = pytest.mark.real


@pytest.mark.parametrize(
    "raw, match",
    [
        ("{not json", "LLMPATCH_VLLM: not valid JSON"),
        ("/no/such/file.json", "LLMPATCH_VLLM: neither JSON nor a readable file"),
        ('{"params": {}}', 'LLMPATCH_VLLM: must be a JSON object {"method"'),
        (
            '{"method": "moa", "plans": "auto"}',
            "LLMPATCH_VLLM: unknown key 'plans'; allowed: method, plan, params",
        ),
        ('{"method": "dhsa"}', "method: vLLM serves the static per-head methods sink_window, streamingllm"),
        ('{"method": "retrieval_kv", "params": {"keep": 4}}', "retrieval_kv: parameter 'keep' must be 0"),
        ('{"method": "moa", "params": [1]}', "LLMPATCH_VLLM: 'params' must be a JSON object"),
    ],
)
def test_bad_configuration_names_the_parameter(raw, match):
    with pytest.raises(ParameterError, match=match.replace("(", r"\(").replace("{", r"\{")):
        read_config(raw)


def test_configuration_from_a_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"method": "moa", "plan": "auto"}))
    assert read_config(str(f)) == {"method": "moa", "plan": "auto", "params": {}}
    assert read_config("") is None


def test_configuration_from_vllms_additional_config():
    cfg = {"method": "streamingllm", "params": {"density": 0.25}}
    want = {"method": "streamingllm", "plan": None, "params": {"density": 0.25}}
    assert read_config("", {"llmpatch": cfg, "other": 1}) == want
    assert read_config(json.dumps(cfg), {"llmpatch": cfg}) == want  # both, agreeing
    assert read_config("", {"other": 1}) is None
    with pytest.raises(ParameterError, match=r"additional_config\['llmpatch'\]: unknown key 'density'"):
        read_config("", {"llmpatch": {"method": "streamingllm", "density": 0.25}})
    with pytest.raises(ParameterError, match="both set and differ"):
        read_config('{"method": "moa", "plan": "auto"}', {"llmpatch": cfg})


@pytest.mark.parametrize(
    "method, plan, params",
    [
        ("streamingllm", None, {"density": 0.25}),
        ("moa", "auto", {}),
        ("retrieval_kv", "auto", {}),
        ("retrieval_mask", "auto", {"top_k": 20}),
        ("sink_window", None, {"sink": 16, "window": 256}),
    ],
)
def test_served_decisions_are_applys(smollm2, method, plan, params):
    model, _ = smollm2
    served = resolve({"method": method, "plan": plan, "params": params}, model.config, 4096)
    extra = {"length": 4096} if method in ("streamingllm", "moa") else {}
    with llmpatch.patched(model, method, plan, **params, **extra) as patch:
        for got, want in zip(served.layers, patch.layers, strict=True):
            assert torch.equal(got.sink, want.sink) and torch.equal(got.window, want.window)
            assert (got.head_mask is None) == (want.head_mask is None)
            if got.head_mask is not None:
                assert torch.equal(got.head_mask.modes, want.head_mask.modes)


def test_a_dense_tail_is_refused(smollm2):
    model, _ = smollm2
    with pytest.raises(ParameterError, match="tail: must be 0 under vLLM"):
        resolve(
            {"method": "streamingllm", "plan": None, "params": {"density": 0.25, "tail": 64}},
            model.config,
            4096,
        )


def test_kv_spans_and_tensor_parallel_cut(smollm2):
    model, _ = smollm2
    served = resolve(
        {"method": "streamingllm", "plan": None, "params": {"density": 0.25}}, model.config, 8192
    )
    assert {served.kv_span(i) for i in range(len(served.layers))} == {(64, 2048 - 64)}
    kv = resolve({"method": "retrieval_kv", "plan": "auto", "params": {}}, model.config, 8192)
    spans = [kv.kv_span(i) for i in range(len(kv.layers))]
    full = [i for i, d in enumerate(kv.layers) if bool((d.window < 0).any())]
    assert [i for i, s in enumerate(spans) if s is None] == full and len(full) < len(spans)
    d = kv.layers[full[0]]
    with torch.inference_mode():  # vLLM asks inside its forward
        cut = kv.local(full[0], 1, 3)
    assert (
        cut.num_heads == 3 and torch.equal(cut.window, d.window[3:6]) and torch.equal(cut.sink, d.sink[3:6])
    )
    seen = d.window[3:6][d.window[3:6] >= 0]
    assert cut.narrowest_window() == (int(seen.min()) if seen.numel() else None)  # keeps version counters
    assert kv.local(full[0], 0, 1) is d


def test_version_pin():
    check_version(PINNED)
    check_version(PINNED + "+cpu")
    with pytest.raises(ParameterError, match="vllm: llmpatch's plugin is tested against vLLM 0.32.0"):
        check_version("0.33.0")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "dhsa"], "error: --method: vLLM serves sink_window"),
        (["--method", "moa", "--set", "sink=-1"], "error: moa: parameter 'sink' must be an int >= 0"),
        (["--method", "moa", "--dtype", "float64"], "error: --dtype: must be float32, float16 or bfloat16"),
    ],
)
def test_serve_refuses_before_vllm_starts(args, message):
    res = CliRunner().invoke(app, ["serve", "--model", "smollm2-135m", *args])
    assert res.exit_code == 2 and message in " ".join(res.output.split())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this venv")
def test_serve_without_vllm_says_how_to_install():
    res = CliRunner().invoke(app, ["serve", "--model", "smollm2-135m", "--method", "moa"])
    assert res.exit_code == 2 and 'pip install "llmpatch[vllm]"' in " ".join(res.output.split())


def test_run_engine_refusals_before_any_engine_starts(smollm2):
    from llmpatch.evals.runner import MethodConfig

    from llmpatch.models import alias_dir
    from llmpatch.vllm.engine import VLLMEngine

    res = CliRunner().invoke(app, ["run", "passkey", "--model", "smollm2-135m", "--engine", "tpu"])
    assert res.exit_code == 2 and "error: --engine: must be hf or vllm, got 'tpu'" in " ".join(
        res.output.split()
    )
    engine = VLLMEngine(alias_dir("smollm2-135m") / "hf", max_model_len=2048)
    assert engine.check(MethodConfig("dense")) is None
    for config, message in (
        (
            MethodConfig("a", ["moa", "act"], {}, "auto"),
            "--engine vllm: serves one method at a time, got moa+act",
        ),
        (MethodConfig("d", ["dhsa"], {}, "auto"), "method: vLLM serves the static per-head methods"),
        (MethodConfig("s", ["streamingllm"], {"density": 2.0}), "streamingllm: parameter 'density' must be"),
    ):
        with pytest.raises(ParameterError, match=re.escape(message)):
            engine.check(config)
    got = engine.check(MethodConfig("m", ["moa"], {}, "auto"))
    assert got == {"method": "moa", "plan": "auto", "params": {}}


def test_runner_engine_contract(smollm2, tmp_path):
    """run_suite(engine=...) as `run --engine vllm` drives it, with a stand-in engine answering EOS (plumbing
    only: the real vLLM engine is tested in tests/vllm_plugin): every prompt generated once per configuration,
    the HF path's measurements left empty, the engine's figures beside each configuration, a report written."""
    from llmpatch.evals.runner import MethodConfig, run_suite, write_report
    from llmpatch.evals.suites import get_suite
    from transformers import AutoConfig, AutoTokenizer

    from llmpatch.models import alias_dir

    path = alias_dir("smollm2-135m") / "hf"
    tok = AutoTokenizer.from_pretrained(path)

    class Engine:
        name, info, calls = "vllm", {}, []

        def check(self, config):
            return None

        def generate(self, config, ids, max_new_tokens):
            self.calls.append((config.label, len(ids)))
            self.info[config.label] = {"kv_tokens": 1}
            return [[tok.eos_token_id] for _ in ids]

    engine = Engine()
    res = run_suite(AutoConfig.from_pretrained(path), tok, "passkey", lengths=[256], samples=2, engine=engine,
                    configs=[MethodConfig("sw", ["sink_window"], {}, None)], logprob=False)  # fmt: skip
    assert engine.calls == [("dense", 2), ("sw", 2)]
    for config in res["configs"]:
        assert config["engine"] == {"name": "vllm", "kv_tokens": 1}
        assert all(s["output"] == "" and s["ttft_s"] is None for s in config["samples"])
    assert [c["density"] for c in res["configs"][1]["cells"]] == [None]
    assert "results.json" in write_report([res], tmp_path, model="smollm2-135m")["files"]

    class Talks(Engine):  # answers with as many tokens as it is allowed
        def generate(self, config, ids, max_new_tokens):
            self.seen = (ids, max_new_tokens)
            return [[tok.encode(" 7")[0]] * max_new_tokens for _ in ids]

    mix, talks = get_suite("mix", ["niah_word", "multivalue"]), Talks()
    res = run_suite(AutoConfig.from_pretrained(path), tok, mix, lengths=[512], samples=2, engine=talks,
                    logprob=False)  # fmt: skip
    ids, budget = (
        talks.seen
    )  # the mix's own token ids; one run at the largest budget, each output cut to its own
    assert ids == [mix.sample(tok, 512, i).prompt_ids for i in range(2)] and budget == 40
    assert [r["new_tokens"] for r in res["configs"][0]["samples"]] == [12, 40]
