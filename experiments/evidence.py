"""Evidence beyond the in-source table: scarce labels, longer training, robustness levers.

    python -m experiments.evidence scarcity     # {5,20,50,100} % of train: 3 tasks, 3 seeds
    python -m experiments.evidence budget       # {4,16,32} student epochs: 2 tasks, 3 seeds
    python -m experiments.evidence robustness   # augment=robust / standardize / multisource: 3 tasks, 3 seeds
    python -m experiments.evidence scarcity --dry-run     # what is still to run
    python -m experiments.evidence budget --aggregate-only

Every study is a set of *variants* of the paper's pretrained scenario (the paper's teacher,
adapted to the task, then scratch, ws and dwskd), each one an ``experiments.paper`` sweep with
its own name, budget and data overrides, run and archived the same way (resumable; finished
jobs are skipped). The variant equal to the table (100 %, 4 epochs, default data) *is* the
paper's pretrained sweep ``paper_pretrained``: its runs are shared, not repeated.

Budget rules, one per study, the same for every method:

* scarcity - a stratified, seeded, nested subset of the train split (``data.train_fraction``;
  val and test unchanged), trained for the optimiser steps of the full-data run, capped at
  :data:`EPOCH_CAP` epochs: epochs = min(cap, round(E / f)) for the students and the teacher's
  adaptation alike (a 5 % run given 4 epochs would barely train).
* budget - E student epochs; dml/dwskd split them as the table does (a quarter fine-tuning).
* robustness - the table's budget; only the data options change.

Runs score their external sets themselves, so each study reports in-source test accuracy and
external AUROC side by side (``experiments/results/<study>.{md,csv,png}``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dwskd import model_folder
from dwskd.io import now_iso
from dwskd.rundir import RunLayout, read_results
from experiments import aggregate, external_table, paper
from experiments.common import REPO, RESULTS_DIR, invocation, set_offline_env, show_progress
from experiments.launch import Launch, add_launch_argument, split_launch

log = logging.getLogger("experiments.evidence")

SHARED = "paper_pretrained"  # the pretrained scenario of the table, at one commit
METHODS = ("scratch", "ws", "dwskd")
EPOCH_CAP = 50


@dataclass(frozen=True)
class StudySpec:
    """What a study varies over, on which tasks and methods.

    ``shares_teacher``: only the students change, so every variant's students select from the
    table's own adapted teachers (``paper_pretrained``), not from copies trained again.
    """

    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    x_title: str
    values: tuple[str, ...]  # the default --values
    shares_teacher: bool = False


TWO_TASKS = ("brain_mri_tumour_type", "chest_xray")
EXTERNAL_TASKS = ("brain_mri", "chest_xray", "lung_ct")  # conf/data/*.yaml external:


@dataclass(frozen=True)
class Variant:
    """One point of a study: its x value, budget and data overrides."""

    label: str  # run-dir name part: f5, e16, robust
    x: float | str
    budget: paper.Budget
    extra: tuple[str, ...] = ()
    datasets: tuple[
        tuple[str, str], ...
    ] = ()  # (dataset, the data config it becomes); others dropped
    teacher_file: Path | None = None  # the pretrained teacher, when not the table's

    def data_of(self, datasets: Sequence[str]) -> tuple[str, ...]:
        """The variant's datasets: all of them, or those it replaces, replaced."""
        if not self.datasets:
            return tuple(datasets)
        swap = dict(self.datasets)
        return tuple(swap[d] for d in datasets if d in swap)

    def shared(self) -> bool:
        """The table's own setting: its runs are the paper's pretrained sweep."""
        return self.budget == paper.FULL and not self.extra


def finetune_share(student_epochs: int, full: paper.Budget = paper.FULL) -> int:
    """dml/dwskd's fine-tune epochs: the table's share of the budget (1 of 4), at least 1."""
    share = full.finetune_epochs / full.student_epochs
    return min(student_epochs - 1, max(1, round(student_epochs * share)))


