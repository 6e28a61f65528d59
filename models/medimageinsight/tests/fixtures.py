"""Shared fixtures for A2's tests: tiny configurations, random weights and a
throwaway dermoscopy folder, so every test runs its claim without the real
data (and without a checkpoint file)."""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import davit_config  # noqa: E402
from dermoscopy_data import CALIBRATION_LESIONS, VALIDATION_LESIONS, split_by_lesion, synthetic_image  # noqa: E402

# 64x64 input: grids 16/8/4/2, all below or off a multiple of the window 5,
# so every stage pads; widths small enough for a forward in milliseconds.
TINY = replace(davit_config.CI, image_size=64, dims=(32, 64, 64, 96), heads=(1, 2, 2, 3),
               groups=(1, 2, 2, 3), window=5, projection_dim=16)


def random_weights(cfg, seed: int = 0, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Every expected key; unlike the published initialisation, norms and
    biases are random too, so a graph that drops or swaps one of them shows."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in davit_config.expected_shapes(cfg).items():
        if key.endswith("norm.weight") or key.endswith("norms.weight"):
            out[key] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return out


def published_init_weights(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """The published initialisation, as the random checkpoints hold it."""
    import checkpoint

    return {key: checkpoint.random_tensor(key, shape, seed)
            for key, shape in davit_config.expected_shapes(cfg).items()}


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def fake_derm(root: Path) -> Path:
    """labels.csv with enough lesions for split_by_lesion and synthetic JPEGs
    (200x150, the real data's size) for the lesions a build can read."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    lesions = CALIBRATION_LESIONS + VALIDATION_LESIONS
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "lesion_id", "dx_type", "age", "sex", "anatom_site"])
        for i in range(lesions):
            writer.writerow([f"FAKE_{i:04d}.jpg", "nv", f"LES_{i:04d}", "histo", 50, "female", "back"])
    split = split_by_lesion(root / "labels.csv")
    for name in split.calibration[:16] + split.validation[:16]:
        synthetic_image(name).save(root / "images" / name, quality=95)
    return root
