"""Model adapters: read a HF causal LM's config and module tree into a `ModelSpec`.

A new model family is one entry in `FAMILIES`. Detection never modifies the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields

from torch import nn

from .errors import UnsupportedModelError
from .sharding import Shard
from .sharding import detect as detect_shard


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # Mistral passes config.sliding_window to every layer; the others set `module.sliding_window` per layer.
    window_from_config: bool = False


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama",)),  # Vicuna is a llama
        Family("mistral", ("mistral",), window_from_config=True),
        Family("qwen2", ("qwen2",)),
        Family("qwen3", ("qwen3",)),
        Family("gemma", ("gemma",)),
        Family("gemma2", ("gemma2",)),
        Family("gemma3_text", ("gemma3_text",)),
    )
}


def supported_families() -> list[str]:
    return list(FAMILIES)


@dataclass
class ModelSpec:
    family: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int | None
    sliding_window: list[int | None]  # per layer; None = full attention
    attention_paths: list[str] = field(default_factory=list)  # module path per layer, in layer order
    shard: Shard | None = None  # this rank's heads of a tensor-parallel model (None: every head)

    @property
    def local_kv_heads(self) -> int:
        """The KV heads this process holds (all of them unless the model is tensor-parallel)."""
        return self.num_kv_heads // (1 if self.shard is None else self.shard.size)

    def local_kv_slice(self) -> slice:
        return slice(0, self.num_kv_heads) if self.shard is None else self.shard.heads(self.num_kv_heads)

    def fingerprint(self) -> dict:
        """Config fields a plan must match; the hash covers them all."""
        fields = {
            "family": self.family,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
        }
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
        return {**fields, "hash": digest}

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**out, "shard": None if self.shard is None else self.shard.describe()}


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules in layer order (those with q/k/v/o projections and a layer_idx)."""
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx"))
    ]
    return sorted(found, key=lambda item: item[1].layer_idx)


def execution_devices(model: nn.Module) -> list:
    """Where each attention module runs: its accelerate hook's execution device (device maps, CPU/disk offload
    keep weights elsewhere), else the device of its weights."""
    import torch

    placed = {}
    for name, mod in model.named_modules():
        hook = getattr(mod, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                placed[name] = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    out = []
    for path, mod in attention_modules(model):
        owners = [n for n in placed if n == "" or path == n or path.startswith(n + ".")]
        if owners:
            out.append(placed[max(owners, key=len)])
            continue
        weight = mod.q_proj.weight
        out.append(torch.device("cpu") if weight.device.type == "meta" else weight.device)
    return out


def detect(model: nn.Module) -> ModelSpec:
    """Build the ModelSpec of `model`, or raise UnsupportedModelError naming its model_type."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"model: expected a transformers PreTrainedModel with a .config, got {type(model).__name__}"
        )
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if family is None:
        raise UnsupportedModelError(
            f"model: model_type {model_type!r} is not supported; supported families: {', '.join(FAMILIES)}"
        )
    modules = attention_modules(model)
    n_layers = config.num_hidden_layers
    if len(modules) != n_layers:
        raise UnsupportedModelError(
            f"model: found {len(modules)} attention modules for {n_layers} layers in {model_type!r}; "
            "the module tree does not look like a transformers decoder"
        )
    first = modules[0][1]
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(first, "head_dim", None) or config.hidden_size // num_heads
    if family.window_from_config:
        windows = [getattr(config, "sliding_window", None)] * n_layers
    else:
        windows = [getattr(mod, "sliding_window", None) for _, mod in modules]
    return ModelSpec(
        family=family.name,
        model_type=model_type,
        num_layers=n_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        sliding_window=[int(w) if w else None for w in windows],
        attention_paths=[name for name, _ in modules],
        shard=detect_shard(model, first, num_heads, num_kv_heads),
    )


def rope_table(model: nn.Module):
    """A function (module, device, dtype, n) -> (cos, sin) [n, head_dim]: the position embeddings the model gives
    attention module `module` at positions 0..n-1, from the model's own rotary module (same values)."""
    import inspect

    import torch

    found = [m for _, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"model: expected one rotary embedding module, found {len(found)}; longheads needs the model's RoPE"
        )
    rotary = found[0]
    takes_type = "layer_type" in inspect.signature(rotary.forward).parameters

    def table(module, device, dtype, n):
        x = torch.zeros(1, dtype=dtype, device=device)
        pos = torch.arange(n, device=device)[None]
        with torch.no_grad():
            if takes_type:
                cos, sin = rotary(x, pos, getattr(module, "layer_type", None))
            else:
                cos, sin = rotary(x, pos)
        return cos[0], sin[0]

    return table
