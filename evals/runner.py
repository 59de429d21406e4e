"""Run suites over methods (always beside the unpatched dense baseline) and write honest reports.

Each sample records accuracy, time to first token, prefill time, decode tokens/s, peak memory and the
achieved density (fraction of causal attention scores computed; 1.0 for the unpatched baseline).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path

import llmpatch
from llmpatch.errors import ParameterError
from llmpatch.measure import GenerationResult, answer_logprob, generate_timed
from llmpatch.meta import run_metadata
from llmpatch.sharding import is_main_process

from .haystack import Haystack
from .suites import Suite, get_suite

BASELINE = "dense"


@dataclass
class MethodConfig:
    """One line of a comparison: `methods` None is the unpatched model (the dense baseline)."""

    label: str
    methods: list[str] | None = None
    params: dict = field(default_factory=dict)
    plan: str | None = None

    def apply(self, model):
        if self.methods is None:
            return None
        return llmpatch.apply(model, self.methods, self.plan, **self.params)


def check_lengths(model, lengths, beyond_context: bool = False) -> list[int]:
    """Prompt lengths, at most the model's context (`model`: a model or its config) unless `beyond_context`
    (length extrapolation runs)."""
    config = getattr(model, "config", model)
    limit = None if beyond_context else getattr(config, "max_position_embeddings", None)
    out = []
    for n in lengths:
        if not isinstance(n, int) or isinstance(n, bool) or n < 64:
            raise ParameterError(f"lengths: each length must be an int >= 64 tokens, got {n!r}")
        if limit is not None and n > limit:
            raise ParameterError(
                f"lengths: {n} tokens exceeds the model's context of {limit} tokens (max_position_embeddings); "
                "pass beyond_context (recipe key, --beyond-context) to measure past it on purpose"
            )
        out.append(n)
    return out


def check_depths(depths) -> list[float]:
    for d in depths:
        if not isinstance(d, (int, float)) or not 0 <= d <= 1:
            raise ParameterError(f"depths: each depth must be a number in [0, 1], got {d!r}")
    return [float(d) for d in depths]


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def run_suite(
    model,
    tokenizer,
    suite: str | Suite,
    *,
    lengths: list[int],
    samples: int = 1,
    depths: list[float] | None = None,
    configs: list[MethodConfig] | None = None,
    seed: int = 0,
    haystack: Haystack | None = None,
    progress=None,
    beyond_context: bool = False,
    logprob: bool = True,
    engine=None,
) -> dict:
    """Run one suite; returns {"suite", "configs": [{"label", "cells": [...], "samples": [...]}], ...}.
    `logprob=False` skips the teacher-forced answer log-probability (a second forward per sample). `engine`
    (llmpatch.vllm.engine.VLLMEngine) generates through vLLM instead of the HF `model` (which may then be its
    config): the same prompts and scoring; timings, density and KV bytes are the HF path's and stay empty."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    lengths = check_lengths(model, lengths, beyond_context)
    if not isinstance(samples, int) or samples < 1:
        raise ParameterError(f"samples: must be an int >= 1, got {samples!r}")
    depth_grid = check_depths(depths or [0.1, 0.3, 0.5, 0.7, 0.9]) if suite.grid_depths else [None]
    configs = configs or [MethodConfig(BASELINE)]
    if configs[0].methods is not None:
        configs = [MethodConfig(BASELINE), *configs]
    prompts = {
        (n, d, i): suite.sample(tokenizer, n, i, seed=seed, depth=d, haystack=haystack)
        for n in lengths
        for d in depth_grid
        for i in range(samples)
    }
    task = progress.add_task(suite.name, total=len(prompts) * len(configs)) if progress else None
    results = []
    if engine is not None:
        for config in configs:  # every configuration's checks before any engine starts
            engine.check(config)
    for config in configs:
        generated = engine_outputs(engine, config, prompts, tokenizer, suite) if engine else None
        if generated is not None and progress:
            progress.update(task, advance=len(prompts), description=f"{suite.name} {config.label} (vllm)")
        patch = config.apply(model) if engine is None else None
        tracker = patch.track_sparsity() if patch is not None else None
        records, cells = [], []
        try:
            for n in lengths:
                for d in depth_grid:
                    if tracker is not None:
                        tracker.reset()
                    cell = []
                    for i in range(samples):
                        s = prompts[(n, d, i)]
                        gen = (
                            generate_timed(
                                model, tokenizer, s.prompt_ids or s.prompt, budget(suite, s)
                            ).to_dict()
                            if generated is None
                            else generated[(n, d, i)]
                        )
                        rec = {
                            **s.to_dict(),
                            "output": gen["text"],
                            "score": suite.score(s, gen["text"]),
                            **{k: v for k, v in gen.items() if k != "text"},
                        }
                        if logprob and s.answer_text is not None and generated is None:
                            rec["answer_logprob"] = answer_logprob(model, tokenizer, s.prompt, s.answer_text)
                        cell.append(rec)
                        if progress and generated is None:
                            progress.update(task, advance=1, description=f"{suite.name} {config.label} {n}")
                    cells.append(
                        {
                            "length": n,
                            "depth": d,
                            "n": len(cell),
                            "accuracy": _mean(r["score"] for r in cell),
                            "prompt_tokens": _mean(r["prompt_tokens"] for r in cell),
                            "ttft_s": _mean(r["ttft_s"] for r in cell),
                            "prefill_s": _mean(r["prefill_s"] for r in cell),
                            "decode_tokens_per_s": _mean(r["decode_tokens_per_s"] for r in cell),
                            "peak_memory_mb": max((r["peak_memory_mb"] or 0) for r in cell) or None,
                            "answer_logprob": _mean(r.get("answer_logprob") for r in cell),
                            "density": tracker.density
                            if tracker is not None
                            else (1.0 if config.methods is None else None),
                            "kv_saved": _kv_saved(cell),
                        }
                    )
                    records.extend(cell)
        finally:
            if patch is not None:
                patch.remove()
        results.append({"label": config.label, "methods": config.methods, "params": config.params,
                        "plan": config.plan, "cells": cells, "samples": records})  # fmt: skip
        if engine is not None:
            results[-1]["engine"] = {"name": engine.name, **engine.info.get(config.label, {})}
    families = getattr(suite, "families", None)  # the mix's, when a recipe picks them
    return {
        "suite": suite.name,
        **({"families": families} if families else {}),
        "lengths": lengths,
        "depths": depth_grid,
        "samples_per_cell": samples,
        "seed": seed,
        "beyond_context": beyond_context,
        "haystack": haystack.path if haystack and haystack.path else "generated",
        "configs": results,
    }


