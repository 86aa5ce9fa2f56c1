"""Image-folder datasets laid out as ``<root>/<split>/<class>/<image>`` (split: train/val/test),
or as one pool ``<root>/<class>/<image>`` split by ``test_fraction`` (grouped by patient).

Every file is decoded once at set-up (in threads; JPEGs at reduced scale through Pillow's
draft mode), which both finds bad files before training starts and fills the in-memory
cache of resized uint8 images that keeps loading far ahead of a CPU training step.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dwskd.data.base import BaseDataModule, SplitData, fit_images
from dwskd.data.checks import (
    DataError,
    check_class_sets,
    check_no_duplicates,
    find_split_dirs,
    is_dangling_link,
    link_target,
    require_choice,
    require_root,
    scan_split,
)
from dwskd.data.splits import groups_from_regex, stratified_split

log = logging.getLogger(__name__)
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def read_image(path: Path, img_size: int, channels: int) -> np.ndarray:
    """Decode one file to uint8 (img_size, img_size, channels); raises on unreadable files."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as image:
        image.draft(mode, (img_size, img_size))
        image.load()
        array = _to_uint8(image, mode)
    return fit_images(array[None], img_size, channels)[0]


def _to_uint8(image: Image.Image, mode: str) -> np.ndarray:
    """8-bit pixels; 16-bit/float images are min-max scaled (Pillow would clip them to white)."""
    if image.mode not in _HIGH_BIT_MODES:
        return np.asarray(image.convert(mode))
    array = np.asarray(image, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    return np.round(255 * (array - low) / max(high - low, 1e-6)).astype(np.uint8)


def try_read_image(path: Path, img_size: int, channels: int) -> np.ndarray | Exception:
    """read_image, returning the error instead of raising it (for a thread pool).

    A dangling symlink gets an error naming its missing target: Pillow's would name only the
    link, leaving the user to guess why a file that is listed "does not exist".
    """
    if is_dangling_link(path):
        return FileNotFoundError(f"symlink to missing target {link_target(path)!r}")
    try:
        return read_image(path, img_size, channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return err


def _require_each_class(labels: np.ndarray, class_names: list[str], files: dict) -> None:
    """A class whose every image was skipped would silently vanish from the label space."""
    for i, name in enumerate(class_names):
        if not np.any(labels == i):
            folder = files[name][0].parent
            raise DataError(f"No readable image left in class folder {str(folder)!r}.")


def select_classes(wanted: Sequence[str] | None, available: list[str], root: Path) -> list[str]:
    """The ``data.classes`` kept, in sorted order (None: all); unknown or repeated names fail."""
    if wanted is None:
        return available
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise DataError(
            f"data.classes names {unknown}, which are not class folders of {str(root)!r}; "
            f"use some of {available} (or data.classes=null for all)."
        )
    if len(set(wanted)) != len(wanted):
        raise DataError(f"data.classes={list(wanted)} names a class twice; name each once.")
    if len(wanted) < 2:
        raise DataError(
            f"data.classes={list(wanted)} keeps fewer than two classes; a classifier needs "
            f"at least two of {available}."
        )
    return sorted(wanted)


def keep_classes(data: SplitData, class_names: list[str], kept: list[str]) -> SplitData:
    """The images of the ``kept`` classes, relabelled to their index in ``kept``."""
    new_label = np.full(len(class_names), -1, dtype=np.int64)
    for i, name in enumerate(kept):
        new_label[class_names.index(name)] = i
    subset = data.subset(np.flatnonzero(new_label[data.labels] >= 0))
    return SplitData(subset.images, new_label[subset.labels], subset.names, subset.skipped)


class LazyImages:
    """Reads files on every access (``cache=false``): little memory, more CPU per epoch."""

    def __init__(self, paths: Sequence[Path], img_size: int, channels: int) -> None:
        self.paths, self.img_size, self.channels = list(paths), img_size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Any) -> Any:
        if np.ndim(index) == 0:
            return read_image(self.paths[int(index)], self.img_size, self.channels)
        return LazyImages([self.paths[i] for i in index], self.img_size, self.channels)


class ImageFolderDataModule(BaseDataModule):
    """Any ``<root>/<split>/<class>/*`` dataset; val is drawn from train when absent.

    ``classes`` (None: every class folder) keeps only the named class folders in every split;
    label indices follow the names' sorted order whatever order they are given in, so
    ``[b, a]`` and ``[a, b]`` give the same task and the same head. A validation split drawn
    from train is drawn over *all* classes first and then subset, so the subset task's val
    images are exactly the full task's val images of those classes (a teacher trained on the
    full task's train split never sees them). ``bad_images``: ``skip`` (warn, count in ``summary()``) or ``error`` (raise naming the
    file), for undecodable images and dangling symlinks alike. Identical files in two class
    folders of a split, or in two splits, always raise. ``download_hint`` is shown when the
    root is missing. ``test_fraction`` (a folder with no split folders, e.g. an external set
    used for training): the pooled ``<root>/<class>/*`` images are split into test and train
    by whole ``group_regex`` groups, then val is drawn from train as usual.
    """

    def __init__(
        self,
        root: str,
        name: str = "folder",
        bad_images: str = "skip",
        download_hint: str | None = None,
        classes: Sequence[str] | None = None,
        test_fraction: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(name=name, **options)
        if test_fraction is not None and not 0 < float(test_fraction) < 1:
            raise DataError(
                f"data.test_fraction={test_fraction} must be in (0, 1): the share of the pooled "
                "<root>/<class>/ images (whole group_regex groups) held out as test."
            )
        self.test_fraction = None if test_fraction is None else float(test_fraction)
        require_choice("bad_images", bad_images, ("skip", "error"))
        self.root, self.bad_images, self.download_hint = str(root), bad_images, download_hint
        if isinstance(classes, str):
            raise DataError(
                f"data.classes={classes!r} must be a list of class folders, "
                f"e.g. data.classes=[{classes},<another>]."
            )
        self.classes = None if classes is None else [str(c) for c in classes]

    def _load_splits(self) -> tuple[dict[str, SplitData], list[str]]:
        root = Path(self.root).expanduser()
        require_root(root, self.download_hint)
        if self.test_fraction is None:
            files = {split: scan_split(d) for split, d in find_split_dirs(root).items()}
        else:
            files = {"train": scan_split(root)}
        class_names = check_class_sets({s: list(by_class) for s, by_class in files.items()})
        kept = select_classes(self.classes, class_names, root)
        check_no_duplicates(files)
        splits = {s: self._read_split(by_class, class_names) for s, by_class in files.items()}
        if self.test_fraction is not None:
            splits = self._with_test_from_pool(splits["train"])
        if kept == class_names:
            return splits, class_names
        if "val" not in splits:  # drawn over all classes: the same val as the full task's
            splits = self._with_val_from_train(splits)
        return {s: keep_classes(d, class_names, kept) for s, d in splits.items()}, kept

    def _with_test_from_pool(self, pool: SplitData) -> dict[str, SplitData]:
        """Hold out ``test_fraction`` of a pooled folder as test, whole groups (patients) at once.

        Stratified and seeded like the validation split (drawn next, from what is left), with
        its own seed stream so that test and val never depend on each other's fractions.
        """
        groups = groups_from_regex(pool.names, self.group_regex)
        train_idx, test_idx = stratified_split(
            pool.labels, self.test_fraction, self.seed + 1, groups
        )
        return {"train": pool.subset(train_idx), "test": pool.subset(test_idx)}

    def _read_split(self, files: dict[str, list[Path]], class_names: list[str]) -> SplitData:
        """Decode a split's files, apply the bad-image policy, keep pixels or paths."""
        paths = [p for c in class_names for p in files[c]]
        labels = np.array([i for i, c in enumerate(class_names) for _ in files[c]], np.int64)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            decoded = list(
                pool.map(lambda p: try_read_image(p, self.img_size, self.channels), paths)
            )
        bad = [(p, r) for p, r in zip(paths, decoded, strict=True) if isinstance(r, Exception)]
        self._handle_bad_images(bad)
        keep = [i for i, r in enumerate(decoded) if not isinstance(r, Exception)]
        if self.cache:
            images: Any = np.stack([decoded[i] for i in keep])
        else:
            images = LazyImages([paths[i] for i in keep], self.img_size, self.channels)
        _require_each_class(labels[keep], class_names, files)
        names = [paths[i].name for i in keep]
        return SplitData(images, labels[keep], names, skipped=[str(p) for p, _ in bad])

    def _handle_bad_images(self, bad: list[tuple[Path, Exception]]) -> None:
        """``error``: raise naming the first bad file; ``skip``: warn listing them."""
        if not bad:
            return
        path, err = bad[0]
        if self.bad_images == "error":
            raise DataError(
                f"Cannot read image {str(path)!r} ({type(err).__name__}: {err}). Replace or "
                "delete the file, or set data.bad_images=skip to skip unreadable images."
            )
        listed = ", ".join(str(p) for p, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
        message = f"data={self.name}: skipped {len(bad)} unreadable image(s): {listed}"
        log.warning(message)
        warnings.warn(message, stacklevel=2)
