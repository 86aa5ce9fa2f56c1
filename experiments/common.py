"""What every results file states: the exact command, the machine and the date."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "experiments" / "results"
METHODS = ("scratch", "ws", "kd", "dml", "dwskd", "teacher")  # table order
TEACHER_FREE = ("scratch", "dml")  # never load a teacher: one run serves both scenarios
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "NO_ALBUMENTATIONS_UPDATE": "1"}


def set_offline_env() -> None:
    """No hub look-ups (~47 s each offline), no W&B account, no update checks."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def invocation(module: str, argv: list[str] | None = None) -> str:
    """The command line that reproduces this run, e.g. ``python -m experiments.paper --quick``."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *args])


def machine_lines(machine: dict) -> list[str]:
    """Markdown bullet lines for a machine dict from :func:`machine_info`."""
    return [
        f"- machine: {machine['platform']}, {machine['cpu_count']} CPU cores "
        f"({machine['torch_threads']} torch threads), GPU: {machine['gpu'] or 'none'}",
        f"- software: Python {machine['python']}, torch {machine['torch']}",
    ]


def show_progress(logger: logging.Logger) -> None:
    """Print this script's own INFO lines, without repeating Lightning's (root) messages."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
