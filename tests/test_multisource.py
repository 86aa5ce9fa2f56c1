"""Several sources of one task: a pooled folder split by patient, a union with merged class
names, and the test split scored per source."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dwskd.data import ImageFolderDataModule, UnionDataModule
from dwskd.data.checks import DataError
from dwskd.metrics import subset_summary
from tests.conftest import compose_config
from tests.test_data import make_folder, write_image

PATIENT = r"^(p\d+)_"


def pooled_folder(root: Path) -> Path:
    """<root>/<class>/p<patient>_<slice>.png: 10 patients, 3 slices each, no split folders."""
    seed = 100
    for patient in range(10):
        cls = "glioma" if patient % 2 else "notumor"
        for slice_ in range(3):
            seed += 1
            write_image(root / cls / f"p{patient}_{slice_}.png", seed)
    return root


def patients(dm: ImageFolderDataModule, split: str) -> set[str]:
    return {re.match(PATIENT, n).group(1) for n in dm.split(split).names}


def test_a_pooled_folder_is_split_into_test_and_train_by_whole_patients(tmp_path: Path) -> None:
    root = pooled_folder(tmp_path / "pool")
    options = {"img_size": 16, "group_regex": PATIENT, "test_fraction": 0.4, "val_fraction": 0.2}
    dm = ImageFolderDataModule(root=str(root), name="pool", **options)
    dm.setup()
    splits = {s: patients(dm, s) for s in ("train", "val", "test")}
    assert splits["train"].isdisjoint(splits["test"]) and splits["val"].isdisjoint(splits["test"])
    assert len(splits["test"]) == 4 and sum(map(len, splits.values())) == 10  # whole patients
    assert set(dm.summary()["counts"]["test"]) == {"glioma", "notumor"}  # stratified
    again = ImageFolderDataModule(root=str(root), name="pool", **options)
    again.setup()
    assert again.split("test").names == dm.split("test").names  # seeded
    with pytest.raises(DataError, match=r"data\.test_fraction=1\.5"):
        ImageFolderDataModule(root=str(root), name="pool", test_fraction=1.5)


def test_a_union_with_merged_classes_is_one_task_scored_per_source(tmp_path: Path) -> None:
    first = make_folder(tmp_path / "a", {"train": {"glioma": 6, "notumor": 6, "pituitary": 6},
                                         "test": {"glioma": 2, "notumor": 2, "pituitary": 2}})  # fmt: skip
    second = pooled_folder(tmp_path / "b")
    sources = {
        "a": ImageFolderDataModule(root=str(first), name="a", img_size=16),
        "b": ImageFolderDataModule(
            root=str(second), name="b", img_size=16, group_regex=PATIENT, test_fraction=0.4
        ),
    }
    union = UnionDataModule(sources, name="u", img_size=16, merge_classes=True)
    union.setup()
    assert union.class_names == ["glioma", "notumor", "pituitary"]
    index = union.source_indices("test")
    assert len(index["a"]) == 6 and len(index["b"]) == 12
    test = union.split("test")
    assert {test.names[i].split("/")[0] for i in index["b"]} == {"b"}
    assert set(test.labels[index["b"]]) == {0, 1}  # b's classes land on the merged labels
    prefixed = UnionDataModule(sources, name="u", img_size=16)
    prefixed.setup()
    assert prefixed.class_names[:2] == ["a_glioma", "a_notumor"]


def test_subset_summary_leaves_absent_classes_out_of_balanced_accuracy() -> None:
    targets = torch.tensor([0, 0, 1, 1])
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.0, 0.8], [0.1, 0.9, 0.0], [0.1, 0.8, 0.1]])
    summary = subset_summary(probs, targets, ["glioma", "notumor", "pituitary"])
    assert summary["acc"] == 0.75 and summary["balanced_acc"] == pytest.approx(0.75)
    assert summary["classes_present"] == ["glioma", "notumor"]
    assert summary["confmat"][0] == [1, 0, 1] and summary["n"] == 4


@pytest.mark.real_data
def test_brain_multisource_holds_out_whole_lgg_patients(real_data_dir: Path) -> None:
    cfg = compose_config(
        "data=brain_mri_multisource", f"paths.data_dir={real_data_dir}", "data.img_size=16",
        tiny=False,
    )  # fmt: skip
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    lgg = dm.source_modules["lgg"]
    regex = re.compile(cfg.data.sources.lgg.group_regex)
    held_out = {regex.match(n).group(1) for n in lgg.split("test").names}
    trained = {regex.match(n).group(1) for s in ("train", "val") for n in lgg.split(s).names}
    assert held_out.isdisjoint(trained) and len(held_out) + len(trained) == 100
    assert len(dm.source_modules["nickparvar"].split("val").labels) == 374  # the teacher's val
    assert np.array_equal(np.sort(np.concatenate(list(dm.source_indices("test").values()))),
                          np.arange(len(dm.split("test").labels)))  # fmt: skip


def test_the_test_stage_scores_a_union_per_source_and_other_data_not_at_all() -> None:
    from dwskd.pipeline import source_scores

    class Union:
        class_names = ["glioma", "notumor"]

        def source_indices(self, split: str) -> dict[str, np.ndarray]:
            return {"a": np.array([0, 1]), "b": np.array([2])}

    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    scores = source_scores(Union(), probs, torch.tensor([0, 1, 1]))
    assert scores["a"]["acc"] == 0.5 and scores["b"]["acc"] == 1.0 and scores["b"]["n"] == 1
    assert source_scores(object(), probs, torch.tensor([0, 1, 1])) == {}
