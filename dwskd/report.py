"""The one renderer: ``metrics.json``, ``report.md``, prediction CSVs and plots.

Two documents share it: a run's report (:func:`write_run_report`) and ``dwskd-eval``'s
(:func:`write_evaluation`). Both show scores of :func:`dwskd.metrics.score` with the same
tables, number format, intervals and plots, so the same predictions read the same in both.

A run's ``results`` layout (``metrics.json`` holds exactly this, plus each model entry
repeated at top level under its name for convenience)::

    {"run": {"method", "data", "model", "teacher", "seed", "wall_time_s", "output_dir",
             "command", ...},
     "data": {...summary...},
     "deployed": "student_a",
     "models": {"student_a": {"test": {flat metrics}, "val": {...},
                              "test_details": {"intervals", "bootstrap", "calibration",
                                               "per_class"},
                              "params": int, "flops": int, "latency_ms": float}, ...}}

Split dicts hold flat metrics **without** a prefix (``acc``, ``sensitivity/<class>``,
``confmat``); ``test_details`` holds the rest of the test split's score. ``dwskd-eval``'s
``metrics.json`` holds one score's sections at top level, beside its command, model and data.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dwskd import io, rundir
from dwskd.metrics import INTERVAL_METRICS
from dwskd.plots import plot_calibration, plot_confusion_matrix, plot_learning_curves, plot_roc
from dwskd.rundir import RunLayout

PLOTS_DIR = "plots"  # relative links in report.md; the folder is RunLayout.plots_dir
MODEL_ORDER = ("student_a", "student_b", "ensemble", "teacher")
RESERVED_KEYS = ("run", "data", "deployed", "models")
TABLE_HEADER = (
    "Accuracy",
    "Balanced acc",
    "Macro-F1",
    "AUROC",
    "ECE",
    "Params (M)",
    "GFLOPs",
    "Latency (ms)",
)
METRIC_NAMES = {
    "acc": "Accuracy",
    "balanced_acc": "Balanced accuracy",
    "f1_macro": "Macro-F1",
    "auroc": "AUROC (macro one-vs-rest)",
    "ece": "ECE",
    "ece_top_label": "ECE (top label)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
}
SCORE_PLOTS = ("confmat", "roc", "reliability")


# --------------------------------------------------------------------------- metrics.json


def jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors/arrays to lists, paths to str, NaN/inf to null (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def with_model_keys(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results`` plus each ``models[name]`` entry also at top level as ``results[name]``."""
    out = dict(results)
    for name, entry in results.get("models", {}).items():
        if name in RESERVED_KEYS:
            raise ValueError(f"Model name '{name}' clashes with the metrics.json key '{name}'.")
        out[name] = entry
    return out


def write_metrics_json(layout: RunLayout, results: dict) -> Path:
    """Write ``metrics.json`` (atomically: it is what marks a run finished)."""
    rundir.refuse_finished(layout)
    return io.write_json(layout.metrics_json, jsonable(with_model_keys(results)))


# --------------------------------------------------------------------------- score tables


