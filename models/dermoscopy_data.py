"""Image selection and preprocessing for calibration, validation and the
Rust reference tensors.

The preprocessing here is the contract the daemon implements (manifest
[input]): decode to RGB8, stretch to HxW with a bilinear (triangle) filter in
8-bit, then (x * pixel_scale - mean[c]) / std[c], NCHW float32.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CALIBRATION_LESIONS = 200
VALIDATION_LESIONS = 128
CHECK_IMAGES = 8


@dataclass
class Normalization:
    height: int
    width: int
    pixel_scale: float
    mean: np.ndarray
    std: np.ndarray

    def __call__(self, rgb8: Image.Image) -> np.ndarray:
        # Pillow's BILINEAR is a triangle filter, like image-rs FilterType::Triangle.
        # Source images (200x150) are upscaled, so no antialias widening is
        # involved and this also equals TF's bilinear resize used in training.
        resized = rgb8.resize((self.width, self.height), Image.BILINEAR)
        x = np.asarray(resized, dtype=np.float32) * np.float32(self.pixel_scale)
        x = (x - self.mean.astype(np.float32)) / self.std.astype(np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


def load_rgb8(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # grayscale / palette / CMYK -> RGB8


@dataclass
class ImageSplit:
    source: str  # "derm" or "synthetic"
    calibration: list[str]
    validation: list[str]  # different lesions from calibration; first CHECK_IMAGES feed check/


def split_by_lesion(labels_csv: Path) -> ImageSplit:
    """One image per lesion (smallest file name), lesions ordered by a hash of
    lesion_id so the order is deterministic but not grouped by diagnosis.
    Calibration and validation never share a lesion."""
    first_image: dict[str, str] = {}
    with labels_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            lesion, image = row["lesion_id"], row["image"]
            if lesion not in first_image or image < first_image[lesion]:
                first_image[lesion] = image
    lesions = sorted(first_image, key=lambda lesion: hashlib.sha256(lesion.encode()).hexdigest())
    needed = CALIBRATION_LESIONS + VALIDATION_LESIONS
    if len(lesions) < needed:
        raise ValueError(f"{labels_csv}: {len(lesions)} lesions, need {needed}")
    return ImageSplit(
        source="derm",
        calibration=[first_image[l] for l in lesions[:CALIBRATION_LESIONS]],
        validation=[first_image[l] for l in lesions[CALIBRATION_LESIONS:needed]],
    )


def synthetic_split() -> ImageSplit:
    return ImageSplit(
        source="synthetic",
        calibration=[f"synthetic-{i:04d}" for i in range(CALIBRATION_LESIONS)],
        validation=[f"synthetic-{i:04d}" for i in range(CALIBRATION_LESIONS, CALIBRATION_LESIONS + VALIDATION_LESIONS)],
    )


def synthetic_image(name: str, width: int = 200, height: int = 150) -> Image.Image:
    """A smooth skin-toned image with a few dark blobs, seeded by its name, so
    activations look roughly like dermoscopy when no real data is present."""
    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:16], 16))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    skin = np.array([200.0, 150.0, 140.0]) + rng.uniform(-30, 30, 3)
    image = np.broadcast_to(skin, (height, width, 3)).copy()
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        sy, sx = rng.uniform(8, 40), rng.uniform(8, 50)
        weight = np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
        color = rng.uniform([40, 20, 10], [160, 110, 100])
        image += weight[..., None] * (color - image)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


class ImageSource:
    def __init__(self, split: ImageSplit, images_dir: Path | None, normalization: Normalization):
        self.split = split
        self.images_dir = images_dir
        self.normalization = normalization

    def tensor(self, name: str) -> np.ndarray:
        if self.split.source == "synthetic":
            return self.normalization(synthetic_image(name))
        return self.normalization(load_rgb8(self.images_dir / name))

    def batch(self, names: list[str]) -> np.ndarray:
        return np.concatenate([self.tensor(name) for name in names])
