"""data.train_fraction / train_per_class, data.augment and data.standardize: what they promise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from dwskd import model_folder
from dwskd.data import DataError, SyntheticDataModule
from dwskd.data.base import BaseDataModule, SplitData
from dwskd.data.splits import groups_from_regex, train_subset
from dwskd.data.transforms import eval_transform, train_transform
from tests.conftest import compose_config

LABELS = np.array([0] * 50 + [1] * 30 + [2] * 20)
SMALL = {"img_size": 16, "n_train": 60, "n_val": 12, "n_test": 12, "num_classes": 3}


def synthetic(**options) -> SyntheticDataModule:
    dm = SyntheticDataModule(**{**SMALL, **options})
    dm.setup()
    return dm


class ArrayDataModule(BaseDataModule):
    """Train and test only, from arrays: val is drawn from train, as for chest_xray."""

    def _load_splits(self) -> tuple[dict[str, SplitData], list[str]]:
        rng = np.random.default_rng(0)
        splits = {}
        for split, n in (("train", 80), ("test", 10)):
            labels = np.arange(n) % 2
            images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
            splits[split] = SplitData(images, labels, [f"{split}_{i}" for i in range(n)])
        return splits, ["a", "b"]


def same_split(a: SplitData, b: SplitData) -> bool:
    return (
        np.array_equal(a.images, b.images)
        and np.array_equal(a.labels, b.labels)
        and a.names == b.names
    )


# -- train subsets ------------------------------------------------------------------------
def test_subsets_are_stratified_and_nested() -> None:
    small, large = train_subset(LABELS, 0, 0.2), train_subset(LABELS, 0, 0.5)
    assert np.bincount(LABELS[small]).tolist() == [10, 6, 4]
    assert np.bincount(LABELS[large]).tolist() == [25, 15, 10]
    assert set(small) < set(large) < set(range(len(LABELS)))
    three = train_subset(LABELS, 0, per_class=3)
    assert np.bincount(LABELS[three]).tolist() == [3, 3, 3] and set(three) < set(small)
    assert np.bincount(LABELS[train_subset(LABELS, 0, 0.001)]).tolist() == [1, 1, 1]
    assert np.array_equal(train_subset(LABELS, 0, 1.0), np.arange(len(LABELS)))
    assert not np.array_equal(small, train_subset(LABELS, 1, 0.2))


def test_grouped_subsets_keep_whole_patients_and_are_nested() -> None:
    names = [f"person{p}_{i}.jpg" for p in range(40) for i in range(p % 3 + 1)]
    labels = np.array([int(n[6:].split("_")[0]) % 2 for n in names])
    groups = groups_from_regex(names, r"^(person\d+)_")
    small = train_subset(labels, 0, 0.25, groups=groups)
    large = train_subset(labels, 0, 0.6, groups=groups)
    assert set(small) < set(large)
    kept = {groups[i] for i in small}
    assert all(i in small for i, g in enumerate(groups) if g in kept)
    for cls in (0, 1):
        assert np.sum(labels[small] == cls) >= round(0.25 * np.sum(labels == cls))


def test_fraction_leaves_val_and_test_alone_and_one_is_the_default() -> None:
    default, full = synthetic(), synthetic(train_fraction=1.0)
    half, fifth = synthetic(train_fraction=0.5), synthetic(train_fraction=0.2)
    assert all(same_split(default.split(s), full.split(s)) for s in ("train", "val", "test"))
    for dm in (half, fifth):
        assert same_split(dm.split("val"), default.split("val"))
        assert same_split(dm.split("test"), default.split("test"))
    assert set(fifth.split("train").names) < set(half.split("train").names)
    assert fifth.class_counts("train").tolist() == [4, 4, 4]
    subset = fifth.summary()["train_subset"]
    assert subset == {"fraction": 0.2, "per_class": None, "images": 12, "of": 60}
    assert default.summary()["train_subset"]["images"] == 60


def test_subset_is_drawn_after_val_is_taken_from_train() -> None:
    full = ArrayDataModule(name="arrays", val_fraction=0.25)
    few = ArrayDataModule(name="arrays", val_fraction=0.25, train_per_class=5)
    full.setup()
    few.setup()
    assert full.summary()["val_from_train"]
    assert same_split(few.split("val"), full.split("val"))
    assert set(few.split("train").names) < set(full.split("train").names)
    assert few.class_counts("train").tolist() == [5, 5]
    assert few.summary()["train_subset"]["of"] == 60


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"train_fraction": 0}, "data.train_fraction"),
        ({"train_fraction": 1.5}, "data.train_fraction"),
        ({"train_fraction": -0.2}, "data.train_fraction"),
        ({"train_fraction": "half"}, "data.train_fraction"),
        ({"train_per_class": 0}, "data.train_per_class"),
        ({"train_per_class": -3}, "data.train_per_class"),
        ({"train_per_class": 2.5}, "data.train_per_class"),
        ({"train_fraction": 0.5, "train_per_class": 5}, "both given"),
        ({"augment": "strong"}, r"data.augment='strong'.*'default', 'robust'"),
        ({"standardize": "yes"}, "data.standardize"),
    ],
)
def test_bad_values_name_the_option(options: dict, option: str) -> None:
    with pytest.raises(DataError, match=option):
        SyntheticDataModule(**SMALL, **options)


def test_config_keys_reach_the_datamodule() -> None:
    cfg = compose_config("data.train_fraction=0.25", "data.augment=robust", "data.standardize=true")
    dm = instantiate(cfg.data)
    assert (dm.train_fraction, dm.augment, dm.standardize) == (0.25, "robust", True)
    defaults = instantiate(compose_config().data)
    assert (defaults.train_fraction, defaults.train_per_class) == (1.0, None)
    assert (defaults.augment, defaults.standardize) == ("default", False)


# -- augmentation presets -----------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_robust_preset_runs_on_uint8_and_differs_from_default(channels: int) -> None:
    image = np.random.default_rng(channels).integers(0, 256, (24, 24, channels), dtype=np.uint8)
    mean, std = [0.5] * channels, [0.25] * channels
    robust = train_transform(16, mean, std, augment="robust")
    default = train_transform(16, mean, std)
    differs = False
    for seed in range(5):
        robust.set_random_seed(seed)
        default.set_random_seed(seed)
        x = robust(image=image)["image"]
        assert x.shape == (channels, 16, 16) and x.dtype == torch.float32
        differs |= not torch.equal(x, default(image=image)["image"])
    assert differs


def test_robust_preset_feeds_the_train_loader() -> None:
    x, _ = next(iter(synthetic(augment="robust", batch_size=8).train_dataloader()))
    assert x.shape == (8, 1, 16, 16) and torch.isfinite(x).all()


# -- per-image standardisation -------------------------------------------------------------
def per_image_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(1)
    return flat.mean(1), flat.std(1, unbiased=False)


def test_standardize_gives_each_image_zero_mean_and_unit_std() -> None:
    dm = synthetic(standardize=True, batch_size=8)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        x, _ = next(iter(loader))
        mean, std = per_image_stats(x)
        assert x.dtype == torch.float32
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
        assert torch.allclose(std, torch.ones_like(std), atol=1e-3)
    flat = np.full((8, 8, 1), 7, np.uint8)  # a constant image stays finite: all zeros
    assert eval_transform(8, [0.5], [0.25], True)(image=flat)["image"].abs().max() == 0


# -- exports carry it ----------------------------------------------------------------------
def write_folder(folder: Path, standardize: bool) -> Path:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, in_chans=1, num_classes=2
    )
    # timm's head starts near zero: probabilities would barely follow the input
    torch.nn.init.normal_(model.head.weight)
    prep = model_folder.Preprocessing(1, 16, (0.5,), (0.25,), ("a", "b"), standardize=standardize)
    return model_folder.write_model_folder(folder, model.eval(), prep, {"model": "tiny"})


def test_standardize_round_trips_through_config_json_and_old_exports_read_false(
    tmp_path: Path,
) -> None:
    import json

    from dwskd import export

    folder = write_folder(tmp_path / "model", standardize=True)
    config = model_folder.read_config(folder)
    assert config["standardize"] is True and model_folder.preprocessing_of(config).standardize
    meta = {"preprocessing": export.preprocessing_metadata(config)}
    assert export.preprocessing_from_metadata(meta) == model_folder.preprocessing_of(config)
    del config["standardize"], meta["preprocessing"]["standardize"]  # an older dwskd's export
    (folder / model_folder.CONFIG_FILE).write_text(json.dumps(config))
    assert model_folder.preprocessing_of(model_folder.read_config(folder)).standardize is False
    assert export.preprocessing_from_metadata(meta).standardize is False


def test_inference_standardizes_as_the_model_was_trained(tmp_path: Path) -> None:
    from dwskd.data.folder import read_image
    from dwskd.inference import load, predict_files

    folder = write_folder(tmp_path / "model", standardize=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 100, (20, 20), dtype=np.uint8)).save(paths[-1])
    loaded = load(folder)
    predicted = predict_files(loaded, paths).probs

    def probs(standardize: bool) -> torch.Tensor:
        transform = eval_transform(16, (0.5,), (0.25,), standardize)
        x = torch.stack([transform(image=read_image(p, 16, 1))["image"] for p in paths])
        with torch.no_grad():
            return loaded.model(x).softmax(1)

    torch.testing.assert_close(predicted, probs(True), atol=1e-6, rtol=0)
    assert not torch.allclose(predicted, probs(False), atol=1e-4)
