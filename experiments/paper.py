"""The comparison table: methods x datasets x seeds x teacher scenarios, then aggregated.

    python -m experiments.paper                  # full: 4 tasks x 6 methods x 3 seeds, 64 px
    python -m experiments.paper --quick          # lung_ct, one seed, tiny epochs: minutes
    python -m experiments.paper --device gpu --img-size 224   # the same table on a GPU

Every job is one ``python -m dwskd.run`` process with ``hydra.run.dir`` set to
``<out>/<scenario>/<dataset>/<method>/s<seed>``; a job whose ``metrics.json`` exists is
skipped, and an interrupted one resumes from its own stage files, so re-running the same
command continues a sweep. Teachers are trained once per dataset and seed and then shared
by every method (``teacher.source=file``, ``method.epochs.teacher=0``):

* ``in_domain`` - the ViT-S teacher is the ``method=teacher`` run on the task's own train split;
* ``transfer``  - the teacher is the in-domain teacher of another modality (``TRANSFER_SOURCE``),
  loaded with its classifier head re-initialised and fine-tuned ``--transfer-epochs`` on the
  target; that run is the transfer teacher row and the teacher of ws, kd and dwskd.
* ``pretrained`` - the paper's setting: a teacher pretrained on a larger corpus
  (``--pretrained-teacher``, by default the shared ViT-S pretrained on the union of the three
  datasets' train splits), adapted to the task before anyone selects from it: its head rows of
  the task's classes are kept (``teacher.head=match``; ``--pretrained-head probe`` trains a new
  head alone first instead), then it is fine-tuned ``--transfer-epochs`` on the task.

scratch and dml never use a teacher, so they run once (under ``in_domain``) and serve both
tables. Model selection inside every run uses validation data only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dwskd.io import atomic_write, now_iso
from dwskd.machine import machine_info
from dwskd.rundir import RunLayout
from experiments import aggregate
from experiments.common import (
    METHODS,
    REPO,
    RESULTS_DIR,
    TEACHER_FREE,
    invocation,
    method_students,
    set_offline_env,
    show_progress,
)
from experiments.launch import Launch, add_launch_argument, launch_phase, split_launch

log = logging.getLogger("experiments.paper")

DATASETS = ("chest_xray", "lung_ct", "brain_mri", "brain_mri_tumour_type")
SCENARIOS = ("in_domain", "transfer", "pretrained")
# The shared union teacher (../shared/teachers/README.md): 64 px, grayscale, 8 labelled classes.
PRETRAINED_TEACHER = "vit_small_medunion8_64px.safetensors"
PRETRAINED_LR = 1e-4  # fine-tuning a pretrained teacher (method.lr.teacher is 1e-3: from scratch)
PRETRAINED_HEADS = {
    "match": ["teacher.head=match"],  # keep the head rows of the task's classes (lung_COVID)
    "probe": ["teacher.head=reinit", "teacher.probe_epochs=1"],  # new head, trained alone first
}
# Source of each target's transfer teacher. Chosen so that the label spaces differ (2 vs 4
# classes): timm's loader then drops the source head and the target head starts from scratch.
TRANSFER_SOURCE = {
    "chest_xray": "brain_mri",
    "lung_ct": "brain_mri",
    "brain_mri": "chest_xray",
    "brain_mri_tumour_type": "chest_xray",
}
FORBIDDEN_OVERRIDES = ("trainer.max_epochs", "hydra.run.dir", "method.epochs")


@dataclass(frozen=True)
class Budget:
    """Identical for every method: image size, batch, and passes over the train split.

    A student sees the train split ``student_epochs`` times whatever the method (dml and
    dwskd: ``student_epochs - finetune_epochs`` of joint training, then ``finetune_epochs``).
    """

    img_size: int = 64
    batch_size: int = 32
    teacher_epochs: int = 5
    student_epochs: int = 4
    finetune_epochs: int = 1
    transfer_epochs: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.finetune_epochs < self.student_epochs:
            raise ValueError(
                f"--finetune-epochs={self.finetune_epochs} must be between 1 and "
                f"--student-epochs - 1 ({self.student_epochs - 1}): dml/dwskd need both stages."
            )


FULL = Budget()
QUICK = Budget(teacher_epochs=2, student_epochs=2, finetune_epochs=1, transfer_epochs=1)


@dataclass(frozen=True)
class Settings:
    """Everything that defines the sweep; the plan is a pure function of it."""

    name: str
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    scenarios: tuple[str, ...]
    budget: Budget
    device: str
    out: Path
    transfer_source: dict[str, str]
    pretrained_teacher: Path | None = None
    pretrained_head: str = "match"
    archive: Path | None = None  # experiments/results/runs/<name>: committed metrics of runs
    extra: tuple[str, ...] = ()
    launch: Launch = Launch()  # Hydra's launcher for every phase
    # Another sweep whose teachers this one's students use (a study that varies only the
    # students shares the table's teachers): its teacher jobs, not copies of them.
    teachers: Settings | None = None

    def archives(self) -> list[Archive]:
        own = [Archive(self.out, self.archive)] if self.archive else []
        return own + (self.teachers.archives() if self.teachers else [])

    def teacher_sweep(self) -> Settings:
        return self.teachers or self


@dataclass(frozen=True)
class Job:
    """One ``dwskd.run`` process; ``teacher_file`` must exist before it can start."""

    scenario: str
    dataset: str
    method: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    teacher_file: Path | None = None

    @property
    def done(self) -> bool:
        return RunLayout(self.run_dir).finished

    def argv(self) -> list[str]:
        return [*self.overrides, f"hydra.run.dir={self.run_dir}"]

    def command(self) -> str:
        return " ".join(["python -m dwskd.run", *self.argv()])


# ---------------------------------------------------------------------------- the plan
def teacher_weights(run_dir: Path) -> Path:
    """The exported teacher of a finished ``method=teacher`` job (what students select from)."""
    return RunLayout(run_dir).weights("teacher", "teacher")


def run_dir(out: Path, scenario: str, dataset: str, method: str, seed: int) -> Path:
    return out / scenario / dataset / method / f"s{seed}"


def device_overrides(device: str) -> list[str]:
    """CPU: the default trainer. GPU: mixed precision and loader workers to keep it fed."""
    if device == "gpu":
        return ["trainer=gpu", "data.num_workers=4"]
    return ["trainer=cpu"]


def epoch_overrides(method: str, budget: Budget) -> list[str]:
    """Per-stage epochs (never trainer.max_epochs: it would retrain the shared teacher)."""
    if method == "teacher":
        return []  # set by teacher_overrides: in-domain and transfer teachers differ
    if method_students(method) >= 2:  # joint training, then the deployed one is fine-tuned
        train = budget.student_epochs - budget.finetune_epochs
        return [f"method.epochs.train={train}", f"method.epochs.finetune={budget.finetune_epochs}"]
    return [f"method.epochs.train={budget.student_epochs}", "method.epochs.finetune=0"]


def teacher_job_dir(settings: Settings, scenario: str, dataset: str, seed: int) -> Path:
    return run_dir(settings.teacher_sweep().out, scenario, dataset, "teacher", seed)


def source_dataset(settings: Settings, dataset: str) -> str:
    if dataset not in settings.transfer_source:
        raise ValueError(
            f"No transfer source for data={dataset}: add --transfer-source {dataset}=<dataset>."
        )
    return settings.transfer_source[dataset]


def teacher_overrides(
    settings: Settings, scenario: str, dataset: str, method: str, seed: int
) -> tuple[list[str], Path | None]:
    """Where this job's teacher comes from, and the weights file it waits for."""
    budget = settings.budget
    if method in TEACHER_FREE:
        return [], None
    if method == "teacher" and scenario == "in_domain":
        return ["teacher.source=fit", f"method.epochs.teacher={budget.teacher_epochs}"], None
    if method == "teacher" and scenario == "pretrained":
        file, head = settings.pretrained_teacher, settings.pretrained_head
        return pretrained_teacher_overrides(file, head, budget.transfer_epochs), file
    if method == "teacher":  # transfer: another modality's teacher, re-headed and fine-tuned
        source_dir = teacher_job_dir(settings, "in_domain", source_dataset(settings, dataset), seed)
        epochs = budget.transfer_epochs
    else:  # a student: the scenario's shared teacher, not trained again
        source_dir, epochs = teacher_job_dir(settings, scenario, dataset, seed), 0
    weights = teacher_weights(source_dir)
    overrides = [
        "teacher.source=file",
        f"teacher.file={weights}",
        f"method.epochs.teacher={epochs}",
    ]
    return overrides, weights


