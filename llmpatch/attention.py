"""The single attention function (and its mask function) registered with transformers as "llmpatch".

The mask function never builds an N x N mask: it hands the attention function a `CompactMask` holding each
sequence's first real key slot (left padding) and, only when the 2D mask has holes, the per-key padding.
The attention function reads the layer's `LayerDecision` from the module and calls one backend entry point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PatchStateError
from .kernels import density, dispatch, rules

NAME = "llmpatch"


@dataclass
class CompactMask:
    kv_offset: int  # absolute slot of key index 0 (non-zero when a sliding cache dropped old keys)
    start: torch.Tensor | None  # [B] key index of each sequence's first token (<= 0 if dropped); None = 0
    key_padding: torch.Tensor | None  # [B, Nk] bool, only when padding is not a left-padded prefix

    def row_start(self, b: int, device) -> torch.Tensor:
        """[B] key index of each sequence's first token (0 without padding)."""
        if self.start is None:
            return torch.zeros(b, dtype=torch.long, device=device)
        return self.start.to(device)


MASK_CHECK_PAIRS = 4096
# Where the sampled pairs fall, as fractions of the query and key ranges: fixed, so a traced graph holds them as
# a constant and every call checks the same pairs.
_MASK_CHECK_AT = torch.rand(
    2, MASK_CHECK_PAIRS, generator=torch.Generator().manual_seed(0), dtype=torch.float64
)
MASK_CHECK_ERROR = (
    "attention_mask: llmpatch supports causal attention with padding masks (and the model's own sliding "
    "windows); this call asks for another pattern (packed sequences in position_ids, bidirectional or custom "
    "mask functions). Pass an attention_mask, or remove the patch."
)


def _check_mask_function(
    mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, local_size, device
):
    """Refuse mask functions that are not plain causal (+ the layer's sliding window), such as packed sequences
    or custom overlays: the compact form cannot carry them. Checked on a fixed sample of (query, key) pairs, with
    tensor ops only, so it also runs inside a compiled graph (as an in-graph assertion, every call)."""
    if mask_function is None:
        return
    at = _MASK_CHECK_AT.to(device)
    qi = (at[0] * q_length).long() + q_offset
    ki = (at[1] * kv_length).long() + kv_offset
    want = rules.visible(qi, ki, local_size)
    zeros = torch.zeros_like(qi)
    ok = torch.ones((), dtype=torch.bool, device=device)
    for b in (0, batch_size - 1):
        got = torch.as_tensor(mask_function(zeros + b, zeros, qi, ki), dtype=torch.bool)
        ok = ok & (got == want).all()
    if torch.compiler.is_compiling():
        torch._assert_async(ok, MASK_CHECK_ERROR)
    elif not bool(ok):
        raise PatchStateError(MASK_CHECK_ERROR)


def compact_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int = 0,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    cache_position: torch.Tensor | None = None,
    **kwargs,
) -> CompactMask:
    """AttentionMaskInterface entry: causal + padding information in O(B x N). Transformers before 5.3 pass the
    queries' `cache_position` instead of `q_length` and `q_offset`."""
    old_api = q_length is None
    if old_api:
        q_length = cache_position.shape[0]
    device = kwargs.get("device", cache_position.device if cache_position is not None else "cpu")
    kv_offset = int(kv_offset)
    if torch.compiler.is_compiling():  # traced: the check as an in-graph assertion, no data-dependent branch
        q_offset = cache_position[0] if old_api else q_offset
        _check_mask_function(
            mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, local_size, device
        )
        if attention_mask is None:
            return CompactMask(kv_offset, None, None)
        full = attention_mask.to(torch.bool)
        return CompactMask(
            kv_offset, first_real_slot(full) - kv_offset, full[:, kv_offset : kv_offset + kv_length]
        )
    if old_api:  # (read here: a data-dependent scalar would break a traced graph)
        q_offset = int(cache_position[0]) if cache_position.numel() else 0
    _check_mask_function(
        mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, local_size, device
    )
    if attention_mask is None or bool(attention_mask.all()):
        # A sliding cache that dropped old keys shifts positions: key index 0 is token kv_offset.
        start = None if kv_offset == 0 else torch.full((batch_size,), -kv_offset, dtype=torch.long)
        return CompactMask(kv_offset, start, None)
    full = attention_mask.to(torch.bool)
    first, left_padded = padding_start(full)
    key_padding = None if left_padded else full[:, kv_offset : kv_offset + kv_length]
    return CompactMask(kv_offset, first - kv_offset, key_padding)


