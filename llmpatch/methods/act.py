"""ACT, the Attention Calibration Technique: Yu et al. (ICML 2024), "Unveiling and Harnessing Hidden Attention
Sinks: Enhancing LLMs without Training through Attention Calibration" (docs/METHODS.md §1).

For each calibrated head, online: column scores s_j = sum_i A_ij / (N - j); sinks S = {j : s_j > threshold}
minus the first sink (never calibrated); each row scales its sink mass by `beta` and gives the freed mass to the
non-sinks in proportion to their weight (rows still sum to 1).
Defaults: beta 0.4, threshold 0.1 (absolute), heads from a plan written by `llmpatch calibrate act`.
Departures from the official code (on purpose): batched and GQA-aware; a row whose mass is all in S is left
unchanged (the official code divides by zero); on decode steps the sink set found at prefill is reused (absolute
positions) and applied to the new row (`decode`, on by default); every model family, not only Llama.
`heads="all"` calibrates every head of layers 2..L-2 (the official search space), for exploration.
"""

from __future__ import annotations

import dataclasses

import torch

from ..decisions import Kind
from ..errors import ParameterError
from .base import Method, check_head_pairs, param


@dataclasses.dataclass
class Calibration:
    """A layer's ACT decision, and the sink set its last prefill found (ACT's own decode bookkeeping)."""

    heads: torch.Tensor  # [H] bool
    beta: float = 0.4
    threshold: float = 0.1
    decode: bool = True  # reuse the prefill's sinks on decode steps
    sinks: tuple | None = None  # (kv_offset, [B, H, Nk] bool) from the last prefill

    def kernel_args(self, prefill: bool, mask, b: int, nk: int) -> dict:
        """The backend keywords for this call; {} when it is not calibrated (a decode step without a prefill
        sink set for this batch is left uncalibrated, as on every backend)."""
        if not bool(self.heads.any()) or not (prefill or self.decode):
            return {}
        kw = dict(calib=self.heads, calib_beta=self.beta, calib_threshold=self.threshold)
        if prefill:
            return kw
        sinks = self.aligned(mask, b, nk)
        return {} if sinks is None else {**kw, "calib_sinks": sinks}

    def remember(self, mask, sinks) -> None:
        self.sinks = (mask.kv_offset, sinks)

    def aligned(self, mask, b: int, nk: int):
        """The prefill sink set aligned to the current key slots, or None."""
        if self.sinks is None or self.sinks[1].shape[0] != b:
            return None
        offset, sinks = self.sinks
        lo = mask.kv_offset - offset
        out = torch.zeros(b, sinks.shape[1], nk, dtype=torch.bool, device=sinks.device)
        src = sinks[..., max(lo, 0) : lo + nk]
        out[..., max(-lo, 0) : max(-lo, 0) + src.shape[-1]] = src
        return out

    def describe(self) -> str:
        heads = [i for i, c in enumerate(self.heads.tolist()) if c]
        return f"ACT heads {heads} beta={self.beta} tau={self.threshold}" if heads else ""


def search_space(spec) -> list[tuple[int, int]]:
    """Layers 2..L-2, every query head (the official code's candidates)."""
    return [(li, hi) for li in range(2, max(2, spec.num_layers - 1)) for hi in range(spec.num_heads)]


@dataclasses.dataclass
class Act(Method):
    name = "act"
    plan_keys = ("heads",)
    summary = "attention calibration: scale hidden attention sinks by beta in searched heads (ACT)"

    heads: list | str | None = param(
        None, "a list of [layer, head] pairs (from `llmpatch calibrate act`) or 'all' (layers 2..L-2)"
    )
    beta: float = param(0.4, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    threshold: float = param(0.1, "a number > 0 (absolute column-score threshold)", lambda v: v > 0)
    decode: bool = param(True, "true or false (reuse the prefill sinks on decode steps)")

    def validate(self, spec):
        self.selected(spec)

    def selected(self, spec) -> list[tuple[int, int]]:
        if self.heads is None:
            raise ParameterError(
                "act: parameter 'heads' is required: pass plan=act.json from `llmpatch calibrate act`, "
                "heads=[[layer, head], ...], heads='all' (every head of layers 2..L-2), or plan='auto' for the "
                "stored or shipped plan (`llmpatch plans`)"
            )
        if isinstance(self.heads, str):
            if self.heads != "all":
                raise ParameterError(f"act: parameter 'heads' must be a list of [layer, head] pairs or 'all', "
                                     f"got {self.heads!r}")  # fmt: skip
            return search_space(spec)
        return check_head_pairs(self.name, self.heads, spec)

    def configure(self, spec, layers):
        for li, hi in self.selected(spec):
            layer = layers[li]
            layer.claim(Kind.CALIBRATION, self.name)
            if layer.calibration is None:
                heads = torch.zeros(spec.num_heads, dtype=torch.bool)
                layer.calibration = Calibration(heads, float(self.beta), float(self.threshold), self.decode)
            layer.calibration.heads[hi] = True
