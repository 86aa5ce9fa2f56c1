"""A finished run's exports: timm folders that rebuild the model and its preprocessing exactly."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from timm.data import resolve_data_config

from dwskd import model_folder, rundir
from dwskd.data.transforms import eval_transform
from dwskd.pipeline import run_pipeline
from tests.conftest import compose_config

OVERRIDES = ("teacher.source=random", "eval.latency=false", "method.epochs.finetune=1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exports")
    return out, run_pipeline(compose_config(*OVERRIDES), out)


def read_probs(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c.startswith("prob_")]
    return [r["file"] for r in rows], np.array([[float(r[c]) for c in columns] for r in rows])


def test_every_tested_model_is_exported_without_extra_disk(finished_run) -> None:
    out, results = finished_run
    layout = rundir.RunLayout(out)
    assert set(results["run"]["exports"]) == {"student_a", "student_b", "teacher"}
    for name in ("student_a", "student_b", "teacher"):
        weights = layout.export_dir(name) / model_folder.WEIGHTS_FILE
        assert weights.samefile(layout.final_weights(name)), "export should be a hard link"
    deployed = model_folder.resolve_model_folder(out)
    assert deployed == layout.export_dir(results["deployed"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_teacher_loaded_unchanged_from_a_file_is_linked_not_written_again(
    dtype: str, tmp_path: Path, finished_run
) -> None:
    """A sweep's students reference the teacher job's export: their teacher export is a hard
    link to it. A file that had to be adapted (float16 here) is written as the model it became."""
    from safetensors.torch import load_file, save_file

    out, _ = finished_run
    source = tmp_path / "teacher.safetensors"
    state = load_file(str(rundir.RunLayout(out).final_weights("teacher")))
    save_file({k: v.to(getattr(torch, dtype)) for k, v in state.items()}, str(source))
    overrides = ("method=ws", "teacher.source=file", f"teacher.file={source}", "eval.latency=false")
    epochs = ("trainer.max_epochs=null", "method.epochs.teacher=0", "method.epochs.train=1")
    run_pipeline(compose_config(*overrides, *epochs), tmp_path / "ws")
    export = rundir.RunLayout(tmp_path / "ws").export_dir("teacher") / model_folder.WEIGHTS_FILE
    assert export.samefile(source) == (dtype == "float32")
    written = load_file(str(export))
    assert all(
        torch.equal(written[k], v.to(getattr(torch, dtype)).float()) for k, v in state.items()
    )


def test_timm_local_dir_reproduces_the_runs_test_probabilities(finished_run) -> None:
    """timm alone (local-dir + resolve_data_config) gives the run's own test predictions."""
    out, results = finished_run
    name = results["deployed"]
    folder = rundir.RunLayout(out).export_dir(name)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data_config = resolve_data_config({}, model=model)
    channels, size, _ = data_config["input_size"]
    assert (channels, size) == (1, 32)
    assert data_config["interpolation"] == "box" and data_config["crop_mode"] == "squash"
    assert list(model.pretrained_cfg["label_names"]) == [
        "normal", "round_bright", "spiculated", "ring_enhancing"
    ]  # fmt: skip
    dm = instantiate(compose_config(*OVERRIDES).data)
    dm.setup()
    transform = eval_transform(size, data_config["mean"], data_config["std"])
    images = dm.split("test").images
    x = torch.stack([transform(image=image)["image"] for image in images])
    with torch.no_grad():
        probs = model(x).softmax(1).numpy()
    files, saved = read_probs(rundir.RunLayout(out).predictions_csv(name))
    assert files == dm.split("test").names
    np.testing.assert_allclose(probs, saved, atol=2e-6)


def test_exports_record_provenance_and_metrics(finished_run) -> None:
    out, results = finished_run
    config = model_folder.read_config(rundir.RunLayout(out).export_dir("teacher"))
    assert config["dwskd"]["model"] == "teacher"
    assert config["dwskd"]["metrics"]["test"]["acc"] == results["models"]["teacher"]["test"]["acc"]
    assert "tag" not in config["pretrained_cfg"]  # the architecture's hub tag is not ours
    prep = model_folder.preprocessing_of(config)
    assert (prep.in_chans, prep.img_size, prep.mean, prep.std) == (1, 32, (0.5,), (0.25,))


def test_model_argument_errors_say_what_to_give(tmp_path: Path, finished_run) -> None:
    with pytest.raises(model_folder.ExportError, match="neither a model folder"):
        model_folder.resolve_model_folder(tmp_path)
    with pytest.raises(model_folder.ExportError, match="model_name= one of"):
        model_folder.resolve_model_folder(finished_run[0], "student_c")


def test_predictions_csv_and_calibration_in_every_run(finished_run) -> None:
    out, results = finished_run
    layout = rundir.RunLayout(out)
    for name in ("student_a", "student_b", "ensemble", "teacher"):
        files, probs = read_probs(layout.predictions_csv(name))
        assert len(files) == 48 and np.allclose(probs.sum(1), 1, atol=1e-4)
        assert 0 <= results["models"][name]["test"]["ece"] <= 1
