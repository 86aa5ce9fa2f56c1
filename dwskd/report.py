"""Run outputs: ``metrics.json``, ``report.md`` and PNG plots (confusion matrix, ROC, curves).

``results`` layout (``metrics.json`` holds exactly this, plus each model entry repeated
at top level under its name for convenience)::

    {"run": {"method", "data", "model", "teacher", "seed", "wall_time_s", "output_dir",
             "command", ...},
     "data": {...summary...},
     "deployed": "student_a",
     "models": {"student_a": {"test": {flat metrics}, "val": {...}, "params": int,
                              "flops": int, "latency_ms": float}, ...}}

Stage dicts hold :func:`dwskd.metrics.flatten_metrics` output **without** a prefix
(``acc``, ``sensitivity/<class>``, ``confmat``). Figures are drawn on bare
``matplotlib.figure.Figure`` objects, which render with Agg and never touch pyplot's
global backend or figure registry.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torchmetrics.functional import auroc, roc
from torchmetrics.utilities.plot import plot_confusion_matrix as draw_confusion_matrix

from dwskd import runs
from dwskd.runs import RunLayout

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
    runs.refuse_finished(layout)
    return runs.write_json(layout.metrics_json, jsonable(with_model_keys(results)))


# --------------------------------------------------------------------------- report.md


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value / unit


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


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


def _model_cells(entry: Mapping[str, Any]) -> list[str]:
    """One table row's cells, in ``TABLE_HEADER`` order; missing values show as a dash."""
    test = entry.get("test", {})
    return [
        *(_fmt(test.get(key), 4) for key in ("acc", "balanced_acc", "f1_macro", "auroc", "ece")),
        _fmt(_scaled(entry.get("params"), 1e6), 2),
        _fmt(_scaled(entry.get("flops"), 1e9), 3),
        _fmt(entry.get("latency_ms"), 2),
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


def class_names_of(flat: Mapping[str, Any]) -> list[str]:
    """Class names in order, read back from the ``sensitivity/<class>`` keys of flat metrics."""
    return [key.split("/", 1)[1] for key in flat if key.startswith("sensitivity/")]


def _per_class_table(flat: Mapping[str, Any]) -> list[str]:
    rows = [
        f"| {cls} | {_fmt(flat.get(f'sensitivity/{cls}'), 4)} | "
        f"{_fmt(flat.get(f'specificity/{cls}'), 4)} |"
        for cls in class_names_of(flat)
    ]
    return ["| Class | Sensitivity | Specificity |", "|---|---:|---:|", *rows]


def _plot_links(layout: RunLayout, model_names: Sequence[str]) -> list[str]:
    """Markdown image links to the plots that exist in the run's ``plots/``."""
    names = sorted(p.name for p in layout.plots_dir.glob("learning_curves_*.png"))
    names += [f"{kind}_{model}.png" for model in model_names for kind in ("confmat", "roc")]
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


def _interval_cell(score: Mapping[str, Any], metric: str) -> str:
    interval = score.get("intervals", {}).get(metric)
    value = _fmt(score["metrics"].get(metric), 3)
    return f"{value} [{interval['low']:.3f}, {interval['high']:.3f}]" if interval else value


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
                f"| {model} | {score['n_images']} | {_interval_cell(score, 'auroc')} "
                f"| {_interval_cell(score, 'balanced_acc')} | {_fmt(m.get('sensitivity'), 3)} "
                f"| {_fmt(m.get('specificity'), 3)} | {_fmt(m.get('ece'), 3)} "
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
    lines = [
        f"# dwskd report: method={run.get('method')}, data={run.get('data')}, "
        f"model={run.get('model')}",
        "",
        "## Command",
        "",
        "```",
        str(run.get("command", "(not recorded)")),
        "```",
        "",
        "## Run",
        "",
        *_bullets({k: v for k, v in run.items() if k not in hidden}),
        "",
        "## Resumes",
        "",
        *_resume_lines(run.get("resumes", [])),
        "",
        "## Test results",
        "",
        *_model_table(models, deployed),
        "",
    ]
    if deployed in models and models[deployed].get("test", {}).get("positive_class"):
        test = models[deployed]["test"]
        lines += [
            f"Positive class (ROC, sensitivity, specificity): **{test['positive_class']}** "
            f"(`data.positive_class`); sensitivity {_fmt(test['sensitivity'], 4)}, "
            f"specificity {_fmt(test['specificity'], 4)}.",
            "",
        ]
    if deployed in models:
        lines += [f"## Per-class results ({deployed}, test)", ""]
        lines += [*_per_class_table(models[deployed].get("test", {})), ""]
    lines += _external_lines(results.get("external") or {})
    lines += ["## Data", "", *_bullets(results.get("data", {})), ""]
    links = _plot_links(layout, _ordered_models(models))
    if links:
        lines += ["## Plots", "", *[f"{link}\n" for link in links]]
    return runs.write_text(layout.report_md, "\n".join(lines).rstrip() + "\n")


# --------------------------------------------------------------------------- plots


def save_figure(fig: Figure, path: Path) -> Path:
    return runs.atomic_write(
        Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    )


def plot_confusion_matrix(
    confmat: list[list[int]], class_names: Sequence[str], path: Path, title: str
) -> Path:
    """Confusion matrix (rows = true class) with counts, drawn by torchmetrics' plotter."""
    n = len(class_names)
    fig = Figure(figsize=(2.5 + 1.2 * n, 2.0 + 1.2 * n))
    ax = fig.subplots()
    draw_confusion_matrix(torch.as_tensor(confmat), ax=ax, labels=list(class_names))
    ax.set_title(title)
    return save_figure(fig, path)


def _roc_curves(
    probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str], positive: int = 1
) -> list[tuple[str, Tensor, Tensor]]:
    """(legend label, fpr, tpr): one curve for 2 classes (of class ``positive``), else one per class."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    t = torch.as_tensor(targets, dtype=torch.long)
    if p.ndim != 2 or p.shape[1] != len(class_names):
        raise ValueError(
            f"plot_roc needs probabilities of shape (N, {len(class_names)}) for classes "
            f"{list(class_names)}; got shape {tuple(p.shape)}."
        )
    if len(class_names) == 2:
        is_positive = (t == positive).long()
        fpr, tpr, _ = roc(p[:, positive], is_positive, task="binary")
        auc = auroc(p[:, positive], is_positive, task="binary")
        return [(f"{class_names[positive]} positive (AUC = {auc:.3f})", fpr, tpr)]
    c = len(class_names)
    fprs, tprs, _ = roc(p, t, task="multiclass", num_classes=c)
    aucs = auroc(p, t, task="multiclass", num_classes=c, average=None)
    return [
        (f"{name} vs rest (AUC = {auc:.3f})", fpr, tpr)
        for name, fpr, tpr, auc in zip(class_names, fprs, tprs, aucs.tolist(), strict=True)
    ]


def plot_roc(
    probs: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    title: str,
    positive: int = 1,
) -> Path:
    """ROC curve(s) with AUC in the legend: binary → one curve for class ``positive``,
    multiclass → one-vs-rest."""
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.subplots()
    for label, fpr, tpr in _roc_curves(probs, targets, class_names, positive):
        ax.plot(fpr.numpy(), tpr.numpy(), label=label)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


CURVE_PANELS = ("train loss terms", "val loss", "accuracy")


def _curve_panel(column: str) -> str | None:
    """Which panel a CSV column belongs to: per-student loss terms, val loss, accuracies.

    ``train/<model>/<term>_epoch`` (ce, partner_kd, ema_kd, teacher_kd, total) are loss
    terms; ``val/<model>/loss`` is the validation NLL; ``train/<model>/acc_epoch`` and
    ``val/<model>/acc`` are accuracies. Step-level and monitor columns are left out.
    """
    parts = column.split("/")
    if len(parts) != 3:
        return None
    split, _, last = parts
    if split == "train" and last.endswith("_epoch"):
        return "accuracy" if last == "acc_epoch" else "train loss terms"
    if split == "val" and last == "loss":
        return "val loss"
    if split == "val" and last == "acc":
        return "accuracy"
    return None


def read_epoch_curves(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """Per-epoch mean of every plotted column of a Lightning CSVLogger ``metrics.csv``.

    CSVLogger writes sparse rows (a step row, a val row, an epoch row); averaging the
    non-empty values per epoch turns them into one value per epoch and column.
    """
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with Path(metrics_csv).open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for col, value in row.items():
                if value not in ("", None) and _curve_panel(col):
                    sums[col][epoch].append(float(value))
    return {
        col: {e: float(np.mean(v)) for e, v in sorted(by_epoch.items())}
        for col, by_epoch in sums.items()
    }


def plot_learning_curves(metrics_csv: Path, path: Path, title: str) -> Path | None:
    """One figure per stage: loss terms per student, val loss, accuracies, vs epoch."""
    curves = read_epoch_curves(metrics_csv)
    panels = [p for p in CURVE_PANELS if any(_curve_panel(c) == p for c in curves)]
    if not panels:
        return None
    fig = Figure(figsize=(5.5 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        for col, curve in sorted(curves.items()):
            if _curve_panel(col) == panel:
                label = col.removesuffix("_epoch")
                ax.plot(list(curve), list(curve.values()), marker="o", markersize=3, label=label)
        ax.set(xlabel="epoch", title=f"{title}: {panel}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return save_figure(fig, path)


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

    return runs.atomic_write(Path(path), write)


# --------------------------------------------------------------------------- everything


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
) -> dict[str, Path]:
    """Write per-image predictions and plots, then report.md, then metrics.json (the file
    that marks a run finished): a crash before the end leaves a resumable run, never a
    half-reported one. ``files`` names the test images in prediction order; ``positive``
    is the positive class of a binary ROC.
    """
    plots, models = layout.plots_dir, results.get("models", {})
    paths: dict[str, Path] = {}
    for name, (probs, targets) in predictions.items() if files is not None else ():
        class_names = _class_names_for(models.get(name, {}), np.shape(probs)[1])
        paths[f"predictions_{name}"] = write_predictions_csv(
            layout.predictions_csv(name), files, probs, targets, class_names
        )
    for name, entry in models.items():
        confmat = entry.get("test", {}).get("confmat")
        if confmat:
            names = _class_names_for(entry, len(confmat))
            paths[f"confmat_{name}"] = plot_confusion_matrix(
                confmat, names, plots / f"confmat_{name}.png", f"{name}: test confusion matrix"
            )
    for name, (probs, targets) in predictions.items():
        names = _class_names_for(models.get(name, {}), np.shape(probs)[1])
        paths[f"roc_{name}"] = plot_roc(
            probs, targets, names, plots / f"roc_{name}.png", f"{name}: test ROC", positive
        )
    for stage, csv_path in stage_csvs.items():
        png = plot_learning_curves(csv_path, plots / f"learning_curves_{stage}.png", stage)
        if png is not None:
            paths[f"learning_curves_{stage}"] = png
    paths["report_md"] = write_report_md(layout, results)
    paths["metrics_json"] = write_metrics_json(layout, results)
    return paths
