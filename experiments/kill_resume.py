"""Exact resume, measured: one run uninterrupted, the same command SIGKILLed and re-run.

    python -m experiments.kill_resume                          # default run, kill in every stage
    python -m experiments.kill_resume --kill-after train:5 -- method=scratch data=lung_ct

Each ``--kill-after STAGE:SECONDS`` kills the run that many seconds after the stage starts
(its ``logs/<stage>/`` appears; ``test``: after ``stages/finetune/done.json``), then the same
command is started again. At the end both runs' val and test metrics are printed side by side
and compared for equality.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dwskd.rundir import RunLayout, read_results
from experiments.common import OFFLINE_ENV, REPO

DEFAULT_KILLS = ("teacher:40", "train:30", "finetune:10", "test:2")


def stage_started(layout: RunLayout, stage: str) -> bool:
    if stage == "test":
        return layout.done_json("finetune").is_file()
    return layout.logs_dir(stage).is_dir()


def run_until_killed(cmd: list[str], layout: RunLayout, stage: str, delay: float) -> str:
    """Start ``cmd``; SIGKILL it ``delay`` s after ``stage`` started. Returns what happened."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, **OFFLINE_ENV))
    while not stage_started(layout, stage):
        if proc.poll() is not None:
            return f"ended (rc {proc.returncode}) before {stage} started"
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        return f"ended (rc {proc.returncode}) before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"killed {delay:.0f} s into {stage}"


def compare(whole: dict, resumed: dict) -> list[str]:
    lines = ["| model | split | metric | uninterrupted | killed + resumed | equal |"]
    lines.append("|---|---|---|---:|---:|---|")
    for name, entry in whole["models"].items():
        for split in ("val", "test"):
            for metric in ("acc", "balanced_acc", "auroc"):
                a, b = entry[split][metric], resumed["models"][name][split][metric]
                lines.append(f"| {name} | {split} | {metric} | {a:.6f} | {b:.6f} | {a == b} |")
    same = all(
        entry[s] == resumed["models"][n][s]
        for n, entry in whole["models"].items()
        for s in ("val", "test")
    )
    lines.append(f"\nall val and test metrics (incl. confusion matrices) identical: {same}")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", nargs="+", default=list(DEFAULT_KILLS))
    parser.add_argument("--out", type=Path, default=None, help="where the two runs go")
    parser.add_argument("overrides", nargs="*", help="dwskd.run overrides (after --)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="dwskd-kill-resume-"))
    base = [sys.executable, "-m", "dwskd.run", *args.overrides]
    whole, resumed = out / "uninterrupted", out / "resumed"
    start = time.perf_counter()
    subprocess.run(
        [*base, f"hydra.run.dir={whole}"], cwd=REPO, check=True, env=dict(os.environ, **OFFLINE_ENV)
    )
    lines = [f"uninterrupted: {time.perf_counter() - start:.0f} s"]
    cmd, layout = [*base, f"hydra.run.dir={resumed}"], RunLayout(resumed)
    for kill in args.kill_after:
        stage, _, seconds = kill.partition(":")
        lines.append(run_until_killed(cmd, layout, stage, float(seconds or 0)))
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, **OFFLINE_ENV))
    result = read_results(resumed)
    lines.append(f"resumes recorded: {result['run']['resumes']}")
    lines += compare(read_results(whole), result)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
