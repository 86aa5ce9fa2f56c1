"""Teacher-strength study: from which teacher advantage on do weight selection and SKD pay off?

    python -m experiments.teacher_study              # lung_ct and brain_mri, 3 seeds, 64 px
    python -m experiments.teacher_study --quick      # lung_ct, seed 1, tiny epochs

For each dataset, teachers of increasing strength: a random ViT-S, in-domain ViT-S trained
5, 20 and 60 epochs (``--teacher-epochs``), and the pretrained union teacher adapted as in
the paper's ``pretrained`` scenario. **One teacher per strength** (trained with
``--teacher-seed``) serves every student seed. Students: ``scratch`` (no teacher), ``ws`` and
``dwskd`` on the paper's budget (:data:`experiments.paper.FULL`), one ``dwskd.run`` process
per job, resumable like the paper sweep.

A job identical to one of ``make paper`` (same overrides: scratch, the 5-epoch and the
pretrained teacher of seed 1, and the students of seed 1 that select from them) is not run
twice: it uses the paper's run directory under ``--paper-root``.

Results (``experiments/results/teacher_study.{md,csv,png}``): per dataset and teacher, the
teacher's validation accuracy minus scratch's (x, the teacher advantage) and each method's
test accuracy minus scratch's, seed by seed (y), mean ± std. Model choices use validation
data only; test accuracy is read once per run.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dwskd.io import now_iso
from dwskd.machine import machine_info
from dwskd.rundir import read_results
from experiments import paper
from experiments.aggregate import mean_std, plain
from experiments.common import (
    REPO,
    RESULTS_DIR,
    invocation,
    machine_lines,
    set_offline_env,
    show_progress,
)
from experiments.launch import add_launch_argument, split_launch

log = logging.getLogger("experiments.teacher_study")

DATASETS = ("lung_ct", "brain_mri")
STUDENTS = ("ws", "dwskd")
META_FILE = "teacher_study_meta.json"


@dataclass(frozen=True)
class Study:
    """Everything that defines the study; the plan is a pure function of it.

    ``shared`` is the paper sweep whose jobs the study reuses; its datasets, seeds, budget,
    device, pretrained teacher and extra overrides are the study's too.
    """

    name: str
    out: Path
    teacher_epochs: tuple[int, ...]
    teacher_seed: int
    shared: paper.Settings
    archive: Path | None = None  # experiments/results/runs/<name>

    def strengths(self) -> list[str]:
        """Weakest first: random, in-domain by epochs, then pretrained (when given)."""
        names = ["random", *(f"in_domain_e{n}" for n in sorted(self.teacher_epochs))]
        return names + (["pretrained"] if self.shared.pretrained_teacher else [])

    def own_archive(self) -> paper.Archive | None:
        return paper.Archive(self.out, self.archive, META_FILE) if self.archive else None

    def archives(self) -> list[paper.Archive]:
        """The study's own archived metrics, then the paper's."""
        own = self.own_archive()
        return ([own] if own else []) + self.shared.archives()


# ---------------------------------------------------------------------------- the plan
def teacher_overrides(study: Study, strength: str) -> tuple[list[str], Path | None]:
    """A ``method=teacher`` job's teacher options, and the file it needs (pretrained only)."""
    if strength == "random":
        return ["teacher.source=random", "method.epochs.teacher=0"], None
    if strength == "pretrained":
        shared = study.shared
        file, epochs = shared.pretrained_teacher, shared.budget.transfer_epochs
        return paper.pretrained_teacher_overrides(file, shared.pretrained_head, epochs), file
    epochs = int(strength.removeprefix("in_domain_e"))
    return ["teacher.source=fit", f"method.epochs.teacher={epochs}"], None


def job_overrides(study: Study, dataset: str, method: str, seed: int, *teacher: str) -> tuple:
    """A job's overrides on the paper's budget and device, its extra overrides last."""
    shared = study.shared
    return paper.job_overrides(
        dataset, method, seed, shared.budget, shared.device, *teacher, *shared.extra
    )


def teacher_job(study: Study, dataset: str, strength: str) -> paper.Job:
    teacher, needs = teacher_overrides(study, strength)
    seed = study.teacher_seed
    overrides = job_overrides(study, dataset, "teacher", seed, *teacher)
    run_dir = study.out / dataset / "teacher" / strength
    return paper.Job(strength, dataset, "teacher", seed, run_dir, overrides, needs)


