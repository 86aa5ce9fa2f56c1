"""One datamodule over several datasets ("sources"), each split exactly as it is on its own.

A model trained on the union (the shared medunion teacher, for one) must never have seen a
source's validation or test image: distilled into a single-source student, it would leak
them into that student's model selection and test score. So the union is composed from the
sources' own datamodules *after* each has drawn its validation split by its own rules (root,
official val folder, group_regex, val_fraction): union train = the sources' remaining train
images, union val = their val splits, union test = their test splits.

Class names are prefixed with the source's key (``chest_NORMAL``) and sorted, so label
indices do not depend on the order the sources are listed in and match a head trained on the
same union (``brain_glioma, ..., chest_NORMAL, ..., lung_NonCOVID``). With
``merge_classes=true`` the names stay unprefixed and equal names are one class: several
sources of the same task (brain MRI from two hospitals) train one head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dwskd.data.base import BaseDataModule, ImageSource, SplitData
from dwskd.data.checks import SPLITS, DataError

# Options of the union that every source takes over: all images need one shape, and one data
# seed (data.seed) should move every drawn validation split, not some of them.
SHARED_OPTIONS = ("img_size", "channels", "cache", "seed")


class ConcatImages:
    """Images of several sources, indexable like one array (for ``cache=false`` sources)."""

    def __init__(self, parts: Sequence[ImageSource], index: np.ndarray | None = None) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.index = np.arange(self.starts[-1]) if index is None else index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: Any) -> Any:
        if np.ndim(index) > 0:
            return ConcatImages(self.parts, self.index[np.asarray(index, dtype=np.int64)])
        position = int(self.index[int(index)])
        part = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.parts[part][position - int(self.starts[part])]


def concat_splits(parts: Sequence[SplitData]) -> SplitData:
    """One split from several (in memory when every part is, else a lazy concatenation)."""
    images = [p.images for p in parts]
    if all(isinstance(i, np.ndarray) for i in images):
        joined: Any = np.concatenate(images)
    else:
        joined = ConcatImages(images)
    return SplitData(
        joined,
        np.concatenate([p.labels for p in parts]).astype(np.int64),
        [n for p in parts for n in p.names],
        [f for p in parts for f in p.skipped],
    )


def prefixed(key: str, data: SplitData, label_map: np.ndarray) -> SplitData:
    """A source's split with union labels and ``<key>/<file>`` names (traceable, unique)."""
    names = [f"{key}/{n}" for n in data.names]
    return SplitData(data.images, label_map[data.labels], names, data.skipped)


class UnionDataModule(BaseDataModule):
    """The union of several datamodules' splits, with ``<key>_<class>`` class names.

    ``sources`` maps a key (the class-name prefix) to a data config (a mapping with
    ``_target_``, as composed from ``conf/data/<name>.yaml``) or to a datamodule. A config is
    instantiated with the union's ``img_size``, ``channels``, ``cache`` and ``seed``; its
    other options (root, group_regex, val_fraction, classes, ...) stay the source's own.
    ``limit_per_class``, ``balance``, loaders and the rest act on the union.
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        name: str = "medunion",
        merge_classes: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(name=name, **options)
        self.merge_classes = bool(merge_classes)
        if OmegaConf.is_config(sources):
            sources = OmegaConf.to_container(sources, resolve=True)
        if not isinstance(sources, Mapping) or not sources:
            raise DataError(
                f"data.sources={sources!r} must map a key (the class-name prefix, e.g. chest) "
                "to a data config; see conf/data/medunion.yaml."
            )
        self.sources = {str(k): v for k, v in sources.items() if v is not None}
        self._modules: dict[str, BaseDataModule] | None = None

    @property
    def source_modules(self) -> dict[str, BaseDataModule]:
        """The sources' datamodules by key, sorted by key (built on first use)."""
        if self._modules is None:
            self._modules = {k: self._build(k, self.sources[k]) for k in sorted(self.sources)}
        return self._modules

    def prepare_data(self) -> None:
        """Let every source fetch what it needs (MedMNIST downloads here)."""
        for module in self.source_modules.values():
            module.prepare_data()

    def _build(self, key: str, spec: Any) -> BaseDataModule:
        """A source's datamodule with the union's shared options; a mismatch is an error."""
        if isinstance(spec, Mapping) and "_target_" in spec:
            spec = instantiate({**spec, **{o: getattr(self, o) for o in SHARED_OPTIONS}})
        if not isinstance(spec, BaseDataModule):
            raise DataError(
                f"data.sources.{key} must be a data config with a _target_ (e.g. "
                f"/data@sources.{key}: chest_xray in the defaults list) or a dwskd "
                f"datamodule, not {type(spec).__name__}."
            )
        for option in ("img_size", "channels"):
            if getattr(spec, option) != getattr(self, option):
                raise DataError(
                    f"data.sources.{key} has {option}={getattr(spec, option)} but the union has "
                    f"data.{option}={getattr(self, option)}; build the source with the union's."
                )
        return spec

    def _load_splits(self) -> tuple[dict[str, SplitData], list[str]]:
        """Each source set up (val drawn by its rules), then concatenated split by split."""
        modules = self.source_modules
        for module in modules.values():
            module.setup()

        def union_name(key: str, name: str) -> str:
            return name if self.merge_classes else f"{key}_{name}"

        class_names = sorted({union_name(k, c) for k, m in modules.items() for c in m.class_names})
        label_maps = {
            k: np.array([class_names.index(union_name(k, c)) for c in m.class_names], np.int64)
            for k, m in modules.items()
        }
        splits = {
            s: concat_splits([prefixed(k, m.split(s), label_maps[k]) for k, m in modules.items()])
            for s in SPLITS
        }
        self._val_from_train = any(m.summary()["val_from_train"] for m in modules.values())
        return splits, class_names

    def source_indices(self, split: str) -> dict[str, np.ndarray]:
        """Positions of each source's images in the union's ``split`` (names ``<key>/<file>``)."""
        names = self.split(split).names
        return {
            key: np.flatnonzero([n.startswith(f"{key}/") for n in names])
            for key in self.source_modules
        }

    def summary(self) -> dict[str, Any]:
        """The base summary plus each source's name, root, val origin and split sizes."""
        summary = super().summary()
        summary["sources"] = {
            key: {
                name: module.summary()[name]
                for name in ("name", "root", "val_from_train", "sizes", "counts")
            }
            for key, module in self.source_modules.items()
        }
        return summary