def pretrained_teacher_overrides(file: Path | None, head: str, epochs: int) -> list[str]:
    """The pretrained file, adapted to the task: matched (or probed) head, then fine-tuned.

    At a fine-tuning learning rate (``PRETRAINED_LR``, not the 1e-3 that trains a teacher from
    scratch); dwskd keeps the loaded weights when no fine-tuned epoch validates better.
    """
    return [
        "teacher.source=file",
        f"teacher.file={file}",
        *PRETRAINED_HEADS[head],
        f"method.epochs.teacher={epochs}",
        f"method.lr.teacher={PRETRAINED_LR}",
    ]


def default_pretrained_teacher() -> Path:
    """``$DWSKD_TEACHERS_DIR`` or the ``teachers/`` folder beside the data (``../shared``)."""
    data = Path(os.environ.get("DWSKD_DATA_DIR", REPO.parent / "shared" / "data"))
    return Path(os.environ.get("DWSKD_TEACHERS_DIR", data.parent / "teachers")) / PRETRAINED_TEACHER


def job_overrides(
    dataset: str, method: str, seed: int, budget: Budget, device: str, *extra: str
) -> tuple[str, ...]:
    """One job's Hydra overrides on the shared budget; ``extra`` (teacher, knobs) come last."""
    return (
        "experiment=paper",
        f"data={dataset}",
        f"method={method}",
        f"seed={seed}",
        f"data.img_size={budget.img_size}",
        f"data.batch_size={budget.batch_size}",
        *device_overrides(device),
        *epoch_overrides(method, budget),
        *extra,
    )


