"""Validation splits and training subsets drawn from a training set: stratified, seeded, grouped.

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


def _group_table(
    labels: np.ndarray, groups: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group index per image, majority class per group, images per group).

    ``groups=None`` makes every image its own group.
    """
    groups = list(groups) if groups is not None else [str(i) for i in range(len(labels))]
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    group_ids, group_of = np.unique(np.asarray(groups, dtype=object), return_inverse=True)
    group_class = np.array([_majority_label(labels[group_of == g]) for g in range(len(group_ids))])
    group_size = np.bincount(group_of, minlength=len(group_ids))
    return group_of, group_class, group_size


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
    group_of, group_class, group_size = _group_table(labels, groups)
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


# Seed stream of training subsets, apart from the validation split's (which uses ``seed`` alone).
_SUBSET_STREAM = 1


def check_train_subset(fraction: float, per_class: int | None) -> None:
    """Reject a ``data.train_fraction`` / ``data.train_per_class`` that cannot define a subset."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise DataError(f"data.train_fraction={fraction!r} must be a number in (0, 1].")
    if not 0.0 < fraction <= 1.0:
        raise DataError(
            f"data.train_fraction={fraction} must be in (0, 1] (1.0: the whole train split)."
        )
    if per_class is None:
        return
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise DataError(
            f"data.train_per_class={per_class!r} must be a whole number of images, at least 1 "
            "(null: no limit)."
        )
    if fraction != 1.0:
        raise DataError(
            f"data.train_fraction={fraction} and data.train_per_class={per_class} are both "
            "given; set one of them (leave data.train_fraction=1.0 or data.train_per_class=null)."
        )


def train_subset(
    labels: Sequence[int] | np.ndarray,
    seed: int,
    fraction: float = 1.0,
    per_class: int | None = None,
    groups: Sequence[str] | None = None,
) -> np.ndarray:
    """Sorted indices of a stratified, seeded subset of a train split (for learning curves).

    Each class keeps ``round(fraction * its images)`` (at least 1) or ``per_class`` images.
    Every class has one permutation of its groups drawn from (seed, class) alone and the subset
    takes the shortest prefix that reaches the target, so for one seed every smaller subset
    lies inside every larger one, and per-class and fraction subsets share one order.
    Whole groups move together (a patient is in or out); groups are filed under their majority
    class, so with groups the counts are reached or just passed, not hit exactly.
    """
    check_train_subset(fraction, per_class)
    labels = np.asarray(labels, dtype=np.int64)
    group_of, group_class, group_size = _group_table(labels, groups)
    kept: list[np.ndarray] = []
    for cls in np.unique(group_class):
        members = np.flatnonzero(group_class == cls)
        order = np.random.default_rng([seed, _SUBSET_STREAM, int(cls)]).permutation(members)
        total = int(group_size[members].sum())
        if per_class is None:
            target = max(1, round(fraction * total))
        else:
            target = min(per_class, total)
        taken = int(np.searchsorted(np.cumsum(group_size[order]), target)) + 1
        kept.append(order[:taken])
    return np.flatnonzero(np.isin(group_of, np.concatenate(kept)))
