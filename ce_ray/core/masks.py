"""Holes, hole fills and loss weights: centre, random block, random region, strokes and user masks.

Centre (train.lua), random block (paper §3.3), random region (train_random.lua), LaMa's painted
stroke families (strokes.py, not in the paper) and user-supplied mask images (hole_from_image);
the mean-pixel and harmonic fills. Pure numpy/torch; no Ray.

Conventions: a *hole* is a boolean (H, W) array, True where pixels are hidden from the generator
and filled with the dataset's mean pixel. *Weights* multiply the squared (or absolute) error of
the prediction: lambda_rec inside the hole, overlap_weight * lambda_rec on visible context that is
still predicted (the centre ring; the context of full-image variants).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from ce_ray.config import MaskConfig, parse_families
from ce_ray.core.strokes import stroke_hole
from ce_ray.errors import InpaintError, UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image

# torch is imported inside the functions that take tensors: Ray Data's decode workers import
# this module for the numpy hole makers, and importing torch costs each of them ~2 s and ~300 MB.

# train.lua fills the hole with the ImageNet mean pixel (117, 104, 123), mapped to [-1, 1].
MEAN_PIXEL_RGB = (117, 104, 123)
MEAN_PIXEL_FILL = tuple(2.0 * v / 255.0 - 1.0 for v in MEAN_PIXEL_RGB)

# train_random.lua: a 600x600 uniform noise image upscaled bicubically to 10000x10000 and
# thresholded at 0.25; each noise cell spans 10000/600 ~ 16.7 output pixels.
REGION_NOISE_CELLS = 600
REGION_PATTERN_SIZE = 10000
REGION_THRESHOLD = 0.25
REGION_MAX_TRIES = 200


def center_box(size: int) -> tuple[int, int]:
    """(start, stop) of the centre target region: `img[:, :, 32:96, 32:96]` for a 128 crop."""
    return size // 4, size - size // 4


def center_hole(size: int, overlap: int) -> np.ndarray:
    """The filled part of the centre region: its inner square, `overlap` px in from each side."""
    lo, hi = center_box(size)
    hole = np.zeros((size, size), dtype=bool)
    hole[lo + overlap : hi - overlap, lo + overlap : hi - overlap] = True
    return hole


def center_weights(size: int, overlap: int, lambda_rec: float, overlap_weight: float) -> torch.Tensor:
    """(S/2, S/2) loss weights over the predicted centre patch: the visible ring counts
    `overlap_weight` times the filled interior (train.lua's overlapL2Weight). lambda_rec is
    applied here, once, and nowhere else."""
    import torch

    lo, hi = center_box(size)
    n = hi - lo
    w = torch.full((n, n), overlap_weight * lambda_rec)
    w[overlap : n - overlap, overlap : n - overlap] = lambda_rec
    return w


def full_weights(hole: torch.Tensor, lambda_rec: float, overlap_weight: float) -> torch.Tensor:
    """Weights for a full-image prediction: lambda_rec in the hole, overlap_weight * lambda_rec on
    the visible context (train_random.lua with overlap on). `hole`: (..., H, W) bool or {0, 1}."""
    import torch

    h = hole.to(torch.float32)
    return lambda_rec * (h + overlap_weight * (1.0 - h))


def unpack_holes(packed: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S*S/8) uint8 packed bits (crops.pack_holes) -> (B, 1, S, S) float32 in {0, 1}, on the
    packed tensor's device (a few element-wise ops: cheap on a GPU, no host round trip)."""
    import torch

    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)  # high bit first, as np.packbits
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # (B, S*S/8, 8)
    return bits.reshape(packed.shape[0], 1, size, size).float()


FILLS = ("mean", "diffusion")
# A hole shared by a batch gets an exact dense operator (hole pixels x boundary pixels) when it is
# this small: the centre hole's is 3136 x 224. A whole photo's hole would need gigabytes.
SHARED_OPERATOR_MAX_PIXELS = 64 * 64  # MaskConfig.fill: what the generator sees in the hole


