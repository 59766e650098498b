"""Picture grids (masked input | output | truth) as PNG, for training's evals and `ce-ray evaluate`.

What training logs at every evaluation and `ce-ray evaluate` writes per method. Values are
rescaled from [-1, 1] to [0, 255] before saving (crops.to_uint8): the ports that skipped this
wrote images "too dark"."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ce_ray.core.masks import fill_hole
from ce_ray.core.pixels import to_uint8
from ce_ray.data.images import encode_png
from ce_ray.fsutil import write_atomic

GAP = 2  # px of white between tiles


def grid(columns: list[torch.Tensor]) -> np.ndarray:
    """Rows = images, columns = the given (B, 3, H, W) batches side by side. -> (H', W', 3) uint8."""
    b, _, h, w = columns[0].shape
    out = np.full((b * (h + GAP) - GAP, len(columns) * (w + GAP) - GAP, 3), 255, np.uint8)
    for j, col in enumerate(columns):
        for i in range(b):
            out[i * (h + GAP) : i * (h + GAP) + h, j * (w + GAP) : j * (w + GAP) + w] = to_uint8(col[i])
    return out


def save_png(rgb: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write an (H, W, 3) uint8 image as PNG, atomically (fsutil.write_atomic)."""
    return write_atomic(path, encode_png(rgb))


def inpainting_grid(images: torch.Tensor, holes: torch.Tensor, outputs: torch.Tensor) -> np.ndarray:
    """masked input | output | truth, one row per image."""
    return grid([fill_hole(images, holes), outputs, images])
