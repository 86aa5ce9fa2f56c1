"""Turn a sweep's run directories into the comparison table (Markdown, CSV) and a bar chart.

Runs live at ``<root>/<scenario>/<dataset>/<method>/s<seed>/metrics.json`` (the layout that
:mod:`experiments.paper` writes). Each run gives one row for its *deployed* model, and
two-student methods also give rows for ``student_a``, ``student_b`` and ``ensemble``.
Numbers are mean ± sample standard deviation (ddof=1) over seeds; one seed has no std.

    python -m experiments.aggregate outputs/paper            # -> experiments/results/paper.*
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dwskd.io import now_iso
from dwskd.rundir import RunLayout, read_results
from experiments.common import METHODS, RESULTS_DIR, TEACHER_FREE, machine_lines

META_FILE = "paper_meta.json"
QUALITY = ("acc", "balanced_acc", "f1_macro", "auroc")
QUALITY_NAMES = ("Accuracy", "Balanced acc", "Macro-F1", "AUROC")
COSTS = ("params", "flops", "latency_ms")
VALIDATION = ("val_acc", "teacher_val_acc")  # deployed model's, and the adapted teacher's
EXTRA_MODELS = ("student_a", "student_b", "ensemble")
SCENARIO_TITLES = {
    "in_domain": "In-domain teacher (ViT-S trained on the task's own train split)",
    "transfer": "Transfer teacher (ViT-S trained on another modality, head re-initialised)",
    "pretrained": "Pretrained teacher (ViT-S pretrained on the union of the three train splits, "
    "adapted to the task)",
}


@dataclass(frozen=True)
class Row:
    """One model of one run: the unit that is averaged over seeds."""

    scenario: str
    dataset: str
    method: str
    model: str  # "deployed" or student_a / student_b / ensemble
    seed: int
    values: dict[str, float]
    deployed: str
    curve: tuple[float, ...] = ()  # validation accuracy after each epoch the model trained


# ------------------------------------------------------------------------- collecting
def find_runs(root: Path) -> list[Path]:
    """Finished run dirs of a sweep laid out as <scenario>/<dataset>/<method>/s<seed>."""
    return sorted(d for d in Path(root).glob("*/*/*/s*") if RunLayout(d).finished)


def rows_of_run(path: Path) -> list[Row]:
    """The deployed model's row, plus each student and the ensemble where there are two."""
    scenario, dataset, method, seed_dir = path.parts[-4:]
    results = read_results(path)
    models, deployed = results["models"], results["deployed"]
    wall = results.get("run", {}).get("wall_time_s")
    names = {"deployed": deployed}
    if "ensemble" in models:
        names.update({name: name for name in EXTRA_MODELS})
    teacher_val = models.get("teacher", {}).get("val", {}).get("acc")
    rows = []
    for label, name in names.items():
        entry = models[name]
        values = {k: entry["test"].get(k) for k in QUALITY}
        values.update({k: entry.get(k) for k in COSTS})
        values.update(wall_time_s=wall, val_acc=entry.get("val", {}).get("acc"))
        values["teacher_val_acc"] = teacher_val
        seed = int(seed_dir.removeprefix("s"))
        curve = val_curve(results, name) if label == "deployed" else ()
        rows.append(Row(scenario, dataset, method, label, seed, values, deployed, curve))
    return rows


def val_curve(results: Mapping, model: str) -> tuple[float, ...]:
    """A model's validation accuracy after each epoch it trained: joint training, then fine-tune.

    Runs made before the curves were recorded give an empty curve; runs made before dwskd
    named every model alike (``student_a``, ``teacher``) keyed the curves ``a``/``b``.
    """
    stages = results.get("run", {}).get("stages", {})

    def curve_of(stage: str, name: str, legacy: str) -> list[float]:
        curves = stages.get(stage, {}).get("val_curve", {})
        return list(curves.get(name, curves.get(legacy, ())))

    if model == "teacher":
        return tuple(curve_of("teacher", "teacher", "a"))
    curve = curve_of("train", model, model.removeprefix("student_"))
    if stages.get("finetune", {}).get("deployed") == model:
        curve += curve_of("finetune", model, "a")
    return tuple(curve)


