"""vLLM + llmpatch's plugin against HF + llmpatch.apply: the same greedy tokens for every served method (prompts
of 1k and 3k tokens, and a batch of four concurrent requests of different lengths), the KV capacity vLLM
reports, and the start-up refusals. Each engine runs in its own process (tests/vllm_plugin/drive.py)."""

from __future__ import annotations

import functools
import json
import os
import shutil
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


def drive(config, *args, check=True, env=None) -> dict | subprocess.CompletedProcess:
    cfg = config if config == "dense" else json.dumps(config)
    proc = subprocess.run([sys.executable, str(DRIVE), cfg, *args], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})  # fmt: skip
    if not check:
        return proc
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(line[len("RESULT ") :])


@functools.cache
def hf_model(name: str = "smollm2-135m"):
    return llmpatch.load_model(name, dtype="float32")


def hf_tokens(
    config: dict, prompt: list[int], new_tokens: int = 24, model_name: str = "smollm2-135m"
) -> list[int]:
    model, _ = hf_model(model_name)
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


@pytest.mark.parametrize("isa", ["vec", "vec16", "amx"])
def test_kv_views_read_what_vllms_writer_wrote(isa):
    """vLLM's own `cpu_attn_reshape_and_cache` writes random bf16 keys and values into a cache of each layout;
    `paged.gather` reads every one back at its position, from shuffled blocks."""
    from vllm import _custom_ops as ops

    from llmpatch.vllm import paged

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX tiles: vLLM picks the 'vec' layout for bf16")
    g = torch.Generator().manual_seed(0)
    shapes = ((16, 64, 2, 70), (16, 80, 1, 33)) if isa == "vec16" else ((32, 64, 3, 150), (128, 256, 1, 300))
    for block_size, d, hkv, n in shapes:
        blocks = -(-n // block_size)
        table = torch.randperm(blocks + 2, generator=g)[:blocks]
        slots = (table[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size).long()
        cache = torch.zeros(blocks + 2, hkv, block_size, 2 * d, dtype=torch.bfloat16)
        kc, vc = cache.view(blocks + 2, hkv, 2 * block_size, d).chunk(2, dim=2)
        k, v = (torch.randn(n, hkv, d, generator=g).to(torch.bfloat16) for _ in range(2))
        ops.cpu_attn_reshape_and_cache(
            k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
        )
        positions = [[torch.randperm(n, generator=g)[: n // 2]] * hkv]
        got_k, got_v, _ = paged.gather(cache, isa, table[None], positions)
        pick = positions[0][0]
        assert torch.equal(got_k[0], k[pick].transpose(0, 1))
        assert torch.equal(got_v[0], v[pick].transpose(0, 1))


def test_bfloat16_in_the_amx_layout_gives_the_vec_layouts_tokens():
    """bf16 through the plugin: on a CPU with AMX tiles vLLM stores the cache in its "amx" layout; the same engine
    made to store it in "vec" (tests/vllm_plugin/vec_layout: attention's layout only, as without AMX) gives the
    same greedy tokens with a sink + window pattern narrower than every prompt (every attention call is
    llmpatch's, on the same bf16 keys and values), for the single prompts and the batch (decode steps and later
    prompt chunks read the paged cache). bf16 tokens are not compared with HF: vLLM's bf16 layers (norms, MLPs)
    round differently from transformers' (fp32 is compared in `test_same_tokens_as_hf`)."""
    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX tiles: vLLM stores bf16 in the 'vec' layout")
    config = CONFIGS["sink_window"]
    amx = drive(config, *ENGINE, "--dtype", "bfloat16")
    path = os.pathsep.join([str(Path(__file__).with_name("vec_layout")), os.environ.get("PYTHONPATH", "")])
    vec = drive(config, *ENGINE, "--dtype", "bfloat16", env={"PYTHONPATH": path})
    assert (amx["isa"], vec["isa"]) == ("amx", "vec")
    assert amx["single"] == vec["single"] and amx["batch"] == vec["batch"]


def test_gemma3_at_tensor_parallel_2_configured_by_additional_config():
    """Each rank cuts the plan to its 2 of Gemma-3's 4 query heads (the one KV head is replicated); the plugin
    reads its configuration from vLLM's additional_config (LLMPATCH_VLLM unset)."""
    config = {"method": "moa", "plan": "auto", "params": {}}
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "LLMPATCH_VLLM": ""}
    got = drive(config, "--model", "gemma3-270m", "--tp", "2", "--additional-config", *ENGINE, env=env)
    prompts = got["prompts"]
    for prompt, tokens in zip(
        prompts["single"] + prompts["batch"], got["single"] + got["batch"], strict=True
    ):
        assert tokens == hf_tokens(config, prompt, model_name="gemma3-270m"), len(prompt)


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


def test_run_engine_vllm_gives_the_hf_paths_outputs(tmp_path):
    """`llmpatch run --engine vllm`: the same prompts and scores as the HF path, dense and patched (a static
    pattern, so both engines see the same spans), with vLLM's version and capacity in the results."""
    exe = shutil.which("llmpatch") or str(Path(sys.executable).with_name("llmpatch"))
    args = ["run", "passkey", "--model", "smollm2-135m", "--lengths", "1024", "--samples", "3", "--method",
            "sink_window", "--set", "sink=16", "--set", "window=256", "--no-logprob"]  # fmt: skip
    runs = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        proc = subprocess.run([exe, *args, "--engine", engine, "--out", str(out)], capture_output=True, text=True,
                              timeout=1800)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[engine] = json.loads((out / "results.json").read_text())
    for hf, vl in zip(
        runs["hf"]["results"][0]["configs"], runs["vllm"]["results"][0]["configs"], strict=True
    ):
        assert [s["output"] for s in vl["samples"]] == [s["output"] for s in hf["samples"]], hf["label"]
        assert [s["score"] for s in vl["samples"]] == [s["score"] for s in hf["samples"]]
        assert vl["engine"]["kv_tokens"] > 0
    assert runs["vllm"]["metadata"]["vllm"].startswith("0.32.0")