def fmt(value: Any, digits: int = 4) -> str:
    """A number as the reports print it; missing or NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def class_names_of(flat: Mapping[str, Any]) -> list[str]:
    """Class names in order, read back from the ``sensitivity/<class>`` keys of flat metrics."""
    return [key.split("/", 1)[1] for key in flat if key.startswith("sensitivity/")]


def interval_cell(score: Mapping[str, Any], metric: str, digits: int = 3) -> str:
    """``value [low, high]``, or the value alone when the score has no interval for it."""
    interval = (score.get("intervals") or {}).get(metric)
    value = fmt(score["metrics"].get(metric), digits)
    if not interval:
        return value
    return f"{value} [{fmt(interval['low'], digits)}, {fmt(interval['high'], digits)}]"


def level_label(score: Mapping[str, Any]) -> str:
    return f"{100 * score['bootstrap']['level']:g}% CI"


def score_table(score: Mapping[str, Any]) -> list[str]:
    """| Metric | Value | CI |: every headline figure of one score, with its interval."""
    metrics, intervals = score["metrics"], score.get("intervals") or {}
    lines = [f"| Metric | Value | {level_label(score)} |", "|---|---:|---:|"]
    for key, label in METRIC_NAMES.items():
        if key not in metrics:
            continue
        if key == "auroc" and metrics.get("positive_class") is not None:
            label = "AUROC"  # two classes: the positive class's (both curves are mirrors)
        ci = intervals.get(key)
        span = f"{fmt(ci['low'])} – {fmt(ci['high'])}" if ci else ""
        lines.append(f"| {label} | {fmt(metrics[key])} | {span} |")
    return lines


def method_note(score: Mapping[str, Any]) -> str:
    """How the intervals and the ECE were computed."""
    boot, bins = score["bootstrap"], score["calibration"]["n_bins"]
    binary = score["metrics"].get("positive_class") is not None
    return (
        f"Intervals: percentile bootstrap, {boot['resamples']} resamples stratified by true "
        f"class, seed {boot['seed']}. ECE: torchmetrics, {bins} equal-width bins, L1"
        + (" (binary: of the positive class's probability)." if binary else ".")
    )


def per_class_table(
    metrics: Mapping[str, Any], per_class: Mapping[str, Mapping[str, Any]] | None = None
) -> list[str]:
    """One row per class: sensitivity, specificity, and (when scored) precision, F1, images."""
    per_class = per_class or {}
    lines = [
        "| Class | Sensitivity | Specificity | Precision | F1 | Images |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in class_names_of(metrics):
        row = per_class.get(c, {})
        support = row.get("support")
        lines.append(
            f"| {c} | {fmt(metrics.get(f'sensitivity/{c}'))} | "
            f"{fmt(metrics.get(f'specificity/{c}'))} | {fmt(row.get('precision'))} | "
            f"{fmt(row.get('f1'))} | {'—' if support is None else support} |"
        )
    return lines


def confmat_table(confmat: Sequence[Sequence[int]], classes: Sequence[str]) -> list[str]:
    lines = [
        "| true \\ predicted | " + " | ".join(classes) + " |",
        "|---|" + "---:|" * len(classes),
    ]
    for c, row in zip(classes, confmat, strict=True):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |")
    return lines


# --------------------------------------------------------------------------- files of a score


def write_predictions_csv(
    path: Path,
    files: Sequence[str],
    probs: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
) -> Path:
    """One row per image: file, true and predicted label, one probability column per class."""
    header = ["file", "true_label", "predicted_label", *(f"prob_{c}" for c in class_names)]
    rows = [
        [f, class_names[int(t)], class_names[int(np.argmax(p))], *(f"{v:.6f}" for v in p)]
        for f, p, t in zip(files, probs, targets, strict=True)
    ]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as out:
            csv.writer(out).writerows([header, *rows])

    return io.atomic_write(Path(path), write)


def write_score_plots(
    score: Mapping[str, Any],
    predictions: tuple[np.ndarray, np.ndarray] | None,
    classes: Sequence[str],
    paths: Mapping[str, Path],
    title: str,
    positive: int = 1,
) -> dict[str, Path]:
    """The plots one score has the data for: confusion matrix, ROC (binary: of the positive
    class; needs ``predictions`` = (probs, targets)) and reliability diagram (needs its bins).

    ``positive`` is the binary ROC's positive class when the score names none.
    """
    metrics, written = score["metrics"], {}
    named = metrics.get("positive_class")
    positive = list(classes).index(named) if named in classes else positive
    if metrics.get("confmat"):
        written["confmat"] = plot_confusion_matrix(
            metrics["confmat"], classes, paths["confmat"], f"{title}confusion matrix"
        )
    if predictions is not None:
        probs, targets = (np.asarray(a) for a in predictions)
        written["roc"] = plot_roc(probs, targets, classes, paths["roc"], f"{title}ROC", positive)
    if score.get("calibration") and metrics.get("ece") is not None:
        written["reliability"] = plot_calibration(
            score["calibration"], metrics["ece"], named, paths["reliability"], title
        )
    return written


# --------------------------------------------------------------------------- the run's report


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value / unit


def _ordered_models(models: Mapping[str, Any]) -> list[str]:
    known = [name for name in MODEL_ORDER if name in models]
    return known + [name for name in models if name not in MODEL_ORDER]


def _bullets(mapping: Mapping[str, Any], max_chars: int = 200) -> list[str]:
    """One bullet per key; long nested values (the full config) are left to metrics.json."""
    lines = []
    for key, value in mapping.items():
        text = json.dumps(jsonable(value)) if isinstance(value, (Mapping, list)) else str(value)
        lines.append(f"- **{key}**: {text if len(text) <= max_chars else '(see metrics.json)'}")
    return lines


def entry_score(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A run model's test split as a score (:func:`dwskd.metrics.score`'s layout)."""
    return {"metrics": entry.get("test", {}), **entry.get("test_details", {})}