def equal_steps(fraction: float, full: paper.Budget = paper.FULL) -> paper.Budget:
    """The full-data run's optimiser steps on ``fraction`` of the data, capped at EPOCH_CAP."""
    student = min(EPOCH_CAP, round(full.student_epochs / fraction))
    return replace(
        full,
        student_epochs=student,
        finetune_epochs=finetune_share(student, full),
        transfer_epochs=min(EPOCH_CAP, round(full.transfer_epochs / fraction)),
    )


def variants(study: str, values: Sequence[str]) -> list[Variant]:
    """The study's variants, in x order."""
    if study == "scarcity":
        fractions = sorted(float(v) / 100 for v in values)
        return [
            Variant(f"f{round(100 * f)}", f, equal_steps(f) if f < 1 else paper.FULL,
                    (f"data.train_fraction={f}",) if f < 1 else ())
            for f in fractions
        ]  # fmt: skip
    if study == "budget":
        epochs = sorted(int(v) for v in values)
        budgets = [
            replace(paper.FULL, student_epochs=e, finetune_epochs=finetune_share(e)) for e in epochs
        ]
        return [Variant(f"e{e}", e, b) for e, b in zip(epochs, budgets, strict=True)]
    if study == "temperature":
        return knob_variants("t", "method.distill.temperature", values, TABLE_TEMPERATURE)
    if study == "depth":
        return knob_variants("d", "model.depth", values, TABLE_DEPTH)
    if study == "teacher_size":
        return [
            Variant(a, a, paper.FULL, (f"teacher={a}",), teacher_file=union_teacher_file(a))
            for a in values
        ]
    return [Variant(name, name, paper.FULL, *ROBUSTNESS_LEVERS[name]) for name in values]


# (overrides, datasets replaced). multisource: brain_mri trained on a second source of
# tumour-free and glioma slices (half the lgg_tcga_t1c patients); its own scenario, scored on
# the held-out patients per source, never called external.
ROBUSTNESS_LEVERS: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "default": ((), ()),
    "robust": (("data.augment=robust",), ()),
    "standardize": (("data.standardize=true",), ()),
    "robust_standardize": (("data.augment=robust", "data.standardize=true"), ()),
    "multisource": ((), (("brain_mri", "brain_mri_multisource"),)),
}
STUDIES = {
    "scarcity": StudySpec(
        ("brain_mri_tumour_type", "chest_xray", "lung_ct"), METHODS, "train fraction",
        ("5", "20", "50", "100"),
    ),
    "budget": StudySpec(
        ("brain_mri_tumour_type", "lung_ct"), METHODS, "student epochs", ("4", "16", "32"), True
    ),
    # Only the tasks with an external set: a lever is for robustness outside the source.
    # robust_standardize (both levers at once) runs on request: --values robust_standardize.
    "robustness": StudySpec(
        EXTERNAL_TASKS, METHODS, "data", ("default", "robust", "standardize", "multisource")
    ),
    # The design card's sweeps (issue "Sweeps and dashboards"): SKD temperature, student depth.
    "temperature": StudySpec(TWO_TASKS, ("dwskd",), "SKD temperature", ("1", "2", "4", "8"), True),
    "depth": StudySpec(TWO_TASKS, ("ws", "dwskd"), "student depth", ("4", "6", "9", "12"), True),
    # Union-pretrained ViT-T/S/B teachers, one recipe (UNION_EPOCHS); ViT-T students of each.
    "teacher_size": StudySpec(
        TWO_TASKS, ("ws", "dwskd", "teacher"), "teacher", ("vit_tiny", "vit_small", "vit_base")
    ),
}  # fmt: skip
UNION_EPOCHS = 20  # every size the same epochs (the shared ViT-S file had 60, on a GPU)
UNION_ROOT = "teacher_size_union"


