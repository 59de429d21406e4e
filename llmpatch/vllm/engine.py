"""The eval suites through vLLM (`llmpatch run --engine vllm`): each configuration (the dense baseline, a served
method) gets its own vLLM engine in its own process (the plugin's decisions are per process), fed token ids
the HF tokenizer made (as the HF path feeds them) and answering greedy tokens; the caller decodes and scores.

Timings, attention density and KV bytes per sample are the HF path's measurements and are not reported here;
each engine reports vLLM's KV capacity (tokens, concurrency at max_model_len) instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import LlmpatchError, ParameterError


def make_llm(path: str, cfg: dict | None, *, max_model_len: int, tensor_parallel_size: int = 1,
             kv_gib: float = 1.0, dtype: str = "float32", max_num_batched_tokens: int | None = None,
             prefix_caching: bool = False, via_env: bool = True, block_size: int | None = None,
             stats: bool = False):  # fmt: skip
    """A vLLM engine for `path` serving `cfg` ({"method", "plan", "params"}; None: vLLM alone), with a fixed KV
    memory so capacities compare. The plugin reads `cfg` from LLMPATCH_VLLM (`via_env`) or additional_config.
    `block_size` None: vLLM's (128 on CPU; multiples of 32 read the "vec" layout). `stats`: vLLM's per-request
    timestamps in each output's `metrics`."""
    from vllm import LLM

    from .served import ENV, KEY

    extra = {} if block_size is None else {"block_size": block_size}
    if cfg is not None and via_env:
        os.environ[ENV] = json.dumps(cfg)
    elif cfg is not None:
        extra["additional_config"] = {KEY: cfg}
    return LLM(model=path, dtype=dtype, enable_prefix_caching=prefix_caching, seed=0, max_model_len=max_model_len,
               tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=0.25,
               kv_cache_memory_bytes=int(kv_gib * (1 << 30)), max_num_batched_tokens=max_num_batched_tokens,
               distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
               disable_log_stats=not stats, **extra)  # fmt: skip


def capacity(llm) -> dict:
    cc = llm.llm_engine.vllm_config.cache_config
    return {"kv_tokens": cc.kv_cache_size_tokens, "max_concurrency": cc.kv_cache_max_concurrency}


class VLLMEngine:
    """Greedy generation through vLLM for `evals.runner.run_suite(engine=...)`."""

    name = "vllm"

    def __init__(self, path: Path, *, max_model_len: int, tensor_parallel_size: int = 1, kv_gib: float = 1.0):
        self.path, self.max_model_len = str(path), max_model_len
        self.opts = {
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "kv_gib": kv_gib,
        }
        self.info: dict[str, dict] = {}  # label -> the engine's capacity
        self._checked: dict[str, dict | None] = {}  # label -> its plugin configuration, checked once

    def check(self, config) -> dict | None:
        """The plugin configuration of a runner MethodConfig, with every check the engine will make."""
        if config.label in self._checked:
            return self._checked[config.label]
        if config.methods is None:
            return None
        if len(config.methods) != 1:
            raise ParameterError(
                f"--engine vllm: serves one method at a time, got {'+'.join(config.methods)}"
            )
        from transformers import AutoConfig

        from .served import read_config, resolve

        raw = json.dumps({"method": config.methods[0], "plan": config.plan, "params": config.params})
        cfg = read_config(raw)
        resolve(cfg, AutoConfig.from_pretrained(self.path), self.max_model_len)
        self._checked[config.label] = cfg
        return cfg

    def generate(self, config, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from .served import ENV

        cfg = self.check(config)
        with tempfile.TemporaryDirectory() as tmp:
            job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
            job.write_text(json.dumps({"path": self.path, "cfg": cfg, "opts": self.opts, "prompts": prompts,
                                       "max_new_tokens": max_new_tokens}))  # fmt: skip
            env = {k: v for k, v in os.environ.items() if k != ENV}  # the job's cfg alone configures it
            proc = subprocess.run([sys.executable, "-m", "llmpatch.vllm.engine", str(job), str(out)],
                                  capture_output=True, text=True, env=env)  # fmt: skip
            if proc.returncode != 0 or not out.exists():
                raise LlmpatchError(f"vllm engine for {config.label} failed:\n{proc.stderr[-3000:]}")
            got = json.loads(out.read_text())
        self.info[config.label] = got["capacity"]
        return got["tokens"]


def _main(job_path: str, out_path: str) -> None:
    from vllm import SamplingParams

    job = json.loads(Path(job_path).read_text())
    llm = make_llm(job["path"], job["cfg"], **job["opts"])
    sp = SamplingParams(temperature=0, max_tokens=job["max_new_tokens"])
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], sp, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    Path(out_path).write_text(json.dumps({"tokens": tokens, "capacity": capacity(llm)}))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
