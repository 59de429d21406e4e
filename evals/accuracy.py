"""`llmpatch bench accuracy`: the mix (`mix.py`) through methods x protocols, resumable, with 95% intervals.

Protocols, as in kvpress:
- A, question-aware: the whole prompt (context + question) is one prefill, then greedy decoding;
- B, query-agnostic: the context is prefilled (and the cache cut to the method's spans), then the question's
  tokens run as a second call over that cache, then greedy decoding.
Each sample writes one JSON line to `<out>/<label>.<protocol>.jsonl` (score, output, KV saved, the share of the
dense prefill attention computed, prefill time); a rerun skips the seeds already there, so a sweep can run in
parts. `report()` reads every such file in a folder (kvpress's too: `benchmarks/peers/kvpress_mix.py` writes the
same lines) and writes `summary.md`, `summary.json` and an accuracy-vs-KV-saved PNG.

Recipe (YAML):
    model: smollm2-135m
    mix: {split: test, samples: 30, length: 4096}   # families: [...] to narrow
    methods:
      - {label: streamingllm-50, method: streamingllm, params: {density: 0.5}, protocols: [A, B]}
The unpatched model runs first as `dense` (protocol A; for dense, B gives the same tokens).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from llmpatch.errors import ParameterError

from .mix import FAMILIES, MixSample, make_sample, score

PROTOCOLS = ("A", "B")
RECIPE_KEYS = {"model", "mix", "methods", "description", "dtype"}
MIX_KEYS = {"split", "samples", "length", "families"}
METHOD_KEYS = {"label", "method", "params", "plan", "protocols"}


@dataclass
class Point:
    label: str
    methods: list[str] | None  # None: the unpatched model
    params: dict = field(default_factory=dict)
    plan: str | None = None
    protocols: tuple[str, ...] = ("A",)

    def apply(self, model):
        import llmpatch

        return None if self.methods is None else llmpatch.apply(model, self.methods, self.plan, **self.params)


@dataclass
class AccuracyRecipe:
    path: str
    model: str
    split: str
    samples: int
    length: int
    families: list[str]
    points: list[Point]
    dtype: str | None = None
    raw: dict = field(default_factory=dict)

    @property
    def configs(self) -> list[Point]:  # read by recipes.check_methods
        return self.points


def _err(path, key, msg):
    return ParameterError(f"recipe {path}: key {key!r} {msg}")


def is_mix_recipe(path) -> bool:
    """Whether a recipe file is a mix recipe (a `mix` key) rather than a suites recipe."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "mix" in data


