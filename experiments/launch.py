"""Run planned jobs as Hydra multiruns, one per phase, on any of Hydra's launchers.

``experiments/`` plans: which jobs a table needs, their overrides, their run dirs, and the
phase each belongs to (teachers before the students that select from them). Hydra launches:
every job becomes a generated config of the group ``job`` (``<root>/.jobs/job/<name>.yaml``
on Hydra's search path) holding its config-group choices as ``override`` defaults, its
values, and its run dir as an absolute ``hydra.sweep.subdir``. One

    python -m dwskd.run -m hydra.searchpath=[file://<root>/.jobs] '+job=a,b,c' hydra/launcher=...

per phase then runs them with the basic launcher, ``joblib`` (N local processes) or
``submitit_local`` / ``slurm``. Why generated configs: the jobs are no cartesian product
(each student reads its own scenario's, dataset's and seed's teacher; finished and archived
jobs are left out), which is all Hydra's basic sweeper can express. A finished run dir
returns its recorded metric (``dwskd.run``), so re-launching a phase continues it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from experiments.common import OFFLINE_ENV, REPO

log = logging.getLogger("experiments.paper")

LAUNCHERS = ("basic", "joblib", "submitit_local", "slurm")  # conf/hydra/launcher + plugins
CONF = REPO / "conf"


@dataclass(frozen=True)
class Launch:
    """How a phase is launched: Hydra's launcher, its overrides, in this process or not.

    ``in_process`` (tests, tiny sweeps): the basic launcher inside this Python process,
    without the ~10 s start of a new one.
    """

    launcher: str = "basic"
    overrides: tuple[str, ...] = ()  # e.g. hydra.launcher.n_jobs=2
    in_process: bool = False
    threads: int | None = None  # OMP_NUM_THREADS per job (None: the environment's)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise SystemExit(f"--launcher {self.launcher}: choose one of {list(LAUNCHERS)}.")
        if self.in_process and self.launcher != "basic":
            raise SystemExit("--in-process runs Hydra's basic launcher only.")


def is_group(key: str) -> bool:
    """A config-group choice (``data=lung_ct``) rather than a value (``data.img_size=64``)."""
    return "." not in key and (CONF / key).is_dir()


def job_config(overrides: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """One job's overrides as a ``@package _global_`` config: groups, values, run dir."""
    defaults: list[Any] = []
    values = OmegaConf.create({})
    for item in overrides:
        key, sep, text = item.lstrip("+").partition("=")
        if not sep or key.startswith(("~", "hydra")):
            raise ValueError(f"{item!r}: a job override must be key=value (not ~ or hydra.*)")
        value = yaml.safe_load(text) if text else None
        if is_group(key):
            defaults.append({f"override /{key}": value})
        else:
            OmegaConf.update(values, key, value, force_add=True)
    # An absolute subdir is the job's dir whatever the phase's sweep dir (os.path.join).
    sweep = {"subdir": str(run_dir.absolute())}
    return {
        "defaults": [*defaults, "_self_"],
        **OmegaConf.to_container(values),
        "hydra": {"sweep": sweep},
    }


def job_name(run_dir: Path, root: Path) -> str:
    """A config name from the run dir (``pretrained__lung_ct__ws__s1``): unique per root."""
    return (
        "__".join(run_dir.relative_to(root).parts)
        if run_dir.is_relative_to(root)
        else ("__".join(run_dir.parts[-4:]))
    )


def write_job_configs(jobs: Sequence[Any], root: Path) -> list[str]:
    """``<root>/.jobs/job/<name>.yaml`` for every job (rewritten: they are the plan)."""
    folder = root / ".jobs" / "job"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for job in jobs:
        name = job_name(job.run_dir, root)
        text = yaml.safe_dump(job_config(job.overrides, job.run_dir), sort_keys=False)
        (folder / f"{name}.yaml").write_text(f"# @package _global_\n# {job.command()}\n{text}")
        names.append(name)
    return names


class ArchiveFinishedJob(Callback):
    """Hydra callback: a finished job's metrics.json goes into the sweep's archive at once.

    Why at once: run dirs are not committed, so a sweep stopped in the middle of a long phase
    would otherwise lose every run that phase had finished.
    """

    def __init__(self, out: str, root: str) -> None:
        self.out, self.root = Path(out), Path(root)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        from experiments.paper import Archive

        Archive(self.out, self.root).store(Path(HydraConfig.get().runtime.output_dir))


def archive_callbacks(archives: Sequence[Any]) -> list[str]:
    """``hydra.callbacks`` overrides that archive each finished job (see ArchiveFinishedJob)."""
    target = f"{ArchiveFinishedJob.__module__}.{ArchiveFinishedJob.__name__}"
    overrides = []
    for number, archive in enumerate(archives):
        key = f"+hydra.callbacks.archive{number}"
        overrides += [
            f"{key}._target_={target}",
            f"{key}.out={archive.out}",
            f"{key}.root={archive.root}",
        ]
    return overrides


