"""albumentations pipelines for medical images (uint8 HxWxC in, float CxHxW tensor out).

Augmentation stays mild: lesions are small and their shape and intensity carry the label,
so strong crops, elastic warps or colour jitter could erase or fake the evidence. The
``robust`` preset keeps the same geometry but varies what differs between scanners and
sites (gamma, contrast, local contrast, blur, noise, resolution), so a model learns less of
its source. ``standardize`` replaces the fixed mean/std by each image's own, in training and
evaluation alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from dwskd.data.checks import DataError, require_choice


def per_channel(values: float | Sequence[float], channels: int, option: str) -> tuple[float, ...]:
    """Broadcast a scalar or one-element mean/std to every channel."""
    values = [float(values)] if isinstance(values, int | float) else [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise DataError(
            f"data.{option} has {len(values)} values for {channels} channel(s); "
            f"give one value or {channels}."
        )
    return tuple(values)


class Standardize(A.Normalize):
    """Each image to zero mean and unit std over all its pixels and channels, as float32.

    albumentations' own per-image normalisation (``normalization="image"``: eps 1e-4, values
    clipped to +-20); it returns float64 for uint8 input, which the model would reject.
    Over all channels at once, so the colour balance of an RGB image survives.
    """

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(mean=0.0, std=1.0, normalization="image", p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return super().apply(img, **params).astype(np.float32, copy=False)


def _to_tensor(mean: Sequence[float], std: Sequence[float], standardize: bool) -> list:
    """The end of every pipeline: the fixed mean/std, or per-image standardisation instead."""
    if standardize:
        normalise: A.BasicTransform = Standardize()
    else:
        normalise = A.Normalize(mean=mean, std=std, max_pixel_value=255.0)
    return [normalise, ToTensorV2()]


def _resize(img_size: int) -> A.Resize:
    """Area averaging, as the cached images were made (timm calls it ``box``)."""
    return A.Resize(img_size, img_size, interpolation=cv2.INTER_AREA)


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], standardize: bool = False
) -> A.Compose:
    """Deterministic pipeline for val/test and inference: resize, normalise, to tensor."""
    return A.Compose([_resize(img_size), *_to_tensor(mean, std, standardize)])


def _geometry(hflip: float) -> list:
    """Small shifts, zooms, rotations and the flip: what every preset shares."""
    return [
        A.Affine(
            scale=(0.9, 1.1),
            translate_percent=(-0.05, 0.05),
            rotate=(-10, 10),
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=0.7,
        ),
        A.HorizontalFlip(p=hflip),
    ]


def _default_intensity() -> list:
    """Mild brightness/contrast/gamma: one scanner's day-to-day variation."""
    return [
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        A.RandomGamma(gamma_limit=(85, 115), p=0.3),
    ]


def _robust_intensity() -> list:
    """What differs between scanners and sites: response curve, contrast, processing, noise.

    Every transform works on uint8 HxWx1 and HxWx3 (albumentations 2.0 argument names).
    """
    return [
        A.RandomGamma(gamma_limit=(70, 150), p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.3, p=0.7),
        A.CLAHE(clip_limit=(1.0, 3.0), tile_grid_size=(8, 8), p=0.3),
        A.OneOf(
            [A.GaussianBlur(sigma_limit=(0.3, 1.2), p=1.0), A.MotionBlur(blur_limit=(3, 5), p=1.0)],
            p=0.3,
        ),
        A.Downscale(scale_range=(0.5, 0.9), p=0.25),
        A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
    ]


# data.augment: the intensity part of the training pipeline, by preset name
AUGMENTATIONS: dict[str, Callable[[], list]] = {
    "default": _default_intensity,
    "robust": _robust_intensity,
}


def train_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: float = 0.5,
    augment: str = "default",
    standardize: bool = False,
) -> A.Compose:
    """Training pipeline: resize, mild affine/flip, the ``augment`` preset, normalise."""
    require_choice("augment", augment, AUGMENTATIONS)
    return A.Compose(
        [
            _resize(img_size),
            *_geometry(hflip),
            *AUGMENTATIONS[augment](),
            *_to_tensor(mean, std, standardize),
        ]
    )
