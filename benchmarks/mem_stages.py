"""Resident memory by stage of repeated 8k prefills, dense against sink+window (issue 4's memory criterion).

MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=2 python benchmarks/mem_stages.py dense 8192
MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=2 python benchmarks/mem_stages.py sw 8192
MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=2 python benchmarks/mem_stages.py stream 8192   # + ring cache
"""

import gc
import sys
from pathlib import Path

import torch

from llmpatch import apply
from llmpatch.bench import _prompt_ids
from llmpatch.models import load_model


def rss():
    d = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            d[line.split(":")[0]] = int(line.split()[1]) / 1024
    return d


def reset():
    Path("/proc/self/clear_refs").write_text("5")


meth = sys.argv[1]
L = int(sys.argv[2])
m, tok = load_model("smollm2-135m")
ids = _prompt_ids(tok, L)
gc.collect()
print("loaded", rss())
if meth == "sw":
    apply(m, "sink_window", sink=64, window=1024)
elif meth == "stream":
    apply(m, "streamingllm", sink=64, window=1024)
gc.collect()
print("applied", rss())
for i in range(3):
    reset()
    base = rss()["VmRSS"]
    with torch.inference_mode():
        out = m(ids, use_cache=True, logits_to_keep=1)
    r = rss()
    print(f"pass{i} base {base:.1f} hwm {r['VmHWM']:.1f} work {r['VmHWM'] - base:.1f} after {r['VmRSS']:.1f}")
    del out
    gc.collect()
