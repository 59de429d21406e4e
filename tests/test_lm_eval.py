"""lm-eval bridge end to end, offline: `--model llmpatch` equals llmpatch's own passkey suite and lm-eval's hf."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.real, pytest.mark.slow]

SAMPLES = 4


def run_lm_eval(tmp_path, model, model_args):
    out = tmp_path / model
    cmd = [sys.executable, "-m", "llmpatch", "lm-eval", "--model", model, "--model_args", model_args,
           "--tasks", "llmpatch_passkey", "--apply_chat_template", "--device", "cpu", "--output_path", str(out),
           "--metadata", json.dumps({"lengths": [1024], "samples": SAMPLES})]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    return result["results"]["llmpatch_passkey"]["acc,none"]


def test_lm_eval_matches_own_suite_and_hf(smollm2, tmp_path):
    from llmpatch.evals.runner import run_suite

    from llmpatch.models import fetch

    model, tok = smollm2
    own = run_suite(model, tok, "passkey", lengths=[1024], samples=SAMPLES)["configs"][0]["cells"][0][
        "accuracy"
    ]
    patched = run_lm_eval(tmp_path, "llmpatch", "pretrained=smollm2-135m,method=dense")
    hf = run_lm_eval(tmp_path, "hf", f"pretrained={fetch('smollm2-135m')}")
    assert patched == own == hf