def run_paths(root: Path, archived: Sequence[Path] = ()) -> list[Path]:
    """Every finished run under ``root``, plus archived copies of runs not there, in order."""
    runs: dict[tuple[str, ...], Path] = {}
    for base in (*reversed(archived), root):  # later bases win: the live run over its copy
        runs.update({path.parts[-4:]: path for path in find_runs(base)})
    return [runs[key] for key in sorted(runs)]


def collect_rows(root: Path, archived: Sequence[Path] = ()) -> list[Row]:
    """Rows of every finished run under ``root``, plus archived copies of runs not there."""
    return [row for path in run_paths(root, archived) for row in rows_of_run(path)]


# ------------------------------------------------------------------------- statistics
def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean and sample std (ddof=1) of the finite values; std is NaN for fewer than two."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan, 0
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return statistics.fmean(finite), std, len(finite)


def group_key(row: Row) -> tuple[str, str, str, str]:
    return row.scenario, row.dataset, row.method, row.model


def summarise(rows: Sequence[Row]) -> list[dict]:
    """One record per (scenario, dataset, method, model): mean/std of every value, seeds, deploys."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[group_key(row)].append(row)
    records = []
    for key in sorted(groups, key=sort_key):
        members = groups[key]
        record = dict(zip(("scenario", "dataset", "method", "model"), key, strict=True))
        record["seeds"] = " ".join(str(r.seed) for r in sorted(members, key=lambda r: r.seed))
        record["deployed"] = deployed_summary(members)
        for name in (*QUALITY, *COSTS, *VALIDATION, "wall_time_s"):
            mean, std, _ = mean_std(r.values.get(name) for r in members)
            record[f"{name}_mean"], record[f"{name}_std"] = mean, std
        record["n"] = len(members)
        records.append(record)
    return records


def epochs_to_reach(curve: Sequence[float], target: float) -> int | None:
    """First epoch (1-based) whose validation accuracy reaches ``target``; None if none does."""
    return next((epoch for epoch, value in enumerate(curve, 1) if value >= target), None)


def convergence(rows: Sequence[Row]) -> list[dict]:
    """Epochs each method's deployed student needs to reach scratch's final validation accuracy.

    Scratch's final accuracy is that of the epoch it deploys (its best; checkpoints are picked
    on validation accuracy). Compared seed by seed on the same dataset (scratch runs once and
    serves every scenario);
    the mean is over the seeds that reached it, ``reached`` says how many did.
    """
    curves = [r for r in rows if r.model == "deployed" and r.curve and r.method != "teacher"]
    target = {(r.dataset, r.seed): max(r.curve) for r in curves if r.method == "scratch"}
    groups: dict[tuple, list[tuple[int | None, int]]] = defaultdict(list)
    for r in curves:
        if (r.dataset, r.seed) in target:
            hit = epochs_to_reach(r.curve, target[r.dataset, r.seed])
            groups[r.scenario, r.dataset, r.method, "deployed"].append((hit, len(r.curve)))
    records = []
    for key in sorted(groups, key=sort_key):
        hits = [hit for hit, _ in groups[key] if hit is not None]
        record = dict(zip(("scenario", "dataset", "method"), key, strict=False))
        record.update(n=len(groups[key]), reached=len(hits), budget=max(e for _, e in groups[key]))
        record["epochs_mean"], record["epochs_std"], _ = mean_std(hits)
        records.append(record)
    return records


def sort_key(key: tuple[str, str, str, str]) -> tuple:
    scenario, dataset, method, model = key
    order = METHODS.index(method) if method in METHODS else len(METHODS)
    return scenario, dataset, order, method, model != "deployed", model


def deployed_summary(rows: Sequence[Row]) -> str:
    """Which model was deployed in how many seeds, e.g. ``student_a x2, student_b x1``."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row.deployed] += 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


