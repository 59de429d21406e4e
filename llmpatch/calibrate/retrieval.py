"""Retrieval-head detection (Wu et al., 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality"; docs/METHODS.md §5), on any model llmpatch can patch.

Protocol, as in the official code (nightdessert/Retrieval_Head):
- NIAH prompts from the eval suite's generator (`evals.suites.Niah`), over a grid of lengths x depths;
- prefill on the model's fast path, then greedy decoding; at every decode step, for every (layer, head), the key
  with the highest attention score (argmax of q.k: softmax and softcap keep the order, so no probabilities are
  materialised) is a hit when it lies in the needle's token span and the token there equals the token this step
  generates; a hit adds 1 / (needle tokens);
- a sample counts only when the output recalls > 50% of the needle's words (ROUGE-1 recall > 0.5);
- a head's score is the mean over counted samples; retrieval heads score > 0.1.

Departures: our needle is the NIAH suite's ("The best thing to do in {city} is to {activity}.") in generated,
public-domain prose, not Paul Graham essays; the grid defaults to 2 lengths x 5 depths (a few samples find the
strongest heads, as the paper notes). Decoding stops at the needle's length + 8 tokens or at EOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ParameterError, PlanError
from ..kernels import rules

RETRIEVAL_THRESHOLD = 0.1
PLAN_ENTRY = "retrieval_heads"


def top_keys(query, key, mask, decision, scale) -> torch.Tensor:
    """[B, H] absolute key slot each query head attends to most on this decode step (the last query row)."""
    b, h = query.shape[:2]
    return last_row_scores(query, key, mask, decision, scale).argmax(-1).view(b, h) + mask.kv_offset


def last_row_scores(query, key, mask, decision, scale, softcap=None) -> torch.Tensor:
    """[B, Hkv, G, Nk] attention logits of the last query row, -inf where the key is not visible."""
    b, h, _, d = query.shape
    hkv, nk = key.shape[1], key.shape[2]
    q = query[:, :, -1].float().view(b, hkv, h // hkv, d)
    scores = torch.einsum("bkgd,bknd->bkgn", q, key.float()) * (scale if scale is not None else d**-0.5)
    q_pos, k_pos = rules.token_positions(b, 1, nk, mask.start, mask.key_padding, key.device)
    invalid = ~rules.visible(q_pos, k_pos, decision.sliding_window)  # [B, Nk]
    return rules.soft_cap(scores, softcap).masked_fill_(invalid[:, None, None, :], float("-inf"))


class _Recorder:
    """Collects, per layer for one decode step, each head's argmax key slot and its attention mass on the
    needle span [s0, s1) (absolute slots)."""

    def __init__(self, num_layers: int, s0: int, s1: int):
        self.rows: list[torch.Tensor | None] = [None] * num_layers
        self.mass: list[torch.Tensor | None] = [None] * num_layers
        self.span = (s0, s1)

    def __call__(self, decision, query, key, mask, scale, softcap=None):
        scores = last_row_scores(query, key, mask, decision, scale, softcap)[0].flatten(0, 1)  # [H, Nk]
        self.rows[decision.layer] = scores.argmax(-1) + mask.kv_offset
        lo, hi = (max(0, x - mask.kv_offset) for x in self.span)
        self.mass[decision.layer] = torch.softmax(scores, -1)[:, lo:hi].sum(-1)


def needle_span(tokenizer, prompt: str, needle: str) -> tuple[list[int], int, int]:
    """The prompt's token ids and the [start, end) token span covering `needle`."""
    at = prompt.find(needle)
    if at < 0:
        raise ParameterError("needle: the sample's needle is not in its prompt")
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    inside = [i for i, (s, e) in enumerate(offsets) if e > at and s < at + len(needle)]
    return list(enc["input_ids"]), inside[0], inside[-1] + 1


def rouge1_recall(reference: str, output: str) -> float:
    from ..evals.suites import words

    want, got = words(reference), set(words(output))
    return sum(w in got for w in want) / max(len(want), 1)


@dataclass
class Detection:
    scores: list[list[float]]  # [layers][heads], the copy-paste score: mean over counted samples
    samples: list[dict] = field(default_factory=list)
    mass_scores: list[list[float]] | None = (
        None  # mean attention mass on the needle while answering  # per sample: length, depth, counted, output, per-head
    )

    @property
    def counted(self) -> int:
        return sum(s["counted"] for s in self.samples)

    def retrieval_heads(self, threshold: float = RETRIEVAL_THRESHOLD) -> list[tuple[int, int, float]]:
        heads = [
            (li, hi, s) for li, row in enumerate(self.scores) for hi, s in enumerate(row) if s > threshold
        ]
        return sorted(heads, key=lambda x: -x[2])


