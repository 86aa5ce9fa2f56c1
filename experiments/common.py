"""What every results file states: the exact command, the machine and the date."""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dwskd import CONFIG_DIR
from dwskd.io import write_text

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "experiments" / "results"
METHODS = ("scratch", "ws", "kd", "dml", "dwskd", "teacher")  # table order


def method_config(name: str) -> DictConfig:
    """``conf/method/<name>.yaml`` as ``method=<name>`` composes it: merged over the files its
    ``defaults`` list names (``_base``), ``_self_`` where it stands (last when absent).

    Why: what a method trains (``students``, ``needs_teacher``, its objective) is stated once,
    in its YAML; experiments read it from there instead of keeping their own lists.
    """
    folder = Path(CONFIG_DIR) / "method"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
        raise ValueError(f"method={name}: no {path}; the methods are {known}")
    own = OmegaConf.load(path)
    defaults = list(own.pop("defaults", []))
    if "_self_" not in defaults:
        defaults.append("_self_")
    return OmegaConf.merge(*(own if d == "_self_" else method_config(d) for d in defaults))


def needs_teacher(method: str) -> bool:
    """Whether a run of ``method`` builds or loads the large teacher (method=teacher is one)."""
    config = method_config(method)
    return bool(config.needs_teacher) or not config.students


def method_students(method: str) -> int:
    """How many students ``method`` trains (2: jointly, then the better one is fine-tuned)."""
    return int(method_config(method).students)


# Never load a teacher: one run serves every teacher scenario (scratch, dml).
TEACHER_FREE = tuple(m for m in METHODS if not needs_teacher(m))
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


# A section another script owns inside a results file (bench.md holds the sweep throughput).
_SECTION = re.compile(r"<!-- section: (?P<name>[\w-]+) -->\n.*?<!-- end: (?P=name) -->\n", re.S)


def owned_sections(path: Path) -> list[str]:
    """The marked sections of ``path`` (empty when it does not exist), kept by its writer."""
    text = path.read_text() if path.is_file() else ""
    return [match.group(0) for match in _SECTION.finditer(text)]


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` into ``path`` as the section ``name``, replacing the previous one.

    Why: two scripts write ``bench.md`` (the step timings, the sweep throughput); each
    replaces only its own part, so re-running one never deletes the other's figures.
    """
    text = path.read_text() if path.is_file() else ""
    sections = [match.group(0) for match in _SECTION.finditer(text)]
    head = _SECTION.sub("", text)
    others = [s for s in sections if not s.startswith(f"<!-- section: {name} -->")]
    block = f"<!-- section: {name} -->\n{body.strip()}\n<!-- end: {name} -->\n"
    head = head.rstrip() + "\n\n" if head.strip() else ""
    write_text(path, head + "\n".join([*others, block]))