# --------------------------------------------------------------------------- markdown
def pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def plain(mean: float, std: float, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + ("" if math.isnan(std) else f" ± {std * scale:.{digits}f}")


def table_rows(records: Sequence[dict], scenario: str, dataset: str) -> list[dict]:
    """A scenario's rows for one dataset; transfer tables also show the teacher-free runs."""
    own = [r for r in records if r["scenario"] == scenario and r["dataset"] == dataset]
    if scenario == "in_domain":
        return own
    shared = [
        dict(r, method=f"{r['method']} (no teacher)")
        for r in records
        if r["scenario"] == "in_domain" and r["dataset"] == dataset and r["method"] in TEACHER_FREE
    ]
    return shared + own


def markdown_table(rows: Sequence[dict]) -> list[str]:
    header = ["Method", "Model", "n", *QUALITY_NAMES, "Val acc", "Teacher val acc"]
    header += ["Params (M)", "Latency (ms)", "Wall (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        model = r["model"] if r["model"] != "deployed" else f"deployed ({r['deployed']})"
        cells = [r["method"], model, str(r["n"])]
        cells += [pct(r[f"{k}_mean"], r[f"{k}_std"]) for k in (*QUALITY, *VALIDATION)]
        cells.append(plain(r["params_mean"], math.nan, 1e-6, 2))
        cells.append(plain(r["latency_ms_mean"], r["latency_ms_std"], 1.0, 2))
        cells.append(plain(r["wall_time_s_mean"], math.nan, 1 / 60, 1))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_table(records: Sequence[dict], scenario: str) -> list[str]:
    """Datasets x methods: deployed model's test accuracy / balanced accuracy, mean ± std (%)."""
    datasets = sorted({r["dataset"] for r in records if r["scenario"] == scenario})
    cells: dict[tuple[str, str], str] = {}
    for dataset in datasets:
        for r in table_rows(records, scenario, dataset):
            if r["model"] == "deployed":
                method = r["method"].removesuffix(" (no teacher)")
                cells[dataset, method] = (
                    f"{pct(r['acc_mean'], r['acc_std'])} / "
                    f"{pct(r['balanced_acc_mean'], r['balanced_acc_std'])} (n={r['n']})"
                )
    methods = [m for m in METHODS if any(key[1] == m for key in cells)]
    header = ["dataset", *methods, "teacher val acc"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for dataset in datasets:
        row = [cells.get((dataset, m), "–") for m in methods]
        row.append(teacher_val_cell(records, scenario, dataset))
        lines.append(f"| {dataset} | " + " | ".join(row) + " |")
    return lines


def teacher_val_cell(records: Sequence[dict], scenario: str, dataset: str) -> str:
    """Validation accuracy of the scenario's adapted teacher (its own ``teacher`` runs)."""
    for r in records:
        if (r["scenario"], r["dataset"], r["method"], r["model"]) == (
            scenario,
            dataset,
            "teacher",
            "deployed",
        ):
            return pct(r["val_acc_mean"], r["val_acc_std"])
    return "–"


def convergence_table(records: Sequence[dict], scenario: str) -> list[str]:
    """Datasets x methods: epochs to reach scratch's final validation accuracy (seeds reached)."""
    own = [r for r in records if r["scenario"] in (scenario, "in_domain")]
    own = [r for r in own if r["scenario"] == scenario or r["method"] in TEACHER_FREE]
    datasets = sorted({r["dataset"] for r in own if r["scenario"] == scenario})
    methods = [m for m in METHODS if any(r["method"] == m for r in own)]
    lines = ["| dataset | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for dataset in datasets:
        cells = []
        for method in methods:
            match = [r for r in own if (r["dataset"], r["method"]) == (dataset, method)]
            cells.append(convergence_cell(match[0]) if match else "–")
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return lines


def convergence_cell(record: Mapping) -> str:
    reached = f"{record['reached']}/{record['n']} seeds"
    if not record["reached"]:
        return f"not within {record['budget']} ({reached})"
    return f"{plain(record['epochs_mean'], record['epochs_std'])} ({reached})"


def verdict(rows: Sequence[dict]) -> str | None:
    """Does dwskd's deployed student beat every student baseline on mean test accuracy?"""
    deployed = {r["method"]: r for r in rows if r["model"] == "deployed"}
    ours = deployed.get("dwskd")
    baselines = {
        m: r
        for m, r in deployed.items()
        if m not in ("dwskd", "teacher") and not math.isnan(r["acc_mean"])
    }
    if ours is None or not baselines:
        return None
    best_name, best = max(baselines.items(), key=lambda item: item[1]["acc_mean"])
    gap = 100 * (ours["acc_mean"] - best["acc_mean"])
    word = "beats" if gap > 0 else ("ties with" if gap == 0 else "does not beat")
    size = gap_size(gap, ours, best)
    return f"dwskd {word} the best baseline ({best_name}): {gap:+.1f} accuracy points ({size})."


def gap_size(gap: float, *rows: Mapping) -> str:
    """A gap (points) against the larger seed spread of the rows compared; rows of one seed
    have none, and a gap between single runs says nothing about noise."""
    spreads = [100 * r["acc_std"] for r in rows if not math.isnan(r["acc_std"])]
    if not spreads:
        return "one seed each: no spread to compare with"
    return "within one std" if abs(gap) <= max(spreads) else "more than one std"


def header_lines(meta: Mapping | None, root: Path) -> list[str]:
    """Command, budget, image size, machine and date of the runs behind the table."""
    lines = [f"- aggregated: {now_iso()} from `{root}`"]
    if not meta or not meta.get("invocations"):
        return lines + ["- (no paper_meta.json: runs were not made by experiments.paper)"]
    last = meta["invocations"][-1]
    budget = last["budget"]
    lines += [
        f"- command: `{last['command']}` (from the repository root)",
        f"- budget (every method): {budget['img_size']} px, batch {budget['batch_size']}, "
        f"teacher {budget['teacher_epochs']} epochs, every student {budget['student_epochs']} "
        f"passes over train (dml/dwskd: {budget['student_epochs'] - budget['finetune_epochs']} "
        f"joint + {budget['finetune_epochs']} fine-tune), transfer teacher fine-tune "
        f"{budget['transfer_epochs']} epochs; device {last['device']}; extra overrides: "
        f"`{' '.join(last['extra']) or 'none'}`",
        f"- transfer teachers: {', '.join(f'{t} <- {s}' for t, s in last['transfer_source'].items())}",
    ]
    if last.get("pretrained_teacher"):
        lines.append(
            f"- pretrained teacher: `{Path(last['pretrained_teacher']).name}`, head "
            f"`{last.get('pretrained_head', 'match')}`, then fine-tuned "
            f"{budget['transfer_epochs']} epochs on the task (per dataset and seed)"
        )
    for entry in meta["invocations"]:
        lines.append(f"- runs made {entry['date']} by `{entry['command']}`:")
        lines += ["  " + line for line in machine_lines(entry["machine"])]
    return lines


def code_versions(paths: Sequence[Path]) -> dict[str, int]:
    """How many runs each code version made: ``<commit>`` or ``<commit> (dirty)``."""
    counts: dict[str, int] = defaultdict(int)
    for path in paths:
        git = read_results(path).get("run", {}).get("git") or {}
        commit = str(git.get("commit") or "unknown")[:10]
        counts[commit + (" (dirty)" if git.get("dirty") else "")] += 1
    return dict(counts)


def code_lines(versions: Mapping[str, int]) -> list[str]:
    """One code version per table, or a plain warning that this one mixes them."""
    listed = ", ".join(f"`{v}` ({n} runs)" for v, n in sorted(versions.items()))
    if len(versions) == 1 and not next(iter(versions)).endswith("(dirty)"):
        return [f"- code: every run at commit {listed}"]
    return [f"- **code: mixed or uncommitted versions** - {listed}; cells may not be comparable"]


def scenarios_of(records: Sequence[dict]) -> list[str]:
    """In the order of SCENARIO_TITLES; unknown names last. A scenario holding only the
    teacher-free runs (scratch, dml: filed under in_domain) is left out where other scenarios
    exist: their tables show those runs already."""
    names = {r["scenario"] for r in records if r["method"] not in TEACHER_FREE} or {
        r["scenario"] for r in records
    }
    known = [s for s in SCENARIO_TITLES if s in names]
    return known + sorted(names - set(known))


def comparisons(rows: Sequence[dict]) -> list[str]:
    """The two questions of the method, on mean test accuracy: ws vs scratch, dwskd vs ws."""
    deployed = {
        r["method"].removesuffix(" (no teacher)"): r for r in rows if r["model"] == "deployed"
    }
    lines = []
    for ours, theirs in (("ws", "scratch"), ("dwskd", "ws")):
        if ours in deployed and theirs in deployed:
            a, b = deployed[ours], deployed[theirs]
            gap = 100 * (a["acc_mean"] - b["acc_mean"])
            lines.append(
                f"{ours} vs {theirs}: {gap:+.1f} test accuracy points ({gap_size(gap, a, b)})."
            )
    return lines


def markdown(
    records: Sequence[dict],
    converged: Sequence[dict],
    meta: Mapping | None,
    root: Path,
    plot: str | None,
    external: Sequence[str] = (),
    versions: Mapping[str, int] | None = None,
) -> str:
    lines = ["# dwskd vs baselines: test metrics, mean ± std over seeds", ""]
    lines += header_lines(meta, root)
    lines += code_lines(versions) if versions else []
    lines += [
        "",
        "Deployed = the model each method ships (dwskd/dml: the student with the better "
        "validation accuracy after joint training, then fine-tuned). Model selection used "
        "validation data only; test was evaluated once per run. Latency: batch 1, CPU.",
    ]
    if plot:
        lines += ["", f"![accuracy per dataset and method]({plot})"]
    lines += ["", "## Summary: deployed model, test accuracy / balanced accuracy (%)"]
    for scenario in scenarios_of(records):
        lines += ["", f"**{SCENARIO_TITLES.get(scenario, scenario)}**", ""]
        lines += summary_table(records, scenario)
    lines += ["", *external] if external else []
    if converged:
        lines += ["", CONVERGENCE_TEXT]
        for scenario in scenarios_of(converged):
            lines += ["", f"**{SCENARIO_TITLES.get(scenario, scenario)}**", ""]
            lines += convergence_table(converged, scenario)
    for scenario in scenarios_of(records):
        lines += ["", f"## {SCENARIO_TITLES.get(scenario, scenario)}"]
        for dataset in sorted({r["dataset"] for r in records if r["scenario"] == scenario}):
            rows = table_rows(records, scenario, dataset)
            lines += ["", f"### {dataset}", "", *markdown_table(rows)]
            said = [verdict(rows), *comparisons(rows)]
            lines += ["", *(line for line in said if line)] if any(said) else []
    return "\n".join(lines) + "\n"


CONVERGENCE_TEXT = (
    "## Convergence: epochs to reach scratch's final validation accuracy\n\n"
    "Per seed, the first epoch at which the deployed student's validation accuracy reaches "
    "what scratch (same dataset and seed) deploys (its best epoch); mean ± std over the seeds "
    "that reach it. "
    "dml/dwskd count joint-training epochs, then fine-tuning epochs."
)


# ---------------------------------------------------------------------------- csv, png
def write_csv(records: Sequence[dict], path: Path) -> None:
    fields = ["scenario", "dataset", "method", "model", "n", "seeds", "deployed"]
    names = (*QUALITY, *VALIDATION, *COSTS, "wall_time_s")
    fields += [f"{k}_{s}" for k in names for s in ("mean", "std")]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in records)


def write_runs_csv(rows: Sequence[Row], path: Path) -> None:
    """Every run's deployed model, one line each: the per-seed numbers behind the means."""
    fields = ["scenario", "dataset", "method", "seed", "deployed"]
    fields += [*QUALITY, *VALIDATION, "wall_time_s", "val_curve"]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            if r.model == "deployed":
                line = {k: getattr(r, k) for k in fields[:5]}
                line.update({k: r.values.get(k) for k in (*QUALITY, *VALIDATION, "wall_time_s")})
                line["val_curve"] = " ".join(f"{v:.4f}" for v in r.curve)
                writer.writerow(line)


def accuracy_figure(records: Sequence[dict]) -> Figure:
    """Grouped bars: test accuracy of the deployed model, one panel per scenario."""
    deployed = [r for r in records if r["model"] == "deployed"]
    scenarios = sorted({r["scenario"] for r in deployed})
    fig = Figure(figsize=(6 * len(scenarios), 4), layout="constrained")
    axes = fig.subplots(1, len(scenarios), squeeze=False)[0]
    for ax, scenario in zip(axes, scenarios, strict=True):
        own = [r for r in deployed if r["scenario"] == scenario]
        datasets = sorted({r["dataset"] for r in own})
        methods = [m for m in METHODS if any(r["method"] == m for r in own)]
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            xs, heights, errors = [], [], []
            for j, dataset in enumerate(datasets):
                match = [r for r in own if r["method"] == method and r["dataset"] == dataset]
                if match:
                    xs.append(j + (i - (len(methods) - 1) / 2) * width)
                    heights.append(100 * match[0]["acc_mean"])
                    errors.append(100 * float(np.nan_to_num(match[0]["acc_std"])))
            ax.bar(xs, heights, width, yerr=errors, capsize=2, label=method)
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(scenario)
        ax.legend(fontsize=7, ncols=3)
    return fig


def read_meta(*candidates: Path) -> dict:
    """A sweep's invocation log: the first of ``candidates`` that exists (its runs root, then
    its archived copy in a fresh checkout); no invocations when none does."""
    found = [path for path in candidates if path.is_file()]
    return json.loads(found[0].read_text()) if found else {"invocations": []}


def write_results(
    root: Path, results_dir: Path, name: str, archived: Sequence[Path] = ()
) -> list[Path]:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>.png`` from every run under ``root``
    and, for runs not there, their archived copies (``experiments.paper.Archive``)."""
    root, results_dir = Path(root), Path(results_dir)
    from experiments import external_table  # it builds on this module's statistics

    rows = collect_rows(root, archived)
    records = summarise(rows)
    if not records:
        raise SystemExit(
            f"No runs with metrics.json under {root}/<scenario>/<dataset>/<method>/s<seed>/"
        )
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = read_meta(*(base / META_FILE for base in (root, *archived)))
    paths = [results_dir / f"{name}{end}" for end in (".md", ".csv", ".png", "_runs.csv")]
    accuracy_figure(records).savefig(paths[2], dpi=120)
    write_csv(records, paths[1])
    write_runs_csv(rows, paths[3])
    paths_of_runs = run_paths(root, archived)
    outside = external_table.collect(paths_of_runs)
    if outside:
        paths.append(external_table.write_csv(outside, results_dir / f"{name}_external.csv"))
    section = external_table.markdown_section(outside)
    text = markdown(
        records, convergence(rows), meta, root, paths[2].name, section, code_versions(paths_of_runs)
    )
    paths[0].write_text(text)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("root", type=Path, help="runs root, e.g. outputs/paper")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default="paper")
    p.add_argument(
        "--archived",
        type=Path,
        nargs="*",
        default=[],
        help="archived copies of runs (e.g. experiments/results/runs/paper), used where root lacks them",
    )
    args = p.parse_args(argv)
    for path in write_results(args.root, args.results_dir, args.name, args.archived):
        print(path)


if __name__ == "__main__":
    main()
