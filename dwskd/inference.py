"""What ``dwskd.predict`` and ``dwskd.evaluate`` share: inputs, decoding, the batched forward.

A model is only as good as the preprocessing it is fed: each image is decoded with
:func:`dwskd.data.folder.read_image` at the model folder's ``img_size`` and ``in_chans`` and
normalised by :func:`dwskd.data.transforms.eval_transform` with its mean/std (or per image,
``standardize``), exactly what training and the run's own test stage did, so a
prediction here equals the run's own.
Unreadable images follow the ``bad_images`` policy of training: ``skip`` (warn, list them)
or ``error`` (stop, naming the file).
"""

from __future__ import annotations

import contextlib
import csv
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwskd.data.checks import IMAGE_EXTENSIONS, DataError, is_image_file

BAD_IMAGE_POLICIES = ("skip", "error")
PATH_COLUMNS = ("file", "path")


class InferenceError(ValueError):
    """Inputs or options of predict/evaluate that cannot work; the message says what to do."""


# ------------------------------------------------------------------------- Hydra configs
def list_inputs(spec: str | Path, option: str = "input") -> list[Path]:
    """``input=``: one image, a folder (searched recursively) or a .csv listing paths."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise InferenceError(
                f"{option}={spec} holds no images (extensions {sorted(IMAGE_EXTENSIONS)})."
            )
        return files
    if path.suffix.lower() == ".csv" and path.is_file():
        return csv_inputs(path, option)
    if path.suffix.lower() in IMAGE_EXTENSIONS and (path.exists() or path.is_symlink()):
        return [path]
    what = "does not exist" if not path.exists() else "is not an image, a folder or a .csv file"
    raise InferenceError(
        f"{option}={spec} {what}. Give an image file, a folder of images (searched "
        "recursively) or a .csv file with a 'file' or 'path' column."
    )


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder``, sorted; follows symlinked folders (each real one once).

    Hidden files and folders are skipped, as in training. A dangling symlink with an image
    name is kept: it then meets the ``bad_images`` policy instead of vanishing silently.
    """
    found, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a symlink loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / n for n in names if is_image_file(Path(top) / n)]
    return sorted(found)


def csv_inputs(path: Path, option: str = "input") -> list[Path]:
    """Paths listed in a CSV: its ``file``/``path`` column, else the first column.

    A first row whose first cell names an image is data, not a header. Relative paths are
    relative to the CSV's folder (as in the datasets' ``manifest.csv``), not to the cwd.
    """
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if not rows:
        raise InferenceError(f"{option}={path} is an empty CSV file; list one image per row.")
    header = [cell.strip().lower() for cell in rows[0]]
    column = next((header.index(c) for c in PATH_COLUMNS if c in header), 0)
    headless = column == 0 and Path(rows[0][0].strip()).suffix.lower() in IMAGE_EXTENSIONS
    cells = [r[column].strip() for r in (rows if headless else rows[1:]) if len(r) > column]
    files = [Path(c).expanduser() for c in cells if c]
    if not files:
        raise InferenceError(f"{option}={path} lists no paths (column {rows[0][column]!r}).")
    return [p if p.is_absolute() else path.parent / p for p in files]


# ------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class LoadedModel:
    """A model folder loaded for inference: the model (eval mode), its config, preprocessing."""

    folder: Path
    model: Any
    config: dict[str, Any]
    preprocessing: Any  # dwskd.model_folder.Preprocessing

    @property
    def name(self) -> str:
        return str(self.provenance.get("model") or self.folder.name)

    @property
    def label_names(self) -> tuple[str, ...]:
        names = self.preprocessing.label_names
        return tuple(names) or tuple(str(i) for i in range(int(self.config["num_classes"])))

    @property
    def provenance(self) -> dict[str, Any]:
        """The ``dwskd`` block of config.json: run, command, data, its own metrics."""
        return dict(self.config.get("dwskd") or {})


def load(model: str | Path, model_name: str | None = None, option: str = "model") -> LoadedModel:
    """``model=`` a model folder or a finished run dir (its deployed model unless ``model_name``)."""
    from dwskd.model_folder import load_model_folder, preprocessing_of, resolve_model_folder

    folder = resolve_model_folder(Path(model), model_name, option)
    network, config = load_model_folder(folder, option)
    return LoadedModel(folder, network, config, preprocessing_of(config))


