"""Tests of the data layer: splits, image handling, every bad input, synthetic, MedMNIST, real data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dwskd.data import (
    DataError,
    ImageFolderDataModule,
    MedMNISTDataModule,
    SyntheticDataModule,
    groups_from_regex,
    stratified_split,
)

REPO = Path(__file__).resolve().parents[1]
CHEST_REGEX = r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)"


# -- helpers ----------------------------------------------------------------------------------
def write_image(path: Path, seed: int, mode: str = "L", size: int = 20) -> Path:
    """A random (hence unique) image file."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def make_folder(root: Path, counts: dict[str, dict[str, int]], first_seed: int = 0) -> Path:
    """<root>/<split>/<class>/<class>_<i>.png, distinct random images (seeds from first_seed)."""
    seed = first_seed
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            for i in range(n):
                seed += 1
                write_image(root / split / cls / f"{cls}_{i}.png", seed)
    return root


def folder_dm(root: Path, **options) -> ImageFolderDataModule:
    options = {"img_size": 16, "batch_size": 4, **options}
    return ImageFolderDataModule(root=str(root), name="tiny", **options)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "ds", {"train": {"a": 6, "b": 10}, "test": {"a": 3, "b": 3}})


# -- splits -----------------------------------------------------------------------------------
def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    labels = np.array([0] * 80 + [1] * 20 + [2] * 50)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val]).tolist() == [16, 4, 10]
    again_train, again_val = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=4)[1])


def test_grouped_split_keeps_each_patient_on_one_side() -> None:
    names = [f"person{p}_bacteria_{i}.jpg" for p in range(30) for i in range(p % 4 + 1)]
    names += [f"IM-{p:04d}-000{i}.jpg" for p in range(20) for i in range(2)]
    names += [f"NORMAL2-IM-{p:04d}-0001.jpg" for p in range(10)]
    labels = np.array([1 if n.startswith("person") else 0 for n in names])
    groups = groups_from_regex(names, CHEST_REGEX)
    assert groups[0] == "person0" and groups[-1] == "NORMAL2-IM-0009"
    train, val = stratified_split(labels, 0.25, seed=0, groups=groups)
    assert {groups[i] for i in train}.isdisjoint({groups[i] for i in val})
    assert set(labels[val]) == {0, 1}
    assert 0.1 < len(val) / len(names) < 0.4


def test_unmatched_names_form_their_own_groups() -> None:
    groups = groups_from_regex(["person1_a.jpg", "scan.jpg", "other.jpg"], CHEST_REGEX)
    assert len(set(groups)) == 3
    with pytest.raises(DataError, match="group_regex"):
        groups_from_regex(["x"], "(")


# -- image folders: interface, channels, balance ------------------------------------------
def test_folder_datamodule_interface(tiny_root: Path) -> None:
    dm = folder_dm(tiny_root, balance="loss", group_regex=None, val_fraction=0.25)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("fit")  # Lightning calls setup again: nothing changes
    assert (dm.num_classes, dm.class_names, dm.in_chans, dm.img_size) == (2, ["a", "b"], 1, 16)
    summary = json.loads(json.dumps(dm.summary()))
    assert summary["counts"]["val"] == {"a": 2, "b": 2} and summary["val_from_train"]
    assert summary["counts"]["train"] == {"a": 4, "b": 8}
    weights = dm.class_weights()
    assert weights is not None and weights[0] > weights[1]
    assert torch.allclose(weights, torch.tensor([1.5, 0.75]))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert folder_dm(tiny_root).class_weights() is None


