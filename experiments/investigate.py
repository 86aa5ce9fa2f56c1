"""Why dwskd loses where it loses: one-knob variants, compared on VALIDATION data only.

    python -m experiments.investigate                          # lung_ct, seeds 1 2 3
    python -m experiments.investigate --dataset brain_mri --seeds 1

Each variant is dwskd with one thing changed (temperature, which KD terms, weight selection
on/off, learning rate, a longer-trained teacher), next to the baselines it lost to, on the
paper table's budget (``experiments.paper.FULL``) and with the paper's own shared in-domain
teacher (``<paper root>/in_domain/<dataset>/teacher/s<seed>``; run ``make paper`` first).
Runs go to ``outputs/investigate/<dataset>/<variant>/s<seed>`` and resume like the paper's.

The table (``results/investigate_<dataset>.{md,csv}``) is built from the ``val`` block of
each run's metrics.json - the final weights on the validation split - and never reads
test metrics: knobs chosen on test would make the comparison table meaningless.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dwskd.io import now_iso
from dwskd.machine import machine_info
from dwskd.rundir import RunLayout, read_results
from experiments.aggregate import mean_std, pct
from experiments.common import (
    REPO,
    RESULTS_DIR,
    invocation,
    machine_lines,
    set_offline_env,
    show_progress,
)
from experiments.launch import Launch, add_launch_argument, split_launch
from experiments.paper import (
    FULL,
    QUICK,
    Budget,
    Job,
    check_overrides,
    finish,
    job_overrides,
    run_jobs,
    teacher_weights,
)
from experiments.paper import log as paper_log

log = logging.getLogger("experiments.investigate")

MODELS = ("deployed", "student_a", "student_b", "ensemble")
QUALITY = ("acc", "balanced_acc", "auroc")
LONG_TEACHER = "teacher_long"  # the variant that trains its own, longer teacher


@dataclass(frozen=True)
class Variant:
    """One run recipe: a method, its overrides, whose teacher it uses, and what it tests."""

    method: str
    why: str
    overrides: tuple[str, ...] = ()
    teacher: str | None = "paper"  # "paper" | LONG_TEACHER | None (no teacher)


VARIANTS: dict[str, Variant] = {
    "scratch": Variant("scratch", "baseline: random init, cross-entropy", teacher=None),
    "dml": Variant("dml", "baseline: two random-init students, mutual KD", teacher=None),
    "ws": Variant("ws", "baseline: one weight-selected student, cross-entropy"),
    "dwskd": Variant("dwskd", "ours, defaults (alpha 1, beta 1, T 4, lr 1e-3)"),
    "dwskd_T1": Variant("dwskd", "softer targets off: T = 1", ("method.distill.temperature=1",)),
    "dwskd_no_partner": Variant(
        "dwskd", "alpha = 0: EMA teacher only, no partner KD", ("method.distill.alpha=0",)
    ),
    "dwskd_no_ema": Variant(
        "dwskd", "beta = 0: partner KD only, no EMA teacher", ("method.distill.beta=0",)
    ),
    "dwskd_random_init": Variant(
        "dwskd", "SKD without weight selection (random init)", ("method.init=random",)
    ),
    "dwskd_lr3e-4": Variant(
        "dwskd", "train lr 3e-4: keeps more of the selected weights", ("method.lr.train=3e-4",)
    ),
    "teacher": Variant("teacher", "the paper's teacher, evaluated as it is"),
    LONG_TEACHER: Variant("teacher", "a teacher trained 3x as many epochs", teacher=None),
    "ws_long_teacher": Variant(
        "ws", "ws, selected from the longer-trained teacher", teacher=LONG_TEACHER
    ),
    "dwskd_long_teacher": Variant(
        "dwskd", "dwskd, selected from the longer-trained teacher", teacher=LONG_TEACHER
    ),
}


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Plan:
    dataset: str
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    budget: Budget
    device: str
    out: Path
    paper_root: Path
    extra: tuple[str, ...] = ()
    launch: Launch = Launch()


def run_dir(plan: Plan, variant: str, seed: int) -> Path:
    return plan.out / plan.dataset / variant / f"s{seed}"


def teacher_overrides(plan: Plan, name: str, seed: int) -> tuple[list[str], Path | None]:
    """The variant's teacher: the paper's shared one, the long one, or a freshly fitted one."""
    variant = VARIANTS[name]
    if name == LONG_TEACHER:
        epochs = 3 * plan.budget.teacher_epochs
        return ["teacher.source=fit", f"method.epochs.teacher={epochs}"], None
    if variant.teacher is None:
        return [], None
    if variant.teacher == "paper":
        source = plan.paper_root / "in_domain" / plan.dataset / "teacher" / f"s{seed}"
    else:
        source = run_dir(plan, variant.teacher, seed)
    weights = teacher_weights(source)
    return ["teacher.source=file", f"teacher.file={weights}", "method.epochs.teacher=0"], weights


def make_job(plan: Plan, name: str, seed: int) -> Job:
    variant = VARIANTS[name]
    teacher, weights = teacher_overrides(plan, name, seed)
    extra = (*teacher, *variant.overrides, *plan.extra)
    overrides = job_overrides(plan.dataset, variant.method, seed, plan.budget, plan.device, *extra)
    directory = run_dir(plan, name, seed)
    return Job(name, plan.dataset, variant.method, seed, directory, overrides, weights)


def plan_jobs(plan: Plan) -> list[Job]:
    """Seed by seed; within a seed the long teacher first, since two variants load it."""
    names = list(plan.variants)
    needs_long = any(VARIANTS[n].teacher == LONG_TEACHER for n in names)
    if needs_long and LONG_TEACHER not in names:
        names.append(LONG_TEACHER)
    names.sort(key=lambda n: n != LONG_TEACHER)
    return [make_job(plan, name, seed) for seed in plan.seeds for name in names]


def missing_paper_teachers(jobs: Sequence[Job], plan: Plan) -> list[Path]:
    paper = plan.paper_root.resolve()
    return sorted(
        {
            j.teacher_file
            for j in jobs
            if j.teacher_file is not None
            and paper in j.teacher_file.parents
            and not j.teacher_file.is_file()
        }
    )


# ---------------------------------------------------------------------------- the table
def val_metrics(run: Path) -> dict[str, dict[str, float]]:
    """Validation metrics per model of one finished run (never its test metrics)."""
    results = read_results(run)
    models = results["models"]
    if any("val" not in entry for entry in models.values()):
        raise SystemExit(f"{run}/metrics.json has no val metrics: it was made by an older dwskd.")
    picked = {"deployed": models[results["deployed"]]["val"]}
    if "ensemble" in models:  # two students: show both and their ensemble too
        picked.update({m: models[m]["val"] for m in MODELS[1:]})
    return picked


def summarise(plan: Plan) -> list[dict]:
    """One record per (variant, model): mean ± std over the seeds that finished."""
    records = []
    for name in plan.variants:
        runs = [run_dir(plan, name, s) for s in plan.seeds]
        done = [val_metrics(r) for r in runs if RunLayout(r).finished]
        for model in MODELS:
            values = [d[model] for d in done if model in d]
            if not values:
                continue
            record = {"variant": name, "model": model, "n": len(values)}
            for key in QUALITY:
                record[f"{key}_mean"], record[f"{key}_std"], _ = mean_std(v[key] for v in values)
            records.append(record)
    return records


def markdown(plan: Plan, records: Sequence[dict], command: str) -> str:
    budget = plan.budget
    lines = [
        f"# Investigation on {plan.dataset}: VALIDATION metrics, mean ± std over seeds",
        "",
        f"- command: `{command}` (from the repository root); written {now_iso()}",
        f"- budget (as the paper table): {budget.img_size} px, batch {budget.batch_size}, every "
        f"student {budget.student_epochs} passes over train (dml/dwskd: "
        f"{budget.student_epochs - budget.finetune_epochs} joint + {budget.finetune_epochs} "
        f"fine-tune); teacher: the paper's in-domain teacher from `{plan.paper_root}` "
        f"({budget.teacher_epochs} epochs) unless the variant says otherwise; seeds "
        f"{' '.join(map(str, plan.seeds))}; device {plan.device}; extra overrides: "
        f"`{' '.join(plan.extra) or 'none'}`",
        *machine_lines(machine_info()),
        "",
        "Test metrics are not read. Every run keeps its best-validation checkpoint, so every "
        "row is somewhat optimistic; dml/dwskd rows more so, since their deployed student is "
        "also the better of two on validation (then fine-tuned).",
        "",
        "| Variant | What it tests | Model | n | Val acc | Val bal. acc | Val AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        why = VARIANTS[r["variant"]].why if r["model"] == "deployed" else ""
        cells = [r["variant"], why, r["model"], str(r["n"])]
        cells += [pct(r[f"{k}_mean"], r[f"{k}_std"]) for k in QUALITY]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(plan: Plan, results_dir: Path, command: str) -> list[Path]:
    records = summarise(plan)
    if not records:
        raise SystemExit(f"No finished runs under {plan.out / plan.dataset}/<variant>/s<seed>/")
    results_dir.mkdir(parents=True, exist_ok=True)
    md, table = (results_dir / f"investigate_{plan.dataset}.{ext}" for ext in ("md", "csv"))
    md.write_text(markdown(plan, records, command))
    with table.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return [md, table]


# ------------------------------------------------------------------------------------ cli
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="lung_ct")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument(
        "--paper-root",
        type=Path,
        default=REPO / "outputs" / "paper",
        help="where the paper's shared teachers are (default outputs/paper)",
    )
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "investigate")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    add_launch_argument(p)
    p.add_argument("--quick", action="store_true", help="the paper's --quick budget (tests)")
    p.add_argument("--img-size", type=int, help=f"default {FULL.img_size}")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    return p.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    launch, overrides = split_launch(args.overrides, args.in_process, args.device)
    check_overrides(overrides)
    budget = QUICK if args.quick else FULL
    if args.img_size:
        budget = replace(budget, img_size=args.img_size)
    return Plan(
        dataset=args.dataset,
        seeds=tuple(args.seeds),
        variants=tuple(args.variants),
        budget=budget,
        device=args.device,
        out=args.out.resolve(),
        paper_root=args.paper_root.resolve(),
        extra=tuple(overrides),
        launch=launch,
    )


def main(argv: Sequence[str] | None = None) -> int:
    show_progress(log)
    show_progress(paper_log)  # run_jobs reports each job on the paper logger
    set_offline_env()
    args = parse_args(argv)
    plan = plan_from_args(args)
    command = invocation("experiments.investigate", None if argv is None else list(argv))
    failed: list[Job] = []
    if not args.aggregate_only:
        jobs = plan_jobs(plan)
        missing = missing_paper_teachers(jobs, plan)
        if missing:
            raise SystemExit(
                f"The paper's teacher is missing: {missing[0]}. Train it first: python -m "
                f"experiments.paper --datasets {plan.dataset} --scenarios in_domain --methods "
                f"teacher --seeds {' '.join(map(str, plan.seeds))} (or pass --paper-root)."
            )
        failed = run_jobs(jobs, plan.launch, plan.out)
    return finish(write_results(plan, args.results_dir, command), failed)


if __name__ == "__main__":
    sys.exit(main())
