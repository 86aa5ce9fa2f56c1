"""dwskd.predict on a real finished run: same probabilities as the run's own test stage."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dwskd.commands import compose_command
from dwskd.data.checks import DataError
from dwskd.data.synthetic import CLASS_NAMES, make_split
from dwskd.inference import InferenceError, csv_inputs, image_files, predict_files
from dwskd.model_folder import ExportError, label_names, read_config
from dwskd.pipeline import run_pipeline
from dwskd.predict import run
from dwskd.rundir import RunLayout, read_results
from tests.conftest import compose_config, run_module

ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
FILE_SIZE = 48  # the files are larger than the model input: decoding must resize them (to 32)


def write_folder_dataset(root: Path) -> Path:
    """``<root>/{train,test}/<class>/*.png``: synthetic phantoms of the 4 classes, as files.

    Brightness grows with the class, so that a few steps of training learn something and
    the predictions differ between classes (a model predicting one class proves little).
    """
    for split, n in (("train", 64), ("test", 32)):
        images, labels = make_split(n, 4, FILE_SIZE, seed=0, split=split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            brighter = np.clip(image[..., 0] * (0.4 + 0.25 * label), 0, 255).astype(np.uint8)
            Image.fromarray(brighter).save(folder / f"{split}_{i:03d}.png")
    return root


def folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, finished run dir) of a tiny run on an image-folder dataset, built once per
    session (test_evaluate.py reuses it): the pipeline's own test stage is the reference."""
    base = tmp_path_factory.getbasetemp() / "dwskd_folder_run"
    data, out = base / "data", base / "run"
    if not (out / "metrics.json").is_file():
        write_folder_dataset(data)
        cfg = compose_config(
            "data=folder",
            f"data.root={data}",
            "data.img_size=32",
            "data.batch_size=16",
            "method=scratch",
            "model.depth=2",
            "trainer.max_epochs=4",
            "trainer.enable_progress_bar=false",
            "eval.latency=false",
            tiny=False,
        )
        run_pipeline(cfg, out)
    return data, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return folder_run(tmp_path_factory)


def predict(*overrides: str) -> object:
    return run(compose_command("predict", ["progress=false", *overrides]))


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_equal_the_runs_own_test_stage(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    out = tmp_path / "preds.csv"
    predict(f"model_dir={run_dir}", f"input={data / 'test'}", f"out={out}", "batch_size=5")
    rows = read_rows(out)
    results = read_results(run_dir)
    deployed = results["deployed"]
    labels = label_names(read_config(RunLayout(run_dir).export_dir(deployed)))
    assert labels == sorted(p.name for p in (data / "test").iterdir())
    assert list(rows[0]) == ["file", "predicted_label", *(f"prob_{c}" for c in labels)]
    assert len(rows) == 32
    probs = np.array([[float(r[f"prob_{c}"]) for c in labels] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the run's test accuracy (its own evaluation of the same files) from the CSV alone
    correct = [r["predicted_label"] == Path(r["file"]).parent.name for r in rows]
    assert np.mean(correct) == pytest.approx(results[deployed]["test"]["acc"], abs=1e-9)
    # and image by image, the probabilities the run's test stage wrote
    own = {r["file"]: r for r in read_rows(RunLayout(run_dir).predictions_csv(deployed))}
    for row in rows:
        theirs = own[Path(row["file"]).name]
        for c in labels:
            assert float(row[f"prob_{c}"]) == pytest.approx(float(theirs[f"prob_{c}"]), abs=2e-6)


def make_inputs(data: Path, root: Path) -> Path:
    """Three good images (one in a sub-folder), an unreadable one, a hidden file."""
    (root / "sub").mkdir(parents=True)
    good = sorted((data / "test").rglob("*.png"))[:3]
    for target, source in zip([root, root, root / "sub"], good, strict=True):
        (target / source.name).write_bytes(source.read_bytes())
    (root / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / ".hidden.png").write_bytes(b"ignored")
    return root


def test_unreadable_image_is_skipped_with_a_warning(trained, tmp_path: Path, capsys) -> None:
    data, run_dir = trained
    inputs, out = make_inputs(data, tmp_path / "in"), tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*broken\.jpg"):
        predictions = predict(f"model_dir={run_dir}", f"input={inputs}", f"out={out}")
    rows = read_rows(out)
    assert len(rows) == 3 and not any("broken" in r["file"] for r in rows)
    assert [str(p) for p, _ in predictions.skipped] == [str(inputs / "sub" / "broken.jpg")]
    printed = capsys.readouterr().out
    assert "predicted 3 image(s)" in printed and "1 skipped" in printed and str(out) in printed


def test_unreadable_image_stops_the_run_with_bad_images_error(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    inputs, out = make_inputs(data, tmp_path / "in"), tmp_path / "preds.csv"
    with pytest.raises(DataError, match=r"broken\.jpg.*bad_images=skip"):
        predict(f"model_dir={run_dir}", f"input={inputs}", f"out={out}", "bad_images=error")
    assert not out.exists()


def test_existing_out_is_never_overwritten(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    out = tmp_path / "preds.csv"
    out.write_text("keep me\n")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        predict(f"model_dir={run_dir}", f"input={data / 'test'}", f"out={out}")
    assert out.read_text() == "keep me\n"


def test_csv_input_and_an_explicit_export_folder(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    images = sorted((data / "test").rglob("*.png"))[:4]
    listing = tmp_path / "list" / "inputs.csv"
    listing.parent.mkdir()
    rel = [os.path.relpath(p, listing.parent) for p in images]
    listing.write_text("id,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(rel)))
    assert csv_inputs(listing) == [listing.parent / p for p in rel]
    export = RunLayout(run_dir).export_dir(read_results(run_dir)["deployed"])
    out = tmp_path / "preds.csv"
    predict(f"model_dir={export}", f"input={listing}", f"out={out}")
    assert [Path(r["file"]).resolve() for r in read_rows(out)] == [p.resolve() for p in images]


def test_headless_csv_and_recursive_folder_listing(tmp_path: Path) -> None:
    (tmp_path / "a" / ".cache").mkdir(parents=True)
    for name in ("a/x.png", "a/.cache/y.png", "b.JPG", "notes.txt", ".z.png"):
        (tmp_path / name).write_bytes(b"")
    assert image_files(tmp_path) == [tmp_path / "a" / "x.png", tmp_path / "b.JPG"]
    listing = tmp_path / "plain.csv"
    listing.write_text("a/x.png\n/abs/b.png\n")
    assert csv_inputs(listing) == [tmp_path / "a" / "x.png", Path("/abs/b.png")]


def test_bad_options_are_refused_before_any_work(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    with pytest.raises(InferenceError, match="does not exist"):
        predict(
            f"model_dir={run_dir}", f"input={tmp_path / 'missing'}", f"out={tmp_path / 'p.csv'}"
        )
    with pytest.raises(ExportError, match="no export 'teacher'.*student_a"):
        predict(
            f"model_dir={run_dir}", "model_name=teacher", f"input={data}", f"out={tmp_path}/p.csv"
        )
    with pytest.raises(InferenceError, match="bad_images='maybe'"):
        predict(
            f"model_dir={run_dir}", f"input={data}", f"out={tmp_path}/p.csv", "bad_images=maybe"
        )


def test_command_line_predicts_and_help_exits_0(trained, tmp_path: Path) -> None:
    data, run_dir = trained
    out = tmp_path / "preds.csv"
    args = [f"model_dir={run_dir}", f"input={data / 'test'}", f"out={out}", "progress=false"]
    done = run_module("dwskd.predict", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(read_rows(out)) == 32 and f"wrote {out}" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]  # nothing else written
    helped = run_module("dwskd.predict", "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert (
        "Usage: python -m dwskd.predict model_dir=" in helped.stdout
        and "bad_images" in helped.stdout
    )


def _predict_in_worker(run_dir: str, folder: str) -> tuple[int, float]:
    from dwskd.inference import predict_files as predict_here

    p = predict_here(run_dir, folder, batch_size=4)
    return len(p.files), float(p.probs.sum())


def test_decoding_workers_start_inside_a_joblib_worker(trained) -> None:
    """hydra/launcher=joblib runs each job in a loky worker, whose start method is not fork:
    the decoding workers failed to start there ("'Process' object has no attribute 'env'");
    they are forked now and give the in-process result."""
    joblib = pytest.importorskip("joblib")
    data, run_dir = trained
    jobs = [joblib.delayed(_predict_in_worker)(str(run_dir), str(data / "test"))] * 2
    results = joblib.Parallel(n_jobs=2, backend="loky")(jobs)
    here = predict_files(run_dir, data / "test", batch_size=4)
    for count, total in results:
        assert count == len(here.files) == 32
        assert total == pytest.approx(float(here.probs.sum()), abs=1e-4)
