"""Cache plumbing shared by the methods: cache layers put into the model's own `DynamicCache`, the cache keyword
of each transformers version, and KV byte reports. `RingLayer` (`ring.py`) is the per-KV-head sink + ring-buffer
cache of moa, streamingllm and retrieval_kv; LongHeads has its own layer for its chunk state."""

from __future__ import annotations

import dataclasses
import inspect

from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .ring import RingLayer

__all__ = ["RingLayer", "cache_argument", "dense_kv_bytes", "find_cache", "install", "kv_bytes", "kv_report",
           "output_cache"]  # fmt: skip


def cache_argument(model) -> str:
    """The name of the forward's cache keyword ('cache' in recent transformers, 'past_key_values' before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The cache in a model or generate() output ('cache' in recent transformers, 'past_key_values' before)."""
    # Asking a recent output for the old name logs a deprecation warning, even when it holds no cache.
    new = (
        any(f.name == "cache" for f in dataclasses.fields(out))
        if dataclasses.is_dataclass(out)
        else "cache" in out
    )
    return out.get("cache") if new else out.get("past_key_values")


def find_cache(kwargs: dict, name: str):
    """The cache a forward was called with, under its keyword `name` or either spelling; None if none."""
    return next((kwargs[k] for k in (name, "cache", "past_key_values") if kwargs.get(k) is not None), None)


def _attention_mask(args, kwargs):
    mask = kwargs.get("attention_mask")
    return args[1] if mask is None and len(args) > 1 else mask


def install(model, make_layers) -> callable:
    """Put cache layers (from `make_layers()`: {layer index: factory}) into every fresh DynamicCache the model runs
    with, and tell each layer with a `set_padding` which slots of the batch are padding before every forward;
    returns the undo callback."""
    name = cache_argument(model)

    def convert(cache):
        for i, factory in make_layers().items():
            if i < len(cache.layers) and type(cache.layers[i]) in (DynamicLayer, DynamicSlidingWindowLayer):
                cache.layers[i] = factory()
        return cache

    def hook(module, args, kwargs):
        cache = find_cache(kwargs, name)
        if isinstance(cache, DynamicCache):
            if cache.get_seq_length() == 0:
                convert(cache)
        else:
            use = kwargs.get("use_cache")
            if cache is not None or not (
                use if use is not None else getattr(model.config, "use_cache", True)
            ):
                return args, kwargs
            cache = kwargs[name] = convert(DynamicCache(config=model.config))
        mask = _attention_mask(args, kwargs)
        for layer in cache.layers:
            if hasattr(layer, "set_padding"):
                layer.set_padding(mask)
        return args, kwargs

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return handle.remove


def _bytes(cache: Cache, own: str) -> int:
    """Sum over layers of `layer.<own>()` where a layer has it, else of the layer's keys and values."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, own):
            total += getattr(layer, own)()
        elif getattr(layer, "is_initialized", False):
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


def kv_bytes(cache: Cache) -> int:
    """What the cache holds."""
    return _bytes(cache, "kv_bytes")


def dense_kv_bytes(cache: Cache) -> int:
    """What the model's own DynamicCache would hold for the same tokens (sliding layers as they are)."""
    return _bytes(cache, "dense_bytes")


def kv_report(cache: Cache) -> dict:
    """Bytes the cache holds against the model's own dense cache for the same tokens, and how many KV heads the
    ring layers keep in full."""
    used, dense = kv_bytes(cache), dense_kv_bytes(cache)
    rings = [layer for layer in cache.layers if isinstance(layer, RingLayer)]
    return {"kv_bytes": used, "dense_kv_bytes": dense, "saved": 1 - used / dense if dense else 0.0,
            "full_kv_heads": sum(layer.full_kv_heads() for layer in rings),
            "compressed_layers_kv_heads": sum(layer.num_kv_heads for layer in rings)}  # fmt: skip