def multirun_args(names: Sequence[str], root: Path, launch: Launch, phase: str) -> list[str]:
    """``dwskd.run``'s arguments for one phase (its own multirun.yaml under ``.jobs``)."""
    return [
        "-m",
        f"hydra.searchpath=[file://{root / '.jobs'}]",
        f"+job={','.join(names)}",
        f"hydra/launcher={launch.launcher}",
        f"hydra.sweep.dir={root / '.jobs' / 'launch' / phase}",
        *launch.overrides,
    ]


def launch_phase(
    jobs: Sequence[Any], root: Path, launch: Launch, phase: str, archives: Sequence[Any] = ()
) -> None:
    """Run ``jobs`` as one Hydra multirun; which finished is read from their run dirs.

    ``archives`` (``experiments.paper.Archive``) receive each job's metrics as it finishes.
    """
    if not jobs:
        return
    args = multirun_args(write_job_configs(jobs, root), root, launch, phase)
    args += archive_callbacks(archives)
    log.info("phase %s: %d job(s) on hydra/launcher=%s", phase, len(jobs), launch.launcher)
    if launch.in_process:
        run_in_process(args)
        return
    env = {**OFFLINE_ENV, **os.environ}
    if launch.threads and "OMP_NUM_THREADS" not in os.environ:  # the user's setting wins
        env["OMP_NUM_THREADS"] = str(launch.threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    log_file = root / ".jobs" / f"{phase}.log"
    with log_file.open("a") as stream:
        done = subprocess.run(
            [sys.executable, "-m", "dwskd.run", *args], cwd=REPO, env=env,
            stdout=stream, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        log.error("phase %s: a job failed (exit %d)\n%s", phase, done.returncode, "\n".join(tail))


def run_in_process(args: Sequence[str]) -> None:
    """Hydra's multirun in this process (its basic launcher runs the jobs one by one)."""
    from dwskd import run

    argv = sys.argv
    sys.argv = ["dwskd.run", *args]
    try:
        run.main()
    except SystemExit as stop:  # Hydra exits 1 after reporting a failed job
        if stop.code not in (0, None):
            log.error("a job of this phase failed (see the log above)")
    finally:
        sys.argv = argv


# The faster launch for CPU sweeps, measured on 2 cores (experiments/results/bench.md,
# "Sweep throughput"): 2 processes x 1 thread ran make paper-quick's 15 jobs in 8.3 min,
# 1 process x 2 threads in 11.5 min (1.39x). A small ViT step does not keep two threads busy.
CPU_PROCESSES = 2


def split_launch(
    overrides: Sequence[str], in_process: bool, device: str
) -> tuple[Launch, list[str]]:
    """``hydra/launcher=joblib`` and ``hydra.launcher.*`` choose the launch; the rest are the
    jobs' own overrides (``python -m experiments.paper hydra/launcher=joblib ...``).

    Without a launcher, a CPU sweep runs on joblib with :data:`CPU_PROCESSES` processes; a
    GPU sweep on the basic launcher (one job uses the whole GPU). A joblib launch splits the
    cores between its processes (``OMP_NUM_THREADS``), so they never oversubscribe them.
    """
    launcher, launch_overrides, rest = None, [], []
    for item in overrides:
        if item.startswith("hydra/launcher="):
            launcher = item.partition("=")[2]
        elif item.startswith("hydra.launcher."):
            launch_overrides.append(item)
        else:
            rest.append(item)
    n_jobs = next((int(o.partition("=")[2]) for o in launch_overrides
                   if o.startswith("hydra.launcher.n_jobs=")), None)  # fmt: skip
    if launcher is None:
        launcher = "joblib" if device == "cpu" and not in_process else "basic"
        if launcher == "joblib" and n_jobs is None:
            n_jobs = CPU_PROCESSES
            launch_overrides.append(f"hydra.launcher.n_jobs={n_jobs}")
    threads = cpu_share(n_jobs) if launcher == "joblib" else None
    return Launch(launcher, tuple(launch_overrides), in_process, threads), rest


def cpu_share(n_jobs: int | None) -> int:
    """Threads per joblib process: the cores divided by ``n_jobs`` (None or < 1: the
    plugin's default, one process per core)."""
    cores = os.cpu_count() or 1
    processes = cores if n_jobs is None or n_jobs < 1 else n_jobs
    return max(1, cores // processes)


def add_launch_argument(parser: Any) -> None:
    """``--in-process`` for every sweep script (the launcher itself is a Hydra override)."""
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Hydra's basic launcher in this process (tests, tiny sweeps); "
        "hydra/launcher=joblib|submitit_local|slurm among the overrides chooses another",
    )
