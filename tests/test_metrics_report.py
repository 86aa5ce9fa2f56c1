"""Metrics against hand-computed values, and the run report (metrics.json, report.md, plots)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryAUROC, MulticlassCalibrationError

from dwskd.metrics import (
    Bootstrap,
    classification_metrics,
    flatten_metrics,
    scalar_only,
    score,
    scoring_options,
)
from dwskd.plots import plot_learning_curves, plot_roc, read_epoch_curves
from dwskd.report import write_metrics_json, write_run_report
from dwskd.rundir import RunDirError, RunLayout

CLASSES = ["cat", "dog", "eel"]
TARGETS = [0, 0, 0, 1, 1, 2, 2]
PROBS = [  # argmax: 0, 0, 1, 1, 1, 2, 0
    [0.7, 0.2, 0.1],
    [0.6, 0.3, 0.1],
    [0.3, 0.6, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.5, 0.3],
    [0.1, 0.2, 0.7],
    [0.5, 0.1, 0.4],
]
# By hand: confmat rows = true class.  recall = 2/3, 2/2, 1/2;  precision = 2/3, 2/3, 1/1
# specificity = TN / negatives: 3/4, 4/5, 5/5;  F1 = 2/3, 0.8, 2/3
# Imbalanced on purpose: micro accuracy 5/7 differs from balanced accuracy.
HAND = {
    "acc": 5 / 7,
    "balanced_acc": (2 / 3 + 1.0 + 0.5) / 3,
    "f1_macro": (2 / 3 + 0.8 + 2 / 3) / 3,
    "sensitivity": [2 / 3, 1.0, 0.5],
    "specificity": [0.75, 0.8, 1.0],
    "confmat": [[2, 1, 0], [0, 2, 0], [1, 0, 1]],
    # ECE, 15 bins: confidence 0.5 (acc 1/2) -> 0; 0.6 (acc 1/2) -> 0.1*2; 0.7 (acc 1) -> 0.3*2;
    # 0.8 (acc 1) -> 0.2*1; sum / 7 images.
    "ece": (0.2 + 0.6 + 0.2) / 7,
}


def _computed(probs=PROBS, targets=TARGETS, num_classes=3) -> dict[str, torch.Tensor]:
    metrics = classification_metrics(num_classes)
    p, t = torch.tensor(probs), torch.tensor(targets)
    metrics.update(p[:3], t[:3])  # two batches: state must accumulate
    metrics.update(p[3:], t[3:])
    return metrics.compute()


def _auroc_by_pairs(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC: P(score of a positive > score of a negative), ties count 1/2."""
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_metrics_match_hand_computed_values():
    computed = _computed()
    for name in ("acc", "balanced_acc", "f1_macro"):
        assert computed[name].item() == pytest.approx(HAND[name], abs=1e-6), name
    for name in ("sensitivity", "specificity"):
        assert computed[name].tolist() == pytest.approx(HAND[name], abs=1e-6), name
    assert computed["confmat"].tolist() == HAND["confmat"]
    scores, targets = np.array(PROBS), np.array(TARGETS)
    per_class = [_auroc_by_pairs(scores[:, c], targets == c) for c in range(3)]
    assert computed["auroc"].item() == pytest.approx(np.mean(per_class), abs=1e-6)


def test_two_class_macro_auroc_equals_binary_auroc():
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 2, (64,), generator=gen)
    p1 = (torch.rand(64, generator=gen) + 0.4 * targets).clamp(max=1.0)  # informative, not perfect
    probs = torch.stack([1 - p1, p1], dim=1)
    macro = classification_metrics(2)(probs, targets)["auroc"].item()
    binary = BinaryAUROC()(p1, targets).item()
    assert macro == pytest.approx(binary, abs=1e-6)
    assert macro == pytest.approx(_auroc_by_pairs(p1.numpy(), targets.numpy() == 1), abs=1e-6)
    assert 0.6 < macro < 1.0


