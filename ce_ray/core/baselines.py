"""Classical inpainting baselines (mean fill, OpenCV, biharmonic, harmonic) on the model's batch API.

Mean-pixel fill (what the paper's generator sees in the hole), OpenCV Telea and Navier-Stokes,
scikit-image biharmonic, and the exact harmonic fill (what `mask.fill=diffusion` feeds the
generator). The paper's own comparison (Table 1) is in docs/paper.md, "Results to compare against".
Pure numpy/OpenCV/scikit-image; no Ray.

`run_baseline(name, images, holes)` takes the same (B, 3, H, W) [-1, 1] tiles and (B, 1, H, W)
holes as `step.predict` and, like it, changes only pixels inside the hole. Every baseline is given
the tile with its hole already mean-filled, so the true hole pixels can never leak into a fill.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ce_ray.core.masks import SHARED_OPERATOR_MAX_PIXELS, diffusion_fill, fill_hole_np, harmonic_fill_exact
from ce_ray.core.pixels import to_uint8
from ce_ray.errors import UserError

# cv2.inpaint's `inpaintRadius`: the neighbourhood (px) each hole pixel is estimated from.
# Measured on the bundled val split (22 centre-hole tiles), Telea at radius 3 / 5 / 10: PSNR
# 21.44 / 21.71 / 21.96 dB, L1 8.65 / 8.66 / 8.72 %; Navier-Stokes moves < 0.15 dB. 5 sits between
# OpenCV's tutorial value (3) and the blurrier large radii; no choice moves a baseline by 0.5 dB.
OPENCV_RADIUS = 5

# Order of columns in reports and grids: cheapest to most elaborate.
BASELINES: tuple[str, ...] = ("mean_fill", "telea", "navier_stokes", "biharmonic", "harmonic")
LABELS: dict[str, str] = {
    "mean_fill": "Mean-pixel fill",
    "telea": f"OpenCV Telea (radius {OPENCV_RADIUS})",
    "navier_stokes": f"OpenCV Navier-Stokes (radius {OPENCV_RADIUS})",
    "biharmonic": "scikit-image biharmonic",
    "harmonic": "Harmonic fill (exact Laplace)",
}
SETTINGS: dict[str, str] = {
    "mean_fill": "hole = ImageNet mean pixel (117, 104, 123), masks.MEAN_PIXEL_FILL",
    "telea": f"cv2.inpaint(uint8 RGB, hole, inpaintRadius={OPENCV_RADIUS}, flags=cv2.INPAINT_TELEA)",
    "navier_stokes": f"cv2.inpaint(uint8 RGB, hole, inpaintRadius={OPENCV_RADIUS}, flags=cv2.INPAINT_NS)",
    "biharmonic": "skimage.restoration.inpaint_biharmonic(float64 RGB in [0, 1], hole, channel_axis=-1)",
    "harmonic": "masks.harmonic_fill_exact: the exact solution of Laplace's equation in the hole "
    "(5-point stencil, sparse LU), what a model trained with mask.fill=diffusion starts from",
}


def _opencv(flag_name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def fill(chw: np.ndarray, hole: np.ndarray) -> np.ndarray:
        import cv2  # lazy: only evaluation needs OpenCV

        # 8-bit in, 8-bit out: the <= 0.5/255 rounding is far below any method's error, and
        # context pixels are pasted back from the float input anyway.
        out = cv2.inpaint(
            np.ascontiguousarray(to_uint8(chw)), hole.astype(np.uint8), OPENCV_RADIUS, getattr(cv2, flag_name)
        )
        return out.transpose(2, 0, 1).astype(np.float32) * (2.0 / 255.0) - 1.0

    return fill


def _biharmonic(chw: np.ndarray, hole: np.ndarray) -> np.ndarray:
    from skimage.restoration import inpaint_biharmonic  # lazy: heavy import

    # A 128x128 tile keeps the sparse solve small (~25 ms for the 56x56 centre hole on one core):
    # evaluation runs it per tile, never on a whole photo.
    # (H, W, 3) in [0, 1]; the Cython solver needs C-contiguous arrays (a transpose is not).
    img = np.ascontiguousarray((chw.transpose(1, 2, 0).astype(np.float64) + 1.0) / 2.0)
    # The biharmonic solution can overshoot [0, 1] next to strong edges; clip as any saved image is.
    out: np.ndarray = np.clip(inpaint_biharmonic(img, np.ascontiguousarray(hole), channel_axis=-1), 0.0, 1.0)
    return (out.transpose(2, 0, 1) * 2.0 - 1.0).astype(np.float32)


_PER_TILE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "telea": _opencv("INPAINT_TELEA"),
    "navier_stokes": _opencv("INPAINT_NS"),
    "biharmonic": _biharmonic,
}


def run_baseline(
    name: str, images: torch.Tensor | np.ndarray, holes: torch.Tensor | np.ndarray
) -> torch.Tensor | np.ndarray:
    """Inpaint a batch with a classical method. images: (B, 3, H, W) in [-1, 1]; holes: (B, 1, H, W)
    in {0, 1} (or bool). Returns (B, 3, H, W) float32 in [-1, 1], equal to `images` outside the
    hole; a torch.Tensor for a tensor input, else a numpy array."""
    if name not in BASELINES:
        raise UserError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    as_tensor = isinstance(images, torch.Tensor)
    x = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
    h = np.asarray(holes.detach().cpu() if isinstance(holes, torch.Tensor) else holes).astype(bool)
    if x.ndim != 4 or x.shape[1] != 3:
        raise UserError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
    if h.shape != (x.shape[0], 1, *x.shape[2:]):
        raise UserError(f"holes must be (B, 1, H, W) = {(x.shape[0], 1, *x.shape[2:])}, got {tuple(h.shape)}")
    filled = fill_hole_np(x, h)  # (B, 3, H, W): the truth inside the hole is gone from here on
    out = filled.copy()
    if name == "harmonic":  # the exact fill: one cached operator for a hole shared by the batch, else one LU per image
        shared = len(h) > 1 and bool((h == h[:1]).all()) or len(h) == 1 and int(h.sum()) <= SHARED_OPERATOR_MAX_PIXELS
        fill = diffusion_fill if shared else harmonic_fill_exact
        out = fill(torch.from_numpy(filled), torch.from_numpy(h)).numpy()
    elif name != "mean_fill":
        tile_fill = _PER_TILE[name]
        for i in range(len(x)):
            hole = h[i, 0]
            # No hole: nothing to do. No context at all: nothing to diffuse from, keep the mean fill.
            if hole.any() and not hole.all():
                out[i] = tile_fill(filled[i], hole)
    out = np.where(h, out, x).astype(np.float32)
    return torch.from_numpy(out) if as_tensor else out


# Context pixels around a hole's bounding box that a classical method sees when it fills a whole
# photo (the web page's comparison): OpenCV's methods look OPENCV_RADIUS px out; diffusion needs
# only the ring next to the hole; the margin keeps every method's fill local and its cost bounded.
IMAGE_MARGIN = 16
CLASSICAL = ("telea", "navier_stokes", "biharmonic", "harmonic")


def inpaint_image(name: str, rgb: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Fill `hole` ((H, W) bool) of an (H, W, 3) uint8 photo with a classical method, for
    comparison with the model on a user's own photo. Each connected group of the hole is filled
    on its bounding box plus IMAGE_MARGIN px of context; every pixel outside the hole is returned
    bit-identical."""
    from scipy import ndimage

    if name not in CLASSICAL:
        raise UserError(f"unknown method {name!r}; classical methods are {', '.join(CLASSICAL)}")
    out = rgb.copy()
    h, w = hole.shape
    labels, n = ndimage.label(hole)
    for g, box in enumerate(ndimage.find_objects(labels), start=1):
        y0, y1 = max(0, box[0].start - IMAGE_MARGIN), min(h, box[0].stop + IMAGE_MARGIN)
        x0, x1 = max(0, box[1].start - IMAGE_MARGIN), min(w, box[1].stop + IMAGE_MARGIN)
        sub_hole = hole[y0:y1, x0:x1]
        chw = (out[y0:y1, x0:x1].transpose(2, 0, 1).astype(np.float32) * (2.0 / 255.0) - 1.0)[None]
        filled = run_baseline(name, chw, sub_hole[None, None])[0]  # (3, h, w) in [-1, 1], context unchanged
        patch = to_uint8(filled)
        # Only this group's pixels: pieces of other groups cut by the box edge were filled with the
        # edge as a border, and must not overwrite their own group's fill.
        mine = labels[y0:y1, x0:x1] == g
        region = out[y0:y1, x0:x1]
        region[mine] = patch[mine]
    return out
