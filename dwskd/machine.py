"""The facts a reader needs to compare timings and results between runs.

Platform, cores, torch, GPU and date (:func:`machine_info`), the versions of the packages
that shape a result (:func:`package_versions`) and the code's git commit (:func:`git_commit`).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "torch",
    "torchvision",
    "lightning",
    "timm",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "albumentations",
    "wandb",
    "numpy",
    "safetensors",
    "dwskd",
)
_GIT_TIMEOUT_S = 5.0


def machine_info() -> dict[str, str | int | None]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def package_versions() -> dict[str, str | None]:
    """Installed distribution versions (None when absent): a result is only reproducible
    with the same training/augmentation stack, and these are the packages that change it."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


RESULTS_PATHSPEC = ":(exclude,top)experiments/results"


def git_commit() -> dict[str, str | bool] | None:
    """``{"commit": sha, "dirty": bool}`` of the checkout that holds the dwskd package.

    Names the exact code behind a result; ``dirty`` says the working tree differs from that
    commit (tracked changes or untracked, non-ignored files) outside ``experiments/results/``:
    results a sweep archives while it runs are not code. None when dwskd is not a tracked
    part of a git checkout (an installed wheel, even one inside someone's repository) or when
    git is missing or slow.
    """
    here = Path(__file__).resolve()
    git = shutil.which("git")
    if git is None:
        return None
    commit = _git(git, here.parent, "rev-parse", "HEAD")
    tracked = _git(git, here.parent, "ls-files", "--error-unmatch", here.name)
    if not commit or tracked is None:
        return None
    status = _git(git, here.parent, "status", "--porcelain", "--", ":/", RESULTS_PATHSPEC)
    return {"commit": commit, "dirty": bool(status)}


def _git(git: str, cwd: Path, *args: str) -> str | None:
    """stdout of one git command, stripped; None on any failure or after the timeout."""
    try:
        done = subprocess.run(
            [git, "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