def test_flatten_metrics_names_and_scalar_only():
    flat = flatten_metrics(_computed(), CLASSES, prefix="test/")
    expected_keys = {"test/acc", "test/balanced_acc", "test/f1_macro", "test/auroc", "test/confmat"}
    expected_keys |= {"test/ece"}
    expected_keys |= {f"test/{m}/{c}" for m in ("sensitivity", "specificity") for c in CLASSES}
    assert set(flat) == expected_keys
    assert flat["test/specificity/eel"] == pytest.approx(1.0)
    assert flat["test/sensitivity/dog"] == pytest.approx(1.0)
    assert flat["test/confmat"] == HAND["confmat"]
    assert flat["test/ece"] == pytest.approx(HAND["ece"], abs=1e-6)
    assert all(isinstance(v, int) for row in flat["test/confmat"] for v in row)
    scalars = scalar_only(flat)
    assert set(scalars) == expected_keys - {"test/confmat"}
    assert all(type(v) is float for v in scalars.values())
    with pytest.raises(ValueError, match="3 per-class values but 2 class names"):
        flatten_metrics(_computed(), ["cat", "dog"])


# --------------------------------------------------------------------------- the scorer


def _random_task(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=gen)
    logits = torch.randn(n, classes, generator=gen) + 1.5 * torch.nn.functional.one_hot(targets)
    return torch.softmax(logits, dim=1), targets


def test_score_gives_the_run_metrics_per_class_figures_and_intervals():
    probs, targets = torch.tensor(PROBS), torch.tensor(TARGETS)
    scored = score(probs, targets, CLASSES, n_bins=15, bootstrap=Bootstrap(200, 0.9, 3))
    # multiclass: exactly the training collection's figures (same torchmetrics definitions)
    assert scored["metrics"] == flatten_metrics(_computed(), CLASSES)
    assert "positive_class" not in scored["metrics"] and "ece_top_label" not in scored["metrics"]
    # by hand: precision 2/3, 2/3, 1; F1 2/3, 0.8, 2/3; support 3, 2, 2
    per_class = scored["per_class"]
    assert [per_class[c]["precision"] for c in CLASSES] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert [per_class[c]["f1"] for c in CLASSES] == pytest.approx([2 / 3, 0.8, 2 / 3])
    assert [per_class[c]["recall"] for c in CLASSES] == pytest.approx(HAND["sensitivity"])
    assert [per_class[c]["support"] for c in CLASSES] == [3, 2, 2]
    assert set(scored["intervals"]) == {"acc", "balanced_acc", "auroc"}
    for name, ci in scored["intervals"].items():
        assert ci["low"] <= ci["value"] <= ci["high"], name
        assert ci["value"] == scored["metrics"][name]
    assert scored["bootstrap"] == {
        "resamples": 200, "level": 0.9, "seed": 3, "method": "percentile, stratified"
    }  # fmt: skip
    again = score(probs, targets, CLASSES, bootstrap=Bootstrap(200, 0.9, 3))
    assert again["intervals"] == scored["intervals"]  # a seed gives the same intervals
    json.dumps(scored, allow_nan=False)  # plain JSON data


