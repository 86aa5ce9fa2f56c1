"""LightningDataModules for dwskd: image folders, MedMNIST, a union of sources, and the synthetic default.

Configs in ``conf/data/`` instantiate these through ``hydra.utils.instantiate(cfg.data)``.
The names below are imported on first use (as in :mod:`dwskd`): ``dwskd.data.checks``,
which the light commands need for ``DataError``, then loads without torch or Lightning,
and their ``--help`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_LAZY = {
    "BaseDataModule": "dwskd.data.base",
    "SplitData": "dwskd.data.base",
    "DataError": "dwskd.data.checks",
    "ImageFolderDataModule": "dwskd.data.folder",
    "MedMNISTDataModule": "dwskd.data.medmnist",
    "groups_from_regex": "dwskd.data.splits",
    "stratified_split": "dwskd.data.splits",
    "SyntheticDataModule": "dwskd.data.synthetic",
    "UnionDataModule": "dwskd.data.union",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'dwskd.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
