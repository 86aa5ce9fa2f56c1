"""Classification metrics: the live collection of training, and the one scorer of a test set.

:func:`classification_metrics` is the torchmetrics collection a stage updates batch by batch
(one per stage: train/val/test, so no state leaks between them). :func:`score` scores a
finished set of predictions (a run's test split, ``dwskd-eval``'s folder, an external set)
with every figure the reports show, as plain JSON-able data, so that a run and ``dwskd-eval``
give the same figures for the same predictions. Both take **probabilities** (softmax of the
logits, shape ``(N, C)``) and integer targets ``(N,)``: thresholded metrics take the argmax,
AUROC uses the probabilities as scores.

torch and torchmetrics are imported where they are used: the commands import this module
for their option checks, and ``--help`` and refusals stay instant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torchmetrics
    from torch import Tensor

PER_CLASS_METRICS = ("sensitivity", "specificity")
INTERVAL_METRICS = ("acc", "balanced_acc", "auroc")  # the figures given bootstrap intervals
BOOTSTRAP_METHOD = "percentile, stratified"
BLOCK_ELEMENTS = 4_000_000  # resamples x images scored at once: bounds the bootstrap's memory


def classification_metrics(num_classes: int) -> torchmetrics.MetricCollection:
    """Accuracy, balanced accuracy, macro-F1, macro AUROC, per-class sens./spec., confusion matrix,
    and the top-label expected calibration error (``ece``: 15 equal-width bins, L1).

    ``balanced_acc`` is macro-averaged recall. ``auroc`` is macro one-vs-rest; with two
    classes both one-vs-rest curves are mirror images, so it equals the binary AUROC. This is
    what training logs per epoch; reports use :func:`score` (the same definitions, and the
    binary ECE of the positive class).
    """
    import torchmetrics
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassAUROC,
        MulticlassCalibrationError,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassRecall,
        MulticlassSpecificity,
    )

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
    from torchmetrics.classification import MulticlassConfusionMatrix

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


# ------------------------------------------------------------------------- scoring options
@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap settings (``bootstrap`` of dwskd-eval, ``eval.bootstrap`` of a run)."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def record(self) -> dict[str, Any]:
        """What metrics.json says about the intervals."""
        return {**asdict(self), "method": BOOTSTRAP_METHOD}


def require_int(option: str, value: Any, minimum: int, what: str) -> None:
    """Refuse ``value`` unless it is an integer >= ``minimum``, naming ``option``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{option}={value!r} must be {what}.")


def scoring_options(
    bootstrap: Mapping[str, Any], calibration_bins: Any, prefix: str = ""
) -> tuple[Bootstrap, int]:
    """Checked bootstrap settings and calibration bins; a bad value is refused by its name.

    Why here, for both commands: a bad value used to surface only deep inside the work, as an
    IndexError of the bootstrap or a torchmetrics error that named no option. ``prefix`` is
    where the options sit in the command's config (``eval.`` in a run).
    """
    at_least_one = "an integer >= 1"
    require_int(f"{prefix}calibration_bins", calibration_bins, 1, f"{at_least_one} (default 15)")
    require_int(
        f"{prefix}bootstrap.resamples",
        bootstrap["resamples"],
        1,
        f"{at_least_one} (default 1000; e.g. 200 for quicker, coarser intervals)",
    )
    require_int(f"{prefix}bootstrap.seed", bootstrap["seed"], 0, "an integer >= 0")
    level = bootstrap["level"]
    if isinstance(level, bool) or not (isinstance(level, int | float) and 0 < level < 1):
        raise ValueError(f"{prefix}bootstrap.level={level!r} must be in (0, 1), e.g. 0.95.")
    checked = Bootstrap(bootstrap["resamples"], float(level), bootstrap["seed"])
    return checked, calibration_bins


# ------------------------------------------------------------------------- the scorer
def score(
    probs: Tensor,
    targets: Tensor,
    classes: Sequence[str],
    positive: int | None = None,
    *,
    n_bins: int = 15,
    bootstrap: Bootstrap | None = Bootstrap(),  # noqa: B008 (frozen: safe as a default)
) -> dict[str, Any]:
    """Every figure of one model on one labelled set, as plain JSON-able data.

    ``positive``: the positive class of a binary task (default index 1), for the binary ECE,
    sensitivity and specificity; ignored with more classes. Returns ``metrics`` (flat, the
    keys metrics.json has always had), ``per_class``, ``calibration`` (bins of the ECE) and,
    unless ``bootstrap`` is None, ``intervals`` and ``bootstrap`` (its settings).
    """
    if probs.ndim != 2 or probs.shape[1] != len(classes) or len(probs) != len(targets):
        raise ValueError(
            f"score needs probabilities of shape (N, {len(classes)}) for classes "
            f"{list(classes)} and N targets; got {tuple(probs.shape)} and {len(targets)}."
        )
    binary = len(classes) == 2
    positive = (1 if positive is None else int(positive)) if binary else None
    per_class = per_class_metrics(probs, targets, classes)
    result: dict[str, Any] = {
        "metrics": point_metrics(probs, targets, classes, per_class, positive, n_bins),
        "per_class": per_class,
        "calibration": {
            "n_bins": n_bins,
            "norm": "l1",
            "bins": reliability_bins(probs, targets, positive, n_bins),
        },
    }
    if bootstrap is not None:
        result["intervals"] = bootstrap_intervals(probs, targets, result["metrics"], bootstrap)
        result["bootstrap"] = bootstrap.record()
    return result