def pick_device(name: str) -> Any:
    """``auto``: the GPU when there is one, else the CPU; otherwise a torch device name."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------- predictions
@dataclass
class Predictions:
    """Softmax probabilities for the readable inputs, in input order, and what was skipped."""

    files: list[Path]
    probs: Any  # torch.Tensor (N, C), float32
    label_names: tuple[str, ...]
    index: list[int]  # position of each row's file in the input list
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def predicted(self) -> list[str]:
        return [self.label_names[i] for i in self.probs.argmax(dim=1).tolist()]


def check_policy(bad_images: str, option: str = "bad_images") -> None:
    if bad_images not in BAD_IMAGE_POLICIES:
        raise InferenceError(
            f"{option}={bad_images!r} is not supported; use one of {list(BAD_IMAGE_POLICIES)}."
        )


class ImageFiles:
    """A map-style dataset of files decoded (as training decoded them) and normalised.

    An unreadable file yields its error message instead of a tensor, so the ``bad_images``
    policy is applied in the main process, in input order.
    """

    def __init__(self, paths: Sequence[Path], preprocessing: Any) -> None:
        from dwskd.data.transforms import eval_transform

        p = preprocessing
        self.paths, self.size, self.channels = list(paths), p.img_size, p.in_chans
        self.transform = eval_transform(p.img_size, p.mean, p.std, p.standardize)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        from dwskd.data.folder import try_read_image

        result = try_read_image(Path(self.paths[i]), self.size, self.channels)
        if isinstance(result, Exception):
            return i, None, f"{type(result).__name__}: {result}"
        return i, self.transform(image=result)["image"], None


def bad_image_error(path: Path, reason: str, option: str) -> DataError:
    return DataError(
        f"Cannot read image {str(path)!r} ({reason}). Replace or delete the file, or set "
        f"{option}=skip to skip unreadable images."
    )


def run_model(
    loaded: LoadedModel,
    paths: Sequence[Path],
    *,
    batch_size: int = 64,
    bad_images: str = "skip",
    device: str = "cpu",
    progress: bool = False,
    option: str = "bad_images",
) -> Predictions:
    """Decode and predict ``paths`` batch by batch (eval mode, no_grad), with a progress bar.

    A ``DataLoader`` decodes in worker processes while the model runs, and keeps memory flat
    however many files there are; with ``bad_images=error`` the first unreadable file stops
    the run before anything is written.
    """
    import torch
    from torch.utils.data import DataLoader

    check_policy(bad_images, option)
    if int(batch_size) < 1:
        raise InferenceError(f"batch_size={batch_size} must be at least 1.")
    model, target = loaded.model.eval(), pick_device(device)
    model.to(target)
    # Worker processes pay off beyond one batch; a handful of files is decoded in place. They
    # are forked: inside a joblib (loky) sweep worker the default start method is not fork, and
    # starting workers there failed ("'Process' object has no attribute 'env'").
    fork = "fork" in multiprocessing.get_all_start_methods()
    workers = min(4, os.cpu_count() or 1) if fork and len(paths) > int(batch_size) else 0
    batches = DataLoader(
        ImageFiles(paths, loaded.preprocessing),
        batch_size=int(batch_size),
        num_workers=workers,
        collate_fn=list,
        multiprocessing_context="fork" if workers else None,
    )
    probs, index, skipped = [], [], []
    with progress_bar(len(paths), progress) as advance, torch.no_grad():
        for items in batches:
            x, kept = readable(items, paths, bad_images, skipped, option)
            if kept:
                probs.append(torch.softmax(model(x.to(target)).float(), dim=1).cpu())
                index += kept
            advance(len(items))
    warn_skipped(skipped)
    n_classes = len(loaded.label_names)
    stacked = torch.cat(probs) if probs else torch.empty(0, n_classes)
    return Predictions([Path(paths[i]) for i in index], stacked, loaded.label_names, index, skipped)


def readable(
    items: Sequence[tuple[int, Any, str | None]],
    paths: Sequence[Path],
    bad_images: str,
    skipped: list[tuple[Path, str]],
    option: str,
) -> tuple[Any, list[int]]:
    """The batch tensor of the readable images and their input positions (the policy applied)."""
    import torch

    tensors, kept = [], []
    for i, tensor, error in items:
        if error is not None:
            if bad_images == "error":
                raise bad_image_error(Path(paths[i]), error, option)
            skipped.append((Path(paths[i]), error))
            continue
        tensors.append(tensor)
        kept.append(i)
    return (torch.stack(tensors) if tensors else None), kept


def warn_skipped(skipped: Sequence[tuple[Path, str]]) -> None:
    """``bad_images=skip``: one warning naming the first skipped files (all are in the output)."""
    if not skipped:
        return
    listed = ", ".join(str(p) for p, _ in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
    warnings.warn(f"skipped {len(skipped)} unreadable image(s): {listed}", stacklevel=3)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (stdout stays for the summary); a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("predicting", total=total)
        yield lambda n: bar.advance(task, n)


def predict_files(
    model: str | Path | LoadedModel,
    inputs: str | Path | Sequence[str | Path],
    *,
    model_name: str | None = None,
    batch_size: int = 64,
    bad_images: str = "skip",
    device: str = "cpu",
    progress: bool = False,
) -> Predictions:
    """Predictions of a model folder or run dir (its deployed model) for image files.

    ``inputs``: an image, a folder (recursive) or a .csv of paths, or a list of image paths.
    Images are prepared with the model's own preprocessing, as in training and testing.
    """
    loaded = model if isinstance(model, LoadedModel) else load(model, model_name)
    paths = list_inputs(inputs) if isinstance(inputs, str | Path) else [Path(p) for p in inputs]
    return run_model(
        loaded,
        paths,
        batch_size=batch_size,
        bad_images=bad_images,
        device=device,
        progress=progress,
    )
