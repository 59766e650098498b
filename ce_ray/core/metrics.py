"""Inpainting quality over the hole, as the paper reports it (Table 1): L1, L2 and PSNR.

In [0, 1] pixel range: mean L1, mean L2 and PSNR per image, averaged over images. Pure
numpy/torch."""

from __future__ import annotations

import numpy as np
import torch


def hole_errors(
    pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray, holes: torch.Tensor | np.ndarray
) -> dict[str, np.ndarray]:
    """Per-image L1, L2 (mean over hole pixels and channels) and PSNR (dB, peak 1).
    pred/truth: (B, 3, H, W) in [-1, 1]; holes: (B, 1, H, W) in {0, 1}. Returns arrays of shape (B,)."""
    p = (torch.as_tensor(pred, dtype=torch.float64) + 1) / 2
    t = (torch.as_tensor(truth, dtype=torch.float64) + 1) / 2
    h = torch.as_tensor(holes, dtype=torch.float64).expand_as(p)
    n = h.sum(dim=(1, 2, 3)).clamp_min(1)
    d = (p - t) * h
    l1 = d.abs().sum(dim=(1, 2, 3)) / n
    l2 = d.square().sum(dim=(1, 2, 3)) / n
    psnr = 10 * torch.log10(1.0 / l2.clamp_min(1e-10))  # a perfect fill caps at 100 dB
    return {"l1": l1.numpy(), "l2": l2.numpy(), "psnr": psnr.numpy()}


def summarize(errors: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over images: l1 / l2 as fractions (x100 for the paper's %), psnr averaged per image."""
    return {k: float(np.mean(v)) for k, v in errors.items()}
