"""LongHeads: every head reads only the chunks it chooses, at positions inside its trained length (Lu et al., 2024;
docs/METHODS.md §2). Official code: LuLuLuyi/LongHeads.

Defaults as the paper: chunk_size w 256, k = attention_length / w chunks per query; attention_length A defaults
to min(4096, the model's trained length). Queries whose k chunks cover the whole prefix (positions < A) use
ordinary attention. Past A, each query head keeps chunk 0 (sink), the previous and its own chunk, and the
k - 3 others with the best score q . k_hat (un-rotated query; k_hat is the chunk's attention-pooled key, computed
once when the chunk completes). The chosen chunks' un-rotated keys get contiguous positions 0..L-1 and the query
(k-1) w + (t mod w). Run time: `runtime.py` beside this file.

Departures and decisions:
- Prefill goes by query blocks of `block_size` tokens (64) sharing one selection (their mean query's scores);
  decode steps select per token, as the paper does everywhere. `block_size=1` is the per-token algorithm.
- GQA: summaries and selection are per query head; each query head gathers its own chunks from the shared KV head
  (the official code is MHA only).
- Keys are cached un-rotated: the patch hands the attention module identity position embeddings and rotates in
  the attention function (a forward pre-hook, undone by remove()). Layers with the model's own sliding window
  (Gemma-2/3 local layers, Mistral) are left alone: their window already bounds every distance.
- Batch > 1 with left padding; chunks count each row's real tokens. Beam search and cache cropping are refused.
- Does not compose with methods that set patterns, masks or calibration on the same layers.
"""

from __future__ import annotations

import dataclasses

import torch

from ...decisions import Kind
from ...errors import ParameterError, PatchStateError
from ..base import Method, full_attention_layers, param

DEFAULT_ATTENTION_LENGTH = 4096


@dataclasses.dataclass
class LongHeads(Method):
    name = "longheads"
    summary = "each head attends to its k best chunks, re-positioned inside the trained length (LongHeads)"

    chunk_size: int = param(256, "a positive multiple of block_size", lambda v: v >= 1)
    attention_length: int | None = param(
        None, "null (min(4096, trained length)) or a multiple of chunk_size >= 3 * chunk_size, at most the "
        "model's trained length", lambda v: v >= 1
    )  # fmt: skip
    block_size: int = param(64, "an int >= 1 (prefill query block sharing one selection)", lambda v: v >= 1)
    layers: list | None = param(None, "null (every full-attention layer) or a list of layer indices")

    def resolved_length(self, spec) -> int:
        if self.attention_length is not None:
            return self.attention_length
        trained = spec.max_position_embeddings or DEFAULT_ATTENTION_LENGTH
        return min(DEFAULT_ATTENTION_LENGTH, trained) // self.chunk_size * self.chunk_size

    def chosen_layers(self, spec) -> list[int]:
        return full_attention_layers(self.name, self.layers, spec)

    def validate(self, spec):
        w, bs = self.chunk_size, self.block_size
        if w % bs:
            raise ParameterError(
                f"longheads: parameter 'chunk_size' must be a positive multiple of block_size={bs}, got {w}"
            )
        a = self.resolved_length(spec)
        trained = spec.max_position_embeddings
        if trained is not None and a > trained:
            raise ParameterError(
                f"longheads: parameter 'attention_length' must be at most the model's trained length {trained} "
                f"(max_position_embeddings): every head must stay inside it; got {a}"
            )
        if a % w or a < 3 * w:
            raise ParameterError(
                f"longheads: parameter 'attention_length' must be a multiple of chunk_size={w} and at least "
                f"3 * chunk_size={3 * w} (sink, previous and own chunk are always kept); got {a}"
            )
        self.chosen_layers(spec)

    def configure(self, spec, layers):
        for i in self.chosen_layers(spec):
            for kind in Kind:
                layers[i].claim(kind, self.name)

    def install(self, model, spec, layers):
        from ... import caches
        from ...adapters import attention_modules, rope_table
        from .runtime import ChunkLayer, Config, LongHeadsAttention

        name = caches.cache_argument(model)
        length = self.resolved_length(spec)
        cfg = Config(self.chunk_size, length // self.chunk_size, self.block_size)
        modules = attention_modules(model)
        table, cached = (
            rope_table(model),
            {},
        )  # one table per RoPE type (Gemma-3 layers differ), device, dtype
        chosen = self.chosen_layers(spec)
        handles = []
        for i in chosen:
            module, decision = modules[i][1], layers[i]

            def rope(device, dtype, module=module):
                key = (getattr(module, "layer_type", None), str(device), dtype)
                if key not in cached:
                    cached[key] = table(module, device, dtype, length)
                return cached[key]

            attend = decision.attend = LongHeadsAttention(cfg, rope)

            def hook(mod, args, kwargs, i=i, attend=attend):
                pe = kwargs.get("position_embeddings")
                if pe is None:
                    raise PatchStateError(
                        f"longheads: layer {i} was called without position_embeddings; this "
                        "transformers version passes RoPE differently, which longheads cannot re-position"
                    )
                kwargs["position_embeddings"] = (torch.ones_like(pe[0]), torch.zeros_like(pe[1]))
                cache = caches.find_cache(kwargs, name)
                holder = cache.layers[i] if cache is not None and i < len(cache.layers) else None
                if cache is not None and not isinstance(holder, ChunkLayer):
                    raise PatchStateError(
                        f"cache: longheads keeps its chunk state in its own cache layers; layer {i} of the given "
                        f"{type(cache).__name__} is a {type(holder).__name__}. Pass a fresh DynamicCache or none."
                    )
                attend.holder = holder
                return args, kwargs

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        undo_cache = caches.install(model, lambda: {i: ChunkLayer for i in chosen})

        def undo():
            undo_cache()
            for handle in handles:
                handle.remove()
            for i in chosen:
                layers[i].attend = None

        return undo
