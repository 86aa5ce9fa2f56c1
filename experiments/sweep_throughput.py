"""Sweep throughput on this machine: ``make paper-quick``'s jobs as 1 process x all threads
against N processes x 1 thread (Hydra's joblib launcher), one after the other.

    python -m experiments.sweep_throughput                 # its section of results/bench.md
    python -m experiments.sweep_throughput --processes 2   # the joblib side's n_jobs

Why: a CPU sweep is many small jobs; on few cores, running two of them side by side with one
thread each may beat one job using every core (less thread synchronisation per step), or may
not (memory bandwidth). Both sides run the same ``experiments.paper --quick`` jobs from
scratch into their own folders, on an otherwise idle machine: the figures are timings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dwskd.io import now_iso
from dwskd.machine import git_commit, machine_info
from experiments.common import OFFLINE_ENV, REPO, RESULTS_DIR, machine_lines, write_section

SECTION = "sweep-throughput"  # its part of bench.md (experiments.bench keeps it)


@dataclass(frozen=True)
class Side:
    """One way to launch the jobs: Hydra overrides and the threads each job may use."""

    label: str
    overrides: tuple[str, ...]
    threads: int


def sides(processes: int) -> list[Side]:
    cores = os.cpu_count() or 1
    joblib = ("hydra/launcher=joblib", f"hydra.launcher.n_jobs={processes}")
    return [
        Side(f"1 process x {cores} threads (basic launcher)", (), cores),
        Side(f"{processes} processes x 1 thread (joblib)", joblib, 1),
    ]


def run_side(side: Side, root: Path, name: str) -> tuple[float, int]:
    """Wall seconds of the whole quick sweep on one side, and how many jobs finished."""
    out = root / name
    cmd = [sys.executable, "-m", "experiments.paper", "--quick", "--name", name]
    cmd += ["--out", str(out), "--results-dir", str(root / f"{name}_results"), "--no-archive"]
    cmd += list(side.overrides)
    env = dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS=str(side.threads))
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    seconds = time.perf_counter() - start
    return seconds, len(list(out.glob("*/*/*/s*/metrics.json")))  # run dirs, not external/


def markdown(results: list[tuple[Side, float, int]], command: str) -> str:
    base, code = results[0][1], git_commit()
    version = (
        "unknown" if code is None else code["commit"][:10] + (" (dirty)" if code["dirty"] else "")
    )
    lines = [
        "## Sweep throughput: `make paper-quick`'s jobs, two ways",
        "",
        f"- command: `{command}` (from the repository root, on an otherwise idle machine)",
        f"- date: {now_iso()}; code: {version}",
        *machine_lines(machine_info()),
        "",
        "| launch | jobs | wall time | jobs per hour | speed vs the first |",
        "|---|---|---|---|---|",
    ]
    for side, seconds, jobs in results:
        rate = jobs / seconds * 3600
        lines.append(
            f"| {side.label} | {jobs} | {seconds / 60:.1f} min | {rate:.1f} | {base / seconds:.2f}x |"
        )
    fastest = min(results, key=lambda r: r[1])[0]
    lines += ["", f"Faster here: **{fastest.label}**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="joblib's n_jobs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench.md")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dwskd-throughput-"))
    results = []
    for number, side in enumerate(sides(args.processes)):
        seconds, jobs = run_side(side, root, f"side{number}")
        print(f"{side.label}: {jobs} jobs in {seconds:.0f} s", flush=True)
        results.append((side, seconds, jobs))
    command = " ".join(["python -m experiments.sweep_throughput", *(argv or sys.argv[1:])])
    write_section(args.out, SECTION, markdown(results, command))
    print(f"wrote {args.out}; run dirs in {root} (delete them when done)")
    return args.out


if __name__ == "__main__":
    main()