def per_class_metrics(probs: Tensor, targets: Tensor, classes: Sequence[str]) -> dict[str, dict]:
    """Precision, recall (sensitivity), F1, specificity and support of each class."""
    from torchmetrics.functional.classification import (
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
        multiclass_specificity,
    )

    options = {"num_classes": len(classes), "average": None}
    columns = {
        "precision": multiclass_precision(probs, targets, **options),
        "recall": multiclass_recall(probs, targets, **options),
        "f1": multiclass_f1_score(probs, targets, **options),
        "specificity": multiclass_specificity(probs, targets, **options),
    }
    support = [int((targets == i).sum()) for i in range(len(classes))]
    return {
        c: {**{k: float(v[i]) for k, v in columns.items()}, "support": support[i]}
        for i, c in enumerate(classes)
    }


def point_metrics(
    probs: Tensor,
    targets: Tensor,
    classes: Sequence[str],
    per_class: Mapping[str, Mapping[str, float]],
    positive: int | None,
    n_bins: int,
) -> dict[str, Any]:
    """The flat metrics (the definitions of :func:`classification_metrics`), ECE with
    ``n_bins``, and for a binary task the positive class's summary and the top-label ECE."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_recall,
    )

    options = {"num_classes": len(classes)}
    flat: dict[str, Any] = {  # in the order of the collection's (sorted) keys
        "acc": float(multiclass_accuracy(probs, targets, average="micro", **options)),
        # macro one-vs-rest; with two classes it is the positive class's binary AUROC
        "auroc": float(multiclass_auroc(probs, targets, average="macro", **options)),
        "balanced_acc": float(multiclass_recall(probs, targets, average="macro", **options)),
        "confmat": multiclass_confusion_matrix(probs, targets, **options).tolist(),
        "f1_macro": float(multiclass_f1_score(probs, targets, average="macro", **options)),
    }
    flat.update({f"sensitivity/{c}": m["recall"] for c, m in per_class.items()})
    flat.update({f"specificity/{c}": m["specificity"] for c, m in per_class.items()})
    flat["ece"] = calibration_error(probs, targets, positive, n_bins)
    if positive is not None:
        flat["ece_top_label"] = calibration_error(probs, targets, None, n_bins)
        flat.update(positive_class_summary(flat, classes, positive))
    return flat


# ------------------------------------------------------------------------- calibration
def _confidence(probs: Tensor, targets: Tensor, positive: int | None) -> tuple[Tensor, Tensor]:
    """(confidence, hit): P(positive) vs is-positive for binary, top-label vs correct else."""
    if positive is not None:
        return probs[:, positive], (targets == positive).float()
    confidence, predicted = probs.max(dim=1)
    return confidence, (predicted == targets).float()


def calibration_error(probs: Tensor, targets: Tensor, positive: int | None, n_bins: int) -> float:
    """ECE (L1) by torchmetrics: binary on P(positive), multiclass on the top label."""
    from torchmetrics.functional.classification import (
        binary_calibration_error,
        multiclass_calibration_error,
    )

    if positive is not None:
        hit = (targets == positive).long()
        confidence = probs[:, positive].contiguous()
        return float(binary_calibration_error(confidence, hit, n_bins=n_bins, norm="l1"))
    return float(
        multiclass_calibration_error(
            probs, targets, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"
        )
    )


def reliability_bins(
    probs: Tensor, targets: Tensor, positive: int | None, n_bins: int
) -> list[dict[str, Any]]:
    """Per equal-width bin: its edges, image count, mean confidence and observed rate.

    Observed rate: accuracy (multiclass, top label) or fraction positive (binary), the two
    quantities the ECE compares, so the diagram shows where the ECE comes from. Confidence
    1.0 falls in the last bin.
    """
    import torch

    confidence, hit = _confidence(probs, targets, positive)
    confidence = confidence.float().contiguous()
    edges = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins).index_add_(0, index, confidence)
    hit_sum = torch.zeros(n_bins).index_add_(0, index, hit)
    return [
        {
            "lower": round(float(edges[i]), 6),
            "upper": round(float(edges[i + 1]), 6),
            "count": int(count[i]),
            "confidence": float(conf_sum[i] / count[i]) if count[i] else None,
            "observed": float(hit_sum[i] / count[i]) if count[i] else None,
        }
        for i in range(n_bins)
    ]


# ------------------------------------------------------------------------- bootstrap
def bootstrap_intervals(
    probs: Tensor, targets: Tensor, values: Mapping[str, Any], options: Bootstrap
) -> dict[str, dict[str, float]]:
    """Percentile intervals of accuracy, balanced accuracy and AUROC (fixed seed).

    Resampling is stratified by true class: every resample holds every class as often as the
    test set does, so balanced accuracy and AUROC are defined in each of them. This is dwskd's
    own code because torchmetrics has no stratified bootstrap (its ``BootStrapper`` resamples
    without regard to class, one metric call per resample). The metrics of all resamples are
    computed at once from how often each image is drawn (~20x faster than a metric call per
    resample); they equal torchmetrics' definitions in :func:`point_metrics`.
    """
    import numpy as np

    p, t = probs.detach().cpu().numpy(), targets.detach().cpu().numpy()
    by_class = [np.flatnonzero(t == c) for c in range(p.shape[1])]
    rng = np.random.default_rng(options.seed)
    block = max(1, BLOCK_ELEMENTS // max(1, len(t)))
    draws: list[dict[str, np.ndarray]] = []
    for start in range(0, options.resamples, block):
        counts = _resample_counts(rng, by_class, len(t), min(block, options.resamples - start))
        draws.append(_metric_draws(counts, p, t, by_class))
    tail = 100 * (1 - options.level) / 2
    intervals = {}
    for name in INTERVAL_METRICS:
        d = np.concatenate([block_draws[name] for block_draws in draws])
        intervals[name] = {
            "value": float(values[name]),
            "low": float(np.percentile(d, tail)),
            "high": float(np.percentile(d, 100 - tail)),
        }
    return intervals


def _resample_counts(
    rng: np.random.Generator, by_class: Sequence[np.ndarray], n: int, resamples: int
) -> np.ndarray:
    """(resamples, n): how often each image is drawn; each class resampled to its own size.

    The draws are those of the per-resample loop this replaced (the same generator calls in
    the same order), so a seed gives the intervals it always gave.
    """
    import numpy as np

    counts = np.empty((resamples, n))
    for r in range(resamples):
        drawn = np.concatenate([rng.choice(ix, len(ix)) for ix in by_class])
        counts[r] = np.bincount(drawn.astype(np.int64), minlength=n)
    return counts


def _metric_draws(
    counts: np.ndarray, p: np.ndarray, t: np.ndarray, by_class: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro AUROC of each resample (one per row of counts).

    As torchmetrics does, a class without images counts 0 in the macro averages.
    """
    import numpy as np

    correct = (p.argmax(axis=1) == t).astype(float)
    recalls = [
        counts[:, ix] @ correct[ix] / len(ix) if len(ix) else np.zeros(len(counts))
        for ix in by_class
    ]
    aurocs = [_auroc_draws(counts, p[:, c], t == c) for c in range(p.shape[1])]
    return {
        "acc": counts @ correct / len(t),
        "balanced_acc": np.mean(recalls, axis=0),
        "auroc": np.mean(aurocs, axis=0),
    }


def _auroc_draws(counts: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of each resample: the Mann-Whitney statistic with each image weighted
    by its draw count (ties count 1/2), which is the area under torchmetrics' ROC curve."""
    import numpy as np

    order = np.argsort(scores, kind="stable")
    weights, is_positive = counts[:, order], positive[order]
    _, first, group = np.unique(scores[order], return_index=True, return_inverse=True)
    last = np.append(first[1:], len(order))  # one past each group of tied scores
    negatives = np.where(is_positive, 0.0, weights)
    below = np.concatenate([np.zeros((len(counts), 1)), negatives.cumsum(axis=1)], axis=1)
    under, through = below[:, first], below[:, last]  # negative weight below / up to a score
    pos_group = group[is_positive]
    pos_weights = weights[:, is_positive]
    wins = (pos_weights * (under[:, pos_group] + (through - under)[:, pos_group] / 2)).sum(axis=1)
    pairs = pos_weights.sum(axis=1) * negatives.sum(axis=1)
    return np.divide(wins, pairs, out=np.zeros(len(counts)), where=pairs > 0)