def student_job(
    study: Study, dataset: str, method: str, seed: int, teacher: paper.Job
) -> paper.Job:
    weights = paper.teacher_weights(teacher.run_dir)
    extra = ["teacher.source=file", f"teacher.file={weights}", "method.epochs.teacher=0"]
    overrides = job_overrides(study, dataset, method, seed, *extra)
    run_dir = study.out / dataset / teacher.scenario / method / f"s{seed}"
    return paper.Job(teacher.scenario, dataset, method, seed, run_dir, overrides, weights)


def scratch_job(study: Study, dataset: str, seed: int) -> paper.Job:
    overrides = job_overrides(study, dataset, "scratch", seed)
    run_dir = study.out / dataset / "scratch" / f"s{seed}"
    return paper.Job("none", dataset, "scratch", seed, run_dir, overrides)


def in_paper_dir(job: paper.Job, known: dict[tuple[str, ...], Path]) -> paper.Job:
    """The same job in the paper's run directory when the paper plans it identically."""
    return replace(job, run_dir=known[job.overrides]) if job.overrides in known else job


def plan_jobs(study: Study) -> list[paper.Job]:
    """Teachers first (weakest to strongest), then scratch and students seed by seed."""
    known = {job.overrides: job.run_dir for job in paper.plan_jobs(study.shared)}
    seeds = study.shared.seeds
    teachers, students = [], []
    for dataset in study.shared.datasets:
        for strength in study.strengths():
            teacher = in_paper_dir(teacher_job(study, dataset, strength), known)
            teachers.append(teacher)
            for seed in seeds:
                for method in STUDENTS:
                    students.append(
                        in_paper_dir(student_job(study, dataset, method, seed, teacher), known)
                    )
        students += [in_paper_dir(scratch_job(study, dataset, seed), known) for seed in seeds]
    return teachers + sorted(students, key=lambda j: (j.seed, j.dataset, j.method != "scratch"))


# ------------------------------------------------------------------------ aggregation
def val_and_test_acc(
    run_dir: Path, archives: Sequence[paper.Archive]
) -> tuple[float, float] | None:
    """(validation, test) accuracy of a finished (or archived) run's deployed model."""
    found = paper.finished_dir(run_dir, archives)
    if found is None:
        return None
    results = read_results(found)
    entry = results["models"][results["deployed"]]
    return entry["val"]["acc"], entry["test"]["acc"]


def study_records(study: Study, jobs: Sequence[paper.Job]) -> list[dict]:
    """One record per (dataset, teacher strength): teacher advantage and each method's gain."""
    archives = study.archives()
    scores = {
        (j.dataset, j.scenario, j.method, j.seed): val_and_test_acc(j.run_dir, archives)
        for j in jobs
    }
    records = []
    for dataset in study.shared.datasets:
        scratch = {s: scores.get((dataset, "none", "scratch", s)) for s in study.shared.seeds}
        for strength in study.strengths():
            teacher = scores.get((dataset, strength, "teacher", study.teacher_seed))
            if teacher is None:
                continue
            seeds = [s for s in study.shared.seeds if scratch[s] is not None]
            record = {"dataset": dataset, "teacher": strength, "teacher_val_acc": teacher[0]}
            record["teacher_test_acc"] = teacher[1]
            adv = [teacher[0] - scratch[s][0] for s in seeds]
            record["advantage_mean"], record["advantage_std"], _ = mean_std(adv)
            for method in STUDENTS:
                gains = [
                    scores[dataset, strength, method, s][1] - scratch[s][1]
                    for s in seeds
                    if scores.get((dataset, strength, method, s)) is not None
                ]
                mean, std, n = mean_std(gains)
                record.update({f"{method}_gain_mean": mean, f"{method}_gain_std": std})
                record[f"{method}_n"] = n
            records.append(record)
    return records


def clear_gain(record: dict, method: str) -> bool:
    """A gain larger than its spread over seeds (mean > std >= 0, n >= 2): not seed noise."""
    return (
        record[f"{method}_n"] >= 2 and record[f"{method}_gain_mean"] > record[f"{method}_gain_std"]
    )


