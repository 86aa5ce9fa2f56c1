"""Validation splits drawn from a training set: stratified, seeded, optionally grouped.

Pure functions on label arrays and file names, so the split is testable without images
and identical for every model and training seed that uses the same data seed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from dwskd.data.checks import DataError


def groups_from_regex(names: Sequence[str], pattern: str | None) -> list[str]:
    """Group id per file name: the regex match (its first group, if it has one).

    Files whose name does not match form a group of their own, so a pattern that misses
    some files never merges unrelated images. ``pattern=None`` makes every file its own group.
    """
    if not pattern:
        return [f"\0{i}" for i in range(len(names))]
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise DataError(
            f"data.group_regex={pattern!r} is not a valid regular expression: {err}"
        ) from err
    groups = []
    for i, name in enumerate(names):
        match = regex.search(name)
        if match is None:
            groups.append(f"\0{i}")
        else:
            groups.append(match.group(1) if regex.groups else match.group(0))
    return groups


def _majority_label(labels: np.ndarray) -> int:
    """The most frequent label (smallest on ties), to file a mixed group under one class."""
    values, counts = np.unique(labels, return_counts=True)
    return int(values[np.argmax(counts)])


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    val_fraction: float,
    seed: int,
    groups: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, val): ~val_fraction of every class goes to val.

    Whole groups move together (one patient's images stay on one side). Groups are filed
    under their majority class, shuffled with ``seed`` and added to val until each class
    reaches its target; every class with at least two groups keeps one on each side.
    The result depends only on (labels, groups, val_fraction, seed), not on input order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive).")
    labels = np.asarray(labels, dtype=np.int64)
    groups = list(groups) if groups is not None else [str(i) for i in range(len(labels))]
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    group_ids, group_of = np.unique(np.asarray(groups, dtype=object), return_inverse=True)
    group_class = np.array([_majority_label(labels[group_of == g]) for g in range(len(group_ids))])
    group_size = np.bincount(group_of, minlength=len(group_ids))
    rng = np.random.default_rng(seed)
    val_groups: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(group_class == cls)
        val_groups += _pick_val_groups(members, group_size, val_fraction, rng)
    is_val = np.isin(group_of, val_groups)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _pick_val_groups(
    members: np.ndarray, group_size: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> list[int]:
    """Shuffled groups of one class, taken until their images reach the class's val target."""
    if len(members) < 2:
        return []
    target = max(1, round(val_fraction * int(group_size[members].sum())))
    chosen: list[int] = []
    count = 0
    for g in rng.permutation(members):
        if count >= target or len(chosen) == len(members) - 1:
            break
        chosen.append(int(g))
        count += int(group_size[g])
    return chosen
