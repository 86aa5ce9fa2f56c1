"""LightningDataModules for dwskd: image folders, MedMNIST, a union of sources, and the synthetic default.

Configs in ``conf/data/`` instantiate these through ``hydra.utils.instantiate(cfg.data)``.
The names below are imported on first use (as in :mod:`dwskd`): ``dwskd.data.checks``,
which the light commands need for ``DataError``, then loads without torch or Lightning,
and their ``--help`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dwskd.lazy import lazy_exports

# public name -> (module, attribute), imported on first use
_LAZY = {
    "BaseDataModule": ("dwskd.data.base", "BaseDataModule"),
    "SplitData": ("dwskd.data.base", "SplitData"),
    "DataError": ("dwskd.data.checks", "DataError"),
    "ImageFolderDataModule": ("dwskd.data.folder", "ImageFolderDataModule"),
    "MedMNISTDataModule": ("dwskd.data.medmnist", "MedMNISTDataModule"),
    "groups_from_regex": ("dwskd.data.splits", "groups_from_regex"),
    "stratified_split": ("dwskd.data.splits", "stratified_split"),
    "SyntheticDataModule": ("dwskd.data.synthetic", "SyntheticDataModule"),
    "UnionDataModule": ("dwskd.data.union", "UnionDataModule"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


if TYPE_CHECKING:  # static analysers see the lazy names
    from dwskd.data.base import BaseDataModule, SplitData
    from dwskd.data.checks import DataError
    from dwskd.data.folder import ImageFolderDataModule
    from dwskd.data.medmnist import MedMNISTDataModule
    from dwskd.data.splits import groups_from_regex, stratified_split
    from dwskd.data.synthetic import SyntheticDataModule
    from dwskd.data.union import UnionDataModule

__all__ = [
    "BaseDataModule",
    "DataError",
    "ImageFolderDataModule",
    "MedMNISTDataModule",
    "SplitData",
    "SyntheticDataModule",
    "UnionDataModule",
    "groups_from_regex",
    "stratified_split",
]
