"""apply / patched / Patch: reversible patches through transformers' AttentionInterface.

Everything is validated before the model is touched; a failure leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from . import attention, methods, plan_store
from .adapters import ModelSpec, attention_modules, detect, execution_devices
from .decisions import LayerDecision
from .errors import ParameterError, PatchStateError, UnsupportedModelError
from .kernels.density import SparsityTracker
from .kernels.dispatch import check_backend, interpreting
from .plan import Plan, provenance

PATCH_ATTR = "_llmpatch_patch"
LAYER_ATTR = "llmpatch_layer"


class Patch:
    """A live patch on one model. `remove()` restores the original attention implementation exactly."""

    def __init__(self, model, spec: ModelSpec, instances, layers, original_impl, plan: Plan | None):
        self.model = model
        self.spec = spec
        self.methods = instances
        self.layers = layers
        self.original_impl = original_impl
        self.source_plan = plan
        self.plan_sources: list = []  # plan="auto": the stored / shipped plans used (plan_store.Found)
        self.active = True
        self._undo: list = []  # callbacks for wrappers / caches that later methods install

    def remove(self) -> None:
        if not self.active:
            raise PatchStateError("patch: already removed; apply a new patch with llmpatch.apply(model, ...)")
        for undo in reversed(self._undo):
            undo()
        for _, module in attention_modules(self.model):
            module.__dict__.pop(LAYER_ATTR, None)
        self.model.set_attn_implementation(self.original_impl)
        self.model.__dict__.pop(PATCH_ATTR, None)
        self.active = False

    def track_sparsity(self) -> SparsityTracker:
        """Count computed against causal attention scores from now on (all layers, prefill and decode)."""
        tracker = SparsityTracker()
        for layer in self.layers:
            layer.taps.tracker = tracker
        return tracker

    def plan(self) -> Plan:
        prov = provenance()
        if self.source_plan is not None:
            prov["source_plan"] = self.source_plan.provenance
        return Plan(
            model=self.spec.fingerprint(),
            methods=[{"name": m.name, "params": m.params()} for m in self.methods],
            provenance=prov,
        )

    def save(self, path: str | Path) -> Path:
        return self.plan().save(path)

    def describe(self) -> str:
        s = self.spec
        head = (
            f"llmpatch: {'+'.join(m.name for m in self.methods)} on {s.family} "
            f"({s.num_layers} layers, {s.num_heads} heads, {s.num_kv_heads} kv heads, d={s.head_dim}); "
            f"was {self.original_impl!r}{'' if self.active else ' (removed)'}"
        )
        rows = [f"  layer {d.layer:>3} {s.attention_paths[d.layer]}: {d.describe()}" for d in self.layers]
        return "\n".join([head, *rows])

    def __repr__(self):
        return f"<Patch {'+'.join(m.name for m in self.methods)} active={self.active}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.active:
            self.remove()


def current_patch(model: nn.Module) -> Patch | None:
    return model.__dict__.get(PATCH_ATTR)


def _route_overrides(names: list[str], overrides: dict) -> dict[str, dict]:
    """Overrides are flat keys (for several methods, a key only one of them has) or per method, `act={...}`."""
    routed: dict[str, dict] = {n: {} for n in names}
    for key, value in overrides.items():
        if key in routed and isinstance(value, dict):
            routed[key].update(value)
            continue
        if len(names) == 1:
            routed[names[0]][key] = value
            continue
        owners = [n for n in names if key in {p for p, _, _ in methods.get(n).describe_params()}]
        if len(owners) != 1:
            raise ParameterError(
                f"{key}: {'no' if not owners else 'more than one'} method among {names} takes this parameter; "
                f"pass it per method, e.g. {names[0]}={{'{key}': ...}}"
            )
        routed[owners[0]][key] = value
    return routed


def check(method: str | list[str], plan=None, *, backend: str | None = None, **overrides) -> list[str]:
    """Everything apply() can check without the model: method names, backend, the plan file, and every given
    parameter's type and range (plan + overrides). The CLI calls it before loading the model. Returns the
    method names. The checks that need the model (head counts, a plan's fingerprint) stay in apply()."""
    names = (
        [method] if isinstance(method, str) else list(method) if isinstance(method, (list, tuple)) else None
    )
    if not names or not all(isinstance(n, str) for n in names):
        raise ParameterError(
            f"method: give a method name or a list of names; available: {', '.join(methods.REGISTRY)}, "
            f"got {method!r}"
        )
    for name in names:
        methods.get(name)
    if len(set(names)) != len(names):
        raise ParameterError(f"method: {names} names a method twice")
    try:
        check_backend(backend)
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
    loaded = None if plan is None or (isinstance(plan, str) and plan == "auto") else Plan.load(plan)
    routed = _route_overrides(names, overrides)
    for name in names:
        cls = methods.get(name)
        params = loaded.params_for(name, cls.plan_entry) if loaded is not None else {}
        cls.from_params({**params, **routed[name]})
    return names


def decide(spec: ModelSpec, names: list[str], plan, overrides: dict, *, backend=None, model_name=None):
    """The model-dependent half of apply(), without touching a model: resolve the plan (`"auto"` included),
    check it and every method against `spec`, and let the methods fill one `LayerDecision` per layer (cut to
    this rank's heads). Returns (method instances, layer decisions, the loaded Plan or None, plan_store finds).
    Serving engines (`llmpatch.vllm`) read the same decisions."""
    found = []
    if isinstance(plan, str) and plan == "auto":
        plan, found = plan_store.resolve(spec, names, overrides, model_name)
    loaded = Plan.load(plan) if plan is not None else None
    if loaded is not None:
        loaded.check_model(spec)
    routed = _route_overrides(names, overrides)
    instances = []
    for name in names:
        cls = methods.get(name)
        params = loaded.params_for(name, cls.plan_entry) if loaded is not None else {}
        params.update(routed[name])
        inst = cls.from_params(params)
        inst.validate(spec)
        instances.append(inst)
    with torch.inference_mode(False):  # decision tensors track versions (see attention._facts), also when
        layers = [  # apply() is called under inference_mode
            LayerDecision(
                layer=i, num_heads=spec.num_heads, sliding_window=spec.sliding_window[i], backend=backend
            )
            for i in range(spec.num_layers)
        ]
        for inst in instances:
            inst.configure(spec, layers)
        for layer in layers:  # a tensor-parallel rank keeps its own heads (methods speak global heads)
            layer.localize(spec.shard)
    return instances, layers, loaded, found


def apply(
    model: nn.Module, method: str | list[str], plan=None, *, backend: str | None = None, **overrides
) -> Patch:
    """Patch `model` with one method or several composed ones; returns the Patch.

    `plan` is a path, dict or Plan (schema v1); its parameters for each method are overridden by `overrides`.
    `plan="auto"`: each method that needs a plan and was given none of its data gets the stored or shipped plan
    for this model (`plan_store`; `patch.plan_sources` says which), or an error naming the calibrate command.
    """
    names = check(method, plan, backend=backend, **overrides)
    spec = detect(model)
    existing = current_patch(model)
    if existing is not None:
        raise PatchStateError(
            f"model: already patched with {[m.name for m in existing.methods]}; call patch.remove() first, "
            "or compose methods in one call: llmpatch.apply(model, ['method_a', 'method_b'])"
        )
    devices = execution_devices(model)
    if backend == "triton" and not interpreting():
        off = sorted({str(d) for d in devices if torch.device(d).type != "cuda"})
        if off:
            raise ParameterError(f"backend: 'triton' needs the model on CUDA devices; this one runs on {off}. "
                                 "Use 'cpu', 'sdpa', 'reference' or None (by device)")  # fmt: skip
    instances, layers, loaded, found = decide(
        spec, names, plan, overrides, backend=backend, model_name=plan_store.model_name(model)
    )
    with torch.inference_mode(False):
        for layer, device in zip(layers, devices, strict=True):
            layer.to(device)

    # Validation is over: from here on the model changes, and any failure undoes it.
    attention.register()
    original = model.config._attn_implementation
    modules = attention_modules(model)
    try:
        for (_, module), decision in zip(modules, layers, strict=True):
            module.__dict__[LAYER_ATTR] = decision
        model.set_attn_implementation(attention.NAME)
        if model.config._attn_implementation != attention.NAME:
            raise UnsupportedModelError(
                f"model: {type(model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface (set_attn_implementation had no effect), so llmpatch cannot patch it"
            )
        undo = [u for u in (inst.install(model, spec, layers) for inst in instances) if u is not None]
    except Exception:
        for _, module in modules:
            module.__dict__.pop(LAYER_ATTR, None)
        model.set_attn_implementation(original)
        raise
    patch = Patch(model, spec, instances, layers, original, loaded)
    patch.plan_sources = found
    patch._undo.extend(undo)
    model.__dict__[PATCH_ATTR] = patch
    return patch


@contextlib.contextmanager
def patched(model: nn.Module, method: str | list[str], plan=None, **kwargs):
    """`with llmpatch.patched(model, "sink_window", window=256) as patch:` — removed on exit, also on errors."""
    patch = apply(model, method, plan, **kwargs)
    try:
        yield patch
    finally:
        if patch.active:
            patch.remove()
