"""The Method base class: a small dataclass of the paper's parameters that validates itself.

A method turns a ModelSpec (and its parameters, from a plan and overrides) into per-layer decisions.
Parameters are declared with `param(default, allowed, check)`; `from_params` type-checks and range-checks them
and names the parameter and the allowed values in every error.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import ClassVar

from ..adapters import ModelSpec
from ..decisions import LayerDecision
from ..errors import ParameterError


def param(default, allowed: str, check: Callable[[object], bool] | None = None):
    return dataclasses.field(default=default, metadata={"allowed": allowed, "check": check})


def _not_finite(value, at: str = "") -> str | None:
    """Where a NaN or infinity sits in a number or nested list (e.g. "[3][1]"), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return at or "the value"
    if isinstance(value, (list, tuple)):
        for i, x in enumerate(value):
            if (where := _not_finite(x, f"{at}[{i}]")) is not None:
                return where
    return None


def _at(value, where: str):
    for i in [int(x) for x in where.strip("[]").split("][") if x.isdigit()]:
        value = value[i]
    return value


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


@dataclasses.dataclass
class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    plan_entry: ClassVar[str | None] = None  # a shared plan entry to read when the plan has none by `name`
    plan_keys: ClassVar[
        tuple[str, ...]
    ] = ()  # parameters a plan supplies; plan="auto" finds one when none is given

    @classmethod
    def from_params(cls, params: dict | None = None) -> Method:
        params = dict(params or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ParameterError(
                f"{cls.name}: unknown parameter {unknown[0]!r}; allowed: {', '.join(fields) or '(none)'}"
            )
        hints = typing.get_type_hints(cls)
        for key, value in params.items():
            if (where := _not_finite(value)) is not None:
                raise ParameterError(f"{cls.name}: parameter {key!r} must hold finite numbers; "
                                     f"{where} is {_at(value, where)}")  # fmt: skip
            f = fields[key]
            allowed = f.metadata.get("allowed", str(hints[key]))
            check = f.metadata.get("check")
            if not _type_ok(value, hints[key]) or (
                check is not None and value is not None and not check(value)
            ):
                raise ParameterError(f"{cls.name}: parameter {key!r} must be {allowed}, got {value!r}")
        return cls(**params)

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, spec: ModelSpec) -> None:
        """Checks that need the model (e.g. a layer index out of range). Raise ParameterError."""

    def configure(self, spec: ModelSpec, layers: list[LayerDecision]) -> None:
        raise NotImplementedError

    def install(self, model, spec: ModelSpec, layers: list[LayerDecision]):
        """Model-level wrappers or caches (after the attention implementation is set); returns an undo callback
        or None. Most methods need none."""
        return None

    @classmethod
    def describe_params(cls) -> list[tuple[str, object, str]]:
        return [(f.name, f.default, f.metadata.get("allowed", "")) for f in dataclasses.fields(cls)]


def check_layers(method: str, layers, spec: ModelSpec) -> list[int]:
    """The layer list a method applies to (None = all), checked against the model."""
    if layers is None:
        return list(range(spec.num_layers))
    bad = [x for x in layers if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < spec.num_layers]
    if bad:
        raise ParameterError(
            f"{method}: parameter 'layers' must hold layer indices in 0..{spec.num_layers - 1}, got {bad[0]!r}"
        )
    return list(layers)


def compressed_layers(spec: ModelSpec, sliding: bool = False) -> list[int]:
    """The layers without the model's own sliding window (a cache method cuts these), or every layer if
    `sliding`. Leaving the local layers is also kvpress's rule for Gemma-3."""
    return [i for i in range(spec.num_layers) if sliding or spec.sliding_window[i] is None]


def full_attention_layers(method: str, layers, spec: ModelSpec) -> list[int]:
    """The layers a method that replaces attention applies to: the given ones (None = every layer without the
    model's own sliding window), refusing sliding-window layers."""
    if layers is None:
        return compressed_layers(spec)
    chosen = check_layers(method, layers, spec)
    local = [i for i in chosen if spec.sliding_window[i] is not None]
    if local:
        raise ParameterError(
            f"{method}: parameter 'layers' may list full-attention layers only; layer {local[0]} has the "
            f"model's own sliding window ({spec.sliding_window[local[0]]})"
        )
    return sorted(chosen)


def check_head_pairs(method: str, heads, spec: ModelSpec) -> list[tuple[int, int]]:
    """A `heads` parameter ([layer, head] pairs), checked against the model; sorted, without repeats."""
    out = []
    for pair in heads:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        if not ok or not (0 <= pair[0] < spec.num_layers and 0 <= pair[1] < spec.num_heads):
            raise ParameterError(
                f"{method}: parameter 'heads' must hold [layer, head] pairs with layer in 0..{spec.num_layers - 1} "
                f"and head in 0..{spec.num_heads - 1}, got {pair!r}"
            )
        out.append((pair[0], pair[1]))
    return sorted(set(out))
