"""dwskd.evaluate on a real finished run: test-only folders, class maps, intervals, refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from dwskd.commands import compose_command
from dwskd.evaluate import EvaluationError, build_task, positive_index, run
from dwskd.metrics import reliability_bins
from dwskd.rundir import RunLayout, read_results
from tests.conftest import run_module
from tests.test_predict import folder_run

LESIONS = ["ring_enhancing", "round_bright", "spiculated"]
TWO_CLASS_MAP = "class_map={healthy: normal, lesion: [ring_enhancing, round_bright, spiculated]}"
FAST = ["progress=false", "bootstrap.resamples=200"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return folder_run(tmp_path_factory)


def evaluate(*overrides: str) -> dict:
    return run(compose_command("evaluate", list(overrides)))


def two_class_folder(data: Path, root: Path) -> Path:
    """A test-only folder ``<root>/<class>/`` of symlinks: healthy <- normal, lesion <- rest."""
    for external, classes in (("healthy", ["normal"]), ("lesion", LESIONS)):
        (root / external).mkdir(parents=True)
        for image in (p for c in classes for p in sorted((data / "test" / c).iterdir())):
            (root / external / image.name).symlink_to(image)
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_four_class_model_scored_on_two_external_classes(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    root, out = two_class_folder(data, tmp_path / "external"), tmp_path / "eval"
    results = evaluate(f"model_dir={run_dir}", f"data.root={root}", f"out={out}", TWO_CLASS_MAP)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["task"]["classes"] == ["healthy", "lesion"]
    assert saved["task"]["positive_class"] == "lesion"
    assert saved["task"]["positive_source"] == "default: class index 1"
    confmat = np.array(saved["metrics"]["confmat"])
    assert confmat.shape == (2, 2) and confmat.sum() == 32
    assert confmat.sum(axis=1).tolist() == [8, 24]  # rows: true healthy, true lesion
    assert saved["metrics"]["sensitivity"] == saved["metrics"]["sensitivity/lesion"]
    assert 0.0 <= saved["metrics"]["ece"] <= 1.0 and "ece_top_label" in saved["metrics"]
    assert set(saved["intervals"]) == {"acc", "balanced_acc", "auroc"}
    for name, ci in saved["intervals"].items():
        assert ci["low"] <= ci["value"] <= ci["high"], name
        assert ci["value"] == pytest.approx(saved["metrics"][name])
    assert sum(b["count"] for b in saved["calibration"]["bins"]) == 32
    assert results["metrics"]["acc"] == saved["metrics"]["acc"]
    # the lesion probability is the model's three lesion classes summed, image by image
    own = RunLayout(run_dir).predictions_csv(read_results(run_dir)["deployed"])
    model_probs = {r["file"]: r for r in read_rows(own)}
    rows = read_rows(out / "predictions.csv")
    assert len(rows) == 32
    for row in rows:
        theirs = model_probs[Path(row["file"]).name]
        summed = sum(float(theirs[f"prob_{c}"]) for c in LESIONS)
        assert float(row["prob_lesion"]) == pytest.approx(summed, abs=5e-6)
        assert float(row["prob_healthy"]) == pytest.approx(float(theirs["prob_normal"]), abs=2e-6)
        assert row["true_label"] == Path(row["file"]).parent.name
    report = (out / "report.md").read_text()
    for text in ("95% CI", "| lesion | ring_enhancing, round_bright, spiculated |", "ECE"):
        assert text in report
    assert str(RunLayout(run_dir).export_dir("student_a")) in report and "scratch" in report
    assert "default: class index 1" in report
    assert {p.name for p in (out / "plots").iterdir()} == {
        "confmat.png",
        "roc.png",
        "reliability.png",
    }


def test_same_classes_reproduce_the_runs_own_test_metrics(trained, tmp_path: Path) -> None:
    """A root with train/ and test/ is scored on test/, exactly as the run scored it."""
    data, run_dir = trained
    results = evaluate(f"model_dir={run_dir}", f"data.root={data}", f"out={tmp_path / 'e'}", *FAST)
    own = read_results(run_dir)[read_results(run_dir)["deployed"]]["test"]
    assert results["data"]["folder"] == str(data / "test")
    assert results["task"]["classes"] == ["normal", *LESIONS]
    assert results["task"]["positive_class"] is None  # four classes: no positive class
    assert results["metrics"]["confmat"] == own["confmat"]
    for key in ("acc", "balanced_acc", "f1_macro", "auroc", "ece"):
        assert results["metrics"][key] == pytest.approx(own[key], abs=1e-6), key


def test_the_run_and_dwskd_eval_score_alike_with_intervals(trained, tmp_path: Path) -> None:
    """One scorer and one renderer: a run's test stage writes the intervals, per-class figures
    and reliability bins dwskd-eval gives for the same images (same bootstrap options)."""
    data, run_dir = trained
    saved = read_results(run_dir)
    for name in saved["models"]:
        details = saved[name]["test_details"]
        assert details["bootstrap"]["resamples"] == 1000 and details["calibration"]["n_bins"] == 15
        for metric, ci in details["intervals"].items():
            assert ci["low"] <= saved[name]["test"][metric] <= ci["high"], (name, metric)
    deployed = saved["deployed"]
    own = saved[deployed]["test_details"]
    results = evaluate(
        f"model_dir={run_dir}", f"data.root={data}", f"out={tmp_path / 'e'}", FAST[0]
    )
    assert results["bootstrap"] == own["bootstrap"]
    for metric, ci in own["intervals"].items():
        for key in ("value", "low", "high"):
            assert results["intervals"][metric][key] == pytest.approx(ci[key], abs=1e-6)
    for c, row in own["per_class"].items():
        assert results["per_class"][c] == pytest.approx(row, abs=1e-6)
    assert [b["count"] for b in results["calibration"]["bins"]] == [
        b["count"] for b in own["calibration"]["bins"]
    ]
    report = (run_dir / "report.md").read_text()
    assert "## Test results with intervals (95% CI)" in report
    row = next(line for line in report.splitlines() if line.startswith(f"| **{deployed}**"))
    acc = own["intervals"]["acc"]
    assert f"[{acc['low']:.3f}, {acc['high']:.3f}]" in report.split("with intervals")[1]
    assert "0." in row and "Intervals: percentile bootstrap, 1000 resamples" in report
    assert f"(plots/reliability_{deployed}.png)" in report
    assert (run_dir / "plots" / f"reliability_{deployed}.png").is_file()


def test_positive_class_option_picks_the_binary_positive(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    root = two_class_folder(data, tmp_path / "external")
    results = evaluate(
        f"model_dir={run_dir}",
        f"data.root={root}",
        f"out={tmp_path / 'e'}",
        TWO_CLASS_MAP,
        "positive_class=healthy",
        "saliency=2",
        *FAST,
    )
    assert results["task"]["positive_class"] == "healthy"
    # saliency=2: overlays of the first two images (healthy sorts first), linked in the report
    first = [f"healthy_{p.stem}" for p in sorted((root / "healthy").iterdir())[:2]]
    overlays = sorted((tmp_path / "e" / "saliency").iterdir())
    assert [p.stem for p in overlays] == first
    report = (tmp_path / "e" / "report.md").read_text()
    assert f"![{first[0]}](saliency/{first[0]}.png)" in report
    assert results["task"]["positive_source"] == "positive_class="
    assert results["metrics"]["sensitivity"] == results["metrics"]["sensitivity/healthy"]
    assert results["metrics"]["specificity"] == results["metrics"]["specificity/healthy"]


def test_mismatched_img_size_is_refused_naming_both(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    out = tmp_path / "e"
    with pytest.raises(EvaluationError, match=r"data\.img_size=64 but the model takes 32"):
        evaluate(f"model_dir={run_dir}", f"data.root={data}", f"out={out}", "data.img_size=64")
    with pytest.raises(EvaluationError, match=r"data\.channels=3 but the model takes 1"):
        evaluate(f"model_dir={run_dir}", f"data.root={data}", f"out={out}", "data.channels=3")
    assert not out.exists()
    with pytest.warns(UserWarning, match="allow_resize=true"):
        results = evaluate(
            f"model_dir={run_dir}",
            f"data.root={data}",
            f"out={out}",
            "data.img_size=64",
            "allow_resize=true",
            *FAST,
        )
    assert results["preprocessing"]["requested"] == {"img_size": 64}
    assert results["preprocessing"]["used"] == {"img_size": 32, "channels": 1}


def test_unmapped_external_classes_are_named_with_the_models_labels(trained, tmp_path) -> None:
    data, run_dir = trained
    root = two_class_folder(data, tmp_path / "external")
    with pytest.raises(EvaluationError, match=r"\['healthy', 'lesion'\].*normal.*spiculated"):
        evaluate(f"model_dir={run_dir}", f"data.root={root}", f"out={tmp_path / 'e'}")
    assert not (tmp_path / "e").exists()


def test_non_empty_out_is_refused(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    out = tmp_path / "e"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        evaluate(f"model_dir={run_dir}", f"data.root={data}", f"out={out}")
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_task_order_grouping_and_errors() -> None:
    labels = ["glioma", "meningioma", "notumor", "pituitary"]
    grouped = build_task(
        ["tumor", "no_tumor"],
        labels,
        {"no_tumor": "notumor", "tumor": ["glioma", "meningioma", "pituitary"]},
    )
    assert grouped.classes == ("no_tumor", "tumor") and grouped.members == ((2,), (0, 1, 3))
    assert positive_index(grouped, None) == 1
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert grouped.probabilities(probs)[0].tolist() == pytest.approx([0.3, 0.7])
    # one model class per external class: the model's order; dropped classes renormalised
    subset = build_task(["pituitary", "glioma"], labels, None)
    assert subset.classes == ("glioma", "pituitary") and subset.dropped == ["meningioma", "notumor"]
    assert subset.probabilities(probs)[0].tolist() == pytest.approx([0.2, 0.8])
    with pytest.raises(EvaluationError, match="'glioma' is mapped from both"):
        build_task(["a", "b"], labels, {"a": "glioma", "b": ["glioma", "pituitary"]})
    with pytest.raises(EvaluationError, match=r"\['tumour'\], which are not classes of the model"):
        build_task(["a", "notumor"], labels, {"a": "tumour"})
    with pytest.raises(EvaluationError, match="positive_class='x' is not a class"):
        positive_index(grouped, "x")


def test_reliability_bins_give_torchmetrics_ece() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 3, generator=generator), dim=1)
    targets = torch.randint(0, 3, (500,), generator=generator)
    bins = reliability_bins(probs, targets, None, 15)
    assert sum(b["count"] for b in bins) == 500
    ece = sum(b["count"] / 500 * abs(b["observed"] - b["confidence"]) for b in bins if b["count"])
    expected = MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")(probs, targets)
    assert ece == pytest.approx(float(expected), abs=1e-6)


def test_help_exits_0() -> None:
    done = run_module("dwskd.evaluate", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "Usage: python -m dwskd.evaluate model_dir=" in done.stdout and "class_map" in done.stdout
    )


@pytest.mark.real_data
def test_external_brain_mri_subset_as_tumour_vs_no_tumour(real_data_dir: Path, tmp_path) -> None:
    """Train on a few nickparvar train images, score the test subset as a 2-class task.

    Both folders are symlinks into the shared data (never copies).
    """
    from dwskd.pipeline import run_pipeline
    from tests.conftest import compose_config

    source = real_data_dir / "brain_mri_tumor_nickparvar"
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    for split, n in (("train", 16), ("test", 8)):
        for c in classes:
            (tmp_path / "train_data" / split / c).mkdir(parents=True)
            for image in sorted((source / split / c).iterdir())[:n]:
                (tmp_path / "train_data" / split / c / image.name).symlink_to(image)
    cfg = compose_config(
        "data=folder",
        f"data.root={tmp_path / 'train_data'}",
        "data.img_size=32",
        "data.batch_size=16",
        "method=scratch",
        "model.depth=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "eval.latency=false",
        tiny=False,
    )
    run_pipeline(cfg, tmp_path / "run")
    external = tmp_path / "external"
    groups = {"no_tumor": ["notumor"], "tumor": ["glioma", "meningioma", "pituitary"]}
    for name, members in groups.items():
        (external / name).mkdir(parents=True)
        for image in (p for c in members for p in sorted((source / "test" / c).iterdir())[8:18]):
            (external / name / image.name).symlink_to(image)
    results = evaluate(
        f"model_dir={tmp_path / 'run'}",
        f"data.root={external}",
        f"out={tmp_path / 'eval'}",
        "class_map={no_tumor: notumor, tumor: [glioma, meningioma, pituitary]}",
        *FAST,
    )
    assert results["task"]["classes"] == ["no_tumor", "tumor"]
    assert np.array(results["metrics"]["confmat"]).sum(axis=1).tolist() == [10, 30]
    assert results["data"]["n_skipped"] == 0
    for ci in results["intervals"].values():
        assert ci["low"] <= ci["value"] <= ci["high"]
    assert (tmp_path / "eval" / "report.md").is_file()


def test_positive_class_defaults_to_the_runs_own() -> None:
    from dwskd.evaluate import Task, chosen_positive, positive_index, positive_source
    from dwskd.inference import LoadedModel

    task = Task(("COVID", "NonCOVID"), ((0,), (1,)), ("COVID", "NonCOVID"))
    loaded = LoadedModel(Path("."), None, {"dwskd": {"positive_class": "COVID"}}, None)
    chosen = chosen_positive(None, loaded, task)
    assert positive_index(task, chosen) == 0
    assert positive_source(None, chosen, 0) == "the run's data.positive_class"
    assert positive_index(task, chosen_positive("NonCOVID", loaded, task)) == 1
    labels = ("COVID", "NonCOVID", "x")
    subset = Task(("NonCOVID", "x"), ((1,), (2,)), labels)
    assert positive_index(subset, chosen_positive(None, loaded, subset)) == 1  # run's not scored
    mapped = Task(("healthy", "lesion"), ((0,), (1, 2)), labels)
    chosen = chosen_positive(None, loaded, mapped)
    assert chosen == "healthy"  # the class the run's COVID counts for, through the class map
    assert positive_source(None, chosen, 0, "COVID") == (
        "the run's data.positive_class 'COVID', through class_map"
    )
