"""What every dwskd datamodule shares: splits held as uint8 arrays, loaders, balance, summary.

A subclass only says how to read its splits (``_load_splits``); drawing a validation split,
subsetting train, limiting class sizes, augmenting, balancing and describing the data live
here once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dwskd.data.checks import SPLITS, DataError, check_several_classes, require_choice
from dwskd.data.splits import (
    check_train_subset,
    groups_from_regex,
    stratified_split,
    train_subset,
)
from dwskd.data.transforms import AUGMENTATIONS, eval_transform, per_channel, train_transform


class ImageSource(Protocol):
    """uint8 HxWxC images by index: an in-memory array, or a lazy reader of files."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> Any: ...


@dataclass(frozen=True)
class SplitData:
    """One split: images, integer labels and a name per image (file name, for grouping)."""

    images: ImageSource
    labels: np.ndarray
    names: list[str]
    skipped: list[str] = field(default_factory=list)

    def subset(self, index: np.ndarray) -> SplitData:
        """The images at ``index`` (the skipped-file record stays with the split)."""
        index = np.asarray(index, dtype=np.int64)
        names = [self.names[i] for i in index]
        return SplitData(self.images[index], self.labels[index], names, self.skipped)


def fit_images(images: np.ndarray, img_size: int, channels: int) -> np.ndarray:
    """uint8 images (N,H,W) or (N,H,W,C) -> (N,img_size,img_size,channels).

    Grayscale stays grayscale (colour is converted by luminance); channels=3 replicates gray.
    """
    if images.ndim == 3:
        images = images[..., None]
    out = np.empty((len(images), img_size, img_size, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = to_channels(_resize(image, img_size), channels)
    return out


def _resize(image: np.ndarray, img_size: int) -> np.ndarray:
    """Square resize, area-averaged when shrinking, keeping a trailing channel axis."""
    if image.shape[:2] == (img_size, img_size):
        return image
    shrink = image.shape[0] > img_size or image.shape[1] > img_size
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    resized = cv2.resize(image, (img_size, img_size), interpolation=interpolation)
    return resized.reshape(img_size, img_size, -1)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HxWxC uint8 -> HxWx``channels``: RGB to luminance for 1, gray replicated for 3."""
    if image.shape[-1] == channels:
        return image
    if channels == 1:
        return cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)[..., None]
    return np.repeat(image[..., :1], 3, axis=-1)


class ImageDataset(Dataset):
    """Applies an albumentations pipeline to uint8 images; ``views=2`` stacks two draws.

    An item may be ``(index, seed)`` (from :class:`EpochSampler`): the augmentation is then
    drawn from that seed, so a sample's augmentation depends only on (loader seed, epoch,
    position) and a resumed stage sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, data: SplitData, transform: Any, views: int = 1) -> None:
        self.data, self.transform, self.views = data, transform, views

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index = item
        if isinstance(item, tuple):
            index, seed = item
            self.transform.set_random_seed(seed)
        image = self.data.images[index]
        if self.views == 1:
            x = self.transform(image=image)["image"]
        else:
            x = torch.stack([self.transform(image=image)["image"] for _ in range(self.views)])
        return x, int(self.data.labels[index])


