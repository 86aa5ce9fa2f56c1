"""One CLI style (issue 20): predict, evaluate and export take ``model_dir=`` through a plain
``@hydra.main`` on conf/, and still read the old ``model=`` with a one-line warning.

Tiny timm folders written with ``write_model_folder`` (as in test_bad_exports.py): no training.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from dwskd import evaluate, export, predict
from dwskd.commands import accept_renamed_options, compose_command
from dwskd.model_folder import ExportError
from tests.conftest import run_module
from tests.test_bad_exports import FAST, LABELS, write_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("model") / "student_a")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/<class>/<i>.png``, two images per class of the model."""
    root = tmp_path_factory.mktemp("images")
    for c, label in enumerate(LABELS):
        (root / label).mkdir()
        for i in range(2):
            Image.new("L", (40, 40), color=60 * i + 20 * c).save(root / label / f"{i}.png")
    return root


# ------------------------------------------------------------------- the old model= key
def test_model_is_rewritten_to_model_dir_with_one_warning(capsys) -> None:
    argv = ["dwskd-predict", "model=runs/a", "model_name=teacher", "model_dir=x", "model.depth=2"]
    assert accept_renamed_options("dwskd-predict", argv) is argv  # in place (sys.argv)
    assert argv == [
        "dwskd-predict",
        "model_dir=runs/a",
        "model_name=teacher",
        "model_dir=x",
        "model.depth=2",
    ]
    assert capsys.readouterr().err == (
        "dwskd-predict: model= is deprecated and will be removed; use model_dir= "
        "(read model=runs/a as model_dir=runs/a).\n"
    )
    untouched = ["dwskd-eval", "model_dir=a", "data.root=b"]
    accept_renamed_options("dwskd-eval", untouched)
    assert untouched == ["dwskd-eval", "model_dir=a", "data.root=b"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("module", "other"), [("dwskd.evaluate", "data.root=x"), ("dwskd.export", "out=a.onnx")]
)
def test_the_command_line_still_reads_model(module: str, other: str, tmp_path: Path) -> None:
    """``--cfg job``: Hydra prints the composed config and runs nothing (no torch)."""
    done = run_module(module, f"model={tmp_path}", other, "--cfg", "job")
    assert done.returncode == 0, done.stderr[-3000:]
    assert OmegaConf.create(done.stdout).model_dir == str(tmp_path)
    assert done.stderr.count("\n") == 1 and "model= is deprecated" in done.stderr


@pytest.mark.slow  # a second CLI end-to-end; the rewrite itself is unit-tested above
def test_predict_with_the_old_key_end_to_end(folder: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    done = run_module("dwskd.predict", f"model={folder}", f"input={images}", f"out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.startswith("dwskd-predict: model= is deprecated")
    assert len(list(csv.reader(out.open()))) == 1 + 2 * len(LABELS)


def test_predict_takes_model_dir(folder: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    cfg = compose_command(
        "predict", [f"model_dir={folder}", f"input={images}", f"out={out}", "progress=false"]
    )
    predictions = predict.run(cfg)
    assert len(predictions.files) == 2 * len(LABELS) and out.is_file()


def test_evaluate_takes_model_dir(folder: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    cfg = compose_command(
        "evaluate", [f"model_dir={folder}", f"data.root={images}", f"out={out}", *FAST]
    )
    results = evaluate.run(cfg)
    assert results["model"]["folder"] == str(folder)
    assert json.loads((out / "metrics.json").read_text())["data"]["n_images"] == 2 * len(LABELS)


def test_export_takes_model_dir(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "student.pt"
    cfg = compose_command(
        "export", [f"model_dir={folder}", "format=torchscript", f"out={out}", "check=false"]
    )
    assert export.run(cfg)["model_folder"] == str(folder) and out.is_file()


def test_messages_name_model_dir(tmp_path: Path) -> None:
    cfg = compose_command("export", [f"model_dir={tmp_path}", f"out={tmp_path / 'a.pt'}"])
    cfg.format = "torchscript"
    with pytest.raises(ExportError, match=rf"^model_dir={re.escape(str(tmp_path))} is neither"):
        export.run(cfg)
