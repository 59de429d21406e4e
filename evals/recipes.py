"""Recipes: YAML files naming a model, the methods to compare (the unpatched dense baseline is always added
first), the suites with their lengths, depths and sample counts (and the `mix` suite's families).

    model: smollm2-135m
    seed: 0
    samples: 20                       # default for every suite
    haystack: null                    # or a text file
    suites:
      passkey: {lengths: [1024, 2048]}
      niah: {lengths: [1024, 2048, 3072], depths: [0.1, 0.3, 0.5, 0.7, 0.9], samples: 1}
      mix: {lengths: [1024], samples: 30, families: [niah_number, multikey]}   # the held-out mix's test split
    methods:
      - label: window-256
        method: sink_window           # or a list of methods to compose
        params: {sink: 64, window: 256}
        plan: null                    # a plan file (relative to the recipe), or auto: the stored / shipped plan
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmpatch.errors import LlmpatchError, ParameterError

from .runner import BASELINE, MethodConfig
from .suites import SUITES, families_problem

TOP_KEYS = {"model", "seed", "samples", "haystack", "suites", "methods", "description", "dtype", "device",
            "beyond_context", "answer_logprob"}  # fmt: skip
SUITE_KEYS = {"lengths", "depths", "samples", "families"}
METHOD_KEYS = {"label", "method", "params", "plan"}


@dataclass
class SuiteSpec:
    name: str
    lengths: list[int]
    samples: int
    depths: list[float] | None = None
    families: list[str] | None = None  # the mix's families (the mix suite only)


@dataclass
class Recipe:
    path: str
    model: str
    suites: list[SuiteSpec]
    configs: list[MethodConfig]
    seed: int = 0
    haystack: str | None = None
    dtype: str | None = None
    device: str | None = None
    description: str = ""
    beyond_context: bool = False  # lengths past the model's context are allowed (extrapolation runs)
    answer_logprob: bool = True
    raw: dict = field(default_factory=dict)


def _err(path, key, msg):
    return ParameterError(f"recipe {path}: key {key!r} {msg}")


def _int_list(path, key, value):
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise _err(path, key, f"must be a non-empty list of integers, got {value!r}")
    return value


def read_yaml(path: Path):
    """A recipe file's YAML, or a clear error naming the file."""
    if not path.is_file():
        raise ParameterError(f"recipe: file {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParameterError(f"recipe {path}: not valid YAML ({exc})") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ParameterError(f"recipe {path}: must be a YAML mapping with keys {sorted(TOP_KEYS)}")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise _err(path, unknown[0], f"is not a recipe key; allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in ("model", "suites"):
        if key not in data:
            raise _err(path, key, "is missing")
    if not isinstance(data["model"], str):
        raise _err(path, "model", f"must be an alias, HF id or path, got {data['model']!r}")
    default_samples = data.get("samples", 1)
    if not isinstance(default_samples, int) or default_samples < 1:
        raise _err(path, "samples", f"must be an integer >= 1, got {default_samples!r}")

    for key in ("beyond_context", "answer_logprob"):
        if not isinstance(data.get(key, False), bool):
            raise _err(path, key, f"must be true or false, got {data[key]!r}")

    suites = []
    if not isinstance(data["suites"], dict) or not data["suites"]:
        raise _err(path, "suites", f"must map suite names ({', '.join(SUITES)}) to settings")
    for name, spec in data["suites"].items():
        where = f"suites.{name}"
        if name not in SUITES:
            raise _err(path, where, f"names an unknown suite; available: {', '.join(SUITES)}")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise _err(path, where, "must be a mapping with lengths, depths, samples")
        bad = sorted(set(spec) - SUITE_KEYS)
        if bad:
            raise _err(
                path, f"{where}.{bad[0]}", f"is not a suite key; allowed: {', '.join(sorted(SUITE_KEYS))}"
            )
        if "lengths" not in spec:
            raise _err(path, f"{where}.lengths", "is missing")
        lengths = _int_list(path, f"{where}.lengths", spec["lengths"])
        depths = spec.get("depths")
        if depths is not None and (
            not isinstance(depths, list)
            or not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in depths)
        ):
            raise _err(path, f"{where}.depths", f"must be a list of numbers in [0, 1], got {depths!r}")
        samples = spec.get("samples", default_samples)
        if not isinstance(samples, int) or samples < 1:
            raise _err(path, f"{where}.samples", f"must be an integer >= 1, got {samples!r}")
        families = spec.get("families")
        problem = families_problem(name, families)
        if problem:
            raise _err(path, f"{where}.families", problem)
        suites.append(SuiteSpec(name, lengths, samples, depths, families))

    configs = [MethodConfig(BASELINE)]
    for i, entry in enumerate(data.get("methods") or []):
        label, methods, params, plan = method_entry(path, i, entry, METHOD_KEYS, {c.label for c in configs})
        configs.append(MethodConfig(label, methods, params, plan))
    return Recipe(
        path=str(path),
        model=data["model"],
        suites=suites,
        configs=configs,
        seed=int(data.get("seed", 0)),
        haystack=data.get("haystack"),
        dtype=data.get("dtype"),
        device=data.get("device"),
        description=str(data.get("description", "")),
        beyond_context=data.get("beyond_context", False),
        answer_logprob=data.get("answer_logprob", True),
        raw=data,
    )


def method_entry(path: Path, i: int, entry, allowed: set, taken: set) -> tuple[str, list, dict, str | None]:
    """One `methods[i]` entry of a recipe (either kind): (label, methods, params, plan), checked; a plan path is
    relative to the recipe if that file exists there, else to the working directory."""
    where = f"methods[{i}]"
    if not isinstance(entry, dict) or "method" not in entry:
        raise _err(path, where, "must be a mapping with at least 'method'")
    bad = sorted(set(entry) - allowed)
    if bad:
        raise _err(path, f"{where}.{bad[0]}", f"is not a method key; allowed: {', '.join(sorted(allowed))}")
    methods = entry["method"] if isinstance(entry["method"], list) else [entry["method"]]
    params = entry.get("params") or {}
    if not isinstance(params, dict):
        raise _err(path, f"{where}.params", f"must be a mapping, got {params!r}")
    label = str(entry.get("label") or "+".join(methods))
    if label == BASELINE or label in taken:
        raise _err(
            path, f"{where}.label", f"{label!r} is taken (labels are unique; {BASELINE!r} is the baseline)"
        )
    plan = entry.get("plan")
    if plan is not None and not Path(plan).is_absolute() and (Path(path).parent / plan).is_file():
        plan = str(Path(path).parent / plan)
    try:  # every check that needs no model, before any model loads
        from llmpatch.patch import check

        check(methods, plan, **params)
    except LlmpatchError as exc:
        raise _err(path, where, str(exc)) from None
    return label, methods, params, plan


def check_methods(recipe: Recipe, model) -> None:
    """Validate every method config against the model before anything runs (a typo fails in seconds)."""

    for config in recipe.configs[1:]:
        try:
            config.apply(model).remove()
        except LlmpatchError as exc:
            raise ParameterError(f"recipe {recipe.path}: method {config.label!r}: {exc}") from None
