"""vLLM + llmpatch's plugin against HF + llmpatch.apply: the same greedy tokens for every served method (prompts
of 1k and 3k tokens, and a batch of four concurrent requests of different lengths), the KV capacity vLLM
reports, and the start-up refusals. Each engine runs in its own process (tests/vllm_plugin/drive.py)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmpatch

pytestmark = pytest.mark.slow
DRIVE = Path(__file__).with_name("drive.py")
MAX_LEN = 4096
# A 1024-token step budget: the 1k prompt is one step, longer ones are prefilled in chunks (the cache-reading
# path), and the batch mixes both.
ENGINE = ("--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", "1024")
CONFIGS = {
    "sink_window": {"method": "sink_window", "params": {"sink": 16, "window": 256}},
    "streamingllm": {"method": "streamingllm", "params": {"density": 0.25}},
    "moa": {"method": "moa", "plan": "auto", "params": {}},
    "retrieval_kv": {"method": "retrieval_kv", "plan": "auto", "params": {}},
    "retrieval_mask": {"method": "retrieval_mask", "plan": "auto", "params": {"top_k": 20}},
}


def drive(config, *args, check=True) -> dict | subprocess.CompletedProcess:
    cfg = config if config == "dense" else json.dumps(config)
    proc = subprocess.run([sys.executable, str(DRIVE), cfg, *args], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    if not check:
        return proc
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(line[len("RESULT ") :])


@functools.cache
def hf_model():
    return llmpatch.load_model("smollm2-135m", dtype="float32")


def hf_tokens(config: dict, prompt: list[int], new_tokens: int = 24) -> list[int]:
    model, _ = hf_model()
    params = dict(config["params"])
    if config["method"] in ("streamingllm", "moa"):
        params["length"] = MAX_LEN  # vLLM evaluates elastic spans at max_model_len
    ids = torch.tensor([prompt])
    with llmpatch.patched(model, config["method"], config.get("plan"), **params), torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@functools.cache
def dense_run() -> dict:
    return drive("dense", *ENGINE)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_tokens_as_hf(name):
    config = CONFIGS[name]
    got = drive(config, *ENGINE)
    prompts = got["prompts"]
    for prompt, tokens in zip(
        prompts["single"] + prompts["batch"], got["single"] + got["batch"], strict=True
    ):
        assert tokens == hf_tokens(config, prompt), (name, len(prompt))
    if name in ("sink_window", "streamingllm"):  # every layer bounded: the capacity grows (same KV memory)
        assert got["kv_tokens"] > dense_run()["kv_tokens"]


def test_dense_vllm_matches_hf_dense():
    got = dense_run()
    model, _ = hf_model()
    for prompt, tokens in zip(got["prompts"]["single"], got["single"], strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
        assert tokens == want.tolist()


def test_refusals_at_start_up():
    proc = drive(CONFIGS["streamingllm"], "--prefix-caching", check=False)
    assert proc.returncode != 0 and "enable_prefix_caching: must be False" in proc.stdout + proc.stderr
    proc = drive({"method": "moa", "params": {}}, check=False)
    assert (
        proc.returncode != 0
        and "moa: parameters 'alphas' and 'betas' are required" in proc.stdout + proc.stderr
    )
    proc = drive({"method": "dhsa", "params": {}}, check=False)
    assert (
        proc.returncode != 0
        and "method: vLLM serves the static per-head methods" in proc.stdout + proc.stderr
    )


def test_serve_answers_an_openai_completion():
    import shutil
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("llmpatch") or str(Path(sys.executable).with_name("llmpatch"))
    cmd = [exe, "serve", "--model", "smollm2-135m", "--method", "streamingllm", "--set", "density=0.25",
           "--max-model-len", str(MAX_LEN), "--port", str(port), "--gpu-memory-utilization", "0.25"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 1200
        while True:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            try:
                urllib.request.urlopen(base + "/models", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the server did not start"
                time.sleep(3)
        model, tok = hf_model()
        prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                         tokenize=False, add_generation_prompt=True)  # fmt: skip
        ids = tok(prompt, add_special_tokens=False).input_ids
        body = json.dumps(
            {"model": "smollm2-135m", "prompt": ids, "max_tokens": 16, "temperature": 0}
        ).encode()
        req = urllib.request.Request(base + "/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=300).read())["choices"][0]["text"]
        want = hf_tokens(CONFIGS["streamingllm"], ids, 16)
        assert answer == tok.decode(want, skip_special_tokens=True)
    finally:
        proc.terminate()
        proc.wait(60)