def make_job(settings: Settings, scenario: str, dataset: str, method: str, seed: int) -> Job:
    if method == "teacher" and settings.teachers is not None:
        return make_job(settings.teachers, scenario, dataset, method, seed)
    teacher, weights = teacher_overrides(settings, scenario, dataset, method, seed)
    overrides = job_overrides(
        dataset, method, seed, settings.budget, settings.device, *teacher, *settings.extra
    )
    directory = run_dir(settings.out, scenario, dataset, method, seed)
    return Job(scenario, dataset, method, seed, directory, overrides, weights)


def job_phase(job: Job) -> int:
    """In-domain teachers first, transfer and pretrained teachers next, students last."""
    if job.method != "teacher":
        return 2
    return 0 if job.scenario == "in_domain" else 1


def plan_jobs(settings: Settings) -> list[Job]:
    """Every job the table needs, teachers that others depend on included, in a runnable order."""
    keys: set[tuple[str, str, str, int]] = set()
    for seed in settings.seeds:
        for dataset in settings.datasets:
            for scenario in settings.scenarios:
                for method in settings.methods:
                    keys.add(
                        ("in_domain" if method in TEACHER_FREE else scenario, dataset, method, seed)
                    )
                needs_teacher = scenario == "transfer" or set(settings.methods) - set(TEACHER_FREE)
                if needs_teacher:
                    keys.add((scenario, dataset, "teacher", seed))
                if scenario == "transfer":
                    keys.add(("in_domain", source_dataset(settings, dataset), "teacher", seed))
    jobs = [make_job(settings, *key) for key in keys]
    # Seed by seed, so that a long sweep has complete tables for its first seeds early.
    return sorted(jobs, key=lambda j: (j.seed, job_phase(j), j.scenario, j.dataset, j.method))