def pays_from(records: Sequence[dict], dataset: str, method: str) -> str:
    """The smallest teacher advantage from which the method clearly beats scratch for every
    stronger teacher (``clear_gain``); means alone would call seed noise a win."""
    own = sorted(
        (r for r in records if r["dataset"] == dataset and r[f"{method}_n"]),
        key=lambda r: r["advantage_mean"],
    )
    for i, record in enumerate(own):
        if all(clear_gain(r, method) for r in own[i:]):
            return (
                f"{method} beats scratch on {dataset} by more than the seed spread (mean gain > "
                f"its std) for every teacher with an advantage of "
                f"{100 * record['advantage_mean']:+.1f} points or more "
                f"({record['teacher']} and stronger)."
            )
    return (
        f"{method} does not beat scratch on {dataset} by more than the seed spread, even with "
        "the strongest teacher here."
    )


def markdown(study: Study, records: Sequence[dict], meta: dict, plot: str) -> str:
    shared, budget = study.shared, study.shared.budget
    lines = ["# Teacher-strength study: does a stronger teacher make ws and dwskd pay?", ""]
    lines += [
        f"- aggregated: {now_iso()} from `{study.out}` (shared jobs: `{shared.out}`)",
        f"- budget: {budget.img_size} px, batch {budget.batch_size}, every student "
        f"{budget.student_epochs} passes over train (dwskd: "
        f"{budget.student_epochs - budget.finetune_epochs} joint + "
        f"{budget.finetune_epochs} fine-tune); device {shared.device}",
        f"- one teacher per strength (seed {study.teacher_seed}) serves student seeds "
        f"{' '.join(map(str, shared.seeds))}; pretrained: `{shared.pretrained_teacher}` "
        f"(head {shared.pretrained_head}, fine-tuned {budget.transfer_epochs} epochs)",
    ]
    for entry in meta["invocations"]:
        lines.append(f"- runs made {entry['date']} by `{entry['command']}`:")
        lines += ["  " + line for line in machine_lines(entry["machine"])]
    lines += [
        "",
        "Teacher advantage = teacher's validation accuracy minus scratch's (same split), per "
        "student seed. Gain = method's test accuracy minus scratch's, same seed. Mean ± std (pp).",
        "",
        f"![gain vs teacher advantage]({plot})",
        "",
        "| dataset | teacher | teacher val acc | advantage (pp) | ws − scratch (pp) "
        "| dwskd − scratch (pp) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cells = [r["dataset"], r["teacher"], plain(r["teacher_val_acc"], float("nan"), 100)]
        cells.append(plain(r["advantage_mean"], r["advantage_std"], 100))
        cells += [plain(r[f"{m}_gain_mean"], r[f"{m}_gain_std"], 100) for m in STUDENTS]
        cells.append("/".join(str(r[f"{m}_n"]) for m in STUDENTS))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for dataset in sorted({r["dataset"] for r in records}):
        lines += [f"- {pays_from(records, dataset, m)}" for m in STUDENTS]
    return "\n".join(lines) + "\n"


def figure(records: Sequence[dict]) -> Figure:
    """x: teacher advantage, y: gain over scratch, one panel per dataset, one series per method."""
    datasets = sorted({r["dataset"] for r in records})
    fig = Figure(figsize=(5.5 * len(datasets), 4), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, dataset in zip(axes, datasets, strict=True):
        own = sorted(
            (r for r in records if r["dataset"] == dataset), key=lambda r: r["advantage_mean"]
        )
        for method, marker in zip(STUDENTS, "os", strict=True):
            ax.errorbar(
                [100 * r["advantage_mean"] for r in own],
                [100 * r[f"{method}_gain_mean"] for r in own],
                xerr=[100 * np.nan_to_num(r["advantage_std"]) for r in own],
                yerr=[100 * np.nan_to_num(r[f"{method}_gain_std"]) for r in own],
                marker=marker,
                capsize=3,
                label=method,
            )
        for r in own:
            ax.annotate(r["teacher"], (100 * r["advantage_mean"], 0), fontsize=6, rotation=60)
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("teacher val acc − scratch val acc (pp)")
        ax.set_ylabel("method − scratch, test accuracy (pp)")
        ax.set_title(dataset)
        ax.legend(fontsize=8)
    return fig


def write_results(study: Study, jobs: Sequence[paper.Job], results_dir: Path) -> list[Path]:
    records = study_records(study, jobs)
    if not records:
        raise SystemExit(f"No finished teacher runs under {study.out}: run the study first.")
    meta = paper.sweep_meta(study.out, study.archives(), META_FILE)
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = [results_dir / f"{study.name}.{ext}" for ext in ("md", "csv", "png")]
    figure(records).savefig(paths[2], dpi=120)
    with paths[1].open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    paths[0].write_text(markdown(study, records, meta, paths[2].name))
    return paths


# ------------------------------------------------------------------------------ the CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="lung_ct, seed 1, tiny epochs")
    p.add_argument("--datasets", nargs="+", help=f"default {' '.join(DATASETS)}")
    p.add_argument("--seeds", nargs="+", type=int, help="default 1 2 3 (--quick: 1)")
    p.add_argument("--teacher-epochs", nargs="+", type=int, help="default 5 20 60 (--quick: 1 2)")
    p.add_argument("--teacher-seed", type=int, default=1)
    p.add_argument("--img-size", type=int)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--pretrained-teacher", type=Path, help="default: the paper's")
    p.add_argument("--no-pretrained", action="store_true", help="leave the pretrained teacher out")
    p.add_argument("--pretrained-head", choices=tuple(paper.PRETRAINED_HEADS), default="match")
    p.add_argument("--out", type=Path, help="runs root (default outputs/<name>)")
    p.add_argument("--paper-root", type=Path, help="the paper sweep's root (default outputs/paper)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument(
        "--no-archive",
        action="store_true",
        help="neither read nor write <results-dir>/runs/ (archived metrics.json of finished runs)",
    )
    add_launch_argument(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the jobs still to run (and the skipped ones), run nothing",
    )
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the results")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    return p.parse_args(argv)


def study_from_args(args: argparse.Namespace) -> Study:
    launch, overrides = split_launch(args.overrides, args.in_process, args.device)
    paper.check_overrides(overrides)
    budget = paper.QUICK if args.quick else paper.FULL
    if args.img_size:
        budget = replace(budget, img_size=args.img_size)
    name = "teacher_study_quick" if args.quick else "teacher_study"
    pretrained = None
    if not args.no_pretrained:
        pretrained = paper.pretrained_file(args.pretrained_teacher)
    paper_name = paper.sweep_name(args.quick, args.device, budget.img_size)
    paper_root = (args.paper_root or REPO / "outputs" / paper_name).resolve()
    runs = args.results_dir.resolve() / "runs"
    shared = paper.Settings(
        name=paper_root.name,
        datasets=tuple(args.datasets or (["lung_ct"] if args.quick else DATASETS)),
        methods=("scratch", *STUDENTS, "teacher"),
        seeds=tuple(args.seeds or ([1] if args.quick else [1, 2, 3])),
        scenarios=("in_domain", "pretrained") if pretrained else ("in_domain",),
        budget=budget,
        device=args.device,
        out=paper_root,
        transfer_source=paper.TRANSFER_SOURCE,
        pretrained_teacher=pretrained,
        pretrained_head=args.pretrained_head,
        archive=None if args.no_archive else runs / paper_root.name,
        extra=tuple(overrides),
        launch=launch,
    )
    return Study(
        name=name,
        out=(args.out or REPO / "outputs" / name).resolve(),
        teacher_epochs=tuple(args.teacher_epochs or ([1, 2] if args.quick else [5, 20, 60])),
        teacher_seed=args.teacher_seed,
        shared=shared,
        archive=None if args.no_archive else runs / name,
    )


def record_invocation(study: Study, command: str) -> None:
    entry = {"command": command, "date": now_iso(), "machine": machine_info()}
    paper.append_invocation(study.out, study.archives(), entry, META_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    show_progress(log)
    show_progress(paper.log)
    set_offline_env()
    args = parse_args(argv)
    study = study_from_args(args)
    jobs = plan_jobs(study)
    if args.dry_run:
        print(paper.plan_listing(jobs, study.archives()))
        return 0
    failed: list[paper.Job] = []
    if not args.aggregate_only:
        record_invocation(
            study, invocation("experiments.teacher_study", None if argv is None else list(argv))
        )
        failed = paper.run_jobs(jobs, study.shared.launch, study.out, study.archives())
    own = study.own_archive()
    if own is not None:
        own.store_all()
    return paper.finish(write_results(study, jobs, args.results_dir), failed)


if __name__ == "__main__":
    sys.exit(main())