def union_teacher_job(arch: str, device: str, epochs: int = UNION_EPOCHS) -> paper.Job:
    """A teacher of one size pretrained on the union of the three tasks (data=medunion),
    the way the shared ViT-S was made, but on the paper's CPU budget and ``epochs``."""
    extra = (f"teacher={arch}", "teacher.source=fit", f"method.epochs.teacher={epochs}")
    overrides = paper.job_overrides("medunion", "teacher", 1, paper.FULL, device, *extra)
    run_dir = REPO / "outputs" / UNION_ROOT / "union" / "medunion" / "teacher" / arch
    return paper.Job("union", "medunion", "teacher", 1, run_dir, overrides)


def union_teacher_file(arch: str) -> Path:
    """Its export (label names beside it in config.json, for teacher.head=match)."""
    layout = RunLayout(union_teacher_job(arch, "cpu").run_dir)
    return layout.export_dir("teacher") / model_folder.WEIGHTS_FILE


# The table's values (a variant with them is the table's own run): method.distill.temperature
# (conf/method/_base.yaml) and the ViT-T depth (conf/model/vit_tiny.yaml).
TABLE_TEMPERATURE, TABLE_DEPTH = 4, 12


def knob_variants(prefix: str, key: str, values: Sequence[str], table: float) -> list[Variant]:
    """One override per variant; the table's own value needs none (its runs are shared)."""
    numbers = sorted(float(v) for v in values)
    return [
        Variant(f"{prefix}{v:g}", v, paper.FULL, () if v == table else (f"{key}={v:g}",))
        for v in numbers
    ]


def settings_of(
    study: str, variant: Variant, args: argparse.Namespace, launch: Launch
) -> paper.Settings:
    """The paper sweep behind one variant (the shared one is named ``paper_pretrained``)."""
    spec = STUDIES[study]
    name = SHARED if variant.shared() else f"{study}_{variant.label}"
    teachers = None
    if spec.shares_teacher and not variant.shared():
        table = Variant("table", "table", paper.FULL)
        teachers = settings_of(study, table, args, launch)
    return paper.Settings(
        name=name,
        datasets=variant.data_of(args.datasets or spec.datasets),
        methods=spec.methods,
        seeds=tuple(args.seeds),
        scenarios=("pretrained",),
        budget=variant.budget,
        device=args.device,
        out=(REPO / "outputs" / name).resolve(),
        transfer_source=paper.TRANSFER_SOURCE,
        pretrained_teacher=variant.teacher_file or paper.pretrained_file(args.pretrained_teacher),
        archive=(args.results_dir / "runs" / name).resolve(),
        extra=variant.extra,
        launch=launch,
        teachers=teachers,
    )


# ------------------------------------------------------------------------- results
def collect(study: str, plan: Sequence[tuple[Variant, paper.Settings]]) -> list[dict]:
    """Per run: the deployed model's test accuracy, external AUROC and validation curve."""
    lines = []
    for variant, settings in plan:
        archived = [a.root for a in settings.archives()]
        paths = aggregate.run_paths(settings.out, archived)
        outside = {(r.dataset, r.method, r.seed): r for r in external_table.collect(paths)}
        path_of = {(p.parts[-3], p.parts[-2], int(p.parts[-1][1:])): p for p in paths}
        for row in aggregate.collect_rows(settings.out, archived):
            keep = row.dataset in settings.datasets and row.method in settings.methods
            if not keep or row.model != "deployed" or row.seed not in settings.seeds:
                continue
            ext = outside.get((row.dataset, row.method, row.seed))
            path = path_of[row.dataset, row.method, row.seed]
            lines.append({
                "study": study, "variant": variant.label, "x": variant.x,
                "dataset": row.dataset, "method": row.method, "seed": row.seed,
                "acc": row.values["acc"], "val_acc": row.values["val_acc"],
                "params": row.values["params"], "latency_ms": row.values["latency_ms"],
                "external_set": ext.set_name if ext else "",
                "external_auroc": ext.values["auroc"] if ext else None,
                "by_source": source_accuracies(path, row.deployed),
                "curve": row.curve, "path": path,
            })  # fmt: skip
    return lines