def test_rgb_in_gray_dataset_is_converted_and_channels3_replicates(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    write_image(root / "test" / "a" / "colour.png", seed=99, mode="RGB")
    gray = folder_dm(root, channels=1)
    gray.setup("test")
    x, _ = next(iter(gray.test_dataloader()))
    assert x.shape[1] == 1
    rgb = folder_dm(root, channels=3)
    rgb.setup("test")
    x3, _ = next(iter(rgb.test_dataloader()))
    assert x3.shape[1] == 3 and rgb.in_chans == 3
    names = rgb.split("test").names
    gray_rows = [i for i, n in enumerate(names[:4]) if n != "colour.png"]
    assert torch.equal(x3[gray_rows, 0], x3[gray_rows, 2])  # grayscale replicated


def first_batch(dm, epoch: int = 0):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
    return next(iter(loader))


def test_sampler_balance_and_two_views(tiny_root: Path) -> None:
    dm = folder_dm(tiny_root, balance="sampler", views=2, batch_size=200, val_fraction=0.25)
    drawn = torch.cat([first_batch(dm, epoch)[1] for epoch in range(20)])
    x, _ = first_batch(dm)
    assert x.shape[1:] == (2, 1, 16, 16)
    assert not torch.equal(x[:, 0], x[:, 1])  # independently augmented views
    assert abs(drawn.float().mean().item() - 0.5) < 0.1  # 4 a vs 8 b, drawn ~50/50


@pytest.mark.parametrize("workers", [0, 1])
def test_order_and_augmentation_are_a_function_of_seed_and_epoch(
    tiny_root: Path, workers: int
) -> None:
    """What exact resume needs: no hidden RNG state, only (loader seed, epoch)."""
    dm = folder_dm(tiny_root, num_workers=workers)
    dm.loader_seed = 7
    first, again = first_batch(dm, epoch=3), first_batch(dm, epoch=3)
    torch.manual_seed(123)  # the global RNG plays no part
    third = first_batch(dm, epoch=3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[0], third[0])
    assert torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first_batch(dm, epoch=4)[0])
    dm.loader_seed = 8
    assert not torch.equal(first[0], first_batch(dm, epoch=3)[0])
    in_process = folder_dm(tiny_root, num_workers=0)
    in_process.loader_seed = 7
    assert torch.equal(first[0], first_batch(in_process, epoch=3)[0])


# -- bad input ----------------------------------------------------------------------------
def test_missing_root_says_where_to_get_data(tmp_path: Path) -> None:
    dm = folder_dm(tmp_path / "nowhere", download_hint="https://example.org/data")
    with pytest.raises(DataError, match="DWSKD_DATA_DIR") as err:
        dm.setup("fit")
    assert "nowhere" in str(err.value) and "https://example.org/data" in str(err.value)


def test_empty_class_folder(tiny_root: Path) -> None:
    (tiny_root / "test" / "c").mkdir()
    (tiny_root / "train" / "c").mkdir()
    write_image(tiny_root / "train" / "c" / "x.png", seed=500)
    with pytest.raises(DataError, match=r"test[/\\]c.*holds no images"):
        folder_dm(tiny_root).setup("fit")


