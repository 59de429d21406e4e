"""Tensor parallelism: which heads this rank holds, and the collectives that keep cross-head choices global.

Transformers 5.x shards attention colwise (`from_pretrained(..., tp_plan="auto")` under torchrun): q/k/v_proj
weights are DTensors with `Shard(0)` on a 1-D "tp" mesh, so rank r computes the contiguous query heads
[r * H / n, (r + 1) * H / n) and KV heads [r * Hkv / n, ...). Methods keep speaking global heads (plans and
fingerprints stay global, so one plan serves every world size); each `LayerDecision` holds only its rank's
slice, and the few cross-head reductions (DHSA's head averages, KVzip's model-wide budget) go through the
rank group here, so every rank makes the same choice as one process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Shard:
    rank: int
    size: int
    group: object = None  # torch.distributed ProcessGroup of the tensor-parallel ranks

    def heads(self, total: int) -> slice:
        """The global indices of this rank's share of `total` heads."""
        per = total // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def describe(self) -> str:
        return f"tensor parallel rank {self.rank} of {self.size}"


def _projection_weight(module):
    for name in ("q_proj", "qkv_proj", "query_key_value", "Wqkv"):
        proj = getattr(module, name, None)
        if proj is not None and getattr(proj, "weight", None) is not None:
            return name, proj.weight
    return None, None


def detect(model, attention_module, num_heads: int, num_kv_heads: int) -> Shard | None:
    """The rank's head shard of a tensor-parallel model, None for an unsharded one; a sharding llmpatch cannot
    follow (not colwise by head, a multi-dimensional mesh, heads that do not divide) is refused by name.
    Transformers 5.3+ keep DTensors (placements say the layout); earlier 5.x keep plain local shards and the
    model's `_device_mesh`, so the local row count says it."""
    name, weight = _projection_weight(attention_module)
    placements = getattr(weight, "placements", None)
    if placements is not None:  # (a DTensor: torch.distributed.tensor is loaded already)
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor import Shard as DShard

        mesh = weight.device_mesh
        if all(isinstance(p, Replicate) for p in placements) or mesh.size() == 1:
            return None
        colwise = mesh.ndim == 1 and isinstance(placements[0], DShard) and placements[0].dim == 0
    else:
        size = getattr(model, "tp_size", None) or 1
        if size <= 1:
            return None
        mesh = getattr(model, "_device_mesh", None)
        rows = num_heads * getattr(attention_module, "head_dim", 0)
        colwise = mesh is not None and mesh.ndim == 1 and weight.shape[0] * mesh.size() == rows
        placements = f"local shards of {weight.shape[0]} of {rows} rows"
    if not colwise:
        raise UnsupportedModelError(
            f"model: attention weight {name!r} is sharded as {placements} on a {mesh.ndim}-D mesh; llmpatch "
            "supports tensor parallelism that splits attention by heads (colwise Shard(0) on a 1-D tp mesh, "
            "transformers' tp_plan='auto')"
        )
    size = mesh.size()
    if num_heads % size or num_kv_heads % size:
        raise UnsupportedModelError(
            f"model: {num_heads} query heads and {num_kv_heads} KV heads do not split evenly over "
            f"{size} tensor-parallel ranks; use a world size that divides both"
        )
    return Shard(mesh.get_local_rank(), size, mesh.get_group())


def is_main_process() -> bool:
    """Under torchrun every rank computes and rank 0 alone prints and writes files."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def all_reduce_mean(x: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """The mean over every rank of a per-rank mean over equal head counts = the mean over all heads."""
    if shard is None:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    dist.all_reduce(x, group=shard.group)
    return x / shard.size


def all_gather_heads(x: torch.Tensor, shard: Shard | None, dim: int) -> torch.Tensor:
    """Every rank's per-head tensor concatenated along `dim` in rank order (= global head order)."""
    if shard is None:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(shard.size)]
    dist.all_gather(parts, x.contiguous(), group=shard.group)
    return torch.cat(parts, dim)