# ------------------------------------------------------------------------- the archive
@dataclass(frozen=True)
class Archive:
    """Copies of finished runs' ``metrics.json`` under ``experiments/results/runs/<name>/``.

    Why: run directories hold weights (tens of MB each) and stay out of git, so a checkout
    that lacks them would have to redo a sweep of many CPU hours. With the metrics committed,
    a later checkout skips every archived job and tabulates it; only a teacher whose weights a
    job still needs is trained again (same seed, same command).
    """

    out: Path  # the sweep's runs root
    root: Path  # where the copies live, in the same <scenario>/<dataset>/<method>/s<seed> layout
    meta_file: str = aggregate.META_FILE  # the sweep's invocation log, archived with it

    def path(self, run_dir: Path) -> Path | None:
        """The archived copy of ``run_dir``, or None for a run outside this sweep's root."""
        return (
            self.root / run_dir.relative_to(self.out) if run_dir.is_relative_to(self.out) else None
        )

    def store(self, run_dir: Path) -> None:
        copy = self.path(run_dir)
        if copy is not None and RunLayout(run_dir).finished:
            target = RunLayout(copy).metrics_json
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp: shutil.copyfile(RunLayout(run_dir).metrics_json, tmp))

    def store_all(self) -> None:
        """Archive every finished run under ``out`` (idempotent), and the sweep's invocations."""
        for run_dir in aggregate.find_runs(self.out):  # run dirs only, not <run>/external/
            self.store(run_dir)
        meta = self.out / self.meta_file
        if meta.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(meta, self.root / self.meta_file)


def sweep_meta(out: Path, archives: Sequence[Archive], name: str = aggregate.META_FILE) -> dict:
    """A sweep's invocation log: in its runs root, else (a fresh checkout) its archived copy."""
    return aggregate.read_meta(out / name, *(a.root / name for a in archives if a.out == out))


def append_invocation(
    out: Path, archives: Sequence[Archive], entry: dict, name: str = aggregate.META_FILE
) -> dict:
    """Add one invocation to ``<out>/<name>`` (``Archive.store_all`` copies it); the log."""
    meta = sweep_meta(out, archives, name)
    meta["invocations"].append(entry)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(meta, indent=2, default=str))
    return meta


def finished_dir(run_dir: Path, archives: Sequence[Archive]) -> Path | None:
    """Where a finished run's results are: its own dir, else an archived copy; None if neither."""
    if RunLayout(run_dir).finished:
        return run_dir
    copies = [a.path(run_dir) for a in archives]
    return next((c for c in copies if c is not None and RunLayout(c).finished), None)


def must_rerun(job: Job, pending: set[Path | None]) -> bool:
    """An archived teacher whose weights a job still waits for (they are not archived)."""
    weights = teacher_weights(job.run_dir)
    return job.method == "teacher" and weights in pending and not weights.is_file()


def job_states(jobs: Sequence[Job], archives: Sequence[Archive] = ()) -> list[str]:
    """Per job, what a sweep will do with it: ``done``, ``archived`` (both skipped) or ``to run``.

    One rule for ``run_jobs`` and ``--dry-run``, so the listing says what running would do.
    """
    pending = {j.teacher_file for j in jobs if finished_dir(j.run_dir, archives) is None}

    def state(job: Job) -> str:
        if job.done:
            return "done"
        if finished_dir(job.run_dir, archives) and not must_rerun(job, pending):
            return "archived"
        return "to run"

    return [state(job) for job in jobs]


def plan_listing(jobs: Sequence[Job], archives: Sequence[Archive] = ()) -> str:
    """``--dry-run``: the commands still to run, then the skipped ones as comments."""
    states = job_states(jobs, archives)
    todo = [job.command() for job, s in zip(jobs, states, strict=True) if s == "to run"]
    skipped = [
        f"# {s}: {job.command()}" for job, s in zip(jobs, states, strict=True) if s != "to run"
    ]
    head = f"# {len(todo)} of {len(jobs)} jobs to run; {len(skipped)} done or archived (skipped)"
    return "\n".join([head, *todo, *skipped])


