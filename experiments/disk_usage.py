"""How much disk runs take: per run dir, per kind of file, and in total.

    python -m experiments.disk_usage outputs/synthetic/dwskd/<time>     # one run
    python -m experiments.disk_usage experiments/runs/paper              # a whole sweep
    python -m experiments.disk_usage --default     # run the default; its peak and final size

Sizes are bytes of regular files (MiB = 2^20 bytes), each hard-linked file once, as
``du -s --apparent-size``.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from experiments.common import OFFLINE_ENV, REPO

MIB = 2**20


def file_kind(path: Path) -> str:
    """Coarse kind of a run file: weights, checkpoints, logs, plots, records."""
    if path.suffix == ".safetensors":
        return "weights (.safetensors)"
    if path.suffix == ".ckpt":
        return "Lightning checkpoints (.ckpt)"
    if path.suffix == ".png":
        return "plots"
    if path.suffix in (".csv", ".log", ".yaml") or "wandb" in path.parts:
        return "logs"
    return "records (json, md, lock)"


def usage(root: Path) -> dict[str, int]:
    """Bytes per file kind under ``root``; a hard-linked file (exports/) counts once, as du does."""
    sizes: dict[str, int] = defaultdict(int)
    seen: set[tuple[int, int]] = set()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        stat = path.stat()
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        sizes[file_kind(path)] += stat.st_size
    return dict(sizes)


def run_dirs(root: Path) -> list[Path]:
    """Every run dir under root (a folder holding record.json or metrics.json)."""
    found = {p.parent for name in ("record.json", "metrics.json") for p in root.rglob(name)}
    return sorted(found)


def describe(root: Path) -> list[str]:
    dirs = run_dirs(root)
    total = usage(root)
    lines = [f"{root}: {sum(total.values()) / MIB:.1f} MiB in {len(dirs)} run dir(s)"]
    lines += [f"  {kind}: {size / MIB:.1f} MiB" for kind, size in sorted(total.items())]
    if len(dirs) > 1:
        per_run = sorted((sum(usage(d).values()), d) for d in dirs)
        lines.append(f"  largest run: {per_run[-1][0] / MIB:.1f} MiB ({per_run[-1][1]})")
        lines.append(f"  smallest run: {per_run[0][0] / MIB:.1f} MiB ({per_run[0][1]})")
    return lines


def run_default(out: Path, every: float = 0.5) -> int:
    """``python -m dwskd.run`` with no options (the README's default run) into ``out``; returns
    the largest size its run dir had while it ran (checkpoints live only during their stage),
    sampled every ``every`` seconds."""
    env = dict(__import__("os").environ, **OFFLINE_ENV)
    cmd = [sys.executable, "-m", "dwskd.run", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    peak = 0
    while proc.poll() is None:
        time.sleep(every)
        with contextlib.suppress(FileNotFoundError):  # a file renamed or removed mid-scan
            peak = max(peak, sum(usage(out).values()) if out.exists() else 0)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return max(peak, sum(usage(out).values()))


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="run dirs or sweep roots")
    parser.add_argument("--default", action="store_true", help="run the default run first")
    args = parser.parse_args(argv)
    paths = list(args.paths)
    lines = []
    if args.default:
        out = Path(tempfile.mkdtemp(prefix="dwskd-default-")) / "run"
        peak = run_default(out)
        lines.append(f"default run: peak {peak / MIB:.1f} MiB while it ran (checkpoints included)")
        paths.append(out)
    if not paths:
        parser.error("give run dirs or sweep roots, or --default")
    lines += [line for path in paths for line in describe(path)]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
