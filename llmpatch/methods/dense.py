"""Dense: every head attends to every causal key. For tests and baselines.

Through llmpatch's attention function it must give the same logits as the unpatched model.
"""

from __future__ import annotations

import dataclasses

from ..decisions import Kind
from .base import Method


@dataclasses.dataclass
class Dense(Method):
    name = "dense"
    summary = "full causal attention through llmpatch's attention path (baseline and parity tests)"

    def configure(self, spec, layers):
        for layer in layers:
            layer.claim(Kind.PATTERN, self.name)
