"""What this process runs on — package versions, devices, the source commit, the command line —
for `fvar env` (bug reports) and the provenance every checkpoint records."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

PACKAGES = ("fvar", "torch", "torchvision", "accelerate", "torch-fidelity", "huggingface_hub", "safetensors",
            "numpy", "scipy", "pillow", "pydantic", "typer")


def package_version(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The commit of the fvar source tree when it runs from a git checkout (with '+dirty' when it
    has uncommitted changes); None for an installed wheel or without git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def gpus() -> List[str]:
    """Names of the visible CUDA devices (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def provenance() -> Dict[str, Any]:
    """The short record a checkpoint keeps: torch / CUDA versions, GPU names, the git commit of the
    source when there is one, and the command line that ran."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus(), "git_commit": git_commit(),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []}


def environment() -> Dict[str, Any]:
    """Everything `fvar env` prints: versions of fvar and its dependencies, Python, the platform,
    CPU threads, CUDA / MPS availability and devices."""
    mps = getattr(torch.backends, "mps", None)
    return {
        "packages": {name: package_version(name) for name in PACKAGES},
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": {"built_with": torch.version.cuda, "available": torch.cuda.is_available(), "devices": gpus(),
                 "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None},
        "mps": bool(mps is not None and mps.is_available()),
    }
