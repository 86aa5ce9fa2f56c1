"""Checks on the data a user points dwskd at; every failure names the path/option and the fix.

A bad dataset should stop a run at set-up, with a message a newcomer can act on, rather
than as a shape error or a silently optimistic test score halfway through training.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
SPLITS = ("train", "val", "test")
_MAX_LISTED = 10


class DataError(ValueError):
    """Input data or a data option that cannot work; the message says what to do."""


def require_choice(option: str, value: object, allowed: Iterable[object]) -> None:
    """Reject an option value outside its allowed set, listing the allowed ones."""
    allowed = list(allowed)
    if value not in allowed:
        raise DataError(f"data.{option}={value!r} is not supported; use one of {allowed}.")


def require_root(root: Path, download_hint: str | None) -> None:
    """Fail early on a missing dataset root, saying where to get the data and how to point at it."""
    if root.is_dir():
        return
    where = f" Get it from {download_hint}." if download_hint else ""
    raise DataError(
        f"Dataset root {str(root)!r} does not exist.{where} Lay it out as "
        "<root>/<split>/<class>/<image> (splits: train, optional val, test), then set "
        "DWSKD_DATA_DIR to the folder that holds the datasets, or pass data.root=<path>."
    )


def find_split_dirs(root: Path) -> dict[str, Path]:
    """The split folders under root; train and test are required, val is optional."""
    found = {s: root / s for s in SPLITS if (root / s).is_dir()}
    missing = [s for s in ("train", "test") if s not in found]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"Dataset root {str(root)!r} has no {' or '.join(missing)} folder (found: {present}). "
            "Expected <root>/train/<class>/*, <root>/test/<class>/* and optionally <root>/val/."
        )
    return found


def is_image_file(path: Path) -> bool:
    """Image files by extension; hidden files (.DS_Store, ._x.jpg) are never images.

    A dangling symlink with an image name counts too: ``is_file()`` is False for it, so it
    would otherwise vanish silently; kept, it fails to decode and meets ``data.bad_images``.
    """
    return (
        (path.is_file() or is_dangling_link(path))
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def is_dangling_link(path: Path) -> bool:
    """A symlink whose target is missing (or a symlink loop): nothing there to read."""
    return path.is_symlink() and not path.exists()


def link_target(path: Path) -> str:
    """Where a symlink ends up, for messages; a loop is named as such instead of raising."""
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # RuntimeError: symlink loop before Python 3.13
        return f"{path.readlink()} (symlink loop)"


def scan_split(split_dir: Path) -> dict[str, list[Path]]:
    """Sorted image paths per class folder; an empty class folder is an error."""
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"Split folder {str(split_dir)!r} has no class sub-folders; "
            "put each class's images in <split>/<class>/."
        )
    files = {c.name: sorted(p for p in c.iterdir() if is_image_file(p)) for c in classes}
    for name, paths in files.items():
        if not paths:
            raise DataError(
                f"Class folder {str(split_dir / name)!r} holds no images "
                f"(extensions {sorted(IMAGE_EXTENSIONS)}); add images or remove the folder."
            )
    return files


def check_class_sets(classes_by_split: Mapping[str, Sequence[str]]) -> list[str]:
    """All splits must share one class list (else label indices differ); returns it."""
    reference_split, reference = next(iter(classes_by_split.items()))
    for split, classes in classes_by_split.items():
        if set(classes) != set(reference):
            raise DataError(
                f"Class folders differ between splits: {reference_split} has {sorted(reference)}, "
                f"{split} has {sorted(classes)}. Every split needs the same class folders."
            )
    check_several_classes(reference, where=reference_split)
    return sorted(reference)


def check_several_classes(class_names: Sequence[str], where: str) -> None:
    """Classification needs at least two classes."""
    if len(class_names) < 2:
        raise DataError(
            f"Only one class ({list(class_names)}) found in {where}; "
            "a classifier needs at least two class folders / labels."
        )


def file_digest(path: Path) -> str:
    """Content hash of a file's bytes (leakage means identical files, whatever their names)."""
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def file_digests(paths: Iterable[Path]) -> dict[Path, str]:
    """Each readable file's digest, computed once for every duplicate check.

    Files that cannot be read (dangling symlinks, permission errors) are left out: reading
    them fails again at decode time, where ``data.bad_images`` decides to skip or stop.
    """
    digests = {}
    for path in paths:
        try:
            digests[path] = file_digest(path)
        except OSError:
            continue
    return digests


def check_no_duplicates(files: Mapping[str, Mapping[str, Sequence[Path]]]) -> None:
    """Hash every file once, then reject identical files in two classes or two splits.

    ``files`` is ``{split: {class: paths}}``, as returned per split by ``scan_split``.
    """
    digests = file_digests(p for by_class in files.values() for ps in by_class.values() for p in ps)
    check_single_label(files, digests)
    check_no_leakage(
        {s: [p for ps in by_class.values() for p in ps] for s, by_class in files.items()}, digests
    )


def check_single_label(
    files: Mapping[str, Mapping[str, Sequence[Path]]], digests: Mapping[Path, str]
) -> None:
    """The same bytes in two class folders of one split would carry two labels: error listing them."""
    conflicts = [group for by_class in files.values() for group in _spread(by_class, digests)]
    if conflicts:
        raise DataError(
            f"{len(conflicts)} identical file(s) appear in more than one class folder of a split "
            "(the same image would be trained or scored with two labels):"
            f"{_listing(conflicts)}\nKeep each in the one class folder of its true label and "
            "delete the other copies."
        )


def check_no_leakage(
    files_by_split: Mapping[str, Sequence[Path]], digests: Mapping[Path, str] | None = None
) -> None:
    """Identical files in two splits inflate test scores: error listing them.

    Pass the ``digests`` already computed (``file_digests``) so no file is hashed twice.
    """
    if digests is None:
        digests = file_digests(p for paths in files_by_split.values() for p in paths)
    leaks = _spread(files_by_split, digests)
    if leaks:
        raise DataError(
            f"{len(leaks)} identical file(s) appear in more than one split (train/val/test "
            f"leakage):{_listing(leaks)}\nRemove the copies from all but one split."
        )


def _spread(paths_by_key: Mapping[str, Sequence[Path]], digests: Mapping[Path, str]) -> list:
    """Groups of identical files found under more than one key (split or class), one path per key."""
    keys_of: dict[str, dict[str, Path]] = defaultdict(dict)
    for key, paths in paths_by_key.items():
        for path in paths:
            if path in digests:
                keys_of[digests[path]].setdefault(key, path)
    groups = [sorted(str(p) for p in by_key.values()) for by_key in keys_of.values()]
    return [group for group in groups if len(group) > 1]


def _listing(groups: Sequence[Sequence[str]]) -> str:
    """The first groups as ``a == b`` lines, then how many more (a message stays readable)."""
    listed = "".join("\n  " + " == ".join(group) for group in groups[:_MAX_LISTED])
    more = f"\n  ... and {len(groups) - _MAX_LISTED} more" if len(groups) > _MAX_LISTED else ""
    return listed + more
