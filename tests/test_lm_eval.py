"""lm-eval bridge end to end, offline: `--model llmpatch` equals llmpatch's own passkey suite sample by sample
(including failures, with a sink+window pattern) and lm-eval's own hf model."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

SAMPLES = 6


def run_lm_eval(tmp_path, model, model_args, name):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "llmpatch", "lm-eval", "--model", model, "--model_args", model_args,
           "--tasks", "llmpatch_passkey", "--apply_chat_template", "--device", "cpu", "--output_path", str(out),
           "--log_samples", "--metadata", json.dumps({"lengths": [1024], "samples": SAMPLES})]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
    return {r["doc"]["index"]: r["acc"] for r in rows}


def own_suite(model, tok, methods=None, params=None):
    from llmpatch.evals.runner import MethodConfig, run_suite

    config = MethodConfig("x", methods, params or {})
    res = run_suite(model, tok, "passkey", lengths=[1024], samples=SAMPLES, configs=[config])
    return {s["index"]: s["score"] for s in res["configs"][-1]["samples"]}


def test_lm_eval_dense_matches_own_suite_and_hf(smollm2, tmp_path):
    from llmpatch.models import fetch

    model, tok = smollm2
    own = own_suite(model, tok)
    patched = run_lm_eval(tmp_path, "llmpatch", "pretrained=smollm2-135m,method=dense", "dense")
    hf = run_lm_eval(tmp_path, "hf", f"pretrained={fetch('smollm2-135m')}", "hf")
    assert patched == own == hf


def test_lm_eval_sparse_matches_own_suite_per_sample(smollm2, tmp_path):
    model, tok = smollm2
    own = own_suite(model, tok, ["sink_window"], {"sink": 64, "window": 256})
    patched = run_lm_eval(
        tmp_path, "llmpatch", "pretrained=smollm2-135m,method=sink_window,sink=64,window=256", "sw"
    )
    assert patched == own
    assert sum(own.values()) < SAMPLES  # the pattern makes the model fail some samples
