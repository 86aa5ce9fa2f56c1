"""albumentations pipelines for medical images (uint8 HxWxC in, float CxHxW tensor out).

Augmentation stays mild: lesions are small and their shape and intensity carry the label,
so strong crops, elastic warps or colour jitter could erase or fake the evidence.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from dwskd.data.checks import DataError


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


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Deterministic pipeline for val/test: resize, normalise, to tensor."""
    return A.Compose(
        [
            A.Resize(img_size, img_size, interpolation=cv2.INTER_AREA),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )


def train_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], hflip: float = 0.5
) -> A.Compose:
    """Training pipeline: resize, mild affine/flip, brightness/contrast/gamma, normalise."""
    return A.Compose(
        [
            A.Resize(img_size, img_size, interpolation=cv2.INTER_AREA),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                rotate=(-10, 10),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=0.7,
            ),
            A.HorizontalFlip(p=hflip),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            A.RandomGamma(gamma_limit=(85, 115), p=0.3),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