def fill_hole(
    images: torch.Tensor, hole: torch.Tensor, kind: str = "mean", *, cycles: int | None = None
) -> torch.Tensor:
    """Replace hole pixels with the fill the generator is trained with: "mean" (train.lua's mean
    pixel) or "diffusion" (`diffusion_fill`, not in the paper). images: (B, 3, H, W) in [-1, 1];
    hole: (H, W) or (B, 1, H, W), bool or {0, 1}. `cycles`: see diffusion_fill. Returns a new
    tensor."""
    import torch

    h = hole.to(device=images.device, dtype=torch.bool)
    if h.dim() == 2:
        h = h[None, None]
    if kind == "diffusion":
        return diffusion_fill(images, h, cycles=cycles)
    if kind != "mean":
        raise UserError(f"unknown hole fill {kind!r}; use one of {', '.join(FILLS)}")
    fill = torch.tensor(MEAN_PIXEL_FILL, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return torch.where(h, fill, images)


def _harmonic_system(hole: np.ndarray) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """The discrete Laplace equation on the hole pixels of one (H, W) bool hole: 5-point stencil,
    known neighbours as boundary values, no flux across the image border. Returns (L, B, inside,
    boundary): L (n, n) sparse, B (n, m) sparse, flat indices of the n hole and m boundary pixels;
    the fill u solves L u = B b for the boundary values b."""
    import scipy.sparse as sp

    h, w = hole.shape
    inside = np.flatnonzero(hole)
    pos = np.full(h * w, -1, dtype=np.int64)
    pos[inside] = np.arange(len(inside))
    ys, xs = np.divmod(inside, w)
    row_parts: list[np.ndarray] = []
    col_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    brow_parts: list[np.ndarray] = []
    bpix_parts: list[np.ndarray] = []
    degree = np.zeros(len(inside))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)  # no neighbour beyond the border
        degree += ok
        q = ny[ok] * w + nx[ok]
        r = np.flatnonzero(ok)
        unknown = pos[q] >= 0
        row_parts.append(r[unknown])
        col_parts.append(pos[q[unknown]])
        val_parts.append(-np.ones(int(unknown.sum())))
        brow_parts.append(r[~unknown])
        bpix_parts.append(q[~unknown])
    rows, cols, vals = np.concatenate(row_parts), np.concatenate(col_parts), np.concatenate(val_parts)
    brows, bpix = np.concatenate(brow_parts), np.concatenate(bpix_parts)
    boundary, bcol = np.unique(bpix, return_inverse=True)
    n = len(inside)
    L = sp.csc_matrix(
        (np.concatenate([degree, vals]), (np.concatenate([np.arange(n), rows]), np.concatenate([np.arange(n), cols]))),
        shape=(n, n),
    )
    B = sp.csc_matrix((np.ones(len(brows)), (brows, bcol)), shape=(n, len(boundary)))
    return L, B, inside, boundary


