"""Run metadata written beside every result: versions, git commit (and any uncommitted code), device, arguments."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_modified() -> list[str] | None:
    """The code files (llmpatch/, kernels/) that differ from the commit, so a result run on uncommitted code says
    so; None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", str(here), str(here.parent / "kernels")],
            capture_output=True, text=True, cwd=here, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted(line[3:] for line in out.stdout.splitlines()) if out.returncode == 0 else None


def run_metadata(**extra) -> dict:
    import torch
    import transformers

    from . import __version__
    from .sharding import world_size

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "llmpatch": __version__,
        "git_commit": git_commit(),
        "git_modified": git_modified(),  # code files changed since that commit ([] when clean)
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
        "world_size": world_size(),  # torchrun ranks (tensor parallel), 1 for one process
        "argv": sys.argv,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
