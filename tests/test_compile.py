"""The production Triton configurations compile for sm_90 on this CPU-only machine, and fit in shared memory.
Runs in a subprocess: compiling needs the real JIT, which TRITON_INTERPRET=1 (set for the other tests) replaces."""

import json
import os
import subprocess
import sys

from llmpatch.kernels.compile_check import SMEM_LIMIT_SM90

CASES = [
    ("prefill", {"head_dim": 128, "pattern": 1, "group": 4}),
    ("prefill", {"head_dim": 256, "pattern": 2, "group": 4, "calib": True, "softcap": True}),
    ("decode", {"head_dim": 128, "group": 8}),
]


def test_production_configs_compile_for_sm90_and_fit():
    code = (
        "import json, sys\n"
        "from llmpatch.kernels import compile_check as c\n"
        "for kind, kw in json.loads(sys.argv[1]):\n"
        "    f = c.compile_prefill if kind == 'prefill' else c.compile_decode\n"
        "    print(json.dumps(f(dtype='bf16', **kw)), flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(CASES)], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(CASES)
    for row in rows:
        assert 0 < row["shared_bytes"] <= SMEM_LIMIT_SM90, row
        assert row["registers"] is not None and row["registers"] <= 255, row
