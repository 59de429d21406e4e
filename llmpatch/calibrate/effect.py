"""retrieval_kv's head choice by measured effect, as `llmpatch calibrate retrieval-effect`.

The training-free analogue of DuoAttention's learned gates (Xiao et al., 2024): for every KV head of the layers
retrieval_kv compresses, the answer loss on dev-split prompts when that KV head alone keeps only sink + recent
and every other head keeps everything, minus the dense loss. A large increase marks a head that needs its full
cache. Prompts are the held-out mix's dev split, answered greedily by the dense model (the test split is never
read). A KV head's effect is given to each of its query heads (retrieval_kv keeps whole KV groups). With
`sliding` (retrieval_kv's parameter) the layers with the model's own sliding window are measured and counted too,
and the rankings compared with it; the plan's provenance says so (`sliding` is not a plan default: retrieval_mask
and kvzip_heads read the same plan and have no such parameter).

Then the rankings the plan holds (copy, mass, effect) are compared by dev accuracy at equal memory: each keeps
`kv_heads` full KV heads (its `top_k` is the fewest query heads that span them; the effect ranking gives a whole
group one figure, so at equal top_k it would keep fewer), on `dev_samples` mix samples under the question-aware
protocol. The plan's default `score` and `top_k` become the best ranking's (ties: effect, then mass, then copy).
The plan's provenance keeps every figure and the cost.
"""

from __future__ import annotations

import time

from ..errors import ParameterError
from ..methods.base import compressed_layers
from ..methods.shared import SCORES, ranked_heads


def effect_scores(
    model, tokenizer, *, samples=4, length=1024, sink=32, recent=128, sliding=False, progress=None
):
    """[layers][query heads]: answer-loss increase when the head's KV head alone is cut to sink + recent."""
    import llmpatch

    from .moa import answer_loss, dense_answers, prompts

    spec = llmpatch.detect(model)
    data = dense_answers(model, tokenizer, prompts(tokenizer, length, samples, seed=7, data="mix"))
    base = answer_loss(model, data, None)
    g = spec.num_heads // spec.num_kv_heads
    every = [(li, h) for li in range(spec.num_layers) for h in range(spec.num_heads)]
    scores = [[0.0] * spec.num_heads for _ in range(spec.num_layers)]
    for li in compressed_layers(spec, sliding):  # the others stay 0: retrieval_kv leaves them as they are
        for kv in range(spec.num_kv_heads):
            keep = [[a, h] for a, h in every if not (a == li and h // g == kv)]
            with llmpatch.patched(
                model, "retrieval_kv", heads=keep, sink=sink, recent=recent, sliding=sliding
            ):
                delta = answer_loss(model, data, None) - base
            for h in range(kv * g, (kv + 1) * g):
                scores[li][h] = delta
            if progress:
                progress({"layer": li, "kv_head": kv, "delta": delta})
    return scores, base


def dev_accuracy(model, tokenizer, params: dict, *, samples: int, length: int, families=None) -> float:
    """retrieval_kv's mean score on the mix's dev split (protocol A)."""
    import llmpatch
    from llmpatch.evals.accuracy import run_sample
    from llmpatch.evals.mix import make_samples

    dev = make_samples(tokenizer, "dev", samples, length, families, start=500)
    with llmpatch.patched(model, "retrieval_kv", **params):
        return sum(run_sample(model, tokenizer, s, "A")["score"] for s in dev) / len(dev)


def top_k_for(table, spec, kv_heads: int, sliding: bool = False) -> int:
    """The fewest best-ranked query heads whose KV groups number `kv_heads` (layers with the model's own sliding
    window count only with `sliding`: else retrieval_kv leaves them as they are)."""
    g = spec.num_heads // spec.num_kv_heads
    counted, groups = set(compressed_layers(spec, sliding)), set()
    for k, (li, h) in enumerate(ranked_heads(table), 1):
        if li in counted:
            groups.add((li, h // g))
            if len(groups) == kv_heads:
                return k
    raise ParameterError(
        f"kv_heads: must be at most {len(groups)} (the KV heads retrieval_kv compresses), got {kv_heads}"
    )


def calibrate(model, tokenizer, plan_params: dict, *, kv_heads: int, samples=4, dev_samples=20, length=1024,
              sink=32, recent=128, sliding=False, families=None, progress=None) -> dict:  # fmt: skip
    """Effect scores added to a retrieval plan's tables, and the ranking chosen by dev accuracy."""
    if "scores" not in plan_params:
        raise ParameterError(
            "plan: needs a retrieval plan (its 'scores' table) from `llmpatch calibrate retrieval`"
        )
    t0 = time.perf_counter()
    effect, base = effect_scores(model, tokenizer, samples=samples, length=length, sink=sink, recent=recent,
                                 sliding=sliding, progress=progress)  # fmt: skip
    profile_s = time.perf_counter() - t0
    tables = {"scores": plan_params["scores"], "mass_scores": plan_params.get("mass_scores"),
              "effect_scores": effect}  # fmt: skip
    import llmpatch

    spec = llmpatch.detect(model)
    accuracy, top_ks = {}, {}
    for score in ("effect", "mass", "copy"):
        if tables[SCORES[score]] is None:
            continue
        top_ks[score] = top_k_for(tables[SCORES[score]], spec, kv_heads, sliding)
        params = {
            **tables,
            "score": score,
            "top_k": top_ks[score],
            "sink": sink,
            "recent": recent,
            "sliding": sliding,
        }
        accuracy[score] = dev_accuracy(
            model, tokenizer, params, samples=dev_samples, length=length, families=families
        )
        if progress:
            progress({"ranking": score, "dev_accuracy": accuracy[score]})
    best = max(accuracy, key=lambda k: accuracy[k])  # dict order breaks ties: effect, mass, copy
    return {"params": {**{k: v for k, v in tables.items() if v is not None}, "score": best, "top_k": top_ks[best]},
            "provenance": {"effect": {"data": "the mix's dev split, answers by the dense model", "samples": samples,
                                      "length": length, "sink": sink, "recent": recent, "sliding": sliding,
                                      "dense_loss": base,
                                      "seconds": profile_s},
                           "ranking_choice": {"kv_heads": kv_heads, "sliding": sliding, "top_k": top_ks, "dev_samples": dev_samples, "families": families, "dev_accuracy": accuracy,
                                              "chosen": best, "total_s": time.perf_counter() - t0}}}  # fmt: skip