@functools.lru_cache(maxsize=8)
def _harmonic_operator(hole_bytes: bytes, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inside, boundary, A) with A (n, m) float32 mapping boundary values to the harmonic fill,
    for a hole shared by a whole batch (the centre hole): one sparse factorisation, then each
    batch is a single matrix product. Cached: the centre hole is the same every step."""
    import scipy.sparse.linalg as spl

    hole = np.frombuffer(hole_bytes, dtype=bool).reshape(shape)
    L, B, inside, boundary = _harmonic_system(hole)
    A = spl.splu(L).solve(B.toarray())  # (n, m) dense: 3136 x 224 for the 56x56 centre hole
    return inside, boundary, A.astype(np.float32)


def diffusion_fill(images: torch.Tensor, hole: torch.Tensor, *, cycles: int | None = None) -> torch.Tensor:
    """Harmonic (membrane) inpainting: hole pixels solve Laplace's equation with the pixels around
    the hole as boundary values, the smooth fill that classical diffusion inpainting (Navier-
    Stokes, Telea) approximates. Not in the paper: with `mask.fill=diffusion` the generator sees
    this instead of the mean pixel and only has to learn what diffusion cannot do.
    images: (B, C, H, W); hole: (H, W) or (B, 1, H, W) bool. Pixels outside the hole are returned
    as they are; an image with no known pixel gets the mean-pixel fill.

    A hole shared by the whole batch (the centre hole, given as (H, W), or found equal for every
    image when `cycles` is None) costs one cached exact factorisation, then one (n x m) matrix
    product per batch on the images' device. Different
    holes per image go to the batched multigrid solver on the images' device (harmonic.py):
    solved to within 1/255 of the exact fill, or with exactly `cycles` V-cycles after its
    full-multigrid start when given (the training step: no device-to-host synchronisation)."""
    import torch

    from ce_ray.core.harmonic import harmonic_fill

    h = hole.bool()
    b, c, height, width = images.shape
    if b == 0:
        return images.clone()
    if cycles is None and h.dim() == 4 and h.shape[0] > 1 and bool((h == h[:1]).all()):
        h = h[:1]  # inference: one hole for the whole batch (the centre model's) takes the exact operator
    if h.dim() == 2 or h.shape[0] == 1:
        shared = h.reshape(height, width)
        n = int(shared.sum())
        if n == 0:
            return images.clone()
        if n == shared.numel():
            return _mean_fill_all(images)
        if n <= SHARED_OPERATOR_MAX_PIXELS:
            return _shared_fill(images, shared.cpu().numpy())
        h = shared[None, None].expand(b, 1, height, width)
    out = harmonic_fill(images, h, cycles=cycles)
    empty = h.flatten(1).all(dim=1)  # nothing to diffuse from: the mean pixel, as the mean fill
    return torch.where(empty[:, None, None, None], _mean_fill_all(images), out)


def _mean_fill_all(images: torch.Tensor) -> torch.Tensor:
    import torch

    c = images.shape[1]
    mean = torch.tensor(MEAN_PIXEL_FILL[:c] if c <= 3 else [0.0] * c, dtype=images.dtype, device=images.device)
    return mean.view(1, c, 1, 1).expand_as(images).clone()


def _shared_fill(images: torch.Tensor, hole: np.ndarray) -> torch.Tensor:
    """The exact harmonic fill of one hole shared by the batch: a cached operator, one product."""
    return _shared_operator(np.ascontiguousarray(hole, dtype=bool).tobytes(), hole.shape, str(images.device))(images)


@functools.lru_cache(maxsize=8)
def _shared_operator(hole_bytes: bytes, shape: tuple[int, int], device: str) -> SharedHoleFill:
    return SharedHoleFill(np.frombuffer(hole_bytes, dtype=bool).reshape(shape), device)


class SharedHoleFill:
    """The exact harmonic fill of one (H, W) hole that every image of every batch shares (the
    centre hole), with its operator and index tensors put on `device` once. A call is one gather,
    one (B*C, m) x (m, n) product and one scatter on that device: no host round trip and no
    host-to-device copy per batch, so a GPU step never waits on it. The hole must have between 1
    and SHARED_OPERATOR_MAX_PIXELS hole pixels and at least one known pixel (diffusion_fill
    handles the other cases)."""

    def __init__(self, hole: np.ndarray, device: str | torch.device):
        import torch

        hole = np.asarray(hole, dtype=bool)
        n = int(hole.sum())
        if not 0 < n <= SHARED_OPERATOR_MAX_PIXELS or n == hole.size:
            raise ValueError(f"shared operator: needs 1..{SHARED_OPERATOR_MAX_PIXELS} hole pixels and context, got {n}")
        inside, boundary, A = _harmonic_operator(np.ascontiguousarray(hole).tobytes(), hole.shape)
        self.shape = hole.shape
        self.inside = torch.from_numpy(inside).to(device)  # (n,) flat indices of the hole
        self.boundary = torch.from_numpy(boundary).to(device)  # (m,) flat indices of its known neighbours
        self.A_t = torch.from_numpy(np.ascontiguousarray(A.T)).to(device)  # (m, n)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> a new tensor with the hole holding the harmonic fill."""
        b, c, height, width = images.shape
        out = images.clone()
        flat = out.reshape(b, c, height * width)
        bvals = flat[:, :, self.boundary].float()  # (B, C, m)
        flat[:, :, self.inside] = (bvals @ self.A_t).to(images.dtype)  # (B, C, n)
        return out


