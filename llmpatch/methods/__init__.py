"""Method registry: a new method is one file plus one line here."""

from __future__ import annotations

from ..errors import ParameterError
from .base import Method
from .dense import Dense
from .sink_window import SinkWindow

REGISTRY: dict[str, type[Method]] = {
    Dense.name: Dense,
    SinkWindow.name: SinkWindow,
}


def get(name: str) -> type[Method]:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ParameterError(f"method: unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "get"]