def test_truncated_image_skip_counts_and_error_names_file(tiny_root: Path) -> None:
    bad = tiny_root / "train" / "a" / "broken.jpg"
    data = (write_image(tiny_root / "tmp.jpg", seed=7, size=64)).read_bytes()
    (tiny_root / "tmp.jpg").unlink()
    bad.write_bytes(data[: len(data) // 2])
    (tiny_root / "train" / "b" / "not_an_image.png").write_text("hello")
    skip = folder_dm(tiny_root, bad_images="skip")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        skip.setup("fit")
    assert skip.summary()["skipped_bad_images"] == 2
    assert sum(skip.summary()["sizes"].values()) == 22
    with pytest.raises(DataError, match="broken.jpg.*bad_images=skip"):
        folder_dm(tiny_root, bad_images="error").setup("fit")


def test_class_sets_differ_between_splits(tiny_root: Path) -> None:
    write_image(tiny_root / "test" / "c" / "x.png", seed=600)
    with pytest.raises(DataError, match=r"differ between splits.*\['a', 'b', 'c'\]"):
        folder_dm(tiny_root).setup("fit")


def test_single_class(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"train": {"a": 3}, "test": {"a": 2}})
    with pytest.raises(DataError, match="Only one class"):
        folder_dm(root).setup("fit")


def test_identical_files_across_splits_are_leakage(tiny_root: Path) -> None:
    shutil.copy(tiny_root / "train" / "a" / "a_0.png", tiny_root / "test" / "b" / "renamed.png")
    with pytest.raises(DataError, match="leakage") as err:
        folder_dm(tiny_root).setup("fit")
    assert "a_0.png" in str(err.value) and "renamed.png" in str(err.value)


def test_dangling_symlink_skip_counts_and_error_names_link_and_target(tiny_root: Path) -> None:
    link = tiny_root / "train" / "a" / "gone.png"
    link.symlink_to(tiny_root / "moved_away.png")
    skip = folder_dm(tiny_root, bad_images="skip")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable.*gone\.png"):
        skip.setup("fit")
    assert skip.summary()["skipped_bad_images"] == 1
    assert skip.summary()["skipped_files"] == [str(link)]
    assert sum(skip.summary()["sizes"].values()) == 22
    with pytest.raises(DataError, match=r"gone\.png.*missing target.*moved_away\.png"):
        folder_dm(tiny_root, bad_images="error").setup("fit")


def test_class_of_only_dangling_symlinks_has_no_readable_image(tiny_root: Path) -> None:
    for i in range(2):
        (tiny_root / "test" / "c" / f"x{i}.png").parent.mkdir(exist_ok=True)
        (tiny_root / "test" / "c" / f"x{i}.png").symlink_to(tiny_root / f"missing{i}.png")
    write_image(tiny_root / "train" / "c" / "c_0.png", seed=700)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        with pytest.raises(DataError, match=r"No readable image left.*test[/\\]c"):
            folder_dm(tiny_root, bad_images="skip").setup("fit")


def test_identical_files_in_two_classes_of_a_split_are_an_error(tiny_root: Path) -> None:
    shutil.copy(tiny_root / "train" / "a" / "a_1.png", tiny_root / "train" / "b" / "other.png")
    with pytest.raises(DataError, match="more than one class folder") as err:
        folder_dm(tiny_root).setup("fit")
    message = str(err.value)
    assert str(tiny_root / "train" / "a" / "a_1.png") in message
    assert str(tiny_root / "train" / "b" / "other.png") in message
    assert "one class folder" in message and "two labels" in message


def test_identical_files_in_one_class_are_allowed(tiny_root: Path) -> None:
    shutil.copy(tiny_root / "train" / "a" / "a_1.png", tiny_root / "train" / "a" / "again.png")
    dm = folder_dm(tiny_root)
    dm.setup("fit")
    assert sum(dm.summary()["sizes"].values()) == 23


@pytest.mark.parametrize(
    ("option", "value"), [("balance", "oversample"), ("channels", 2), ("views", 3)]
)
def test_bad_option_values_name_the_option(tiny_root: Path, option: str, value: object) -> None:
    with pytest.raises(DataError, match=f"data.{option}"):
        folder_dm(tiny_root, **{option: value})


# -- class subset (data.classes) -----------------------------------------------------------
@pytest.fixture
def three_class_root(tmp_path: Path) -> Path:
    counts = {"train": {"a": 10, "b": 10, "c": 10}, "test": {"a": 3, "b": 3, "c": 3}}
    return make_folder(tmp_path / "abc", counts)


def test_class_subset_keeps_sorted_classes_and_the_full_tasks_val_split(
    three_class_root: Path,
) -> None:
    full = folder_dm(three_class_root, val_fraction=0.3)
    subset = folder_dm(three_class_root, val_fraction=0.3, classes=["c", "a"])  # any order
    full.setup()
    subset.setup()
    assert subset.class_names == ["a", "c"] and subset.summary()["val_from_train"]
    for split in ("train", "val", "test"):
        data, whole = subset.split(split), full.split(split)
        assert not any(n.startswith("b_") for n in data.names)
        assert [n[0] for n in data.names] == [subset.class_names[i] for i in data.labels]
        # the same images as the full task's, minus class b: the val split is not redrawn
        assert data.names == [n for n in whole.names if not n.startswith("b_")]
    assert subset.class_counts("test").tolist() == [3, 3]


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["a", "tumour"], r"data.classes names \['tumour'\].*\['a', 'b', 'c'\]"),
        (["a"], "fewer than two"),
        (["a", "a"], "twice"),
        ("a", "must be a list"),
    ],
)
def test_bad_class_subset_names_the_option(
    three_class_root: Path, classes: object, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        folder_dm(three_class_root, classes=classes).setup()


def test_brain_mri_configs_point_at_their_datasets() -> None:
    from hydra import compose, initialize_config_dir

    roots = {}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for name in ("brain_mri", "brain_mri_sartaj", "brain_mri_tumour_type"):
            cfg = compose("config", overrides=[f"data={name}", "paths.data_dir=/d"])
            roots[name] = (cfg.data.root, cfg.data.classes, cfg.data.name)
    assert roots["brain_mri"] == ("/d/brain_mri_tumor_nickparvar", None, "brain_mri")
    assert roots["brain_mri_sartaj"][0] == "/d/brain_mri_tumor_4class"
    assert roots["brain_mri_tumour_type"][:2] == (
        "/d/brain_mri_tumor_nickparvar",
        ["glioma", "meningioma", "pituitary"],
    )


# -- synthetic ----------------------------------------------------------------------------
def test_synthetic_is_deterministic_balanced_and_seed_dependent() -> None:
    sizes = {"n_train": 40, "n_val": 12, "n_test": 20}
    first, second = SyntheticDataModule(seed=1, **sizes), SyntheticDataModule(seed=1, **sizes)
    other = SyntheticDataModule(seed=2, **sizes)
    for dm in (first, second, other):
        dm.setup("fit")
    assert np.array_equal(first.split("train").images, second.split("train").images)
    assert not np.array_equal(first.split("train").images, other.split("train").images)
    assert not np.array_equal(first.split("train").images[:20], first.split("test").images)
    assert first.class_counts("train").tolist() == [10, 10, 10, 10]
    assert first.class_counts("test").tolist() == [5, 5, 5, 5]
    assert first.num_classes == 4 and first.split("train").images.shape[1:] == (64, 64, 1)
    x, y = next(iter(first.test_dataloader()))
    assert x.shape == (20, 1, 64, 64) and set(y.tolist()) == {0, 1, 2, 3}


# -- MedMNIST -----------------------------------------------------------------------------
def test_medmnist_reads_local_official_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in {"train": 10, "val": 4, "test": 6}.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    dm = MedMNISTDataModule(root=str(tmp_path), flag="breastmnist", download=False, img_size=32)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == ["malignant", "normal, benign"] and dm.name == "breastmnist"
    assert dm.summary()["sizes"] == {"train": 10, "val": 4, "test": 6}
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 1, 32, 32) and y.tolist() == [0, 1, 0, 1]


