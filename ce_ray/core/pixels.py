"""The model's pixel convention: uint8 RGB (H, W, 3) <-> float (3, H, W) in [-1, 1].

The generator works in [-1, 1] (DCGAN / train.lua); photos are uint8. Pure numpy (torch tensors
are accepted where the docstring says so, without importing torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def to_unit(rgb_crop: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return rgb_crop.transpose(2, 0, 1).astype(np.float32) * (2.0 / 255.0) - 1.0


def to_uint8(chw: np.ndarray | torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] (numpy array or torch tensor, any device) -> (H, W, 3) uint8, rounded.
    Rescaling here is what avoids the "saved too dark" bug of the ports that wrote [-1, 1]
    tensors as images."""
    if hasattr(chw, "detach"):  # a torch tensor; torch itself is not imported here
        chw = chw.detach().float().cpu().numpy()
    a: np.ndarray = np.asarray(chw, dtype=np.float32)
    return np.clip((a.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