@torch.inference_mode()
def score_sample(model, tokenizer, sample, needle: str, max_new_tokens: int) -> dict:
    """Greedy decode of one NIAH sample with argmax recording; per-head hit sums for this sample."""
    from ..caches import cache_argument, output_cache
    from ..patch import current_patch

    patch = current_patch(model)
    ids, s0, s1 = needle_span(tokenizer, sample.prompt, needle)
    recorder = _Recorder(len(patch.layers), s0, s1)
    num_heads = patch.spec.num_heads
    hits = torch.zeros(len(patch.layers), num_heads)
    mass = torch.zeros(len(patch.layers), num_heads)
    steps = 0
    device = model.device
    out = model(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    nxt = int(out.logits[0, -1].argmax())
    generated = [nxt]
    eos = set(_as_list(model.generation_config.eos_token_id))
    for layer in patch.layers:
        layer.taps.observer = recorder
    try:
        for _ in range(max_new_tokens - 1):
            if nxt in eos:
                break
            out = model(
                torch.tensor([[nxt]], device=device),
                use_cache=True,
                **{cache_argument(model): output_cache(out)},
            )
            nxt = int(out.logits[0, -1].argmax())
            for li, row in enumerate(recorder.rows):  # this step's argmax keys vs the token it generates
                pos = row.cpu()
                inside = (pos >= s0) & (pos < s1)
                tok = torch.tensor([ids[p] if s0 <= p < s1 else -1 for p in pos.tolist()])
                hits[li] += (inside & (tok == nxt)).float() / (s1 - s0)
                mass[li] += recorder.mass[li].cpu()
            steps += 1
            generated.append(nxt)
    finally:
        for layer in patch.layers:
            layer.taps.observer = None
    text = tokenizer.decode([t for t in generated if t not in eos], skip_special_tokens=True)
    recall = rouge1_recall(needle, text)
    return {"length": sample.length, "depth": sample.depth, "prompt_tokens": len(ids), "output": text,
            "rouge1_recall": recall, "counted": recall > 0.5, "needle_tokens": s1 - s0,
            "hits": hits.tolist(), "mass": (mass / max(steps, 1)).tolist()}  # fmt: skip


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def detect(model, tokenizer, lengths=(1024, 2048), depths=(0.1, 0.3, 0.5, 0.7, 0.9), samples=1, seed=0,
           haystack=None, progress=None) -> Detection:  # fmt: skip
    """Score every head of `model` (unpatched) over NIAH samples; the model is left as it was."""
    from .. import apply
    from ..evals.runner import check_depths, check_lengths
    from ..evals.suites import Niah

    lengths, depths = check_lengths(model, list(lengths)), check_depths(list(depths))
    if not isinstance(samples, int) or samples < 1:
        raise ParameterError(f"samples: must be an int >= 1, got {samples!r}")
    suite = Niah()
    patch = apply(model, "dense")
    records, total, mass = [], None, None
    try:
        for n in lengths:
            for d in depths:
                for i in range(samples):
                    s = suite.sample(tokenizer, n, i, seed=seed, depth=d, haystack=haystack)
                    needle = s.answer_text  # the needle sentence itself
                    rec = score_sample(
                        model,
                        tokenizer,
                        s,
                        needle,
                        len(tokenizer(needle, add_special_tokens=False).input_ids) + 8,
                    )
                    records.append(rec)
                    if rec["counted"]:
                        h, w = torch.tensor(rec["hits"]), torch.tensor(rec["mass"])
                        total = h if total is None else total + h
                        mass = w if mass is None else mass + w
                    if progress:
                        progress(rec)
    finally:
        patch.remove()
    spec = patch.spec
    counted = sum(r["counted"] for r in records)
    zeros = torch.zeros(spec.num_layers, spec.num_heads)
    as_list = lambda t: [[round(float(x), 6) for x in row] for row in t]  # noqa: E731
    return Detection(as_list(total / counted if counted else zeros), records,
                     as_list(mass / counted if counted else zeros))  # fmt: skip


def to_plan(detection: Detection, spec, **prov):
    """A plan whose `retrieval_heads` entry carries the scores (read by retrieval_mask and retrieval_kv)."""
    from ..plan import Plan, provenance

    return Plan(
        model=spec.fingerprint(),
        methods=[
            {"name": PLAN_ENTRY, "params": {"scores": detection.scores, "mass_scores": detection.mass_scores}}
        ],  # fmt: skip
        provenance=provenance(**prov),
    )


def import_official(path: str | Path, spec):
    """The official {"layer-head": [scores per sample]} JSON as a plan (mean score per head)."""
    from ..plan import Plan, provenance

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"official: cannot read {str(path)!r} as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PlanError(f"official: {str(path)!r} must hold a {{'layer-head': [scores]}} object")
    scores = [[0.0] * spec.num_heads for _ in range(spec.num_layers)]
    for k, v in data.items():
        try:
            li, hi = (int(x) for x in k.split("-"))
            vals = [float(x) for x in (v if isinstance(v, list) else [v])]
        except (ValueError, TypeError):
            raise PlanError(f"official: key {k!r} must be 'layer-head' with a list of numbers") from None
        if not (0 <= li < spec.num_layers and 0 <= hi < spec.num_heads):
            raise PlanError(
                f"official: head {k!r} is outside this model ({spec.num_layers} layers x {spec.num_heads} "
                "heads); the scores were made for another model"
            )
        scores[li][hi] = sum(vals) / len(vals) if vals else 0.0
    return Plan(spec.fingerprint(), [{"name": PLAN_ENTRY, "params": {"scores": scores}}],
                provenance(imported_from=str(path)))  # fmt: skip


def export_official(scores: list[list[float]], path: str | Path) -> Path:
    path = Path(path)
    data = {f"{li}-{hi}": [s] for li, row in enumerate(scores) for hi, s in enumerate(row)}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def heatmap(scores: list[list[float]], path: str | Path, title: str = "retrieval scores") -> Path | None:
    """The scores as a PNG heatmap; None (plots skipped, with a note) without matplotlib (the `eval` extra)."""
    from ..evals.plots import head_heatmap

    return head_heatmap(scores, path, title)
