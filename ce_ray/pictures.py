"""Picture grids (masked input | output | truth), written as PNG. Values are rescaled from [-1, 1]
to [0, 255] before saving: the ports that skipped this wrote images "too dark"."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ce_ray.masks import fill_hole

GAP = 2  # px of white between tiles


def to_uint8_hwc(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    a = np.asarray(torch.as_tensor(x, dtype=torch.float32).detach().cpu())
    return np.clip((a.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def grid(columns: list[torch.Tensor]) -> np.ndarray:
    """Rows = images, columns = the given (B, 3, H, W) batches side by side. -> (H', W', 3) uint8."""
    b, _, h, w = columns[0].shape
    out = np.full((b * (h + GAP) - GAP, len(columns) * (w + GAP) - GAP, 3), 255, np.uint8)
    for j, col in enumerate(columns):
        for i in range(b):
            out[i * (h + GAP) : i * (h + GAP) + h, j * (w + GAP) : j * (w + GAP) + w] = to_uint8_hwc(col[i])
    return out


def save_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(rgb).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def inpainting_grid(images: torch.Tensor, holes: torch.Tensor, outputs: torch.Tensor) -> np.ndarray:
    """masked input | output | truth, one row per image."""
    return grid([fill_hole(images, holes), outputs, images])