def padding_start(full: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """For a 2D mask [B, N] (True = real token): each row's first real slot [B] (N for an empty row), and
    whether the padding is a left-padded prefix (no holes)."""
    idx = torch.arange(full.shape[-1], device=full.device)
    first = first_real_slot(full)
    return first, bool((full == (idx.unsqueeze(0) >= first.unsqueeze(-1))).all())


def first_real_slot(full: torch.Tensor) -> torch.Tensor:
    """[B]: each row's first real slot of a 2D mask [B, N] (N for an empty row), with no data-dependent Python."""
    return torch.where(full.any(-1), full.float().argmax(-1), full.shape[-1]).long()


def llmpatch_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
):
    decision = getattr(module, "llmpatch_layer", None)
    if decision is None:
        raise PatchStateError(
            f"attn_implementation: {NAME!r} is set but layer {getattr(module, 'layer_idx', '?')} carries no "
            "llmpatch decisions; use llmpatch.apply(model, ...) instead of setting the implementation by hand"
        )
    if attention_mask is not None and not isinstance(attention_mask, CompactMask):
        raise PatchStateError(
            "attention_mask: llmpatch takes 2D padding masks only (shape [batch, length]); "
            f"got a prepared {type(attention_mask).__name__} of shape {tuple(attention_mask.shape)}"
        )
    if query.shape[1] != decision.num_heads:
        _refuse_sharding(decision, query.shape[1])
    if decision.sink.device != query.device:
        raise PatchStateError(
            f"device: layer {decision.layer} was patched on {decision.sink.device} but runs on {query.device}; "
            "move the model first, then apply the patch (or remove and re-apply it)"
        )
    mask = attention_mask or CompactMask(0, None, None)
    b, h, nq, _ = query.shape
    nk = key.shape[2]
    positions = decision.take_key_positions(key)
    prefill = nk == nq and positions is None
    taps = decision.taps
    if decision.attend is not None:  # a method's own attention (LongHeads, DHSA)
        out, computed = decision.attend(decision, query, key, value, mask, scaling, softcap)
        _count(taps, decision, mask, (b, h, nq, nk), query.device, computed)
        return out.transpose(1, 2).contiguous(), None
    kw = dict(scale=scaling, softcap=softcap, sliding_window=decision.sliding_window)
    if positions is not None:  # a cache that keeps tokens out of order: its positions, not slot order
        kw.update(q_pos=positions.q_pos, k_pos=positions.k_pos, k_spans=positions.spans)
    else:
        kw.update(start=mask.start, key_padding=mask.key_padding)
    kw.update(pattern_args(decision, nk, positions is not None, prefill))
    tail = min(decision.tail, nq) if prefill and "sink" in kw else 0
    calibration = decision.calibration
    if calibration is not None:
        kw.update(calibration.kernel_args(prefill, mask, b, nk))
    if taps.tracker is not None:
        dims = (b, h, nq, nk if positions is None else positions.length)  # counted as in the full cache
        pattern = {x: kw[x] for x in ("sink", "window") if x in kw}

        def computed():
            common = dict(start=mask.start, sliding_window=decision.sliding_window, device=query.device)
            if tail:  # the pattern over the rows before the tail, every visible key for the tail's rows
                cut = nq - tail
                return density.computed_count(b, h, cut, cut, **common, **pattern) + density.causal_count(
                    b, h, tail, nk, **common
                )
            return density.computed_count(*dims, **common, **pattern)

        _count(taps, decision, mask, dims, query.device, computed)
    if taps.observer is not None and not prefill:
        taps.observer(decision, query, key, mask, scaling, softcap)  # e.g. retrieval-head detection
    if taps.profiler is not None:  # MoA gradient profiling: exact attention with its own backward
        return taps.profiler(decision, query, key, value, scaling, softcap).transpose(1, 2).contiguous(), None
    if prefill and decision.select is not None:  # query-aware eviction: pick the keys to pin from this prompt
        decision.select(decision, query, key, value, mask, scaling, softcap)
    if tail:
        return dense_tail(query, key, value, tail, decision.backend, kw).transpose(1, 2).contiguous(), None
    out, sinks = dispatch.attention(query, key, value, backend=decision.backend, **kw)
    if prefill and sinks is not None and calibration is not None:
        calibration.remember(mask, sinks)
    return out.transpose(1, 2).contiguous(), None


def pattern_args(decision, nk: int, positioned: bool, prefill: bool) -> dict:
    """The PATTERN and HEAD_MASK decisions as kernel arguments for a call over `nk` keys: sink and window
    where the pattern narrows them (always for keys at explicit positions), the head mask for a prompt's
    queries (`prefill`) or a decode step's. Also what the vLLM plugin renders."""
    kw = {}
    narrowest = decision.narrowest_window()
    if narrowest is not None and (positioned or rules.narrows(narrowest, nk)):  # else: dense
        kw.update(sink=decision.sink, window=decision.window)
    if decision.head_mask is not None:
        kw.update(decision.head_mask.kernel_args(prefill))
    return kw


def _refuse_sharding(decision, heads: int):
    held = (
        "every head"
        if decision.shard is None
        else f"{decision.num_heads} heads ({decision.shard.describe()})"
    )
    raise PatchStateError(
        f"sharding: layer {decision.layer} was patched for {held} but its attention got {heads} query heads; the "
        "model is sharded in a way llmpatch did not detect (it follows transformers' tp_plan='auto'). Patch the "
        "model after it is sharded, with the same tensor-parallel layout on every rank"
    )


def dense_tail(query, key, value, tail: int, backend, kw):
    """A prompt whose last `tail` queries attend densely: the rows before them under the pattern (over the keys
    they can see), the tail's rows over every visible key; each part on the same backend."""
    cut = query.shape[2] - tail
    dense_kw = {x: y for x, y in kw.items() if x not in ("sink", "window")}
    if cut == 0:
        return dispatch.attention(query, key, value, backend=backend, **dense_kw)[0]
    head_kw = dict(kw)
    if kw.get("key_padding") is not None:
        head_kw["key_padding"] = kw["key_padding"][:, :cut]
    head = dispatch.attention(
        query[:, :, :cut], key[:, :, :cut], value[:, :, :cut], backend=backend, **head_kw
    )[0]
    rest = dispatch.attention(query[:, :, cut:], key, value, backend=backend, **dense_kw)[0]
    return torch.cat([head, rest], dim=2)


def _count(taps, decision, mask, dims, device, computed) -> None:
    """Sparsity, counted here for every call: the scores computed (a callable, evaluated only while tracking;
    None = every visible key) against the causal total."""
    if taps.tracker is None:
        return
    causal = density.causal_count(
        *dims, start=mask.start, sliding_window=decision.sliding_window, device=device
    )
    taps.tracker.add(causal if computed is None else computed(), causal)


def register() -> None:
    """Register the attention and mask functions under "llmpatch" (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, llmpatch_attention)
    AttentionMaskInterface.register(NAME, compact_mask)