def source_accuracies(path: Path, deployed: str) -> dict[str, float]:
    """A union's test split per source (multisource): the deployed model's accuracy on each."""
    scores = read_results(path)["models"][deployed].get("test_by_source") or {}
    return {key: score["acc"] for key, score in scores.items()}


def summarise(lines: Sequence[dict]) -> list[dict]:
    """Mean ± std over seeds per (dataset, variant, method), and the gain over scratch of the
    same seed (paired), so that seed-to-seed swings common to both do not hide it."""
    scratch = {
        (r["dataset"], r["variant"], r["seed"]): r["acc"] for r in lines if r["method"] == "scratch"
    }
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in lines:
        groups[r["dataset"], r["x"], r["variant"], r["method"]].append(r)
    records = []
    for (dataset, x, label, method), members in groups.items():
        gains = [r["acc"] - scratch[dataset, label, r["seed"]] for r in members
                 if (dataset, label, r["seed"]) in scratch]  # fmt: skip
        record = {"dataset": dataset, "x": x, "variant": label, "method": method, "n": len(members)}
        sources = sorted({k for r in members for k in r.get("by_source") or {}})
        record["by_source"] = {
            k: aggregate.mean_std((r.get("by_source") or {}).get(k) for r in members)[:2]
            for k in sources
        }
        for key, values in (
            ("acc", [r["acc"] for r in members]),
            ("val_acc", [r.get("val_acc") for r in members]),
            ("params", [r.get("params") for r in members]),
            ("latency_ms", [r.get("latency_ms") for r in members]),
            ("external_auroc", [r["external_auroc"] for r in members]),
            ("gain", gains if method != "scratch" else []),
        ):
            record[f"{key}_mean"], record[f"{key}_std"], _ = aggregate.mean_std(values)
        records.append(record)
    order = {m: i for i, m in enumerate(aggregate.METHODS)}
    xs = x_order(records)
    return sorted(records, key=lambda r: (r["dataset"], xs.index(r["x"]), order[r["method"]]))


def x_order(records: Sequence[dict]) -> list:
    """The variants' values in order: by size where they are numbers (depth 4 before 12),
    else as the study lists them (the robustness levers, ``default`` first)."""
    xs = list(dict.fromkeys(r["x"] for r in records))
    return sorted(xs) if all(isinstance(x, int | float) for x in xs) else xs


