"""The portable per-head plan: versioned JSON (schema v1), never pickle.

{
  "schema": "llmpatch.plan", "version": 1,
  "model": {<ModelSpec.fingerprint()>},           # a plan for another model is refused
  "methods": [{"name": "sink_window", "params": {...}}, ...],   # per-layer / per-head entries live in params
  "provenance": {"llmpatch_version", "created", "command", "calibration_data", ...}
}
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .adapters import ModelSpec
from .errors import PlanError

SCHEMA = "llmpatch.plan"
VERSION = 1


def provenance(**extra) -> dict:
    from . import __version__

    return {
        "llmpatch_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        **extra,
    }


@dataclass
class Plan:
    model: dict
    methods: list[dict]
    provenance: dict = field(default_factory=provenance)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "model": self.model,
            "methods": self.methods,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"plan: {source} must hold a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            raise PlanError(f"plan: {source} has schema {data.get('schema')!r}; expected {SCHEMA!r}")
        if data.get("version") != VERSION:
            raise PlanError(
                f"plan: {source} has version {data.get('version')!r}; this llmpatch reads {VERSION}"
            )
        for key in ("model", "methods"):
            if key not in data:
                raise PlanError(f"plan: {source} is missing the {key!r} key")
        methods = data["methods"]
        if not isinstance(methods, list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("params", {}), dict)
            for m in methods
        ):
            raise PlanError(f"plan: {source} 'methods' must be a list of {{'name': str, 'params': {{...}}}}")
        return cls(model=data["model"], methods=methods, provenance=data.get("provenance", {}))

    @classmethod
    def load(cls, source: str | Path | dict | Plan) -> Plan:
        if isinstance(source, Plan):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        if not path.is_file():
            what = "is a folder, not a plan file" if path.is_dir() else "does not exist"
            raise PlanError(f"plan: file {str(path)!r} {what}")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            what = (
                "not UTF-8 text (a pickle or other binary file?)"
                if isinstance(exc, UnicodeDecodeError)
                else exc
            )
            raise PlanError(f"plan: {str(path)!r} is not a JSON plan: {what}") from None
        return cls.from_dict(data, source=repr(str(path)))

    def check_model(self, spec: ModelSpec) -> None:
        mine = spec.fingerprint()
        if self.model.get("hash") == mine["hash"]:
            return
        diffs = [
            f"{k}: plan {self.model.get(k)!r} vs model {v!r}"
            for k, v in mine.items()
            if self.model.get(k) != v
        ]
        raise PlanError("plan: made for another model (" + "; ".join(diffs[:4]) + ")")

    def params_for(self, name: str, entry: str | None = None) -> dict:
        """The params of method `name`, else of the shared `entry` (e.g. "retrieval_heads", read by both
        retrieval methods)."""
        for want in (name, entry):
            for m in self.methods:
                if want is not None and m["name"] == want:
                    return dict(m.get("params", {}))
        have = [m["name"] for m in self.methods]
        raise PlanError(f"plan: has no entry for method {name!r}; it holds {have}")
