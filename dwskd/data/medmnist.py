"""2D MedMNIST datasets (``data.flag=pneumoniamnist|breastmnist|...``) from official ``.npz`` files.

The ``medmnist`` package supplies the metadata (class names, task, download URL) and the
download; the arrays are read straight from ``<root>/<flag>[_<size>].npz`` so a local file
works offline and set-up does not depend on the package's dataset class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dwskd.data.base import BaseDataModule, SplitData, fit_images
from dwskd.data.checks import SPLITS, DataError

_SIZES = (28, 64, 128, 224)


def medmnist_info(flag: str) -> dict[str, Any]:
    """The package's INFO entry for a 2D single-label flag, or a DataError saying why not."""
    try:
        from medmnist import INFO
    except ImportError as err:
        raise DataError(
            "data=medmnist needs the medmnist package: pip install 'dwskd[medmnist]'"
        ) from err
    flags_2d = sorted(f for f in INFO if not f.endswith("3d"))
    if flag not in flags_2d:
        raise DataError(f"data.flag={flag!r} is not a 2D MedMNIST dataset; use one of {flags_2d}.")
    if INFO[flag]["task"].startswith("multi-label"):
        raise DataError(
            f"data.flag={flag!r} is multi-label ({INFO[flag]['task']}); dwskd trains "
            "single-label classifiers, so pick another flag."
        )
    return INFO[flag]


def npz_file_name(flag: str, size: int) -> str:
    """The official file name: ``pneumoniamnist.npz`` at 28 px, ``pneumoniamnist_64.npz`` else."""
    if size not in _SIZES:
        raise DataError(f"data.size={size} is not a MedMNIST size; use one of {list(_SIZES)}.")
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def read_npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,H,W[,3]), labels int64 (N,)) of one split in an official npz."""
    with np.load(path) as npz:
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in npz]
        if missing:
            raise DataError(
                f"{str(path)!r} lacks {missing} (has {sorted(npz.files)}); "
                "it is not an official MedMNIST file: download it again."
            )
        images = np.asarray(npz[f"{split}_images"], dtype=np.uint8)
        labels = np.asarray(npz[f"{split}_labels"], dtype=np.int64).reshape(-1)
    return images, labels


class MedMNISTDataModule(BaseDataModule):
    """A 2D MedMNIST dataset with its official train/val/test splits.

    ``prepare_data`` downloads ``<root>/<file>`` when it is missing and ``download`` is true;
    offline, put the official file there (the error says where from).
    """

    def __init__(
        self,
        root: str,
        flag: str = "pneumoniamnist",
        size: int = 28,
        download: bool = True,
        name: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(name=name or flag, **options)
        self.root, self.flag, self.size, self.download = str(root), flag, int(size), download
        self.info = medmnist_info(flag)

    @property
    def npz_path(self) -> Path:
        return Path(self.root).expanduser() / npz_file_name(self.flag, self.size)

    def prepare_data(self) -> None:
        """Download the official file once (rank 0 only, as Lightning calls this hook)."""
        if self.npz_path.is_file() or not self.download:
            return
        import medmnist

        self.npz_path.parent.mkdir(parents=True, exist_ok=True)
        dataset_class = getattr(medmnist, self.info["python_class"])
        try:
            dataset_class(
                split="train", root=str(self.npz_path.parent), size=self.size, download=True
            )
        except Exception as err:  # the package wraps every failure in a bare RuntimeError
            raise self._missing_file_error(
                f"download failed ({type(err).__name__}; offline?)"
            ) from err

    def _missing_file_error(self, why: str) -> DataError:
        url_key = "url" if self.size == 28 else f"url_{self.size}"
        return DataError(
            f"MedMNIST file {str(self.npz_path)!r} not found: {why}. Download it from "
            f"{self.info[url_key]} and put it there, or point data.root (or DWSKD_DATA_DIR) "
            "at the folder that holds it."
        )

    def _load_splits(self) -> tuple[dict[str, SplitData], list[str]]:
        if not self.npz_path.is_file():
            why = "data.download=false" if not self.download else "prepare_data() not run"
            raise self._missing_file_error(why)
        class_names = [self.info["label"][k] for k in sorted(self.info["label"], key=int)]
        splits = {}
        for split in SPLITS:
            images, labels = read_npz_split(self.npz_path, split)
            names = [f"{self.flag}_{split}_{i}" for i in range(len(labels))]
            splits[split] = SplitData(
                fit_images(images, self.img_size, self.channels), labels, names
            )
        return splits, class_names