# ------------------------------------------------------------------------- running jobs
PHASES = ("in_domain_teachers", "adapted_teachers", "students")  # names of job_phase 0, 1, 2


def run_jobs(
    jobs: Sequence[Job], launch: Launch, root: Path, archives: Sequence[Archive] = ()
) -> list[Job]:
    """Run what is not done yet, one Hydra multirun per phase (teachers first), under ``root``;
    returns the jobs that failed or could not start.

    A job is archived as soon as it finishes (``archives``, by a Hydra callback); an archived
    one is skipped unless it is a teacher that a pending job still needs the weights of.
    """
    todo = []
    for job, state in zip(jobs, job_states(jobs, archives), strict=True):
        if state == "to run":
            todo.append(job)
        else:
            log.info("%s: %s earlier, skipped", job_label(job), state)
    failed = []
    for phase in sorted({job_phase(job) for job in todo}):
        ready = [job for job in todo if job_phase(job) == phase]
        blocked = [j for j in ready if j.teacher_file is not None and not j.teacher_file.is_file()]
        for job in blocked:
            log.error(
                "%s: teacher %s is missing (its job failed?)", job_label(job), job.teacher_file
            )
        ready = [job for job in ready if job not in blocked]
        launch_phase(ready, root, launch, PHASES[phase], archives)
        failed += blocked + [job for job in ready if not job.done]
    return failed


def job_label(job: Job) -> str:
    return f"{job.scenario}/{job.dataset}/{job.method}/s{job.seed}"


# ------------------------------------------------------------------------------ the CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="lung_ct, seed 1, tiny epochs (minutes)")
    p.add_argument("--datasets", nargs="+", help=f"default {' '.join(DATASETS)}")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, help="default 1 2 3 (--quick: 1)")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--img-size", type=int, help=f"default {FULL.img_size}")
    p.add_argument("--teacher-epochs", type=int, help=budget_help("teacher_epochs"))
    p.add_argument("--student-epochs", type=int, help=budget_help("student_epochs"))
    p.add_argument("--finetune-epochs", type=int, help=budget_help("finetune_epochs"))
    p.add_argument("--transfer-epochs", type=int, help=budget_help("transfer_epochs"))
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--transfer-source", nargs="+", default=[], metavar="TARGET=SOURCE")
    p.add_argument(
        "--pretrained-teacher",
        type=Path,
        help=f"weights of the pretrained scenario (default {default_pretrained_teacher()})",
    )
    p.add_argument(
        "--pretrained-head",
        choices=tuple(PRETRAINED_HEADS),
        default="match",
        help="match: keep the teacher head's rows of the task's classes; probe: new head trained "
        "alone for 1 epoch, then the fine-tuning",
    )
    p.add_argument("--name", help="results/<name>.{md,csv,png} and outputs/<name>/ (derived)")
    p.add_argument("--out", type=Path, help="runs root (default outputs/<name>)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--no-archive",
        action="store_true",
        help="do not copy finished runs' metrics.json to <results-dir>/runs/<name>/ (nor read them)",
    )
    add_launch_argument(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the jobs still to run (and the skipped ones), run nothing",
    )
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables")
    p.add_argument(
        "overrides",
        nargs="*",
        help="extra Hydra overrides for every job; hydra/launcher=<name> and hydra.launcher.* "
        "choose how the jobs are launched",
    )
    return p.parse_args(argv)


def budget_help(field: str) -> str:
    return f"default {getattr(FULL, field)} (--quick: {getattr(QUICK, field)})"


def sweep_name(quick: bool, device: str, img_size: int) -> str:
    """paper, paper_quick, paper_gpu224...: other budgets never overwrite the main table."""
    name = "paper_quick" if quick else "paper"
    return name if (device, img_size) == ("cpu", FULL.img_size) else f"{name}_{device}{img_size}"


def check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        if item.lstrip("+~").startswith(FORBIDDEN_OVERRIDES):
            raise SystemExit(
                f"override {item!r} is set by experiments.paper itself (shared teachers, equal "
                "epochs, run directories): use --teacher-epochs/--student-epochs/--out instead."
            )