def load(path) -> AccuracyRecipe:
    from .recipes import method_entry, read_yaml

    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict) or "model" not in data or "mix" not in data:
        raise ParameterError(f"recipe {path}: must be a YAML mapping with keys {sorted(RECIPE_KEYS)}")
    bad = sorted(set(data) - RECIPE_KEYS)
    if bad:
        raise _err(path, bad[0], f"is not a key; allowed: {', '.join(sorted(RECIPE_KEYS))}")
    mix = data["mix"] or {}
    bad = sorted(set(mix) - MIX_KEYS) if isinstance(mix, dict) else ["mix"]
    if bad:
        raise _err(path, f"mix.{bad[0]}", f"is not a mix key; allowed: {', '.join(sorted(MIX_KEYS))}")
    split, samples, length = mix.get("split", "test"), mix.get("samples", 30), mix.get("length", 4096)
    if split not in ("dev", "test"):
        raise _err(path, "mix.split", f"must be dev or test, got {split!r}")
    for key, v, lo in (("samples", samples, 1), ("length", length, 256)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise _err(path, f"mix.{key}", f"must be an int >= {lo}, got {v!r}")
    families = mix.get("families") or list(FAMILIES)
    if not isinstance(families, list) or any(f not in FAMILIES for f in families):
        raise _err(path, "mix.families", f"must list families from {', '.join(FAMILIES)}, got {families!r}")
    points = [Point("dense", None)]
    for i, entry in enumerate(data.get("methods") or []):
        label, methods, params, plan = method_entry(path, i, entry, METHOD_KEYS, {p.label for p in points})
        protocols = tuple(entry.get("protocols") or ["A"])
        if any(p not in PROTOCOLS for p in protocols):
            raise _err(path, f"methods[{i}].protocols", f"must list A and/or B, got {list(protocols)!r}")
        points.append(Point(label, methods, params, plan, protocols))
    return AccuracyRecipe(str(path), data["model"], split, samples, length, families, points, data.get("dtype"),
                          data)  # fmt: skip


class _Counts:
    """(computed, causal) attention scores after each model forward, from a patch's sparsity tracker."""

    def __init__(self, model, tracker):
        self.tracker, self.after = tracker, []
        self.handle = model.register_forward_hook(self._post)

    def _post(self, *_):
        t = self.tracker
        self.after.append((t.computed, t.causal) if t is not None else None)


@torch.inference_mode()
def run_sample(model, tokenizer, sample: MixSample, protocol: str, tracker=None) -> dict:
    """One greedy answer under `protocol`; returns the record written for it."""
    from transformers import DynamicCache

    from llmpatch.caches import cache_argument, dense_kv_bytes, kv_bytes, output_cache

    dev = model.device
    ctx = torch.tensor([sample.context_ids], device=dev)
    ids = torch.tensor([sample.context_ids + sample.question_ids], device=dev)
    if tracker is not None:
        tracker.reset()
    counts = _Counts(model, tracker)
    name = cache_argument(model)
    kw = dict(max_new_tokens=sample.max_new_tokens, do_sample=False, return_dict_in_generate=True,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)  # fmt: skip
    try:
        t0 = time.perf_counter()
        if protocol == "A":
            out = model.generate(ids, **kw)
            prefill_calls = 1
        else:  # the context alone, then the question over the cut cache
            cache = DynamicCache(config=model.config)
            model(ctx, use_cache=True, logits_to_keep=1, **{name: cache})
            out = model.generate(ids, **{name: cache}, **kw)
            prefill_calls = 2
        seconds = time.perf_counter() - t0
    finally:
        counts.handle.remove()
    cache = output_cache(out)
    used, dense = kv_bytes(cache), dense_kv_bytes(cache)
    new = out.sequences[0, ids.shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    pre = counts.after[prefill_calls - 1] if len(counts.after) >= prefill_calls else None
    return {
        "family": sample.family, "split": sample.split, "index": sample.index, "seed": sample.seed,
        "source": sample.source, "n_tokens": sample.n_tokens, "answers": sample.answers, "output": text,
        "score": score(sample.answers, text), "kv_saved": 1 - used / dense if dense else 0.0,
        "prefill_computed": pre[0] / pre[1] if pre and pre[1] else 1.0, "seconds": seconds,
        "new_tokens": int(new.numel()),
    }  # fmt: skip


def done_seeds(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    return {json.loads(line)["seed"] for line in path.read_text().splitlines() if line.strip()}


def run(model, tokenizer, recipe: AccuracyRecipe, out: Path, *, only=None, progress=None, meta=None) -> None:
    """Every point x protocol over the recipe's samples, appending to `<out>/<label>.<protocol>.jsonl`."""
    out.mkdir(parents=True, exist_ok=True)
    samples = [make_sample(tokenizer, recipe.split, i, recipe.length, recipe.families)
               for i in range(recipe.samples)]  # fmt: skip
    sample_file = out / f"samples.{recipe.split}.jsonl"  # the exact token ids, for the peer scripts
    if not sample_file.is_file() or len(sample_file.read_text().splitlines()) < len(samples):
        sample_file.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in samples))
    points = [p for p in recipe.points if only is None or p.label in only]
    todo = [(p, proto) for p in points for proto in p.protocols]
    task = progress.add_task("mix", total=len(todo) * len(samples)) if progress else None
    for point, proto in todo:
        path = out / f"{point.label}.{proto}.jsonl"
        have = done_seeds(path)
        meta_path = out / f"{point.label}.{proto}.meta.json"
        if not meta_path.is_file():
            meta_path.write_text(json.dumps({**(meta or {}), "label": point.label, "methods": point.methods,
                                             "params": point.params, "plan": point.plan, "protocol": proto,
                                             "split": recipe.split, "length": recipe.length}, indent=2) + "\n")  # fmt: skip
        patch = point.apply(model)
        tracker = patch.track_sparsity() if patch is not None else None
        try:
            for s in samples:
                if s.seed not in have:
                    rec = run_sample(model, tokenizer, s, proto, tracker)
                    with path.open("a") as f:
                        f.write(json.dumps({"label": point.label, "protocol": proto, **rec}) + "\n")
                if progress:
                    progress.update(task, advance=1, description=f"{point.label} {proto}")
        finally:
            if patch is not None:
                patch.remove()


def interval(scores: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (fixed seed, so a report is reproducible)."""
    if len(scores) < 2:
        return (scores[0], scores[0]) if scores else (float("nan"), float("nan"))
    rng = random.Random(0)
    n = len(scores)
    means = sorted(statistics.fmean(rng.choices(scores, k=n)) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def summarize(folder: Path) -> list[dict]:
    """One row per (label, protocol) file in `folder`."""
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        if path.name.startswith("samples."):
            continue
        by_seed = {}  # a sample written twice (two runs appending to one file) counts once
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_seed.setdefault(rec["seed"], rec)
        recs = list(by_seed.values())
        if not recs:
            continue
        for r in recs:  # one scoring rule for every toolkit: peers write outputs, the score is made here
            r["score"] = score(r["answers"], r["output"])
        scores = [r["score"] for r in recs]
        lo, hi = interval(scores)
        fams = sorted({r["family"] for r in recs})
        rows.append({
            "label": recs[0]["label"], "protocol": recs[0]["protocol"], "n": len(recs),
            "accuracy": statistics.fmean(scores), "ci95": [lo, hi],
            "kv_saved": statistics.fmean(r["kv_saved"] for r in recs),
            "prefill_computed": statistics.fmean(r["prefill_computed"] for r in recs),
            "seconds": statistics.fmean(r["seconds"] for r in recs),
            "by_family": {f: statistics.fmean(r["score"] for r in recs if r["family"] == f) for f in fams},
            "toolkit": recs[0].get("toolkit", "llmpatch"),
            "nominal": any(r.get("kv_saved_nominal") for r in recs),
        })  # fmt: skip
    return rows


def target(row: dict) -> int:
    """The KV-saved percentage a row aims at: its label's last number ("retrieval_kv-67") when the row saved
    about that (within 10 points), else what it saved (a press whose ratio applies to some layers only)."""
    tail, saved = row["label"].rsplit("-", 1)[-1], round(100 * row["kv_saved"])
    return int(tail) if tail.isdigit() and abs(int(tail) - saved) <= 10 else saved


def markdown(rows: list[dict]) -> str:
    """One table: by protocol, then by targeted KV saved, best first; per-family accuracy; `*` = a nominal figure
    (a press that masks instead of evicting)."""
    fams = sorted({f for r in rows for f in r["by_family"]})
    lines = ["| toolkit | method | protocol | n | accuracy | 95% CI | KV saved | prefill attention computed | "
             + " | ".join(fams) + " | s/sample |", "|---" * (9 + len(fams)) + "|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["protocol"], target(r), -r["accuracy"], r["label"])):
        star = "*" if r.get("nominal") else ""
        per = " | ".join(f"{r['by_family'][f]:.2f}" if f in r["by_family"] else "" for f in fams)
        lines.append(f"| {r['toolkit']} | {r['label']} | {r['protocol']} | {r['n']} | {r['accuracy']:.3f} | "
                     f"{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f} | {r['kv_saved']:.1%}{star} | {r['prefill_computed']:.1%} | "
                     f"{per} | {r['seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def report(folder: Path, title: str = "") -> list[str]:
    """summary.md, summary.json (every row, with its n) and accuracy_vs_kv.png (complete points) for the records
    in `folder`; returns the files."""
    rows = summarize(folder)
    (folder / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (folder / "summary.md").write_text(markdown(rows) + "\n")
    files = ["summary.md", "summary.json"]
    try:
        from .plots import accuracy_vs_kv
    except ImportError:
        return files
    most = max((r["n"] for r in rows), default=0)  # the plot draws complete points only (a sweep resumes)
    if accuracy_vs_kv([r for r in rows if r["n"] == most], folder / "accuracy_vs_kv.png", title=title):
        files.append("accuracy_vs_kv.png")
    return files