def test_bootstrap_is_stratified_and_equals_torchmetrics_per_resample():
    """The vectorised draws: each class keeps its size in every resample, and each resample's
    figures are torchmetrics' own on that resample (the loop dwskd-eval used to run)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_recall,
    )

    from dwskd.metrics import _metric_draws, _resample_counts

    probs, targets = _random_task(90, 3, seed=1)
    probs = (probs * 8).round() / 8  # ties in the scores
    t = targets.numpy()
    by_class = [np.flatnonzero(t == c) for c in range(3)]
    counts = _resample_counts(np.random.default_rng(5), by_class, len(t), 20)
    for ix in by_class:
        assert (counts[:, ix].sum(axis=1) == len(ix)).all()  # stratified by true class
    draws = _metric_draws(counts, probs.numpy(), t, by_class)
    for r, row in enumerate(counts):
        idx = torch.as_tensor(np.repeat(np.arange(len(t)), row.astype(int)))
        p, y = probs[idx], targets[idx]
        expected = {
            "acc": multiclass_accuracy(p, y, num_classes=3, average="micro"),
            "balanced_acc": multiclass_recall(p, y, num_classes=3, average="macro"),
            "auroc": multiclass_auroc(p, y, num_classes=3, average="macro"),
        }
        for name, value in expected.items():
            assert draws[name][r] == pytest.approx(float(value), abs=1e-6), (name, r)


def test_binary_score_follows_the_positive_class():
    probs, targets = _random_task(120, 2, seed=2)
    names = ["COVID", "NonCOVID"]
    first = score(probs, targets, names, 0, n_bins=10, bootstrap=None)
    metrics = first["metrics"]
    assert "intervals" not in first and "bootstrap" not in first
    assert metrics["positive_class"] == "COVID"
    assert metrics["sensitivity"] == metrics["sensitivity/COVID"]
    assert metrics["specificity"] == metrics["specificity/COVID"]
    # binary ECE: of P(COVID) against is-COVID; the top-label ECE beside it
    top = MulticlassCalibrationError(num_classes=2, n_bins=10, norm="l1")(probs, targets)
    assert metrics["ece_top_label"] == pytest.approx(float(top), abs=1e-7)
    bins = first["calibration"]["bins"]
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 120
    ece = sum(b["count"] / 120 * abs(b["observed"] - b["confidence"]) for b in bins if b["count"])
    assert metrics["ece"] == pytest.approx(ece, abs=1e-6)
    # AUROC: the positive class's binary AUROC, whichever class is positive
    binary = BinaryAUROC()(probs[:, 1], targets).item()
    assert metrics["auroc"] == pytest.approx(binary, abs=1e-6)
    assert (
        score(probs, targets, names, 1, bootstrap=None)["metrics"]["positive_class"] == "NonCOVID"
    )


def test_multiclass_score_ignores_a_positive_class_and_bins_top_label_confidence():
    probs, targets = _random_task(200, 4, seed=3)
    scored = score(probs, targets, list("abcd"), 1, n_bins=5, bootstrap=Bootstrap(100))
    assert "positive_class" not in scored["metrics"]
    bins = scored["calibration"]["bins"]
    assert [b["lower"] for b in bins] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    confidence = probs.max(dim=1).values
    assert [b["count"] for b in bins] == [
        int(((confidence >= lo) & (confidence < lo + 0.2 + (lo == 0.8))).sum()) for lo in
        (0, 0.2, 0.4, 0.6, 0.8)
    ]  # fmt: skip
    for ci in scored["intervals"].values():
        assert ci["low"] <= ci["value"] <= ci["high"]
        assert ci["high"] - ci["low"] < 0.3  # 200 images: a real interval, not [0, 1]


@pytest.mark.parametrize(
    ("bootstrap", "bins", "message"),
    [
        ({"resamples": 0, "level": 0.95, "seed": 0}, 15, r"eval\.bootstrap\.resamples=0 must"),
        ({"resamples": 10, "level": 95, "seed": 0}, 15, r"eval\.bootstrap\.level=95 must"),
        ({"resamples": 10, "level": 0.9, "seed": -1}, 15, r"eval\.bootstrap\.seed=-1 must"),
        ({"resamples": 10, "level": 0.9, "seed": 0}, 0, r"eval\.calibration_bins=0 must"),
    ],
)
def test_bad_scoring_options_are_refused_by_name(bootstrap, bins, message):
    with pytest.raises(ValueError, match=message):
        scoring_options(bootstrap, bins, prefix="eval.")
    assert scoring_options({"resamples": 10, "level": 0.9, "seed": 1}, 7) == (
        Bootstrap(10, 0.9, 1),
        7,
    )


# --------------------------------------------------------------------------- report

# Columns as DistillModule logs them (per student a/b; the monitor val/acc is not a curve).
FAKE_CSV = """epoch,step,train/student_a/ce_step,train/student_a/ce_epoch,train/student_b/ema_kd_epoch,train/student_a/acc_epoch,val/student_a/loss,val/student_a/acc,val/acc,lr
0,4,2.0,,,,,,,0.1
0,9,1.0,,,,,,,0.1
0,9,,,,,1.2,0.5,0.5,
0,9,,1.4,0.3,0.4,,,,
1,14,0.8,,,,,,,0.1
1,19,0.6,,,,,,,0.1
1,19,,,,,0.9,0.75,0.75,
1,19,,0.7,0.2,0.6,,,,
"""


def _results(out_dir) -> dict:
    flat = flatten_metrics(_computed(), CLASSES)
    other = dict(flat, acc=0.5, auroc=float("nan"))
    return {
        "run": {
            "method": "dwskd",
            "data": "synthetic",
            "model": "vit_tiny",
            "teacher": "vit_small",
            "seed": 7,
            "wall_time_s": 12.5,
            "output_dir": out_dir,
            "command": "python -m dwskd.run method=dwskd seed=7",
            "config": {f"option_{i}": i for i in range(50)},
        },
        "data": {"name": "synthetic", "class_names": CLASSES, "sizes": {"train": 60, "test": 6}},
        "deployed": "student_a",
        "models": {
            "student_a": {
                "test": flat,
                "params": 5_530_000,
                "flops": 1_260_000_000,
                "latency_ms": 3.14159,
            },
            "student_b": {
                "test": other,
                "params": 5_530_000,
                "flops": 1_260_000_000,
                "latency_ms": 3.2,
            },
        },
    }


def test_write_run_report_writes_everything_and_never_overwrites(tmp_path):
    csv_path = tmp_path / "logs" / "metrics.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(FAKE_CSV)
    results = _results(tmp_path)
    predictions = {"student_a": (np.array(PROBS), np.array(TARGETS))}
    layout = RunLayout(tmp_path)
    paths = write_run_report(layout, results, predictions, {"train": csv_path})

    assert set(paths) == {
        "metrics_json", "report_md", "confmat_student_a", "confmat_student_b", "roc_student_a",
        "learning_curves_train",
    }  # fmt: skip
    for key, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, key
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads(paths["metrics_json"].read_text())
    assert saved["student_a"] == saved["models"]["student_a"]
    assert saved["student_b"]["test"]["auroc"] is None  # NaN stored as strict-JSON null
    assert saved["student_a"]["test"]["acc"] == pytest.approx(HAND["acc"])
    assert saved["student_a"]["test"]["confmat"] == HAND["confmat"]
    assert saved["run"]["output_dir"] == str(tmp_path)
    assert saved["deployed"] == "student_a"
    assert saved["run"]["config"]["option_49"] == 49

    report = paths["report_md"].read_text()
    assert "method=dwskd, data=synthetic, model=vit_tiny" in report
    assert "python -m dwskd.run method=dwskd seed=7" in report
    assert "- **seed**: 7" in report
    assert "- **config**" not in report  # the full config stays in metrics.json
    row_a = next(line for line in report.splitlines() if line.startswith("| **student_a**"))
    for number in ("0.7143", "0.7222", "0.7111", "5.53", "1.260", "3.14"):
        assert number in row_a
    row_b = next(line for line in report.splitlines() if line.startswith("| student_b"))
    assert "0.5000" in row_b and "0.7222" in row_b and "—" in row_b
    assert "| eel | 0.5000 | 1.0000 |" in report
    assert "| dog | 1.0000 | 0.8000 |" in report
    for png in ("learning_curves_train", "confmat_student_a", "roc_student_a"):
        assert f"(plots/{png}.png)" in report
    assert "roc_student_b" not in report

    assert "- none: the run went through without interruption" in report
    before = paths["metrics_json"].read_text()
    with pytest.raises(RunDirError, match="never overwrites"):
        write_metrics_json(layout, {})
    assert paths["metrics_json"].read_text() == before


def test_learning_curves_from_csvlogger_file(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(FAKE_CSV)
    curves = read_epoch_curves(csv_path)
    assert set(curves) == {
        "train/student_a/ce_epoch",
        "train/student_b/ema_kd_epoch",
        "train/student_a/acc_epoch",
        "val/student_a/loss",
        "val/student_a/acc",
    }  # fmt: skip  (every loss term per student; no step columns, no monitor column)
    assert curves["val/student_a/acc"] == {0: 0.5, 1: 0.75}
    assert curves["train/student_b/ema_kd_epoch"] == {0: 0.3, 1: 0.2}
    png = plot_learning_curves(csv_path, tmp_path / "curves.png", "train")
    assert png is not None and png.stat().st_size > 0

    no_curves = tmp_path / "other.csv"
    no_curves.write_text("epoch,step,lr,train/student_a/ce_step\n0,1,0.1,2.0\n")
    assert plot_learning_curves(no_curves, tmp_path / "none.png", "train") is None


def test_plot_roc_binary_and_bad_shape(tmp_path):
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
    path = plot_roc(probs, np.array([0, 1, 1, 0]), ["NORMAL", "PNEUMONIA"], tmp_path / "r.png", "t")
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        plot_roc(probs, np.array([0, 1, 1, 0]), CLASSES, tmp_path / "bad.png", "t")


def test_binary_roc_and_sensitivity_follow_the_positive_class(tmp_path):
    from dwskd.metrics import positive_class_summary
    from dwskd.plots import _roc_curves

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    targets = np.array([0, 1, 1, 0])
    names = ["COVID", "NonCOVID"]
    ((label, _, _),) = _roc_curves(probs, targets, names, positive=0)
    assert label.startswith("COVID positive")
    flat = {"sensitivity/COVID": 1.0, "specificity/COVID": 0.5}
    summary = positive_class_summary(flat, names, positive=0)
    assert summary == {"positive_class": "COVID", "sensitivity": 1.0, "specificity": 0.5}
    assert positive_class_summary(flat, ["a", "b", "c"], positive=0) == {}
