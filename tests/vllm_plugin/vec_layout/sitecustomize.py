"""Test harness only (tests/vllm_plugin, on PYTHONPATH for one engine): vLLM's CPU attention stores bf16 in its
"vec" layout, as on a CPU without AMX tiles, in every process of the engine. Only the attention layout changes:
the linear layers keep their AMX kernels, so the numerics outside attention are the same."""

import importlib.abc
import importlib.machinery
import sys

TARGET = "vllm.v1.attention.backends.cpu_attn"


class _VecLayout(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real = module._get_attn_isa
            module._get_attn_isa = lambda *a, **k: "vec" if real(*a, **k) == "amx" else real(*a, **k)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _VecLayout())
