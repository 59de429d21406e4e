"""Compile the production Triton configurations for a GPU target on any machine (no GPU needed) and report
shared memory (from Triton) and registers, stack and spills (from ptxas -v). Used by tests and by `python -m llmpatch.kernels.compile_check`.

Run without TRITON_INTERPRET (the interpreter replaces the JIT functions that `triton.compile` needs).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

SMEM_LIMIT_SM90 = 227 * 1024  # bytes of shared memory a block may use on sm_90


def _signature(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn if hasattr(fn, "fn") else fn).parameters:
        sig[name] = "constexpr" if name in constexprs else types.get(name, "i32")
    return sig


def _ptxas_stats(ptx: str, arch: str) -> dict:
    """Registers, spill stores/loads and stack from `ptxas -v` (Triton's newest bundled ptxas)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        text = ""
        for tool in ("ptxas-blackwell", "ptxas"):  # the older one rejects newer PTX versions
            res = subprocess.run([os.path.join(bin_dir, tool), "-v", f"--gpu-name={arch}", path, "-o",
                                  os.path.join(tmp, "k.cubin")], capture_output=True, text=True)  # fmt: skip
            text = res.stderr + res.stdout
            if res.returncode == 0:
                break
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(spill.group(1)) if spill else None,
            "spill_stores": int(spill.group(2)) if spill else None,
            "spill_loads": int(spill.group(3)) if spill else None}  # fmt: skip


def compile_prefill(
    dtype="bf16", head_dim=128, pattern=1, group=4, calib=False, softcap=False, arch=90
) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_prefill import config, prefill_kernel

    cfg = config(group * 2, 2, head_dim, pattern, pattern == 2, 64, calib)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    consts = dict(cfg, LIST_BLOCK=64, PATTERN=pattern, STATIC=pattern == 1, LIST_PER_KV=pattern == 2, HAS_START=True,
                  HAS_PAD=False, SLIDING=False, SOFTCAP=softcap, CALIB=calib, COLSUM_PASS=False,
                  HEAD_ZERO_ROWS=False, PRECISION="tf32")  # fmt: skip
    ptrs = {n: "*i32" for n in ("START", "SINK", "WINDOW", "KV_COUNT", "KV_INDEX", "KEY_PAD", "HEAD_MODE")}
    ptrs.update({n: f"*{dtype}" for n in ("Q", "K", "V", "Out")}, LSE="*fp32", CALIB_SINKS="*i8",
                COLSUM="*fp32", COLCNT="*fp32", sm_scale="fp32", softcap="fp32", calib_beta="fp32")  # fmt: skip
    src = ASTSource(fn=prefill_kernel, signature=_signature(prefill_kernel, ptrs, consts), constexprs=consts)
    k = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    stats = _ptxas_stats(k.asm["ptx"], f"sm_{arch}a")
    return {"kernel": "prefill", "dtype": dtype, "head_dim": head_dim, "pattern": pattern, "group": group,
            "calib": calib, "softcap": softcap, "block_m": cfg["BLOCK_M"], "block_n": cfg["BLOCK_N"],
            "num_warps": warps, "num_stages": stages, "shared_bytes": k.metadata.shared, **stats}  # fmt: skip


def compile_decode(dtype="bf16", head_dim=128, group=4, arch=90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_decode import decode_kernel

    consts = dict(GROUP=group, GROUP_PAD=triton.next_power_of_2(group), NQ_PAD=max(16 // group, 1), BLOCK_N=64,
                  HEAD_DIM=head_dim, LIST_PER_KV=True, RING=True, HAS_START=False, STATIC=True, SLIDING=False,
                  SOFTCAP=False, CALIB=False, PRECISION="tf32")  # fmt: skip
    ptrs = {n: "*i32" for n in ("Q_POS", "SLOT_POS", "START", "SINK", "WINDOW", "KV_COUNT", "KV_INDEX")}
    ptrs.update({n: f"*{dtype}" for n in ("Q", "K", "V")}, CALIB_SINKS="*i8", sm_scale="fp32", softcap="fp32",
                **{n: "*fp32" for n in ("ACC", "ACC_S", "M", "L", "L_S")})  # fmt: skip
    src = ASTSource(fn=decode_kernel, signature=_signature(decode_kernel, ptrs, consts), constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
    stats = _ptxas_stats(k.asm["ptx"], f"sm_{arch}a")
    return {"kernel": "decode", "dtype": dtype, "head_dim": head_dim, "group": group, "num_warps": 4,
            "shared_bytes": k.metadata.shared, **stats}  # fmt: skip


PRODUCTION = [
    ("prefill", dict(head_dim=d, pattern=p, group=g, calib=c, softcap=s))
    for d in (64, 128, 256) for p in (1, 2) for g in (1, 4) for c, s in ((False, False), (True, True))
] + [("decode", dict(head_dim=d, group=g)) for d in (64, 128, 256) for g in (1, 4, 8)]  # fmt: skip


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: compiling needs the real JIT", file=sys.stderr)
        return 2
    quick = "--quick" in (argv or sys.argv[1:])
    todo = PRODUCTION[:2] + PRODUCTION[-1:] if quick else PRODUCTION
    for kind, kw in todo:
        row = (compile_prefill if kind == "prefill" else compile_decode)(dtype="bf16", **kw)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
