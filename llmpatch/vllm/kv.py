"""Per-layer KV savings in vLLM: a sink + window KV cache spec whose manager frees the blocks between a layer's
sink and its window (the tokens no head of the layer can see again), modelled on vLLM's sliding-window manager.

A layer's span is the largest sink and the largest window among its heads (`Served.kv_span`): a page holds
every KV head of a layer, so per-head spans save compute only and the memory saving comes per layer. A layer
where some head is dense keeps vLLM's full-attention spec. Needs prefix caching off (a cached prefix would need
the freed middle blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """The first `sink` tokens and the last `sliding_window` tokens (the query included) of every request."""

    sink: int = 0

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + cdiv(self.sink, self.block_size), cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(
            isinstance(s, SinkWindowSpec) and (s.sink, s.sliding_window) == (self.sink, self.sliding_window)
            for s in kv_cache_specs.values()
        )


class SinkWindowManager(SlidingWindowManager):
    """Frees whole blocks strictly between the sink's blocks and the window's first block."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink = kv_cache_spec.sink

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0  # nothing before the sink is skipped; the middle goes in remove_skipped_blocks

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        first = cdiv(self.sink, self.block_size)
        window_start = max(0, processed_computed_tokens - self.sliding_window + 1)
        self._remove_blocks_in_range(request_id, first, window_start // self.block_size)


def register() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)


def layer_spec(spec, span: tuple[int, int] | None):
    """The spec a layer reports: vLLM's own unless it is full attention and the plan bounds the layer."""
    if span is None or type(spec) is not FullAttentionSpec:
        return spec
    sink, window = span
    fields = {f: getattr(spec, f) for f in ("block_size", "num_kv_heads", "head_size", "head_size_v", "dtype",
                                            "kv_quant_mode")}  # fmt: skip
    return SinkWindowSpec(**fields, sliding_window=window, sink=sink)