class EpochSampler(DistributedSampler):
    """Training order and per-sample augmentation seeds as a pure function of (seed, epoch).

    Lightning calls ``set_epoch`` before every epoch, so order and augmentation survive a
    resume exactly. ``weights`` draws class-balanced samples with replacement. It is a
    ``DistributedSampler`` (one shard per rank), which Lightning therefore leaves in place.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        weights: np.ndarray | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        n = len(self.dataset)
        if self.weights is None:
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator)
        pairs = list(zip(order.tolist(), seeds.tolist(), strict=True))
        pairs += pairs[: self.total_size - n]  # pad so every rank gets as many samples
        return iter(pairs[self.rank : self.total_size : self.num_replicas])


class BaseDataModule(pl.LightningDataModule):
    """Shared datamodule logic. Subclasses implement ``_load_splits``.

    After ``setup()`` (idempotent; any stage loads every split once): ``num_classes``,
    ``class_names``, ``in_chans``, ``img_size``, ``class_weights()``, ``summary()`` and the
    three dataloaders yielding ``(x float (B,C,H,W) [or (B,views,C,H,W) for train], y long)``.
    """

    root: str | None = None

    def __init__(
        self,
        name: str,
        img_size: int = 64,
        channels: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        group_regex: str | None = None,
        seed: int = 0,
        cache: bool = True,
        balance: str = "none",
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.25,
        views: int = 1,
        hflip: float = 0.5,
        limit_per_class: int | None = None,
        positive_class: str | None = None,
        external: Mapping[str, Any] | None = None,
        train_fraction: float = 1.0,
        train_per_class: int | None = None,
        augment: str = "default",
        standardize: bool = False,
    ) -> None:
        super().__init__()
        require_choice("channels", channels, (1, 3))
        require_choice("balance", balance, ("none", "sampler", "loss"))
        require_choice("views", views, (1, 2))
        require_choice("augment", augment, AUGMENTATIONS)
        require_choice("standardize", standardize, (False, True))
        check_train_subset(train_fraction, train_per_class)
        self.name, self.img_size, self.channels = name, int(img_size), int(channels)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.val_fraction, self.group_regex, self.seed = float(val_fraction), group_regex, seed
        self.cache, self.balance, self.views, self.hflip = bool(cache), balance, views, hflip
        self.mean = per_channel(mean, self.channels, "mean")
        self.std = per_channel(std, self.channels, "std")
        self.limit_per_class = limit_per_class
        self.train_fraction, self.train_per_class = train_fraction, train_per_class
        self.augment, self.standardize = augment, bool(standardize)
        self.positive_class = positive_class
        # External test sets (dwskd.external scores them after training; never loaded here).
        self.external = dict(external or {})
        self.class_names: list[str] = []
        self._splits: dict[str, SplitData] | None = None
        self._val_from_train = False
        self._train_before_subset: int | None = None
        # Seed of the training order and augmentation; the pipeline sets it for each stage.
        self.loader_seed = int(seed)

    # -- to implement ---------------------------------------------------------------------
    def _load_splits(self) -> tuple[dict[str, SplitData], list[str]]:
        """Read the dataset: {"train", "test"[, "val"]} -> SplitData, and the class names."""
        raise NotImplementedError

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load, split and limit once; later calls (Lightning makes several) do nothing."""
        if self._splits is not None:
            return
        splits, class_names = self._load_splits()
        check_several_classes(class_names, where=f"data={self.name}")
        if "val" not in splits:
            splits = self._with_val_from_train(splits)
        splits = {k: splits[k] for k in SPLITS}
        splits["train"] = self._train_subset(splits["train"])
        if self.limit_per_class:
            splits = {k: self._limited(v) for k, v in splits.items()}
        self.class_names, self._splits = list(class_names), splits

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    # -- public interface -----------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def positive_index(self) -> int:
        """Index of the positive class of a binary task (``data.positive_class``; default 1)."""
        self.setup()
        if self.positive_class is None:
            return 1
        if self.positive_class not in self.class_names:
            raise DataError(
                f"data.positive_class={self.positive_class!r} is not a class of data={self.name}; "
                f"use one of {self.class_names}."
            )
        return self.class_names.index(self.positive_class)

    @property
    def in_chans(self) -> int:
        return self.channels

    def split(self, name: str) -> SplitData:
        """The loaded split ``train``/``val``/``test`` (sets up on first use)."""
        self.setup()
        assert self._splits is not None
        return self._splits[name]

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Images per class in a split."""
        return np.bincount(self.split(split).labels, minlength=self.num_classes)

    def class_weights(self) -> torch.Tensor | None:
        """Inverse-frequency CE weights (mean 1 over images) when ``balance=loss``, else None.

        None lets a caller write ``CrossEntropyLoss(weight=dm.class_weights())`` unconditionally.
        """
        if self.balance != "loss":
            return None
        counts = self.class_counts("train").astype(np.float64)
        weights = counts.sum() / (len(counts) * np.maximum(counts, 1))
        return torch.tensor(weights, dtype=torch.float32)

    def summary(self) -> dict[str, Any]:
        """JSON-able description of the loaded data, for reports and metrics.json."""
        self.setup()
        assert self._splits is not None
        counts = {
            s: dict(zip(self.class_names, map(int, self.class_counts(s)), strict=True))
            for s in self._splits
        }
        skipped = sorted({f for d in self._splits.values() for f in d.skipped})
        return {
            "name": self.name,
            "root": None if self.root is None else str(self.root),
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "counts": counts,
            "sizes": {s: int(sum(c.values())) for s, c in counts.items()},
            "val_from_train": self._val_from_train,
            "skipped_bad_images": len(skipped),
            "skipped_files": skipped[:20],
            "channels": self.channels,
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "balance": self.balance,
            "views": self.views,
            "limit_per_class": self.limit_per_class,
            "train_subset": {
                "fraction": self.train_fraction,
                "per_class": self.train_per_class,
                "images": int(sum(counts["train"].values())),
                "of": self._train_before_subset,
            },
            "augment": self.augment,
            "standardize": self.standardize,
            "positive_class": self.class_names[self.positive_index]
            if self.num_classes == 2
            else None,
        }

    # -- internals ------------------------------------------------------------------------
    def _with_val_from_train(self, splits: dict[str, SplitData]) -> dict[str, SplitData]:
        """Carve a stratified (optionally patient-grouped) validation split out of train."""
        train = splits["train"]
        groups = groups_from_regex(train.names, self.group_regex)
        train_idx, val_idx = stratified_split(train.labels, self.val_fraction, self.seed, groups)
        if len(val_idx) == 0:
            raise DataError(
                f"data={self.name}: train is too small to draw a validation split "
                f"(data.val_fraction={self.val_fraction}); add images or a <root>/val folder."
            )
        self._val_from_train = True
        return {**splits, "train": train.subset(train_idx), "val": train.subset(val_idx)}

    def _train_subset(self, train: SplitData) -> SplitData:
        """The ``train_fraction`` / ``train_per_class`` subset of train (val is drawn already).

        Whole ``group_regex`` groups (patients) stay together; without one it is per image.
        """
        self._train_before_subset = len(train.labels)
        if self.train_fraction == 1.0 and self.train_per_class is None:
            return train
        groups = groups_from_regex(train.names, self.group_regex) if self.group_regex else None
        index = train_subset(
            train.labels, self.seed, self.train_fraction, self.train_per_class, groups
        )
        return train.subset(index)

    def _limited(self, data: SplitData) -> SplitData:
        """At most ``limit_per_class`` images of each class (a seeded subset), for quick runs."""
        rng = np.random.default_rng(self.seed)
        keep = [
            rng.permutation(np.flatnonzero(data.labels == c))[: self.limit_per_class]
            for c in np.unique(data.labels)
        ]
        return data.subset(np.sort(np.concatenate(keep)))

    def _loader(self, split: str, train: bool) -> DataLoader:
        data = self.split(split)
        if train:
            transform = train_transform(
                self.img_size, self.mean, self.std, self.hflip, self.augment, self.standardize
            )
        else:
            transform = eval_transform(self.img_size, self.mean, self.std, self.standardize)
        dataset = ImageDataset(data, transform, self.views if train else 1)
        sampler = self._train_sampler(dataset, data.labels) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train and len(dataset) > self.batch_size,
        )

    def _train_sampler(self, dataset: Dataset, labels: np.ndarray) -> EpochSampler:
        """Seeded order (class-balanced with ``balance=sampler``), one shard per DDP rank."""
        weights = None
        if self.balance == "sampler":
            counts = np.bincount(labels, minlength=self.num_classes)
            weights = 1.0 / counts[labels]
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        return EpochSampler(dataset, self.loader_seed, weights, num_replicas=world, rank=rank)
