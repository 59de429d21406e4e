"""Method registry: a new method is one file plus one line here."""

from __future__ import annotations

from ..errors import ParameterError
from .act import Act
from .base import Method
from .chunkkv import ChunkKV
from .dense import Dense
from .dhsa import DHSA
from .kvzip import KVzip
from .kvzip_heads import KVzipHeads
from .longheads import LongHeads
from .moa import MoA
from .moa_chunkkv import MoAChunkKV
from .reform import Reform
from .reform_zip import ReformZip
from .retrieval_kv import RetrievalKV
from .retrieval_mask import RetrievalMask
from .sink_window import SinkWindow
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

REGISTRY: dict[str, type[Method]] = {
    Dense.name: Dense,
    SinkWindow.name: SinkWindow,
    RetrievalMask.name: RetrievalMask,
    Act.name: Act,
    RetrievalKV.name: RetrievalKV,
    MoA.name: MoA,
    StreamingLLM.name: StreamingLLM,
    LongHeads.name: LongHeads,
    DHSA.name: DHSA,
    SnapKV.name: SnapKV,
    ChunkKV.name: ChunkKV,
    MoAChunkKV.name: MoAChunkKV,
    KVzip.name: KVzip,
    KVzipHeads.name: KVzipHeads,
    Reform.name: Reform,
    ReformZip.name: ReformZip,
}


def get(name: str) -> type[Method]:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ParameterError(f"method: unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "get"]
