"""Tensor-parallel parity, one rank: `torchrun --nproc_per_node 2 tests/tp_worker.py OUT.json BACKEND DIR...`.
With BACKEND "guard" it only loads each DIR sharded and records what `llmpatch.apply` says ({family: error}).
With BACKEND "smollm2" (3 ranks; DIR = the repo root) it answers the 1k passkey with SmolLM2-135M, whole and
sharded, under sink_window, moa (the shipped plan) and retrieval_kv (the shipped heads):
{case: {"whole": answer, "sharded": answer, "logits": max abs diff of the prompt's last logits}}.

Each DIR holds a saved tiny model. Every rank loads it twice, whole and with `tp_plan="auto"`, patches both with
the same method (per-head-varied parameters), and compares prompt logits, greedy tokens and their scores. Rank 0
writes {family: {case: {"logits": max abs diff, "scores": (of the generated steps), "tokens": equal, "effect":
the case's prompt or generated logits against dense's, unsharded}}} to OUT.json; a case that raises is recorded as
{"error": message}. Run by tests/test_tp.py.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import llmpatch  # noqa: E402
from llmpatch.testing import method_cases  # noqa: E402

PROMPT = [(7 * i + 3) % 120 + 3 for i in range(64)]
GEN = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
           return_dict_in_generate=True)  # fmt: skip


def run(model, method, params, backend):
    x = torch.tensor([PROMPT])
    with torch.no_grad(), llmpatch.patched(model, method, backend=backend, **params):
        logits = model(x).logits
        out = model.generate(x, **GEN)
    return logits, out.sequences, torch.stack(out.logits)


def passkey_smollm2(root: Path) -> dict:
    from llmpatch.evals.suites import SUITES

    whole, tok = llmpatch.load_model("smollm2-135m", progress=lambda *a: None)
    sharded, _ = llmpatch.load_model("smollm2-135m", progress=lambda *a: None, tp_plan="auto")
    sample = SUITES["passkey"].sample(tok, 1024, 0)
    enc = tok(sample.prompt, return_tensors="pt", add_special_tokens=False)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    cases = {
        "sink_window": ("sink_window", None, dict(sink=64, window=256)),
        "moa": ("moa", root / "benchmarks/moa/smollm2-135m-moa.json", {}),
        "retrieval_kv": ("retrieval_kv", root / "benchmarks/retrieval/smollm2-135m-heads.json",
                         dict(top_k=20, sink=32, recent=128)),
    }  # fmt: skip
    out = {"answer": sample.answers}
    for label, (method, plan, params) in cases.items():
        got = {}
        for name, model in (("whole", whole), ("sharded", sharded)):
            with torch.no_grad(), llmpatch.patched(model, method, plan, **params):
                got[name + "_logits"] = model(**enc, logits_to_keep=1).logits
                ids = model.generate(**enc, **kw)[0, enc.input_ids.shape[1] :]
                got[name] = tok.decode(ids, skip_special_tokens=True)
        diff = float((got.pop("whole_logits") - got.pop("sharded_logits")).abs().max())
        out[label] = {**got, "logits": diff}
    return out


def main():
    out_path, backend, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    backend = None if backend == "default" else backend
    from transformers import AutoModelForCausalLM

    results = {}
    if backend == "smollm2":
        results, dirs = passkey_smollm2(Path(dirs[0])), []
    if backend == "guard":
        for d in dirs:
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, tp_plan="auto")
            try:
                llmpatch.apply(model, "sink_window", sink=2, window=4)
                results[d] = None
            except Exception as e:
                results[d] = f"{type(e).__name__}: {e}"
        dirs = []
    for d in dirs:
        whole = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        sharded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, tp_plan="auto").eval()
        spec = llmpatch.detect(whole)
        fam, dense = {}, None
        for label, (method, params) in method_cases(spec.num_layers, spec.num_heads, backend).items():
            try:
                want = run(whole, method, params, backend)
                got = run(sharded, method, params, backend)
                dense = want if dense is None else dense
                fam[label] = {
                    "logits": float((want[0] - got[0]).abs().max()),
                    "tokens": bool(torch.equal(want[1], got[1])),
                    "scores": float((want[2] - got[2]).abs().max()),
                    "effect": max(
                        float((w - d).abs().max()) for w, d in ((want[0], dense[0]), (want[2], dense[2]))
                    ),
                }
            except Exception as e:  # recorded, so one case does not hide the others
                fam[label] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        results[spec.family] = fam
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
