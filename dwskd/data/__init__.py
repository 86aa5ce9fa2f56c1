"""LightningDataModules for dwskd: image folders, MedMNIST, a union of sources, and the synthetic default.

Configs in ``conf/data/`` instantiate these through ``hydra.utils.instantiate(cfg.data)``.
"""

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
