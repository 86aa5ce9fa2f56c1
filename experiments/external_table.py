"""The external table: each run's deployed model scored outside its source.

Runs score their external sets themselves (:mod:`dwskd.external`, ``metrics.json`` key
``external``); this module only gathers those scores across a sweep, sets them beside the
in-source test figures, counts where the errors fall, and says where a model that ranks well
at home ranks badly outside. Runs made before external scoring give no row.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dwskd.rundir import read_results
from experiments.aggregate import SCENARIO_TITLES, mean_std, plain
from experiments.common import METHODS, TEACHER_FREE

METRICS = ("auroc", "balanced_acc", "sensitivity", "specificity", "ece")
COUNTS = ("false_pos", "negatives", "false_neg", "positives")
SOURCE = ("source_acc", "source_auroc")  # the same model on its own test split


@dataclass(frozen=True)
class ExternalRow:
    """The deployed model of one run on one external set."""

    scenario: str
    dataset: str
    method: str
    seed: int
    set_name: str
    model: str  # which model was deployed (student_a, student_b, teacher)
    positive: str
    values: dict[str, float]
    intervals: dict[str, tuple[float, float]]


def error_counts(score: Mapping) -> dict[str, float]:
    """Binary sets: negatives called positive and positives called negative, with totals.

    On a brain set that is how many tumour-free slices are called tumour, and how many
    gliomas are called tumour-free: where a source shortcut shows.
    """
    classes, positive = score["classes"], score.get("positive_class")
    if positive is None or len(classes) != 2:
        return {}
    p = classes.index(positive)
    n = 1 - p
    confusion = score["confusion"]  # rows: true class, columns: predicted
    return {
        "false_pos": confusion[n][p],
        "negatives": sum(confusion[n]),
        "false_neg": confusion[p][n],
        "positives": sum(confusion[p]),
    }


def rows_of_run(path: Path) -> list[ExternalRow]:
    """One row per external set the run's deployed model was scored on."""
    scenario, dataset, method, seed_dir = path.parts[-4:]
    results = read_results(path)
    deployed = results["deployed"]
    own = results["models"][deployed]["test"]
    rows = []
    for set_name, scores in (results.get("external") or {}).items():
        score = scores.get(deployed)
        if score is None:
            continue
        values = {k: score["metrics"].get(k) for k in METRICS}
        values.update(error_counts(score), source_acc=own.get("acc"), source_auroc=own.get("auroc"))
        intervals = {k: (v["low"], v["high"]) for k, v in score["intervals"].items()}
        seed = int(seed_dir.removeprefix("s"))
        positive = score.get("positive_class") or ""
        rows.append(
            ExternalRow(
                scenario, dataset, method, seed, set_name, deployed, positive, values, intervals
            )
        )
    return rows


def collect(paths: Sequence[Path]) -> list[ExternalRow]:
    return [row for path in paths for row in rows_of_run(path)]


def summarise(rows: Sequence[ExternalRow]) -> list[dict]:
    """Mean ± std over seeds per (scenario, dataset, set, method), with each seed's interval."""
    groups: dict[tuple[str, str, str, str], list[ExternalRow]] = defaultdict(list)
    for row in rows:
        groups[row.scenario, row.dataset, row.set_name, row.method].append(row)
    records = []
    for key, members in groups.items():
        members = sorted(members, key=lambda r: r.seed)
        record = dict(zip(("scenario", "dataset", "set_name", "method"), key, strict=True))
        record.update(n=len(members), positive=members[0].positive)
        for name in (*METRICS, *SOURCE, *COUNTS):
            record[f"{name}_mean"], record[f"{name}_std"], _ = mean_std(
                r.values.get(name) for r in members
            )
        for name in ("auroc", "balanced_acc"):
            record[f"{name}_intervals"] = [r.intervals.get(name) for r in members]
        records.append(record)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(
        records,
        key=lambda r: (
            *[r[k] for k in ("scenario", "dataset", "set_name")],
            order.get(r["method"], len(order)),
        ),
    )


def _interval_cell(intervals: Sequence[tuple[float, float] | None], scale: float = 1) -> str:
    digits = 2 if scale == 1 else 0
    return (
        "; ".join(
            f"[{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
            for lo, hi in filter(None, intervals)
        )
        or "–"
    )


def _count_cell(record: Mapping, errors: str, total: str) -> str:
    if math.isnan(record[f"{total}_mean"]):
        return "–"
    return f"{record[f'{errors}_mean']:.0f} / {record[f'{total}_mean']:.0f}"