def markdown(
    study: str,
    records: Sequence[dict],
    plan,
    command: str,
    plots: Sequence[str],
    versions: dict[str, dict[str, int]],
) -> str:
    """``versions``: per variant label, the code versions of its runs (aggregate.code_versions)."""
    lines = [
        f"# Study: {study} (pretrained scenario; {', '.join(methods_of(records))})",
        "",
        f"- aggregated: {now_iso()}; command: `{command}`",
        *(f"- variant {v.label}: sweep `{s.name}`, student epochs {v.budget.student_epochs} "
          f"(fine-tune {v.budget.finetune_epochs}), teacher adaptation {v.budget.transfer_epochs}, "
          f"overrides `{' '.join(v.extra) or 'none'}`" for v, s in plan),
        *aggregate.code_lines(sum((Counter(c) for c in versions.values()), Counter())),
        *(f"  - variant {label}: " + (", ".join(f"`{k}` ({n} runs)" for k, n in sorted(c.items()))
                                      or "no finished runs yet") for label, c in versions.items()),
        "",
        "Deployed model per run; mean ± std over seeds (n); gain = accuracy minus scratch's on "
        "the same seed, in points. External AUROC: the run's own external set (none for "
        "brain_mri_tumour_type: no external set holds several tumour types).",
        "",
        *(f"![{study}]({p})" for p in plots),
        "",
        f"| dataset | {STUDIES[study].x_title} | method | n | val acc (%) | test acc (%) "
        "| gain over scratch (points) | external AUROC | test acc per source (%) | params (M) "
        "| latency (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in records:
        lines.append(
            f"| {r['dataset']} | {r['variant']} | {r['method']} | {r['n']} "
            f"| {aggregate.plain(r['val_acc_mean'], r['val_acc_std'], 100)} "
            f"| {aggregate.plain(r['acc_mean'], r['acc_std'], 100)} "
            f"| {aggregate.plain(r['gain_mean'], r['gain_std'], 100)} "
            f"| {aggregate.plain(r['external_auroc_mean'], r['external_auroc_std'], 1, 3)} "
            f"| {source_cell(r['by_source'])} "
            f"| {aggregate.plain(r['params_mean'], math.nan, 1e-6, 2)} "
            f"| {aggregate.plain(r['latency_ms_mean'], r['latency_ms_std'], 1, 2)} |"
        )
    return "\n".join(lines) + "\n"


def source_cell(by_source: dict[str, tuple[float, float]]) -> str:
    """``nickparvar 71.2 ± 1.0; lgg 60.3 ± 2.2`` (held-out part of each source), or –."""
    cells = [f"{k} {aggregate.plain(m, s, 100)}" for k, (m, s) in by_source.items()]
    return "; ".join(cells) or "–"


def methods_of(records: Sequence[dict]) -> list[str]:
    """The methods present, in the table's order."""
    present = {r["method"] for r in records}
    return [m for m in aggregate.METHODS if m in present]


def figure(study: str, records: Sequence[dict]) -> Figure:
    """Test accuracy (top) and external AUROC (bottom) against the variant, per dataset."""
    datasets = sorted({r["dataset"] for r in records})
    fig = Figure(figsize=(4.5 * len(datasets), 6.5), layout="constrained")
    axes = fig.subplots(2, len(datasets), squeeze=False)
    xs = x_order(records)
    numeric = all(isinstance(x, int | float) for x in xs)
    for col, dataset in enumerate(datasets):
        for row, (key, title) in enumerate(
            (("acc", "test accuracy"), ("external_auroc", "external AUROC"))
        ):
            ax = axes[row][col]
            if all(math.isnan(r[f"{key}_mean"]) for r in records if r["dataset"] == dataset):
                ax.text(0.5, 0.5, f"{dataset}: no {title}", ha="center", transform=ax.transAxes)
                ax.set_axis_off()  # brain_mri_tumour_type has no external set
                continue
            for method in methods_of(records):
                own = sorted((r for r in records if r["dataset"] == dataset and r["method"] == method),
                             key=lambda r: xs.index(r["x"]))  # fmt: skip
                points = [(r["x"] if numeric else xs.index(r["x"]), r[f"{key}_mean"],
                           np.nan_to_num(r[f"{key}_std"])) for r in own]  # fmt: skip
                if points:
                    x, y, err = zip(*points, strict=True)
                    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
            if numeric and study == "scarcity":
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(xs)), xs, rotation=20)
            ax.set_title(f"{dataset}: {title}", fontsize=9)
            ax.set_xlabel(STUDIES[study].x_title)
            ax.legend(fontsize=7)
    return fig


def curves_figure(lines: Sequence[dict], label: str) -> Figure:
    """Per-epoch validation accuracy of the deployed students at one variant, mean over seeds."""
    own = [r for r in lines if r["variant"] == label and r["curve"]]
    datasets = sorted({r["dataset"] for r in own})
    fig = Figure(figsize=(5 * max(len(datasets), 1), 3.5), layout="constrained")
    for ax, dataset in zip(
        fig.subplots(1, max(len(datasets), 1), squeeze=False)[0], datasets, strict=False
    ):
        for method in methods_of(own):
            curves = [r["curve"] for r in own if r["dataset"] == dataset and r["method"] == method]
            if curves:
                length = min(map(len, curves))
                mean = np.mean([c[:length] for c in curves], axis=0)
                ax.plot(range(1, length + 1), mean, label=f"{method} (n={len(curves)})")
        ax.set_title(f"{dataset}: validation accuracy per epoch ({label})", fontsize=9)
        ax.set_xlabel("epoch (dwskd: joint, then fine-tune)")
        ax.legend(fontsize=7)
    return fig


