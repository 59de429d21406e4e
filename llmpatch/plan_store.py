"""Where plans are found when none is given: the local store that `llmpatch calibrate` writes, then the plans
that ship with llmpatch.

- Store: `<store>/<fingerprint hash>/<entry>.json`, store = $LLMPATCH_PLANS or <cache>/plans (cache =
  $LLMPATCH_CACHE or ~/.cache/llmpatch), one file per plan entry ("act", "moa", "retrieval_heads"); a newer
  calibration of the same entry replaces the older one.
- Shipped: `llmpatch/plans/*.json`, the plans chosen on the dev split for the built-in aliases (benchmarks/RESULTS.md
  says how each was made and chosen; tests/test_plan_store.py keeps them equal to the files the recipes use).

A plan matches a model by its fingerprint (the architecture: family, layers, heads, sizes), so a model with the
same architecture but other weights finds the same plan; `llmpatch plans` and `apply` say which file was used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ParameterError, PlanError
from .plan import Plan

SHIPPED = Path(__file__).with_name("plans")
# entry -> (the command that makes its plan, about how long it takes on 2 CPU cores for the 135M model)
CALIBRATE = {
    "act": ("llmpatch calibrate act --model {model}", "about 8 minutes"),
    "moa": ("llmpatch calibrate moa --model {model}", "about 15 minutes"),
    "retrieval_heads": ("llmpatch calibrate retrieval --model {model}", "about 1 minute"),
}


@dataclass
class Found:
    entry: str
    source: str  # "stored" | "shipped"
    path: Path
    plan: Plan


def store_root() -> Path:
    from .models import cache_dir

    return Path(os.environ.get("LLMPATCH_PLANS") or cache_dir() / "plans")


def entry_of(method_cls) -> str:
    return method_cls.plan_entry or method_cls.name


def _read(path: Path) -> Plan | None:
    try:
        return Plan.load(path)
    except PlanError:
        return None  # a broken file in the store is listed as such, never used


def find(spec, entry: str) -> Found | None:
    """The stored plan for this model's fingerprint and `entry`, else the shipped one, else None."""
    key = spec.fingerprint()["hash"]
    stored = store_root() / key / f"{entry}.json"
    if stored.is_file() and (plan := _read(stored)) is not None:
        return Found(entry, "stored", stored, plan)
    for path in sorted(SHIPPED.glob("*.json")):
        plan = _read(path)
        if plan is not None and plan.model.get("hash") == key and entry in {m["name"] for m in plan.methods}:
            return Found(entry, "shipped", path, plan)
    return None


def store(plan: Plan) -> list[Path]:
    """Keep `plan` in the store under its fingerprint, one file per entry it holds; returns the paths."""
    key = plan.model.get("hash")
    if not key:
        raise PlanError("plan: has no model fingerprint hash, so it cannot be stored")
    folder = store_root() / key
    folder.mkdir(parents=True, exist_ok=True)
    return [plan.save(folder / f"{m['name']}.json") for m in plan.methods]


def resolve(spec, names: list[str], overrides: dict, model_name: str) -> tuple[Plan | None, list[Found]]:
    """plan="auto": for each method that takes its data from a plan and was given none of it in `overrides`,
    the stored or shipped plan; one Plan holding their entries (None when no method needs one)."""
    from .methods import get as method_class

    found: list[Found] = []
    for name in names:
        cls = method_class(name)
        given = set(overrides) | set(overrides.get(name) if isinstance(overrides.get(name), dict) else ())
        if not cls.plan_keys or given & set(cls.plan_keys):
            continue
        entry = entry_of(cls)
        hit = find(spec, entry)
        if hit is None:
            command, takes = CALIBRATE[entry]
            raise ParameterError(
                f"plan: {name} needs a plan and none is stored or shipped for this model ({spec.family}, "
                f"fingerprint {spec.fingerprint()['hash']}); make one with `{command.format(model=model_name)}` "
                f"({takes} on 2 CPU cores for a 135M model; it is then found automatically), or pass one "
                f"with --plan / plan=, or give {' / '.join(cls.plan_keys)} yourself"
            )
        found.append(hit)
    if not found:
        return None, []
    entries = []
    for hit in found:
        entries += [m for m in hit.plan.methods if m["name"] == hit.entry and m not in entries]
    merged = Plan(model=found[0].plan.model, methods=entries,
                  provenance={"found": [f"{h.source} {h.path}" for h in found]})  # fmt: skip
    return merged, found


def listing() -> list[dict]:
    """Every stored and shipped plan: source, entry, model, path and how it was made."""
    rows = []
    stored = sorted(store_root().glob("*/*.json")) if store_root().is_dir() else []
    for source, paths in (("stored", stored), ("shipped", sorted(SHIPPED.glob("*.json")))):
        for path in paths:
            plan = _read(path)
            if plan is None:
                rows.append({"source": source, "entry": "?", "model": "?", "path": str(path),
                             "created": "", "command": "unreadable: not a valid plan"})  # fmt: skip
                continue
            model = plan.model
            for m in plan.methods:
                if source == "stored" and m["name"] != path.stem:
                    continue
                rows.append({
                    "source": source, "entry": m["name"], "path": str(path),
                    "model": f"{model.get('family', '?')} {model.get('num_layers', '?')}L "
                             f"{model.get('num_heads', '?')}H/{model.get('num_kv_heads', '?')}KV "
                             f"({model.get('hash', '?')})",
                    "created": str(plan.provenance.get("created", "")),
                    "command": str(plan.provenance.get("command", "")),
                })  # fmt: skip
    return rows


def describe(found: list[Found]) -> str:
    return "; ".join(f"{h.entry}: {h.source} plan {h.path}" for h in found)


def model_name(model) -> str:
    """What to pass as --model for this model: its alias when loaded from the alias cache, else its path or id."""
    from .models import ALIASES, cache_dir

    path = str(getattr(model.config, "_name_or_path", "") or "")
    for alias in ALIASES:
        if Path(path) == cache_dir() / "models" / alias / "hf":
            return alias
    return path or "<model>"
