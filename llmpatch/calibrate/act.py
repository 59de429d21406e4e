"""The ACT head search (Yu et al., ICML 2024; docs/METHODS.md §1), as `llmpatch calibrate act`.

Official protocol: candidates are the heads of layers 2..L-2; calibrate one (layer, head) at a time on a small
classification set scored by the label word's log-likelihood, and keep it if the score improves.
Ours, on the generated set of `evals.classify` (sentiment + topic, zero-shot):
- a head with no hidden sink on any training prompt is left out: calibration does not change it (its sink set is
  empty), so trying it costs time and cannot help; the rest are tried in order of how many hidden sinks they
  show, at most `budget` of them;
- greedy: a head is kept when, together with the heads kept so far, it raises the mean log-probability of the
  correct label (normalised over the task's labels) on the train split without lowering train accuracy;
- the held-out split (another seed) reports baseline against calibrated accuracy and log-likelihood, with N.
"""

from __future__ import annotations

import time

import torch

from ..errors import ParameterError


def label_ids(tokenizer, labels: list[str]) -> list[int]:
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in labels]
    if len(set(ids)) != len(ids):
        raise ParameterError(f"labels: {labels} share a first token for this tokenizer")
    return ids


@torch.inference_mode()
def score(model, tokenizer, exs, batch: int = 32) -> dict:
    """Accuracy and mean log-probability of the correct label (log-softmax over the task's label tokens)."""
    correct, logps = 0, []
    ids = {labels: label_ids(tokenizer, list(labels)) for labels in {tuple(e.labels) for e in exs}}
    for i in range(0, len(exs), batch):
        part = exs[i : i + batch]
        enc = tokenizer([e.prompt for e in part], return_tensors="pt", padding=True, add_special_tokens=True)
        mask = enc.attention_mask.to(model.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            enc.input_ids.to(model.device), attention_mask=mask, position_ids=pos, logits_to_keep=1
        )
        last = logits.logits[:, -1].float()
        for row, e in zip(last, part, strict=True):
            lp = torch.log_softmax(row[ids[tuple(e.labels)]], -1)
            correct += int(lp.argmax()) == e.answer
            logps.append(float(lp[e.answer]))
    return {"n": len(exs), "accuracy": correct / len(exs), "label_logprob": sum(logps) / len(logps)}


@torch.inference_mode()
def sink_counts(model, tokenizer, exs, beta: float, threshold: float) -> dict[tuple[int, int], int]:
    """Hidden sinks (beyond the first) per search-space head over the prompts, found by ACT's own rule."""
    from .. import patched

    counts: dict[tuple[int, int], int] = {}
    with patched(model, "act", heads="all", beta=beta, threshold=threshold) as patch:
        for i in range(0, len(exs), 32):
            score(model, tokenizer, exs[i : i + 32])
            for layer in patch.layers:
                calibration = layer.calibration
                if calibration is None or calibration.sinks is None:
                    continue
                found, calibration.sinks = calibration.sinks, None
                per_head = found[1].sum(dim=(0, 2))
                for hi in range(per_head.shape[0]):
                    if bool(calibration.heads[hi]) and int(per_head[hi]):
                        counts[(layer.layer, hi)] = counts.get((layer.layer, hi), 0) + int(per_head[hi])
    return counts


def search(model, tokenizer, *, budget: int = 48, train: int = 48, heldout: int = 96, beta: float = 0.4,
           threshold: float = 0.1, seed: int = 0, progress=None) -> dict:  # fmt: skip
    """Greedy per-head search; returns the kept heads and the train / held-out figures."""
    from .. import patched
    from ..evals.classify import examples
    from ..methods.act import Act

    for name, value, low in (("budget", budget, 1), ("train", train, 2), ("heldout", heldout, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ParameterError(f"{name}: must be an int >= {low}, got {value!r}")
    Act.from_params({"beta": beta, "threshold": threshold})  # the method's own range checks
    t0 = time.perf_counter()
    tr, ho = examples(train, seed), examples(heldout, seed + 1)
    counts = sink_counts(model, tokenizer, tr, beta, threshold)
    candidates = sorted(counts, key=lambda k: (-counts[k], k))[:budget]
    base = score(model, tokenizer, tr)
    best, kept, tried = base, [], []
    for li, hi in candidates:
        heads = [list(x) for x in kept] + [[li, hi]]
        with patched(model, "act", heads=heads, beta=beta, threshold=threshold):
            s = score(model, tokenizer, tr)
        keep = s["label_logprob"] > best["label_logprob"] and s["accuracy"] >= best["accuracy"]
        tried.append({"head": [li, hi], "hidden_sinks": counts[(li, hi)], "kept": keep, **s})
        if keep:
            kept.append((li, hi))
            best = s
        if progress:
            progress(tried[-1])
    search_s = time.perf_counter() - t0
    held_base = score(model, tokenizer, ho)
    held_cal = held_base
    if kept:
        with patched(model, "act", heads=[list(x) for x in kept], beta=beta, threshold=threshold):
            held_cal = score(model, tokenizer, ho)
    return {
        "heads": [list(x) for x in kept],
        "beta": beta,
        "threshold": threshold,
        "train": {"baseline": base, "calibrated": best},
        "heldout": {"baseline": held_base, "calibrated": held_cal},
        "candidates_with_hidden_sinks": len(counts),
        "tried": tried,
        "search_s": search_s,
        "total_s": time.perf_counter() - t0,
        "data": {"generator": "llmpatch.evals.classify", "train_seed": seed, "heldout_seed": seed + 1},
    }


def to_plan(result: dict, spec):
    from ..plan import Plan, provenance

    params = {"heads": result["heads"], "beta": result["beta"], "threshold": result["threshold"]}
    prov = {k: v for k, v in result.items() if k not in ("heads", "beta", "threshold")}
    return Plan(spec.fingerprint(), [{"name": "act", "params": params}], provenance(calibration=prov))