def write_results(study: str, plan, results_dir: Path, command: str) -> list[Path]:
    lines = collect(study, plan)
    if not lines:
        raise SystemExit(f"No finished runs for the {study} study yet: run it first.")
    records = summarise(lines)
    results_dir.mkdir(parents=True, exist_ok=True)
    plots = [results_dir / f"{study}.png"]
    figure(study, records).savefig(plots[0], dpi=110)
    if study == "budget":
        plots.append(results_dir / f"{study}_curves.png")
        curves_figure(lines, plan[-1][0].label).savefig(plots[1], dpi=110)
    md = results_dir / f"{study}.md"
    versions = {
        v.label: aggregate.code_versions([r["path"] for r in lines if r["variant"] == v.label])
        for v, _ in plan
    }
    md.write_text(markdown(study, records, plan, command, [p.name for p in plots], versions))
    table = results_dir / f"{study}.csv"
    with table.open("w", newline="") as stream:
        fields = [k for k in lines[0] if k not in ("curve", "path")]
        writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for line in lines:
            sources = line.get("by_source") or {}
            writer.writerow(
                {**line, "by_source": " ".join(f"{k}={v:.4f}" for k, v in sources.items())}
            )
    return [md, table, *plots]


# ------------------------------------------------------------------------------ the CLI
def union_teachers(archs: Sequence[str], args: argparse.Namespace, launch: Launch) -> list:
    """Train the union teachers first (hours: ViT-B 20 epochs at 64 px ~ 2.5 h on 2 cores).

    Archived metrics do not skip them: their weights are not committed and the students need
    them; a live finished run dir does. Their metrics are archived for the record.
    """
    jobs = [union_teacher_job(a, args.device) for a in archs]
    root = REPO / "outputs" / UNION_ROOT
    if args.dry_run:
        print("# union teachers\n" + paper.plan_listing(jobs))
        return []
    failed = paper.run_jobs(jobs, launch, root)
    paper.Archive(root, (args.results_dir / "runs" / UNION_ROOT).resolve()).store_all()
    return failed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("study", choices=tuple(STUDIES))
    p.add_argument(
        "--values", nargs="+", help="scarcity: percents; budget: epochs; robustness: levers"
    )
    p.add_argument("--datasets", nargs="+")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--pretrained-teacher", type=Path)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    add_launch_argument(p)
    p.add_argument("--dry-run", action="store_true", help="list the jobs still to run")
    p.add_argument("--aggregate-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="hydra/launcher=<name> and hydra.launcher.*")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    show_progress(log)
    set_offline_env()
    args = parse_args(argv)
    values = args.values or STUDIES[args.study].values
    unknown = [v for v in values if args.study == "robustness" and v not in ROBUSTNESS_LEVERS]
    if unknown:
        raise SystemExit(f"--values {unknown}: the robustness levers are {list(ROBUSTNESS_LEVERS)}")
    launch, overrides = split_launch(args.overrides, args.in_process, args.device)
    if overrides:
        raise SystemExit(
            f"{overrides}: only hydra/launcher=... and hydra.launcher.* are taken here."
        )
    plan = [(v, settings_of(args.study, v, args, launch)) for v in variants(args.study, values)]
    command = invocation("experiments.evidence", None if argv is None else list(argv))
    failed: list[paper.Job] = []
    if args.study == "teacher_size" and not args.aggregate_only:
        failed += union_teachers(values, args, launch)
    for variant, settings in plan:
        jobs = paper.plan_jobs(settings)
        if args.dry_run:
            print(f"# variant {variant.label} ({settings.name})")
            print(paper.plan_listing(jobs, settings.archives()))
        elif not args.aggregate_only:
            paper.record_invocation(settings, command)
            failed += paper.run_jobs(jobs, settings.launch, settings.out, settings.archives())
            for archive in settings.archives():
                archive.store_all()
    if args.dry_run:
        return 0
    written = write_results(args.study, plan, args.results_dir, command)
    return paper.finish(written, failed)


if __name__ == "__main__":
    sys.exit(main())
