"""Classification metrics (torchmetrics) and their flattening into loggable / JSON values.

One :func:`classification_metrics` collection is created per stage (train/val/test) so
that state never leaks between stages. Update it with **probabilities** (softmax of the
logits, shape ``(N, C)``) and integer targets ``(N,)``: thresholded metrics take the
argmax, AUROC uses the probabilities as scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torchmetrics
from torch import Tensor
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
    MulticlassSpecificity,
)

PER_CLASS_METRICS = ("sensitivity", "specificity")


def classification_metrics(num_classes: int) -> torchmetrics.MetricCollection:
    """Accuracy, balanced accuracy, macro-F1, macro AUROC, per-class sens./spec., confusion matrix,
    and the expected calibration error (``ece``: 15 equal-width confidence bins, L1).

    ``balanced_acc`` is macro-averaged recall. ``auroc`` is macro one-vs-rest; with two
    classes both one-vs-rest curves are mirror images, so it equals the binary AUROC.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: classification metrics need >= 2 classes.")
    c = num_classes
    return torchmetrics.MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=c, average="micro"),
            "balanced_acc": MulticlassRecall(num_classes=c, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes=c, average="macro"),
            "auroc": MulticlassAUROC(num_classes=c, average="macro"),
            "sensitivity": MulticlassRecall(num_classes=c, average=None),
            "specificity": MulticlassSpecificity(num_classes=c, average=None),
            "confmat": MulticlassConfusionMatrix(num_classes=c),
            "ece": MulticlassCalibrationError(num_classes=c, n_bins=15, norm="l1"),
        }
    )


def flatten_metrics(
    computed: Mapping[str, Tensor], class_names: Sequence[str], prefix: str = ""
) -> dict[str, float | list]:
    """Turn ``collection.compute()`` into plain values: floats, per-class floats, nested lists.

    Scalars become ``{prefix}{name}``; per-class vectors become ``{prefix}{name}/{class}``;
    matrices (the confusion matrix, rows = true class) become a nested list.
    """
    flat: dict[str, float | list] = {}
    for name, value in computed.items():
        if value.ndim == 0:
            flat[f"{prefix}{name}"] = float(value)
        elif value.ndim == 1:
            if len(value) != len(class_names):
                raise ValueError(
                    f"Metric '{name}' has {len(value)} per-class values but {len(class_names)} "
                    f"class names were given ({list(class_names)})."
                )
            for cls, v in zip(class_names, value.tolist(), strict=True):
                flat[f"{prefix}{name}/{cls}"] = float(v)
        else:
            flat[f"{prefix}{name}"] = value.tolist()
    return flat


def scalar_only(flat: Mapping[str, object]) -> dict[str, float]:
    """Keep the scalar entries (drop the confusion matrix), as Lightning's ``log_dict`` needs."""
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def positive_class_summary(flat: Mapping[str, object], class_names: Sequence[str], positive: int):
    """Binary tasks: sensitivity and specificity of the positive class, named, at top level."""
    if len(class_names) != 2:
        return {}
    name = class_names[positive]
    return {
        "positive_class": name,
        "sensitivity": flat[f"sensitivity/{name}"],
        "specificity": flat[f"specificity/{name}"],
    }


def subset_summary(probs: Tensor, targets: Tensor, class_names: Sequence[str]) -> dict[str, object]:
    """Accuracy, balanced accuracy over the classes present, and the confusion matrix of a
    subset (one source of a union's test split), where some of the task's classes are absent:
    macro metrics over absent classes would be undefined, so they are left out."""
    confmat = MulticlassConfusionMatrix(num_classes=len(class_names))(probs, targets)
    support = confmat.sum(dim=1)
    present = support > 0
    recall = confmat.diagonal()[present].float() / support[present]
    return {
        "n": int(support.sum()),
        "acc": float(confmat.diagonal().sum() / support.sum().clamp_min(1)),
        "balanced_acc": float(recall.mean()) if bool(present.any()) else float("nan"),
        "classes_present": [c for c, p in zip(class_names, present.tolist(), strict=True) if p],
        "confmat": confmat.tolist(),
    }
