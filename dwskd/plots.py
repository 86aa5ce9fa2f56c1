"""Figures of a run and of dwskd-eval: confusion matrix, ROC, reliability diagram, curves.

Figures are drawn on bare ``matplotlib.figure.Figure`` objects, which render with Agg and
never touch pyplot's global backend or figure registry; each is written atomically.
"""

from __future__ import annotations

import csv
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

from dwskd import io


def save_figure(fig: Figure, path: Path) -> Path:
    return io.atomic_write(
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


def plot_reliability(
    bins: Sequence[Mapping[str, Any]], path: Path, title: str, observed: str, confidence: str
) -> Path:
    """Reliability diagram: observed rate per confidence bin against the diagonal, with counts."""
    fig = Figure(figsize=(5.5, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["upper"] - bins[0]["lower"]
    filled = [b for b in bins if b["count"]]
    centres = [(b["lower"] + b["upper"]) / 2 for b in filled]
    top.bar(centres, [b["observed"] for b in filled], width=0.9 * width, label=observed)
    top.plot(
        [b["confidence"] for b in filled],
        [b["observed"] for b in filled],
        "o",
        color="C1",
        markersize=4,
        label="at the bin's mean confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    for x, b in zip(centres, filled, strict=True):
        top.annotate(str(b["count"]), (x, b["observed"]), ha="center", va="bottom", fontsize=7)
    top.set(ylabel=observed, xlim=(0, 1), ylim=(0, 1.08), title=title)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(
        [(b["lower"] + b["upper"]) / 2 for b in bins],
        [b["count"] for b in bins],
        width=0.9 * width,
        color="grey",
    )
    bottom.set(xlabel=confidence, ylabel="images")
    return save_figure(fig, path)


def plot_calibration(
    calibration: Mapping[str, Any], ece: float, positive: str | None, path: Path, title: str
) -> Path:
    """The reliability diagram of a score (:func:`dwskd.metrics.score`), axes named for its
    ECE: fraction positive for a binary task, accuracy of the top label otherwise."""
    if positive is None:
        observed, confidence = "accuracy", "confidence (probability of the predicted class)"
    else:
        observed, confidence = f"fraction {positive}", f"predicted probability of {positive}"
    title = f"{title}ECE = {ece:.3f}"
    return plot_reliability(calibration["bins"], path, title, observed, confidence)