def budget_from_args(args: argparse.Namespace) -> Budget:
    base = QUICK if args.quick else FULL
    names = ("img_size", "teacher_epochs", "student_epochs", "finetune_epochs", "transfer_epochs")
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return replace(base, **given)


def parse_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``chest_xray=lung_ct`` pairs; a Hydra override (it has a dot) is a misplaced argument."""
    if any(pair.count("=") != 1 or "." in pair for pair in pairs):
        raise SystemExit(
            f"--transfer-source takes TARGET=SOURCE dataset pairs, got {list(pairs)}; "
            "put Hydra overrides before the option flags."
        )
    return dict(pair.split("=", 1) for pair in pairs)


def check_dataset_names(names: Sequence[str]) -> tuple[str, ...]:
    wrong = [n for n in names if "=" in n or "." in n]
    if wrong:
        raise SystemExit(
            f"--datasets got {wrong}: these look like Hydra overrides; put them before the flags."
        )
    return tuple(names)


def settings_from_args(args: argparse.Namespace) -> Settings:
    launch, overrides = split_launch(args.overrides, args.in_process, args.device)
    check_overrides(overrides)
    quick, budget = args.quick, budget_from_args(args)
    name = args.name or sweep_name(quick, args.device, budget.img_size)
    return Settings(
        name=name,
        datasets=check_dataset_names(args.datasets or (["lung_ct"] if quick else DATASETS)),
        methods=tuple(args.methods),
        seeds=tuple(args.seeds or ([1] if quick else [1, 2, 3])),
        scenarios=tuple(args.scenarios),
        budget=budget,
        device=args.device,
        out=(args.out or REPO / "outputs" / name).resolve(),
        transfer_source={**TRANSFER_SOURCE, **parse_pairs(args.transfer_source)},
        pretrained_teacher=(
            pretrained_file(args.pretrained_teacher) if "pretrained" in args.scenarios else None
        ),
        pretrained_head=args.pretrained_head,
        archive=None if args.no_archive else (args.results_dir / "runs" / name).resolve(),
        extra=tuple(overrides),
        launch=launch,
    )


def pretrained_file(given: Path | None) -> Path:
    """``--pretrained-teacher`` or the default file; a missing one stops before any job."""
    path = (given or default_pretrained_teacher()).resolve()
    if not path.is_file():
        raise SystemExit(
            f"--pretrained-teacher: {path} does not exist. Point it at a pretrained weights file "
            "(../shared/teachers/README.md), set DWSKD_TEACHERS_DIR, or leave the pretrained "
            "teacher out (paper: --scenarios in_domain transfer; teacher_study: --no-pretrained)."
        )
    return path


def record_invocation(settings: Settings, command: str) -> None:
    """Append this invocation (command, budget, machine, date) to ``<out>/paper_meta.json``."""
    entry = asdict(settings)
    entry.update(out=str(settings.out), command=command, date=now_iso(), machine=machine_info())
    append_invocation(settings.out, settings.archives(), entry)


def main(argv: Sequence[str] | None = None) -> int:
    show_progress(log)
    set_offline_env()
    args = parse_args(argv)
    settings = settings_from_args(args)
    jobs = plan_jobs(settings)
    if args.dry_run:
        print(plan_listing(jobs, settings.archives()))
        return 0
    failed: list[Job] = []
    if not args.aggregate_only:
        record_invocation(
            settings, invocation("experiments.paper", None if argv is None else list(argv))
        )
        failed = run_jobs(jobs, settings.launch, settings.out, settings.archives())
    for archive in settings.archives():
        archive.store_all()
    archived = [a.root for a in settings.archives()]
    written = aggregate.write_results(settings.out, args.results_dir, settings.name, archived)
    return finish(written, failed)


def finish(written: Sequence[Path], failed: Sequence[Job]) -> int:
    """Say what was written and which jobs failed; the exit code of a sweep script."""
    for path in written:
        log.info("results: %s", path)
    for job in failed:
        log.error("FAILED: %s", job.command())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
