"""Per-process state of the plugin: the resolved decisions and each attention layer's local cut of them."""

from __future__ import annotations

from ..errors import ParameterError
from . import paged
from . import served as _served

_SERVED: dict = {}  # "value": Served or None (not configured)
_LAYERS: dict[str, object] = {}  # layer name -> local LayerDecision or None (dense)


def served(vllm_config=None):
    """The decisions this process serves (resolved once, while vLLM builds the model: its config is current), or
    None when neither `LLMPATCH_VLLM` nor additional_config["llmpatch"] is set."""
    if "value" not in _SERVED:
        if vllm_config is None:
            from vllm.config import get_current_vllm_config

            vllm_config = get_current_vllm_config()
        cfg = _served.read_config(additional=vllm_config.additional_config)
        if cfg is None:
            _SERVED["value"] = None
        else:
            mc = vllm_config.model_config
            if vllm_config.cache_config.enable_prefix_caching:
                raise ParameterError(
                    "enable_prefix_caching: must be False with llmpatch's sink + window KV manager (a cached "
                    "prefix would need the blocks it frees); pass enable_prefix_caching=False"
                )
            _SERVED["value"] = _served.resolve(cfg, mc.hf_config, mc.max_model_len, mc.model)
    return _SERVED["value"]


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def decision_for(layer, num_heads: int):
    """The layer's decision cut to this rank's query heads, or None when the layer is dense."""
    name = layer.layer_name
    if name not in _LAYERS:
        s = served()
        d = None
        if s is not None:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            d = s.local(
                layer_index(name), get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
            )
            if d.num_heads != num_heads:
                raise ParameterError(f"tensor_parallel_size: layer {name} holds {num_heads} query heads but the "
                                     f"plan's cut gives {d.num_heads}")  # fmt: skip
            d = None if paged.keeps_every_key(d) else d
        _LAYERS[name] = d
    return _LAYERS[name]


def refuse_isa(isa: str):
    raise ParameterError(
        f"dtype: vLLM's CPU attention picked the {isa!r} cache layout, which llmpatch does not read (it reads "
        f"{', '.join(paged.LAYOUTS)}: float32 / float16, and bfloat16 on x86); serve without the plugin"
    )