def markdown_table(records: Sequence[Mapping]) -> list[str]:
    header = [
        "method", "n", "in-source test acc (%)", "in-source AUROC", "external AUROC",
        "AUROC 95% CI per seed", "balanced acc (%)", "balanced acc 95% CI per seed",
        "sensitivity", "specificity", "ECE",
        "negatives called positive", "positives called negative",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [
            r["method"],
            str(r["n"]),
            plain(r["source_acc_mean"], r["source_acc_std"], 100),
            plain(r["source_auroc_mean"], r["source_auroc_std"], 1, 3),
            plain(r["auroc_mean"], r["auroc_std"], 1, 3),
            _interval_cell(r["auroc_intervals"]),
            plain(r["balanced_acc_mean"], r["balanced_acc_std"], 100),
            _interval_cell(r["balanced_acc_intervals"], 100),
            plain(r["sensitivity_mean"], r["sensitivity_std"], 1, 2),
            plain(r["specificity_mean"], r["specificity_std"], 1, 2),
            plain(r["ece_mean"], r["ece_std"], 1, 3),
            _count_cell(r, "false_pos", "negatives"),
            _count_cell(r, "false_neg", "positives"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ranks(records: Sequence[Mapping], key: str) -> dict[str, int]:
    ordered = sorted(records, key=lambda r: -r[key] if not math.isnan(r[key]) else math.inf)
    return {r["method"]: i + 1 for i, r in enumerate(ordered)}


def rank_notes(records: Sequence[Mapping]) -> list[str]:
    """Methods whose rank outside (external AUROC) is two or more places below their rank
    at home (in-source test accuracy), and where the best method at home stands outside."""
    if len(records) < 3:
        return []
    home, away = _ranks(records, "source_acc_mean"), _ranks(records, "auroc_mean")
    n = len(records)
    notes = [
        f"{m} ranks {home[m]} of {n} in-source and {away[m]} of {n} outside."
        for m in home
        if away[m] - home[m] >= 2
    ]
    best = min(home, key=home.get)
    if away[best] != 1 and not any(note.startswith(f"{best} ") for note in notes):
        notes.append(f"{best}, first in-source, ranks {away[best]} of {n} outside.")
    return notes


def against_scratch(records: Sequence[Mapping]) -> list[str]:
    """The paper's robustness claim: do ws and dwskd students lose less than scratch outside?"""
    by_method = {r["method"]: r for r in records}
    scratch = by_method.get("scratch")
    if scratch is None:
        return []
    lines = []
    for method in ("ws", "dwskd"):
        r = by_method.get(method)
        if r is None:
            continue
        gap = r["auroc_mean"] - scratch["auroc_mean"]
        spreads = [x["auroc_std"] for x in (r, scratch) if not math.isnan(x["auroc_std"])]
        size = (
            "one seed each: no spread to compare with"
            if not spreads
            else ("within one std" if abs(gap) <= max(spreads) else "more than one std")
        )
        lines.append(f"{method} vs scratch outside: {gap:+.3f} external AUROC ({size}).")
    return lines


def markdown_section(rows: Sequence[ExternalRow]) -> list[str]:
    """``## External test sets``: one table per scenario, dataset and set, with notes."""
    if not rows:
        return []
    records = summarise(rows)
    lines = [
        "## External test sets: deployed model outside its source (evaluation only)",
        "",
        "Each run scores its deployed model on the external sets its data config names, with "
        "dwskd-eval's scorer (`<run>/external/<set>/`). AUROC of the external task (binary: the "
        "positive class named per table); in-source AUROC is the run's own test task (brain_mri: "
        "4-class macro). Mean ± std over seeds; the 95 % intervals are per seed (percentile "
        "bootstrap, stratified by class). Error counts are mean counts over seeds.",
    ]
    for scenario, dataset, set_name, own in scenario_tables(records):
        title = SCENARIO_TITLES.get(scenario, scenario).split(" (")[0]
        lines += ["", f"### {dataset} on `{set_name}` ({title}; positive: {own[0]['positive']})"]
        lines += ["", *markdown_table(own)]
        notes = [*rank_notes(own), *against_scratch(own)]
        lines += ["", *notes] if notes else []
    return lines


def scenario_tables(records: Sequence[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """(scenario, dataset, set, its records) per table. Teacher-free methods (scratch, dml) run
    once, filed under ``in_domain``; they join every teacher scenario's table, so that each
    compares ws and dwskd with scratch, and get no table of their own beside one."""
    taught = [r for r in records if r["method"] not in TEACHER_FREE]
    free = [r for r in records if r["method"] in TEACHER_FREE]
    scenarios = sorted({r["scenario"] for r in taught}) or sorted({r["scenario"] for r in free})
    order = {m: i for i, m in enumerate(METHODS)}
    tables = []
    for scenario in scenarios:
        for dataset, set_name in sorted({(r["dataset"], r["set_name"]) for r in records}):
            own = [r for r in taught if r["scenario"] == scenario] + free
            own = [r for r in own if (r["dataset"], r["set_name"]) == (dataset, set_name)]
            if own:
                own.sort(key=lambda r: order.get(r["method"], len(order)))
                tables.append((scenario, dataset, set_name, own))
    return tables


def write_csv(rows: Sequence[ExternalRow], path: Path) -> Path:
    """Every run's deployed model on every external set, one line each (per-seed figures)."""
    fields = ["scenario", "dataset", "method", "seed", "set_name", "model", "positive"]
    fields += [*METRICS, "auroc_low", "auroc_high", "balanced_acc_low", "balanced_acc_high"]
    fields += [*COUNTS, *SOURCE]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            line = {k: getattr(r, k) for k in fields[:7]}
            line.update({k: r.values.get(k) for k in (*METRICS, *COUNTS, *SOURCE)})
            for name in ("auroc", "balanced_acc"):
                line[f"{name}_low"], line[f"{name}_high"] = r.intervals.get(name, (None, None))
            writer.writerow(line)
    return path
