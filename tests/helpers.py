"""Small helpers the tests share (kept out of the package: no production code uses them)."""

import numpy as np
import torch.nn as nn

from ce_ray.core.model import build_discriminator, build_generator
from ce_ray.core.pixels import to_unit


def random_crops(rgb: np.ndarray, size: int, n: int, rng: np.random.Generator, flip: bool) -> list[np.ndarray]:
    """`n` random `size` crops of one resized photo, each flipped horizontally with p=0.5, as
    (3, size, size) float32 in [-1, 1]."""
    h, w = rgb.shape[:2]
    out = []
    for _ in range(n):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crop = rgb[y : y + size, x : x + size]
        if flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(to_unit(crop))
    return out


def load_models(ckpt) -> tuple[nn.Module, nn.Module]:
    """Fresh G and D with a checkpoint's weights (CPU, train mode)."""
    G, D = build_generator(ckpt.config.model), build_discriminator(ckpt.config.model, ckpt.config.data.fine_size)
    G.load_state_dict(ckpt.G)
    D.load_state_dict(ckpt.D)
    return G, D


# The free-form recipe's generator at test size (full-image variant, residual over the harmonic
# fill, mask input, U-Net skips) with its stroke masks: model and mask sections of a config dict.
TINY_FREEFORM = {
    "model": {
        "bottleneck": 16,
        "ngf": 8,
        "ndf": 8,
        "variant": "full",
        "residual": True,
        "mask_input": True,
        "skips": True,
    },
    "mask": {"kind": "strokes", "fill": "diffusion", "overlap_weight": 0.0},
}
