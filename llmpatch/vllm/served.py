"""What a vLLM process serves: the llmpatch decisions for the model vLLM loaded, read once per process.

The plugin is configured by the environment variable `LLMPATCH_VLLM`, holding JSON (or a path to a JSON file):
`{"method": "moa", "plan": "auto" | "<path>", "params": {...}}` (`llmpatch serve` sets it), or by the same object
as the "llmpatch" entry of vLLM's `additional_config` (`--additional-config '{"llmpatch": {...}}'`,
`LLM(..., additional_config=...)`). Every vLLM process (engine core, workers) sees both and resolves the same decisions with
`llmpatch.patch.decide` on a meta-device copy of the model's transformers class, so plans, `plan="auto"`,
parameter checks and errors are apply()'s own.

Departure from the HF path: spans that grow with the input (moa, streamingllm with `density`) are evaluated at
one fixed `length` (default: vLLM's max_model_len), because vLLM sizes and frees KV blocks per layer at start-up,
not per request. The HF path gives the same tokens with the same `length` parameter.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..decisions import LayerDecision
from ..errors import ParameterError

ENV = "LLMPATCH_VLLM"
KEY = "llmpatch"  # the entry of vLLM's additional_config
SERVED = ("sink_window", "streamingllm", "moa", "retrieval_mask", "retrieval_kv")
ELASTIC = ("streamingllm", "moa")


@dataclass
class Served:
    layers: list[LayerDecision]  # global heads, one per layer

    def kv_span(self, layer: int) -> tuple[int, int] | None:
        """(sink, window) of the tokens any head of `layer` can still see (the largest of each), or None when
        some head sees every token (the layer keeps its whole cache)."""
        sink, window = group_spans(self.layers[layer], 1)[0]  # a page holds every KV head of the layer
        return None if window is None else (sink, window)

    def local(self, layer: int, rank: int, size: int) -> LayerDecision:
        """Layer `layer`'s decision cut to tensor-parallel rank `rank` of `size` (its query heads)."""
        d = self.layers[layer]
        if size == 1:
            return d
        from ..sharding import Shard

        # first asked inside vLLM's forward: the cut's tensors must keep version counters
        with torch.inference_mode(False):
            cut = copy.deepcopy(d)
            cut.localize(Shard(rank, size))
        return cut


def group_spans(d: LayerDecision, groups: int) -> list[tuple[int, int | None]]:
    """Per group of consecutive query heads (a KV head's, or the whole layer's with groups=1): the largest sink
    and the largest window of its heads; window None where one head is dense (sees every token)."""
    g = d.num_heads // groups
    out = []
    for i in range(groups):
        window = d.window[i * g : (i + 1) * g]
        out.append(
            (int(d.sink[i * g : (i + 1) * g].max()), None if bool((window < 0).any()) else int(window.max()))
        )
    return out


def read_config(raw: str | None = None, additional: dict | None = None) -> dict | None:
    """The plugin's configuration: `LLMPATCH_VLLM` (JSON or a file) or the "llmpatch" entry of vLLM's
    `additional_config` (None when neither is set: the plugin stays out of the way). Both set must agree."""
    raw = os.environ.get(ENV) if raw is None else raw
    from_env = _check(_parse(raw), ENV) if raw else None
    entry = (additional or {}).get(KEY) if isinstance(additional, dict) else None
    from_vllm = None if entry is None else _check(entry, f"additional_config[{KEY!r}]")
    if from_env is not None and from_vllm is not None and from_env != from_vllm:
        raise ParameterError(
            f"{ENV} and additional_config[{KEY!r}] are both set and differ; give the plugin one configuration"
        )
    return from_env if from_env is not None else from_vllm


def _parse(raw: str):
    text = raw
    if not raw.lstrip().startswith("{"):
        try:
            text = Path(raw).read_text()
        except OSError as exc:
            raise ParameterError(
                f"{ENV}: neither JSON nor a readable file: {raw!r} ({exc.strerror})"
            ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParameterError(f"{ENV}: not valid JSON ({exc.msg} at char {exc.pos})") from None


def _check(cfg, source: str) -> dict:
    if not isinstance(cfg, dict) or not isinstance(cfg.get("method"), str):
        raise ParameterError(
            f'{source}: must be a JSON object {{"method": ..., "plan": ..., "params": {{...}}}}'
        )
    unknown = sorted(set(cfg) - {"method", "plan", "params"})
    if unknown:
        raise ParameterError(f"{source}: unknown key {unknown[0]!r}; allowed: method, plan, params")
    if cfg["method"] not in SERVED:
        raise ParameterError(
            f"method: vLLM serves the static per-head methods {', '.join(SERVED)}; got {cfg['method']!r}"
        )
    params = cfg.get("params") or {}
    if not isinstance(params, dict):
        raise ParameterError(f"{source}: 'params' must be a JSON object, got {params!r}")
    if cfg["method"] == "retrieval_kv" and params.get("keep"):
        raise ParameterError("retrieval_kv: parameter 'keep' must be 0 under vLLM (query-aware pins are not "
                             "served; the plugin serves the static spans)")  # fmt: skip
    return {"method": cfg["method"], "plan": cfg.get("plan"), "params": params}


def spec_of(hf_config):
    """The ModelSpec of the transformers model vLLM serves, from a meta-device instance (no weights)."""
    from transformers import AutoModelForCausalLM

    from ..adapters import detect

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config.get_text_config())
    return detect(model)


def resolve(cfg: dict, hf_config, max_model_len: int, model_name: str | None = None) -> Served:
    """The decisions `cfg` asks for on this model (every check of llmpatch.apply; errors name the parameter)."""
    from .. import patch

    params = dict(cfg["params"])
    if cfg["method"] in ELASTIC and params.get("length") is None:
        params["length"] = max_model_len
    names = patch.check(cfg["method"], cfg["plan"], **params)
    spec = spec_of(hf_config)
    _, layers, _, _ = patch.decide(spec, names, cfg["plan"], params, model_name=model_name)
    if any(d.pins for d in layers):  # a plan's `keep` (the configuration's is refused in read_config)
        raise ParameterError("retrieval_kv: parameter 'keep' must be 0 under vLLM (query-aware pins are not "
                             "served; the plugin serves the static spans)")  # fmt: skip
    if any(d.tail for d in layers):
        raise ParameterError("tail: must be 0 under vLLM (a prompt prefilled over several steps no longer holds "
                             "the middle keys its dense tail would read)")  # fmt: skip
    return Served(layers)