def budget(suite, sample) -> int:
    """New tokens for a sample: its own budget (the mix's families differ), else the suite's."""
    return sample.max_new_tokens or suite.max_new_tokens


def engine_outputs(engine, config, prompts: dict, tokenizer, suite) -> dict:
    """{key: generation fields} for every prompt, generated by `engine` in one run (token ids made here, as
    generate_timed makes them; outputs decoded the same way). One budget for the run, the largest: greedy
    tokens do not depend on it, so each output is cut to its sample's own."""
    keys = list(prompts)
    ids = [
        prompts[k].prompt_ids or tokenizer(prompts[k].prompt, add_special_tokens=False).input_ids
        for k in keys
    ]
    budgets = [budget(suite, prompts[k]) for k in keys]
    tokens = [t[:n] for t, n in zip(engine.generate(config, ids, max(budgets)), budgets, strict=True)]
    counted = {"text", "new_tokens", "prompt_tokens"}  # what an engine gives; the rest is the HF path's
    unmeasured = {f.name: None for f in fields(GenerationResult) if f.name not in counted}
    return {
        k: {
            "text": tokenizer.decode(t, skip_special_tokens=True),
            "new_tokens": len(t),
            "prompt_tokens": len(p),
            **unmeasured,
        }  # fmt: skip
        for k, p, t in zip(keys, ids, tokens, strict=True)
    }


def _kv_saved(records) -> float | None:
    """Fraction of KV-cache bytes saved against the model's own cache, over the records (measured)."""
    used = [r.get("kv_bytes") for r in records]
    dense = [r.get("dense_kv_bytes") for r in records]
    if None in used or None in dense or not sum(dense):
        return None
    return 1 - sum(used) / sum(dense)


def summary_rows(result: dict) -> list[dict]:
    """One row per (config, length), averaged over depths: for tables and plots."""
    rows = []
    for cfg in result["configs"]:
        for n in result["lengths"]:
            cells = [c for c in cfg["cells"] if c["length"] == n]
            rows.append(
                {
                    "suite": result["suite"],
                    "method": cfg["label"],
                    "length": n,
                    "n": sum(c["n"] for c in cells),
                    **{
                        k: _mean(c.get(k) for c in cells)
                        for k in (
                            "accuracy",
                            "ttft_s",
                            "prefill_s",
                            "decode_tokens_per_s",
                            "density",
                            "kv_saved",
                            "answer_logprob",
                        )  # fmt: skip
                    },
                    "peak_memory_mb": max((c["peak_memory_mb"] or 0) for c in cells) or None,
                }
            )
    return rows


def write_report(results: list[dict], out: Path, *, model: str, extra_meta: dict | None = None) -> dict:
    """results.json (with metadata), summary.md, and plots (accuracy vs length, NIAH heatmaps)."""
    from . import plots

    rows = [r for res in results for r in summary_rows(res)]
    payload = {
        "model": model,
        "summary": rows,
        "results": results,
        "metadata": run_metadata(**(extra_meta or {})),
    }
    if not is_main_process():  # under torchrun rank 0 writes
        return {**payload, "files": []}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "summary.md").write_text(markdown_table(rows) + "\n")
    files = plots.write_all(results, out, model=model)
    payload["files"] = ["results.json", "summary.md", *files]
    return payload


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| suite | method | length | n | accuracy | density | KV saved | TTFT s | prefill s | decode tok/s | "
        "peak MB |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['suite']} | {r['method']} | {r['length']} | {r['n']} | {_fmt(r['accuracy'], '.3f')} | "
            f"{_fmt(r['density'], '.3f')} | {_fmt(r.get('kv_saved'), '.3f')} | {_fmt(r['ttft_s'], '.2f')} | {_fmt(r['prefill_s'], '.2f')} | "
            f"{_fmt(r['decode_tokens_per_s'], '.1f')} | {_fmt(r['peak_memory_mb'], '.0f')} |"
        )
    return "\n".join(lines)