def harmonic_fill_exact(images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The reference: each image's harmonic fill from its own sparse LU factorisation on the host
    (scipy). images (B, C, H, W); hole (B, 1, H, W). Slow (a factorisation per image); the tests
    hold the multigrid solver to it, and the "harmonic" baseline uses it."""
    import scipy.sparse.linalg as spl
    import torch

    h_np = hole.bool()[:, 0].cpu().numpy()
    out = images.clone()
    b, c, height, width = images.shape
    flat = out.reshape(b, c, height * width)
    for i in range(b):
        hi = h_np[i]
        if not hi.any():
            continue
        if hi.all():
            flat[i] = _mean_fill_all(images[i : i + 1]).reshape(c, -1)
            continue
        L, B, inside, boundary = _harmonic_system(hi)
        bvals = flat[i, :, torch.from_numpy(boundary).to(images.device)].double().cpu().numpy()  # (C, m)
        u = spl.splu(L).solve(np.ascontiguousarray(B @ bvals.T))  # (n, C)
        flat[i, :, torch.from_numpy(inside).to(images.device)] = torch.from_numpy(u.T).to(images.device, images.dtype)
    return out


def fill_hole_np(images: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """numpy twin of `fill_hole` for data workers: images (B, 3, H, W) float32, hole (B, 1, H, W)."""
    fill = np.asarray(MEAN_PIXEL_FILL, dtype=images.dtype).reshape(1, 3, 1, 1)
    return np.where(hole.astype(bool), fill, images)


def random_block_hole(
    size: int, rng: np.random.Generator, max_coverage: float = 0.25, num_blocks: int = 5
) -> np.ndarray:
    """Paper §3.3: several smaller, possibly overlapping square-ish blocks covering at most
    `max_coverage` of the image. Always at least one block."""
    hole = np.zeros((size, size), dtype=bool)
    budget = max_coverage * size * size
    count = int(rng.integers(1, num_blocks + 1))
    for i in range(count):
        # Sides between 1/8 and 1/3 of the image: "smaller" than the centre block.
        bh = int(rng.integers(size // 8, size // 3 + 1))
        bw = int(rng.integers(size // 8, size // 3 + 1))
        y, x = int(rng.integers(0, size - bh + 1)), int(rng.integers(0, size - bw + 1))
        trial = hole.copy()
        trial[y : y + bh, x : x + bw] = True
        if trial.sum() > budget:
            if i == 0:  # shrink the first block so there is always a hole within the budget
                side = int(np.sqrt(budget))
                trial = hole.copy()
                trial[y : y + min(bh, side), x : x + min(bw, side)] = True
            else:
                break
        hole = trial
    return hole


def _region_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """A `size`x`size` window of the authors' smooth noise pattern, generated locally: the same
    noise-cell scale (10000/600 px per cell) without building the 10000x10000 image."""
    scale = REGION_PATTERN_SIZE / REGION_NOISE_CELLS
    cells = int(np.ceil(size / scale)) + 4  # margin so bicubic edges stay outside the window
    import torch  # random-region masks only: the authors' pattern is a bicubic upscale
    import torch.nn.functional as F

    noise = torch.from_numpy(rng.random((1, 1, cells, cells), dtype=np.float32))
    up = F.interpolate(noise, scale_factor=scale, mode="bicubic", align_corners=False)[0, 0].numpy()
    y = int(rng.integers(0, up.shape[0] - size + 1))
    x = int(rng.integers(0, up.shape[1] - size + 1))
    return up[y : y + size, x : x + size]


def random_region_hole(
    size: int, rng: np.random.Generator, region_min: float = 0.20, region_max: float = 0.30
) -> np.ndarray:
    """train_random.lua: threshold the smooth noise pattern at 0.25 and resample the window until
    20-30 % of it is hidden. After REGION_MAX_TRIES windows, threshold the last window at the
    quantile that hides the middle of the range, so the call always returns in bounded time."""
    for _ in range(REGION_MAX_TRIES):
        field = _region_field(size, rng)
        hole = field < REGION_THRESHOLD
        if region_min <= hole.mean() <= region_max:
            return hole
    hole_at_quantile: np.ndarray = field < np.quantile(field, (region_min + region_max) / 2)
    return hole_at_quantile


def hole_from_image(mask: Image.Image | np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """A user's mask image as an (H, W) bool hole: white = hole. Alpha counts: a pixel's colour is
    composited over black, so transparent pixels are not hole and a mask painted white on a
    transparent layer works. `mask`: a PIL image (any mode), or an (H, W), (H, W, 2) grey + alpha,
    (H, W, 3) or (H, W, 4) array, uint8 or floats in [0, 1]; `size`: the image's (H, W), which it
    must match (InpaintError "mask_size_mismatch" otherwise)."""

    m = np.asarray(mask.convert("RGBA")) if hasattr(mask, "convert") else np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (1, 2, 3, 4):
        colour = m[..., :3].max(axis=-1) if m.shape[-1] >= 3 else m[..., 0]
        alpha = m[..., 3] if m.shape[-1] == 4 else m[..., 1] if m.shape[-1] == 2 else None
    elif m.ndim == 2:
        colour, alpha = m, None
    else:
        raise InpaintError(
            "bad_mask", f"mask must be a 2-D image (grey, grey + alpha, RGB or RGBA), got shape {tuple(m.shape)}"
        )
    if size is not None and tuple(colour.shape) != tuple(size):
        raise InpaintError(
            "mask_size_mismatch",
            f"the mask is {colour.shape[1]}x{colour.shape[0]} but the image is "
            f"{size[1]}x{size[0]}; send a mask of the same size",
        )
    unit = m.dtype != np.uint8 and m.size > 0 and m.max() <= 1  # floats (or bools) in [0, 1], else 0-255
    if alpha is None:
        return colour > (0.5 if unit else 127)
    if unit:
        composited: np.ndarray = colour.astype(np.float64) * alpha > 0.5
        return composited
    # Integer compositing, as 8-bit images are: (colour * alpha) // 255 above mid-grey.
    return (colour.astype(np.uint32) * alpha.astype(np.uint32)) // 255 > 127


PAPER_FREEFORM = ("random_block", "random_region")  # the paper's non-centre holes, usable in a stroke mixture


def make_hole(
    kind: str,
    size: int,
    rng: np.random.Generator,
    *,
    overlap: int = 4,
    max_coverage: float = 0.25,
    num_blocks: int = 5,
    region_min: float = 0.2,
    region_max: float = 0.3,
    families: str = "thin,medium,thick",
) -> np.ndarray:
    """One (size, size) hole of the configured kind (MaskConfig.kind). "strokes": one family drawn
    from the `families` mixture (strokes.parse_mixture), then a hole of that family."""
    if kind == "center":
        return center_hole(size, overlap)
    if kind == "random_block":
        return random_block_hole(size, rng, max_coverage, num_blocks)
    if kind == "random_region":
        return random_region_hole(size, rng, region_min, region_max)
    if kind == "strokes":
        mix = _mixture(families)
        family = list(mix)[int(rng.choice(len(mix), p=list(mix.values())))] if len(mix) > 1 else next(iter(mix))
        if family in PAPER_FREEFORM:
            return make_hole(
                family,
                size,
                rng,
                max_coverage=max_coverage,
                num_blocks=num_blocks,
                region_min=region_min,
                region_max=region_max,
            )
        return stroke_hole(family, size, size, rng)
    raise UserError(f"unknown mask kind {kind!r}; use center, random_block, random_region or strokes")


@functools.lru_cache(maxsize=32)
def _mixture(families: str) -> dict[str, float]:
    try:
        return parse_families(families)
    except ValueError as e:
        raise UserError(f"mask.families: {e}") from None


def holes_for(mask_cfg: MaskConfig, size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 1, size, size) float32 holes for a batch, from a `MaskConfig`."""
    if mask_cfg.kind == "center":  # identical for every image: build once
        return np.broadcast_to(center_hole(size, mask_cfg.overlap), (n, 1, size, size)).astype(np.float32)
    out = np.empty((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        out[i, 0] = make_hole(
            mask_cfg.kind,
            size,
            rng,
            overlap=mask_cfg.overlap,
            max_coverage=mask_cfg.max_coverage,
            num_blocks=mask_cfg.num_blocks,
            region_min=mask_cfg.region_min,
            region_max=mask_cfg.region_max,
            families=mask_cfg.families,
        )
    return out
