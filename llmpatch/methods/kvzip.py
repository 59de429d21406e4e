"""KVzip: query-agnostic KV eviction by context reconstruction (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache
Compression with Context Reconstruction"; official code snu-mllab/KVzip), with real eviction on the ring cache.

After the prompt is prefilled (densely), the model is asked to repeat it: "Repeat the previous context exactly."
then the prompt itself as the answer, teacher-forced, in chunks of `chunk` tokens (a later chunk's instruction
ends with the previous chunk's last 8 tokens). A prompt token's importance for a KV head is the largest
attention probability any reconstruction query of its group gives it, the softmax taken over the sink, the chunk
being repeated and the repeat itself (the paper's). The `ratio` of the prompt's KV entries with the lowest
importance are evicted model-wide, so layers and KV heads keep different numbers (the paper's non-uniform
budgets); the first `sink` and the last `window` prompt tokens are always kept. Each KV head also has a ring of
`decode` slots (default: `window`) for what comes after the prompt, a later question and the answer (outside the
ratio, as kvpress appends; KV saved counts it). The kept tokens are pinned in the per-KV-head ring cache
(`RingLayer.set_pins`), so the memory is really freed (kvpress's KVzipPress masks them instead).

Defaults: ratio 0.67, sink 4 (the paper's), window 64, decode = window, chunk 2048 (the paper's), layerwise false.
Departures: what comes after the prompt keeps its last `decode` tokens (the paper keeps all; a question asked
after the compression plus its answer must fit, or the question's start is dropped while answering); each row
of a batch is scored alone (its own budget, as batch 1); the repeat covers the whole prompt after the sink (the
paper skips the chat template's system prefix); layers with the model's own sliding window keep their own cache
(their keys still feed the repeat passes). The scoring passes cost about three times the prefill's attention again; `prefill
attention computed` counts them (docs/METHODS.md §9).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..decisions import Kind
from ..errors import ParameterError
from ..kernels import rules
from ..sharding import all_gather_heads
from .base import Method, compressed_layers, param
from .shared import install_after_prompt

INSTRUCTION = ("\n\nRepeat the previous context exactly.",
               "\n\nRepeat the part of the previous context exactly, starting with")  # fmt: skip
OVERLAP = 8  # tokens of the previous chunk that start a later chunk's instruction


@dataclasses.dataclass
class KVzip(Method):
    name = "kvzip"
    summary = (
        "evicts the prompt KV the model needs least to repeat the prompt (query-agnostic, per-head budgets)"
    )

    ratio: float = param(0.67, "a number in [0, 1) (share of the prompt's KV entries evicted, model-wide)",
                         lambda v: 0 <= v < 1)  # fmt: skip
    sink: int = param(4, "an int >= 1", lambda v: v >= 1)
    window: int = param(64, "an int >= 1 (the last prompt tokens always kept)", lambda v: v >= 1)
    decode: int | None = param(None, "null (= window) or an int >= 1 (ring slots for the tokens after the prompt: "
                               "a later question, the answer)", lambda v: v is None or v >= 1)  # fmt: skip
    chunk: int = param(2048, "an int >= 1 (prompt tokens repeated per scoring pass)", lambda v: v >= 1)
    layerwise: bool = param(False, "false (one budget for the model) or true (the same share in every layer)")
    instruction: list | None = param(None, "null (the model's tokenizer encodes the paper's instruction and chat "
                                     "turn) or a list of token ids used before every chunk instead")  # fmt: skip

    def configure(self, spec, layers):
        h = spec.num_heads
        self._managed = compressed_layers(spec)
        for i in self._managed:  # the prompt attends densely (tail = all); the cache keeps sink + pins + ring
            ring = torch.full((h,), self.decode or self.window)
            layers[i].set_static(self.name, torch.full((h,), self.sink), ring, 2**62)
            layers[i].claim(Kind.HEAD_MASK, self.name)  # the ring cache path does not apply it yet
        for layer in layers:  # every layer's prompt keys feed the repeat passes
            layer.select = self._stash
        self._layers, self._stashed, self._busy = layers, {}, False

    def install(self, model, spec, layers):
        inner = decoder(model)

        def before(ids, fresh):
            self._ids = ids

        def after(out, cache):
            if self._stashed and not self._busy:
                try:
                    self._busy = True
                    self._compress(inner, cache, spec)
                finally:
                    self._busy, self._stashed = False, {}

        return install_after_prompt(model, spec, layers, before, after)

    def _stash(self, decision, q, k, v, mask, scale, softcap) -> None:
        """On the prompt: keep its keys and values (and each row's first slot) for the scoring passes."""
        if not self._busy:
            self._stashed[decision.layer] = (k, v, mask.row_start(q.shape[0], q.device).tolist())

    def _compress(self, inner, cache, spec) -> None:
        ids = self._ids
        if ids is None:
            raise ParameterError(
                "kvzip: the prompt must come as input_ids (it is repeated to score the cache)"
            )
        starts = next(iter(self._stashed.values()))[2]
        lead = lead_ids(inner, self.instruction)
        chosen = []
        for row, start in enumerate(starts):  # each row alone, so a batch row keeps what batch 1 keeps
            prompt = ids[row : row + 1, start:]
            stash = {i: (k[row : row + 1, :, start:], v[row : row + 1, :, start:]) for i, (k, v, _) in
                     self._stashed.items()}  # fmt: skip
            # tensor parallel: every rank chooses on all heads' scores (one model-wide budget), keeps its own
            scores = all_gather_heads(self._score(inner, prompt, stash, lead, spec), spec.shard, 1)
            chosen.append(self._choose(scores)[:, spec.local_kv_slice()])
        hkv = spec.local_kv_heads
        for j, i in enumerate(self._managed):
            k, v, _ = self._stashed[i]
            counts = [max(int(c[j, h].sum()) for c in chosen) for h in range(hkv)]
            index = torch.full((len(starts), hkv, max(counts)), -1, dtype=torch.long)
            for row, (c, start) in enumerate(zip(chosen, starts, strict=True)):
                for h in range(hkv):
                    kept = c[j, h].nonzero().flatten() + start
                    index[row, h, : kept.numel()] = kept
            cache.layers[i].set_pins(counts, keep_ring=False)  # the ring held the recent tokens: now pinned
            cache.layers[i].pin(index.to(k.device), k, v)

    def _score(self, inner, ids, stash, lead, spec) -> torch.Tensor:
        return repeat_scores(inner, ids, stash, lead, self._layers, self._managed, self.sink, self.chunk,
                             spec.local_kv_heads)  # fmt: skip

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """[layers, Hkv, N] bool: the last `window` prompt tokens and the best-scored others, so that with the
        sink they are (1 - ratio) of the prompt's entries (the sink itself stays in its own slots)."""
        layers, hkv, n = scores.shape
        recent = torch.zeros(n, dtype=torch.bool)
        recent[max(self.sink, n - self.window) :] = True
        budget = int((1 - self.ratio) * layers * hkv * n) - layers * hkv * (
            min(self.sink, n) + int(recent.sum())
        )
        free = scores.clone()
        free[..., : self.sink], free[..., recent] = -1.0, -1.0  # in the sink already, pinned anyway
        if self.layerwise:
            top = free.flatten(1).topk(min(max(0, budget // layers), hkv * n), dim=1).indices
            chosen = torch.zeros(layers, hkv * n, dtype=torch.bool).scatter(1, top, True)
        else:
            chosen = torch.zeros(free.numel(), dtype=torch.bool)
            chosen[free.flatten().topk(min(max(0, budget), free.numel())).indices] = True
        return (chosen.view_as(free) & (free >= 0)) | recent


def decoder(model):
    """The model's decoder stack (what the repeat passes run, without the LM head)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def lead_ids(inner, instruction=None) -> tuple[list[int], list[int], list[int]]:
    """Token ids before the first chunk, before a later one (then the previous chunk's last tokens), and the
    assistant turn's opening after either: `instruction` for both if given, else the paper's in the chat turn."""
    if instruction is not None:
        return list(instruction), list(instruction), []
    return tuple(list(part) for part in _paper_lead(getattr(inner.config, "_name_or_path", "")))


@functools.lru_cache(maxsize=8)  # the tokenizer is read once per model path
def _paper_lead(path: str) -> tuple[tuple[int, ...], ...]:
    tok = _tokenizer(path)
    first, later = (tok.encode(t, add_special_tokens=False) for t in INSTRUCTION)
    return tuple(first), tuple(later), tuple(_assistant_prefix(tok))


def repeat_scores(inner, ids, stash, lead, layers, managed, sink: int, chunk: int, hkv: int) -> torch.Tensor:
    """[len(managed), Hkv, N]: each prompt token's importance for each KV head of the `managed` layers, from the
    repeat passes over one row's prompt `ids` [1, N] whose keys and values are `stash` {layer: (k, v)}."""
    from transformers import DynamicCache

    from ..caches import cache_argument

    n = ids.shape[1]
    scores = torch.zeros(len(managed), hkv, n)
    saved = [(layer.taps.profiler, layer.taps.tracker) for layer in layers]
    first, later, suffix = lead
    try:
        for lo in range(min(sink, n), n, chunk):
            hi = min(lo + chunk, n)
            head = first if lo == sink else later + ids[0, max(sink, lo - OVERLAP) : lo].tolist()
            rep = torch.cat(
                [torch.tensor([head + suffix], dtype=ids.dtype, device=ids.device), ids[:, lo:hi]], 1
            )
            for layer, (_, tracker) in zip(layers, saved, strict=True):
                row = managed.index(layer.layer) if layer.layer in managed else None
                layer.taps.profiler, layer.taps.tracker = _scorer(scores, row, sink, lo, hi, n, tracker), None
            replay = DynamicCache()  # the row's prompt keys and values, fresh for each pass
            for i, (k, v) in sorted(stash.items()):
                replay.update(k, v, i)
            pos = torch.arange(n, n + rep.shape[1], device=ids.device)[None]
            inner(input_ids=rep, position_ids=pos, use_cache=True, **{cache_argument(inner): replay})
    finally:
        for layer, (profiler, tracker) in zip(layers, saved, strict=True):
            layer.taps.profiler, layer.taps.tracker = profiler, tracker
    return scores


def _scorer(scores, row, sink: int, lo: int, hi: int, n: int, tracker):
    """The profiler tap of one scoring pass: the layer's exact output and, on a managed layer (`row` of
    `scores`), each cached prompt key's importance: the max over the group's repeat queries of its probability
    among sink + chunk + repeat keys."""
    from ..kernels import density, dispatch

    def tap(decision, q, k, v, scale, softcap):
        b, h, nq, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        out = dispatch.attention(q, k, v, backend=decision.backend, scale=scale, softcap=softcap,
                                 sliding_window=decision.sliding_window)[0]  # fmt: skip
        if tracker is not None:  # the scoring's scores count as computed, not in the dense prefill's total
            seen = density.causal_count(
                b, h, nq, k.shape[2], sliding_window=decision.sliding_window, device=q.device
            )
            tracker.add(seen, 0)
        if row is None:
            return out
        keys = torch.cat([k[:, :, : min(sink, lo)], k[:, :, lo:hi], k[:, :, n:]], 2).float()
        s = min(sink, lo)
        causal = torch.ones(nq, nq, dtype=torch.bool, device=q.device).tril()
        for kv in range(hkv):
            logits = (
                q[0, kv * g : (kv + 1) * g].float()
                @ keys[0, kv].T
                * (scale if scale is not None else d**-0.5)
            )
            logits = rules.soft_cap(logits, softcap)
            logits[..., -nq:] = logits[..., -nq:].masked_fill(~causal, float("-inf"))
            probs = logits.softmax(-1)[..., s : s + hi - lo]
            scores[row, kv, lo:hi] = probs.amax(dim=(0, 1)).cpu()
        return out

    return tap


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the same user-facing problem
        raise ParameterError(
            f"kvzip: needs the model's tokenizer for its repeat instruction; cannot load it from {path!r} ({exc})"
        ) from None


def _assistant_prefix(tok) -> list[int]:
    """The tokens that close a user turn and open the assistant's (the chat template's), or a newline."""
    if tok.chat_template is None:
        return tok.encode("\n", add_special_tokens=False)
    mark = "\x00MARK\x00"
    text = tok.apply_chat_template(
        [{"role": "user", "content": mark}], add_generation_prompt=True, tokenize=False
    )
    return tok.encode(text.split(mark, 1)[1], add_special_tokens=False)
