"""Tensor parallelism (transformers' tp_plan="auto", gloo, CPU): every method with per-head-varied parameters gives
the single-process logits and tokens on 2 ranks, on the default backend and on Triton (interpreter); shardings
llmpatch cannot follow are refused by name. The ranks run tests/tp_worker.py under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmpatch
from llmpatch.errors import PatchStateError
from llmpatch.testing import tiny_model

WORKER = Path(__file__).with_name("tp_worker.py")
FAMILIES = ("llama", "qwen3", "gemma3_text")  # 4 query heads, 2 KV heads: both divide by 2


def torchrun(out: Path, backend: str, dirs, ranks: int = 2, timeout: int = 900) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(WORKER), str(out), backend, *map(str, dirs)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / family)
    return [root / f for f in FAMILIES]


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_every_method_matches_single_process_on_two_ranks(saved, backend, tmp_path):
    results = torchrun(tmp_path / "out.json", backend, saved)
    assert set(results) == set(FAMILIES)
    for family, cases in results.items():
        for case, r in cases.items():
            assert "error" not in r, (family, case, r)
            assert r["logits"] < 1e-4 and r["scores"] < 1e-4, (family, case, r)
            assert r["tokens"], (family, case, r)
            if case != "dense":  # the parameters really change the output
                assert r["effect"] > 1e-3, (family, case, r)


def test_heads_that_do_not_split_over_the_ranks_are_refused(tmp_path):
    d = tmp_path / "odd"
    tiny_model("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=96).save_pretrained(d)
    (msg,) = torchrun(tmp_path / "out.json", "guard", [d]).values()
    assert msg.startswith("UnsupportedModelError") and "6 query heads and 3 KV heads" in msg, msg


def test_attention_sharded_behind_llmpatchs_back_gets_a_clear_error():
    """Heads cut by hand after the patch (or by a framework llmpatch does not follow): an error naming the
    sharding, not a wrong answer."""
    model = tiny_model("llama")
    x = torch.tensor([[5, 9, 17, 33, 8, 70]])
    with llmpatch.patched(model, "sink_window", sink=2, window=4):
        attn = model.model.layers[0].self_attn
        d = attn.head_dim
        attn.q_proj.weight.data = attn.q_proj.weight.data[: 2 * d]
        attn.k_proj.weight.data = attn.k_proj.weight.data[:d]
        attn.v_proj.weight.data = attn.v_proj.weight.data[:d]
        attn.o_proj.weight.data = attn.o_proj.weight.data[:, : 2 * d]
        with pytest.raises(PatchStateError, match="sharding: layer 0 was patched for every head but its "
                                                  "attention got 2 query heads"):  # fmt: skip
            model(x)


@pytest.mark.real
def test_smollm2_passkey_on_three_ranks_answers_as_one_process(smollm2, tmp_path):
    """SmolLM2-135M (9 heads, 3 KV heads) on 3 ranks: the 1k passkey answer of single-process, for sink_window,
    moa (the shipped plan) and retrieval_kv (the shipped heads); about 75 s on 2 cores."""
    root = Path(__file__).resolve().parents[1]
    results = torchrun(tmp_path / "out.json", "smollm2", [root], ranks=3)
    for case in ("sink_window", "moa", "retrieval_kv"):
        r = results[case]
        assert r["sharded"] == r["whole"] and r["logits"] < 1e-3, (case, r)
    assert "48155" in results["moa"]["whole"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.real
def test_cli_under_torchrun_single_and_multi_node(smollm2, tmp_path):
    """`torchrun -m llmpatch apply` on one node (2 ranks) and on two nodes (--nnodes 2, one rank each, both on
    this machine): the single-process output, printed and written once, by rank 0; an error is reported by every
    rank, the others with their rank."""
    d = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(smollm2[1])).save_pretrained(d)
    smollm2[1].save_pretrained(d)
    args = ["apply", "--method", "sink_window", "--set", "sink=2", "--set", "window=6", "--model", str(d),
            "--prompt", "The capital of France is", "--raw", "--max-new-tokens", "5"]  # fmt: skip
    from typer.testing import CliRunner

    from llmpatch.cli import app

    single = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "one.json")])
    assert single.exit_code == 0, single.output
    want = json.loads((tmp_path / "one.json").read_text())["runs"]["sink_window"]["text"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run"]

    out = tmp_path / "tp.json"
    done = subprocess.run([*run, "--standalone", "--nproc_per_node=2", "-m", "llmpatch", *args, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("attn: share of the causal") == 1, done.stdout  # one table, from rank 0
    data = json.loads(out.read_text())
    assert data["runs"]["sink_window"]["text"] == want and data["metadata"]["world_size"] == 2

    port, outs = free_port(), [tmp_path / "node0.json", tmp_path / "node1.json"]
    nodes = [subprocess.Popen([*run, "--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                               f"--master_port={port}", "-m", "llmpatch", *args, "--json", str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]  # fmt: skip
    results = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [e[-3000:] for _, e in results]
    assert json.loads(outs[0].read_text())["runs"]["sink_window"]["text"] == want and not outs[1].exists()

    bad = [a if a != "window=6" else "window=-3" for a in args]
    done = subprocess.run([*run, "--standalone", "--nproc_per_node=2", "-m", "llmpatch", *bad],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    message = "error: sink_window: parameter 'window' must be an int >= 1, got -3"
    assert done.returncode != 0 and f"rank 1: {message}" in done.stderr, done.stderr[-3000:]
    package = str(Path(llmpatch.__file__).parent)  # torchrun's own traceback follows; none from llmpatch
    assert f'File "{package}' not in done.stderr, done.stderr[-3000:]