def _model_cells(entry: Mapping[str, Any]) -> list[str]:
    """One table row's cells, in ``TABLE_HEADER`` order; missing values show as a dash."""
    test = entry.get("test", {})
    return [
        *(fmt(test.get(key)) for key in ("acc", "balanced_acc", "f1_macro", "auroc", "ece")),
        fmt(_scaled(entry.get("params"), 1e6), 2),
        fmt(_scaled(entry.get("flops"), 1e9), 3),
        fmt(entry.get("latency_ms"), 2),
    ]


def _model_table(models: Mapping[str, Any], deployed: str | None) -> list[str]:
    """Rows = models, columns = test metrics and cost; the deployed model is marked."""
    header = "| Model | " + " | ".join(TABLE_HEADER) + " |"
    rule = "|---|" + "---:|" * len(TABLE_HEADER)
    rows = []
    for name in _ordered_models(models):
        label = f"**{name}** (deployed)" if name == deployed else name
        rows.append(f"| {label} | " + " | ".join(_model_cells(models[name])) + " |")
    return [header, rule, *rows]


def _interval_lines(models: Mapping[str, Any], deployed: str | None) -> list[str]:
    """Test figures with their bootstrap intervals, one row per model that has them."""
    scored = [
        n for n in _ordered_models(models) if models[n].get("test_details", {}).get("bootstrap")
    ]
    if not scored:
        return []
    first = entry_score(models[scored[0]])
    names = [METRIC_NAMES[k].split(" (")[0] for k in INTERVAL_METRICS]
    lines = [
        f"## Test results with intervals ({level_label(first)})",
        "",
        "| Model | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for name in scored:
        label = f"**{name}** (deployed)" if name == deployed else name
        cells = [interval_cell(entry_score(models[name]), k) for k in INTERVAL_METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, "", method_note(first), ""]


def _positive_lines(models: Mapping[str, Any], deployed: str | None) -> list[str]:
    """The deployed model's positive class (binary tasks), with its sensitivity/specificity."""
    test = models.get(deployed, {}).get("test", {})
    if not test.get("positive_class"):
        return []
    return [
        f"Positive class (ROC, sensitivity, specificity): **{test['positive_class']}** "
        f"(`data.positive_class`); sensitivity {fmt(test['sensitivity'])}, "
        f"specificity {fmt(test['specificity'])}.",
        "",
    ]


def _deployed_lines(models: Mapping[str, Any], deployed: str | None) -> list[str]:
    """The deployed model's per-class table and confusion matrix (test)."""
    if deployed not in models:
        return []
    score = entry_score(models[deployed])
    test = score["metrics"]
    lines = [f"## Per-class results ({deployed}, test)", ""]
    lines += [*per_class_table(test, score.get("per_class")), ""]
    if test.get("confmat"):
        lines += [f"## Confusion matrix ({deployed}, test; rows: true class)", ""]
        lines += [*confmat_table(test["confmat"], class_names_of(test)), ""]
    return lines


def _plot_links(layout: RunLayout, model_names: Sequence[str]) -> list[str]:
    """Markdown image links to the plots that exist in the run's ``plots/``."""
    names = sorted(p.name for p in layout.plots_dir.glob("learning_curves_*.png"))
    names += [f"{kind}_{model}.png" for model in model_names for kind in SCORE_PLOTS]
    return [
        f"![{name[:-4]}]({PLOTS_DIR}/{name})"
        for name in names
        if (layout.plots_dir / name).is_file()
    ]


def _resume_lines(resumes: Sequence[Mapping[str, Any]]) -> list[str]:
    """One bullet per restart of the command and per stage resumed from its checkpoint."""
    if not resumes:
        return ["- none: the run went through without interruption"]
    lines = []
    for r in resumes:
        if "stage" in r:
            lines.append(f"- {r['time']}: stage {r['stage']} resumed at epoch {r['epoch']}")
        else:
            changed = ", ".join(r.get("config_changes") or {}) or "no config change"
            lines.append(f"- {r['time']}: run restarted ({changed})")
    return lines


def _external_lines(external: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One table per external set: how each scored model does outside its source."""
    lines: list[str] = []
    for set_name, scores in external.items():
        lines += [
            f"## External test set: {set_name}",
            "",
            "| model | n | AUROC [95% CI] | balanced acc [95% CI] | sensitivity | specificity "
            "| ECE | report |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for model, score in scores.items():
            m = score["metrics"]
            lines.append(
                f"| {model} | {score['n_images']} | {interval_cell(score, 'auroc')} "
                f"| {interval_cell(score, 'balanced_acc')} | {fmt(m.get('sensitivity'), 3)} "
                f"| {fmt(m.get('specificity'), 3)} | {fmt(m.get('ece'), 3)} "
                f"| [{score['report']}]({score['report']}) |"
            )
        positive = next(iter(scores.values()), {}).get("positive_class")
        lines += ["", f"Positive class: **{positive}**." if positive else "", ""]
    return lines


def write_report_md(layout: RunLayout, results: dict) -> Path:
    """Human-readable summary of a run; plots are linked when they exist in ``plots/``."""
    run, models = results.get("run", {}), results.get("models", {})
    deployed = results.get("deployed")
    hidden = ("command", "resumes", "config", "stages", "machine", "packages")
    title = f"method={run.get('method')}, data={run.get('data')}, model={run.get('model')}"
    command = ["```", str(run.get("command", "(not recorded)")), "```"]
    lines = [f"# dwskd report: {title}", "", "## Command", "", *command, ""]
    lines += ["## Run", "", *_bullets({k: v for k, v in run.items() if k not in hidden}), ""]
    lines += ["## Resumes", "", *_resume_lines(run.get("resumes", [])), ""]
    lines += ["## Test results", "", *_model_table(models, deployed), ""]
    lines += _positive_lines(models, deployed)
    lines += _interval_lines(models, deployed)
    lines += _deployed_lines(models, deployed)
    lines += _external_lines(results.get("external") or {})
    lines += ["## Data", "", *_bullets(results.get("data", {})), ""]
    links = _plot_links(layout, _ordered_models(models))
    if links:
        lines += ["## Plots", "", *[f"{link}\n" for link in links]]
    return io.write_text(layout.report_md, "\n".join(lines).rstrip() + "\n")


def _class_names_for(entry: Mapping[str, Any], num_classes: int) -> list[str]:
    names = class_names_of(entry.get("test", {}))
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def write_run_report(
    layout: RunLayout,
    results: dict,
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    stage_csvs: Mapping[str, Path],
    files: Sequence[str] | None = None,
    positive: int = 1,
    plots: bool = True,
) -> dict[str, Path]:
    """Write per-image predictions and plots, then report.md, then metrics.json (the file
    that marks a run finished): a crash before the end leaves a resumable run, never a
    half-reported one. ``files`` names the test images in prediction order; ``positive``
    is the positive class of a binary ROC when the test metrics name none; ``plots=False``
    (``eval.plots=false``) leaves ``plots/`` out, the slowest part of a small run's report.
    """
    models = results.get("models", {})
    paths: dict[str, Path] = {}
    for name, (probs, targets) in predictions.items() if files is not None else ():
        class_names = _class_names_for(models.get(name, {}), np.shape(probs)[1])
        paths[f"predictions_{name}"] = write_predictions_csv(
            layout.predictions_csv(name), files, probs, targets, class_names
        )
    if plots:
        paths.update(write_run_plots(layout, results, predictions, stage_csvs, positive))
    paths["report_md"] = write_report_md(layout, results)
    paths["metrics_json"] = write_metrics_json(layout, results)
    return paths


def write_run_plots(
    layout: RunLayout,
    results: dict,
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    stage_csvs: Mapping[str, Path],
    positive: int,
) -> dict[str, Path]:
    """Each model's score plots (confusion matrix, ROC, reliability) and each stage's curves."""
    plots, models = layout.plots_dir, results.get("models", {})
    paths: dict[str, Path] = {}
    for name, entry in models.items():
        shape = np.shape(predictions[name][0])[1] if name in predictions else None
        size = shape or len(entry.get("test", {}).get("confmat") or []) or 2
        targets = {kind: plots / f"{kind}_{name}.png" for kind in SCORE_PLOTS}
        written = write_score_plots(
            entry_score(entry),
            predictions.get(name),
            _class_names_for(entry, size),
            targets,
            f"{name}: test ",
            positive,
        )
        paths.update({f"{kind}_{name}": path for kind, path in written.items()})
    for stage, csv_path in stage_csvs.items():
        png = plot_learning_curves(csv_path, plots / f"learning_curves_{stage}.png", stage)
        if png is not None:
            paths[f"learning_curves_{stage}"] = png
    return paths


# --------------------------------------------------------------------------- dwskd-eval's report


def _task_lines(results: Mapping[str, Any]) -> list[str]:
    task = results["task"]
    lines = ["| Scored class | Model classes (probabilities summed) |", "|---|---|"]
    lines += [f"| {c} | {', '.join(ms)} |" for c, ms in task["class_map"].items()]
    if task["dropped_model_classes"]:
        lines += [
            "",
            f"Model classes without an external class: {task['dropped_model_classes']} "
            "(left out; the other probabilities are renormalised).",
        ]
    if task["positive_class"] is not None:
        how = task["positive_source"]
        lines += [
            "",
            f"Positive class (ROC, sensitivity, specificity): **{task['positive_class']}** ({how}).",
        ]
    return lines


def _model_lines(results: Mapping[str, Any]) -> list[str]:
    model, prov = results["model"], dict(results["model"]["provenance"])
    own = prov.pop("metrics", {}).get("test", {})
    lines = [f"- **folder**: {model['folder']}", f"- **architecture**: {model['architecture']}"]
    lines.append(f"- **labels**: {', '.join(model['labels'])}")
    lines += [f"- **{k}**: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in prov.items()]
    if own:
        lines.append(
            f"- **its run's own test**: acc {fmt(own.get('acc'))}, AUROC {fmt(own.get('auroc'))}"
        )
    return lines


def _data_lines(results: Mapping[str, Any]) -> list[str]:
    data, prep = results["data"], results["preprocessing"]
    skipped = f"{data['n_skipped']} unreadable skipped" if data["n_skipped"] else "none skipped"
    used = ", ".join(f"{k} {v}" for k, v in prep["used"].items())
    lines = [f"- **folder**: {data['folder']}", f"- **images**: {data['n_images']} ({skipped})"]
    lines.append(
        f"- **preprocessing** (the model's own): {used}, mean {prep['mean']}, std {prep['std']}"
    )
    if prep["requested"]:
        lines.append(f"- **asked for** (allow_resize=true): {prep['requested']}")
    return lines


def evaluation_report_md(results: Mapping[str, Any]) -> str:
    """dwskd-eval's report: what was evaluated, on what, how it scored (with intervals)."""
    classes = results["task"]["classes"]
    sections = {
        "Command": ["```", results["command"], "```"],
        "Model": _model_lines(results),
        "Data": _data_lines(results),
        "Task": _task_lines(results),
        "Results": [*score_table(results), "", method_note(results)],
        "Per class": per_class_table(results["metrics"], results.get("per_class")),
        "Confusion matrix (rows: true class)": confmat_table(
            results["metrics"]["confmat"], classes
        ),
        "Plots": [f"![{name}](plots/{name}.png)\n" for name in SCORE_PLOTS],
    }
    if results.get("saliency"):
        names = [Path(p).name for p in results["saliency"]]
        sections["Saliency (first images)"] = [f"![{n[:-4]}](saliency/{n})\n" for n in names]
    title = f"# dwskd evaluation: {results['model']['name']} on {results['data']['folder']}"
    lines = [title, ""]
    for heading, body in sections.items():
        lines += [f"## {heading}", "", *body, ""]
    return "\n".join(lines).rstrip() + "\n"


def write_evaluation(
    out: Path,
    results: dict,
    predictions: tuple[np.ndarray, np.ndarray],
    files: Sequence[str],
) -> dict[str, Path]:
    """predictions.csv, the plots, report.md, then metrics.json (each written atomically).

    ``results`` holds one score's sections (:func:`dwskd.metrics.score`) at top level.
    """
    classes, (probs, targets) = results["task"]["classes"], predictions
    paths = {
        "predictions": write_predictions_csv(
            out / "predictions.csv", files, probs, targets, classes
        )
    }
    plots = {kind: out / PLOTS_DIR / f"{kind}.png" for kind in SCORE_PLOTS}
    paths.update(
        write_score_plots(results, predictions, classes, plots, f"{results['model']['name']}: ")
    )
    paths["report"] = io.write_text(out / "report.md", evaluation_report_md(results))
    paths["metrics"] = io.write_json(out / "metrics.json", jsonable(results))
    return paths
