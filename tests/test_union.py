"""data=medunion: a union of datasets whose train split never holds a source's val or test image.

The reference splits here are computed from the files on disk and the split functions alone
(no datamodule), so a union that took a source's split from the wrong place fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dwskd.data import DataError, ImageFolderDataModule, UnionDataModule, stratified_split
from dwskd.data.checks import SPLITS, file_digest, scan_split
from dwskd.data.splits import groups_from_regex
from dwskd.data.union import concat_splits
from tests.conftest import compose_config
from tests.test_data import make_folder

TEACHER_HEAD = [
    "brain_glioma",
    "brain_meningioma",
    "brain_notumor",
    "brain_pituitary",
    "chest_NORMAL",
    "chest_PNEUMONIA",
    "lung_COVID",
    "lung_NonCOVID",
]
FOLDER = "dwskd.data.ImageFolderDataModule"


# -- helpers ----------------------------------------------------------------------------------
def reference_splits(source: dict) -> dict[str, dict[tuple[str, str], Path]]:
    """{split: {(class, file name): path}} of a folder source, from the disk and its options.

    A missing val folder is drawn from train exactly as documented: files sorted by class
    then name, stratified by class, grouped by ``group_regex``, seeded by ``seed``.
    """
    root = Path(source["root"])
    rows = {
        s: [(c, p) for c, paths in scan_split(root / s).items() for p in paths]
        for s in SPLITS
        if (root / s).is_dir()
    }
    if "val" not in rows:
        train = rows["train"]
        classes = sorted({c for c, _ in train})
        labels = np.array([classes.index(c) for c, _ in train])
        groups = groups_from_regex([p.name for _, p in train], source.get("group_regex"))
        kept, val = stratified_split(
            labels, source.get("val_fraction", 0.1), source.get("seed", 0), groups
        )
        rows["train"], rows["val"] = [train[i] for i in kept], [train[i] for i in val]
    return {s: {(c, p.name): p for c, p in r} for s, r in rows.items()}


def union_items(dm: UnionDataModule, split: str) -> set[tuple[str, str, str]]:
    """(source key, class, file name) of every image in a union split."""
    data = dm.split(split)
    items = set()
    for name, label in zip(data.names, data.labels, strict=True):
        key, file = name.split("/", 1)
        cls = dm.class_names[label]
        assert cls.startswith(f"{key}_")
        items.add((key, cls[len(key) + 1 :], file))
    return items


def assert_no_leakage(dm: UnionDataModule, sources: dict[str, dict]) -> None:
    """Union splits == the sources' splits, and no val/test file's bytes are in union train.

    Compared across sources too: an image shared by two sources (say brain_mri and
    brain_mri_sartaj) in one's test and the other's train would leak just the same.
    """
    references = {key: reference_splits(spec) for key, spec in sources.items()}
    train_digests, held_out_digests = set(), set()
    for split in SPLITS:
        expected = {(k, *item) for k, ref in references.items() for item in ref[split]}
        assert union_items(dm, split) == expected, split
    for ref in references.values():
        train_digests |= {file_digest(p) for p in ref["train"].values()}
        held_out_digests |= {file_digest(p) for s in ("val", "test") for p in ref[s].values()}
    # union train is exactly the reference train files (above), none of whose bytes is a val or
    # test file (file names alone could not tell: train/x.png and test/x.png may both exist)
    assert train_digests.isdisjoint(held_out_digests)


def folder_source(root: Path, **options) -> dict:
    return {"_target_": FOLDER, "root": str(root), "name": root.name, **options}


@pytest.fixture
def two_sources(tmp_path: Path) -> dict[str, dict]:
    """``xray``: no val folder (drawn from train); ``ct``: an official val folder."""
    xray = make_folder(
        tmp_path / "xray",
        {"train": {"NORMAL": 10, "SICK": 10}, "test": {"NORMAL": 3, "SICK": 3}},
        0,
    )
    ct = make_folder(
        tmp_path / "ct",
        {"train": {"b": 4, "a": 4}, "val": {"b": 2, "a": 2}, "test": {"b": 2, "a": 2}},
        1000,
    )
    return {"xray": folder_source(xray, val_fraction=0.2), "ct": folder_source(ct)}


# -- logic on tiny synthetic folders -------------------------------------------------------------
def test_union_splits_are_the_sources_splits_with_prefixed_sorted_classes(two_sources) -> None:
    dm = UnionDataModule(sources=two_sources, img_size=16, batch_size=4)
    dm.setup()
    assert dm.class_names == ["ct_a", "ct_b", "xray_NORMAL", "xray_SICK"]
    assert_no_leakage(dm, two_sources)
    summary = dm.summary()
    assert summary["sizes"] == {"train": 24, "val": 8, "test": 10}
    assert summary["val_from_train"]  # xray's val was drawn from its train
    assert summary["sources"]["ct"]["val_from_train"] is False
    assert summary["sources"]["xray"]["sizes"] == {"train": 16, "val": 4, "test": 6}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 16, 16) and int(y.max()) < 4


def test_union_options_win_over_the_sources_and_limit_acts_per_union_class(two_sources) -> None:
    sources = {k: {**v, "img_size": 99, "seed": 5} for k, v in two_sources.items()}
    dm = UnionDataModule(sources=sources, img_size=16, seed=0, limit_per_class=3)
    dm.setup()
    assert {m.img_size for m in dm.source_modules.values()} == {16}
    assert {m.seed for m in dm.source_modules.values()} == {0}
    assert dm.class_counts("train").tolist() == [3, 3, 3, 3]
    assert dm.class_counts("val").tolist() == [2, 2, 2, 2]


def test_uncached_union_reads_the_same_images(two_sources) -> None:
    cached = UnionDataModule(sources=two_sources, img_size=16)
    lazy = UnionDataModule(sources=two_sources, img_size=16, cache=False)
    for split in SPLITS:
        a, b = cached.split(split), lazy.split(split)
        assert a.names == b.names and np.array_equal(a.labels, b.labels)
        index = np.arange(len(a.labels))[::-1]
        assert all(np.array_equal(a.images[i], b.images[index][len(index) - 1 - i]) for i in index)
    x, _ = next(iter(lazy.test_dataloader()))
    assert torch.isfinite(x).all()


def test_source_class_subset_passes_through(two_sources) -> None:
    xray_only = {"xray": two_sources["xray"], "ct": {**two_sources["ct"], "classes": ["a", "b"]}}
    dm = UnionDataModule(sources=xray_only, img_size=16)
    assert dm.setup() is None and dm.class_names == ["ct_a", "ct_b", "xray_NORMAL", "xray_SICK"]


def test_bad_sources_name_the_option(two_sources) -> None:
    with pytest.raises(DataError, match="data.sources="):
        UnionDataModule(sources={}, img_size=16)
    with pytest.raises(DataError, match="data.sources.ct must be a data config"):
        UnionDataModule(sources={"ct": {"root": "x"}}, img_size=16).setup()
    other_size = ImageFolderDataModule(root=two_sources["ct"]["root"], img_size=32)
    with pytest.raises(DataError, match="data.sources.ct has img_size=32"):
        UnionDataModule(sources={"ct": other_size}, img_size=16).setup()


# -- the config ---------------------------------------------------------------------------------
def test_medunion_config_composes_sources_and_overrides() -> None:
    cfg = compose_config("data=medunion", "paths.data_dir=/d", tiny=False)
    sources = cfg.data.sources
    assert list(sources) == ["brain", "chest", "lung"]
    assert sources.brain.root == "/d/brain_mri_tumor_nickparvar"
    assert sources.chest.group_regex == r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"
    assert sources.lung.root == "/d/lung_ct_covid"
    assert cfg.data._target_ == "dwskd.data.UnionDataModule" and not cfg.data._recursive_
    dropped = compose_config("data=medunion", "~data.sources.lung", tiny=False)
    assert list(dropped.data.sources) == ["brain", "chest"]
    swapped = compose_config(
        "data=medunion", "data@data.sources.brain=brain_mri_tumour_type", tiny=False
    )
    assert list(swapped.data.sources.brain.classes) == ["glioma", "meningioma", "pituitary"]


# -- the real datasets --------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_medunion_is_the_teachers_train_set_without_leakage(real_data_dir: Path) -> None:
    """The split the shared teacher was trained on (its README's counts), nothing held out in it."""
    cfg = compose_config(
        "data=medunion", f"paths.data_dir={real_data_dir}", "data.img_size=16", tiny=False
    )
    dm = instantiate(cfg.data)
    dm.setup()
    assert dm.class_names == TEACHER_HEAD
    counts = dm.summary()["counts"]
    assert sum(counts["train"].values()) == 8447
    assert [counts["train"][c] for c in TEACHER_HEAD[:6]] == [1093, 938, 231, 1093, 1206, 3464]
    assert sum(counts["val"][c] for c in TEACHER_HEAD[:4]) == 374
    assert sum(counts["val"][c] for c in TEACHER_HEAD[4:6]) == 520
    sources = {key: dict(spec) for key, spec in cfg.data.sources.items()}
    assert_no_leakage(dm, sources)


def test_leakage_check_catches_a_union_that_trains_on_val(two_sources) -> None:
    """The check above is not vacuous: a union whose train split took a source's val fails it."""

    class Leaky(UnionDataModule):
        def _load_splits(self):
            splits, names = super()._load_splits()
            return {**splits, "train": concat_splits([splits["train"], splits["val"]])}, names

    dm = Leaky(sources=two_sources, img_size=16)
    dm.setup()
    with pytest.raises(AssertionError):
        assert_no_leakage(dm, two_sources)
