"""Synthetic slice-like phantoms with lesions: the project's own offline, seeded dataset.

Each image is an elliptical body with textured tissue, darker organ regions, a bright
rim and small bright "vessel" dots, blurred and noisy like a reconstructed slice. The
class is the lesion: none, a round bright nodule, an irregular spiculated mass, or a
ring-enhancing lesion (bright rim, dark core). Lesions are small, low-contrast and vary in
size and place, and the vessel dots mimic small round nodules, so the task is learnable
but not trivial, and rewards models that resolve small shapes and textures.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from dwskd.data.base import BaseDataModule, SplitData
from dwskd.data.checks import DataError

CLASS_NAMES = ("normal", "round_bright", "spiculated", "ring_enhancing")
_LESION_RADIUS = (0.14, 0.27)  # in image half-widths: 4.5-8.6 px at 64 px
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x to the right, y downwards)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(axis, axis)


def _ellipse(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    a: float,
    b: float,
    theta: float,
    edge: float,
) -> np.ndarray:
    """Soft 0..1 mask of a rotated ellipse (edge: blur width in ellipse radii)."""
    c, s = np.cos(theta), np.sin(theta)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    radius = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((radius - 1.0) / edge, -30, 30)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency texture (random grid upsampled bicubically)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _body(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, tuple]:
    """Body outline with tissue texture, a bright rim and two darker organ regions."""
    size = x.shape[0]
    a, b = rng.uniform(0.72, 0.9), rng.uniform(0.58, 0.78)
    cx, cy, theta = rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(-0.2, 0.2)
    body = _ellipse(x, y, cx, cy, a, b, theta, 0.02)
    inner = _ellipse(x, y, cx, cy, a - 0.06, b - 0.06, theta, 0.02)
    tissue = 0.45 + 0.05 * _smooth_noise(rng, size, 6) + 0.03 * _smooth_noise(rng, size, 16)
    image = tissue * inner + 0.7 * (body - inner)
    for side in (-1, 1):
        organ = _ellipse(
            x,
            y,
            cx + side * a * rng.uniform(0.35, 0.5),
            cy + rng.uniform(-0.1, 0.1),
            a * rng.uniform(0.2, 0.3),
            b * rng.uniform(0.4, 0.6),
            rng.uniform(-0.4, 0.4),
            0.08,
        )
        image -= organ * rng.uniform(0.12, 0.22) * inner
    return image, (cx, cy, a, b)


def _dots(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    outline: tuple,
    count: int,
    radius: tuple[float, float],
    contrast: float,
) -> np.ndarray:
    """Small bright round dots inside the body (vessels; decoys for round nodules)."""
    cx, cy, a, b = outline
    out = np.zeros_like(x)
    for _ in range(count):
        r, angle, rho = rng.uniform(*radius), rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform())
        px, py = cx + 0.7 * a * rho * np.cos(angle), cy + 0.7 * b * rho * np.sin(angle)
        out += contrast * rng.uniform(0.6, 1.2) * _ellipse(x, y, px, py, r, r, 0.0, 0.15)
    return out


def _lesion(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    outline: tuple,
    label: int,
    contrast: float,
) -> np.ndarray:
    """Additive intensity of the class's lesion (zero for ``normal``)."""
    if label == 0:
        return np.zeros_like(x)
    cx, cy, a, b = outline
    angle, rho = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform()) * 0.55
    lx, ly = cx + a * rho * np.cos(angle), cy + b * rho * np.sin(angle)
    r0 = rng.uniform(*_LESION_RADIUS)
    dist, phi = np.hypot(x - lx, y - ly), np.arctan2(y - ly, x - lx)
    c = contrast * rng.uniform(0.7, 1.3)
    if label == 1:  # round, homogeneous, smooth edge
        return c * _ellipse(x, y, lx, ly, r0, r0 * rng.uniform(0.85, 1.0), angle, 0.12)
    if label == 2:  # irregular outline with spikes and internal texture
        spikes = rng.integers(5, 10)
        boundary = r0 * (
            0.8
            + 0.2 * np.sin(3 * phi + rng.uniform(0, 6.3))
            + 0.6 * np.maximum(0, np.cos(spikes * phi + rng.uniform(0, 6.3))) ** 6
        )
        mask = 1.0 / (1.0 + np.exp(np.clip((dist - boundary) / (0.1 * r0), -30, 30)))
        return c * mask * (1 + 0.3 * _smooth_noise(rng, x.shape[0], 12))
    outer = _ellipse(x, y, lx, ly, r0, r0, 0.0, 0.1)  # ring-enhancing: bright rim, dark core
    core = _ellipse(x, y, lx, ly, 0.55 * r0, 0.55 * r0, 0.0, 0.15)
    return c * (outer - core) - 0.5 * c * core


def make_phantom(
    rng: np.random.Generator, label: int, size: int, noise: float, contrast: float
) -> np.ndarray:
    """One uint8 (size, size) slice of class ``label``."""
    x, y = _grid(size)
    image, outline = _body(rng, x, y)
    image += _dots(rng, x, y, outline, int(rng.integers(2, 7)), (0.025, 0.06), contrast)
    image += _lesion(rng, x, y, outline, label, contrast) * (image > 0.1)
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=0.5 * size / 64)
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    image += rng.normal(0, noise * rng.uniform(0.7, 1.3), image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def make_split(
    n: int,
    num_classes: int,
    size: int,
    seed: int,
    split: str,
    noise: float = 0.04,
    contrast: float = 0.75,
) -> tuple[np.ndarray, np.ndarray]:
    """(images (n,size,size,1) uint8, labels (n,)): balanced classes in shuffled order.

    Each split has its own seed stream, so changing n_val never changes the train images.
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    images = np.stack([make_phantom(rng, int(lbl), size, noise, contrast) for lbl in labels])
    return images[..., None], labels


class SyntheticDataModule(BaseDataModule):
    """Generated phantoms (see module docstring); deterministic for a given ``seed``."""

    def __init__(
        self,
        name: str = "synthetic",
        n_train: int = 700,
        n_val: int = 250,
        n_test: int = 400,
        num_classes: int = 4,
        noise: float = 0.04,
        contrast: float = 0.75,
        **options: Any,
    ) -> None:
        super().__init__(name=name, **options)
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise DataError(f"data.num_classes={num_classes} must be 2..{len(CLASS_NAMES)}.")
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.n_classes, self.noise, self.contrast = int(num_classes), noise, contrast

    def _load_splits(self) -> tuple[dict[str, SplitData], list[str]]:
        splits = {}
        for split, n in self.sizes.items():
            if n < self.n_classes:
                raise DataError(
                    f"data.n_{split}={n} must be at least num_classes={self.n_classes}."
                )
            images, labels = make_split(
                n, self.n_classes, self.img_size, self.seed, split, self.noise, self.contrast
            )
            if self.channels == 3:
                images = np.repeat(images, 3, axis=-1)
            names = [f"{split}_{i:05d}" for i in range(n)]
            splits[split] = SplitData(images, labels, names)
        return splits, list(CLASS_NAMES[: self.n_classes])