def test_medmnist_missing_file_and_bad_flag(tmp_path: Path) -> None:
    dm = MedMNISTDataModule(root=str(tmp_path), flag="pneumoniamnist", download=False)
    with pytest.raises(DataError, match=r"pneumoniamnist\.npz.*zenodo"):
        dm.setup("fit")
    with pytest.raises(DataError, match="multi-label"):
        MedMNISTDataModule(root=str(tmp_path), flag="chestmnist")
    with pytest.raises(DataError, match="not a 2D MedMNIST"):
        MedMNISTDataModule(root=str(tmp_path), flag="organmnist3d")


# -- real datasets through the real configs --------------------------------------------------
@pytest.fixture(scope="module")
def data_dir() -> Path:
    return Path(os.environ.get("DWSKD_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("config", "folder"),
    [
        ("chest_xray", "chest_xray_pneumonia"),
        ("lung_ct", "lung_ct_covid"),
        ("brain_mri", "brain_mri_tumor_nickparvar"),
        ("brain_mri_tumour_type", "brain_mri_tumor_nickparvar"),
        ("pneumoniamnist", "medmnist/pneumoniamnist.npz"),
    ],
)
def test_real_dataset_loads_one_batch(data_dir: Path, config: str, folder: str) -> None:
    if not (data_dir / folder).exists():
        pytest.skip(f"{data_dir / folder} absent: set DWSKD_DATA_DIR to the real datasets")
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"data={config}", f"paths.data_dir={data_dir}"])
    dm = instantiate(cfg.data, download=False) if "mnist" in config else instantiate(cfg.data)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 64, 64) and torch.isfinite(x).all()
    assert dm.num_classes >= 2 and int(y.max()) < dm.num_classes
    summary = dm.summary()
    assert all(n > 0 for n in summary["sizes"].values()) and summary["skipped_bad_images"] == 0
