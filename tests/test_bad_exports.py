"""Model folders and class maps that used to give silently wrong results (issue 20, item 6).

A config.json that disagrees with its weights loaded with a random head; a damaged file
gave a bare parser error; a class_map that renames classes made the wrong class positive.
Tiny timm models written directly with ``write_model_folder``: no training here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dwskd import model_folder
from dwskd.commands import compose_command
from dwskd.evaluate import EvaluationError, run
from dwskd.inference import load
from dwskd.model_folder import ExportError

LABELS = ("COVID", "NonCOVID")
FAST = ["progress=false", "bootstrap.resamples=50", "device=cpu"]


def write_folder(folder: Path, positive_class: str | None = "COVID") -> Path:
    """A 2-class, 1-channel ViT of one block, exported as a run exports its models."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", depth=1, img_size=32, in_chans=1, num_classes=len(LABELS)
    )
    preprocessing = model_folder.Preprocessing(
        in_chans=1, img_size=32, mean=(0.5,), std=(0.25,), label_names=LABELS
    )
    provenance = {"model": "student_a", "positive_class": positive_class}
    return model_folder.write_model_folder(folder, model, preprocessing, provenance)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("export") / "student_a")


def damaged_copy(folder: Path, target: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(folder, target)
    edit(target)
    return target


def edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(target: Path) -> None:
        config = json.loads((target / "config.json").read_text())
        change(config)
        (target / "config.json").write_text(json.dumps(config))

    return edit


# ------------------------------------------------------------------- config.json vs weights
@pytest.mark.parametrize(
    ("change", "claim", "found"),
    [
        (lambda c: c.update(num_classes=3), "num_classes=3", "2 output classes"),
        (  # both edited: timm would fail with a bare size-mismatch RuntimeError
            lambda c: (c.update(num_classes=3), c["model_args"].update(num_classes=3)),
            "num_classes=3",
            "2 output classes",
        ),
        (lambda c: c.update(label_names=["a", "b", "c"]), "3 label_names", "2 output classes"),
        (lambda c: c["model_args"].update(in_chans=3), "model_args.in_chans=3", "1 input channels"),
        (
            lambda c: c["pretrained_cfg"].update(input_size=[3, 32, 32]),
            r"pretrained_cfg.input_size\[0\]=3",
            "1 input channels",
        ),
    ],
    ids=["num_classes", "num_classes_everywhere", "label_names", "in_chans", "input_size"],
)
def test_config_that_disagrees_with_its_weights_is_refused(
    folder: Path, tmp_path: Path, change, claim: str, found: str
) -> None:
    """It used to load with a random head (or give more CSV headers than values), exit 0."""
    bad = damaged_copy(folder, tmp_path / "bad", edit_config(change))
    pattern = rf"{bad / 'config.json'} does not match its weights: it says {claim}, but .*{found}"
    with pytest.raises(ExportError, match=pattern) as refused:
        load(bad)
    assert "copy the model folder again" in str(refused.value)


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("model.safetensors", lambda f: _truncate(f / "model.safetensors"), "not a readable"),
        ("model.safetensors", lambda f: (f / "model.safetensors").write_bytes(b"x" * 64), "not a"),
        ("config.json", lambda f: _truncate(f / "config.json"), "is not valid JSON"),
        ("config.json", lambda f: (f / "config.json").write_text("[]"), "holds a JSON list"),
    ],
    ids=["truncated_weights", "garbage_weights", "truncated_config", "config_not_an_object"],
)
def test_damaged_files_are_named(folder: Path, tmp_path: Path, name: str, edit, message) -> None:
    bad = damaged_copy(folder, tmp_path / "bad", edit)
    with pytest.raises(ExportError, match=message) as refused:
        load(bad)
    assert str(bad / name) in str(refused.value) and "truncated or damaged" in str(refused.value)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_an_intact_folder_still_loads(folder: Path) -> None:
    loaded = load(folder)
    assert loaded.label_names == LABELS
    assert loaded.model.get_classifier().weight.shape == (2, 192)


# ------------------------------------------------------------------- positive class via class_map
def labelled_images(root: Path, names: tuple[str, str]) -> Path:
    """``<root>/<class>/*.png``: 4 distinct noise images per class (same pixels for any names)."""
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def evaluate(model: Path, root: Path, out: Path, *overrides: str) -> dict:
    return run(
        compose_command(
            "evaluate", [f"model_dir={model}", f"data.root={root}", f"out={out}", *FAST, *overrides]
        )
    )


RENAME = "class_map={sick: COVID, healthy: NonCOVID}"


def test_renaming_class_map_keeps_the_models_positive_class(folder: Path, tmp_path: Path) -> None:
    """sick <- COVID is positive, and it scores exactly as the model's own names do."""
    own = evaluate(folder, labelled_images(tmp_path / "own", LABELS), tmp_path / "e1")
    renamed_root = labelled_images(tmp_path / "renamed", ("sick", "healthy"))
    renamed = evaluate(folder, renamed_root, tmp_path / "e2", RENAME)
    assert own["task"]["positive_class"] == "COVID"
    assert renamed["task"]["positive_class"] == "sick"
    assert (
        renamed["task"]["positive_source"]
        == "the run's data.positive_class 'COVID', through class_map"
    )
    for key in ("sensitivity", "specificity", "auroc", "ece"):
        assert renamed["metrics"][key] == pytest.approx(own["metrics"][key])


def test_renaming_without_a_known_positive_class_is_refused(tmp_path: Path) -> None:
    model = write_folder(tmp_path / "no_positive", positive_class=None)
    root = labelled_images(tmp_path / "renamed", ("sick", "healthy"))
    with pytest.raises(EvaluationError, match=r"positive_class=<one of \['sick', 'healthy'\]>"):
        evaluate(model, root, tmp_path / "e", RENAME)
    assert not (tmp_path / "e").exists()  # refused before any work
    given = evaluate(model, root, tmp_path / "e2", RENAME, "positive_class=sick")
    assert given["task"]["positive_class"] == "sick"
    assert given["task"]["positive_source"] == "positive_class="
