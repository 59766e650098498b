"""The window planner: a photo of any size with any hole, through a generator trained on 128x128 crops.

The window strategy for a generator trained on 128x128 crops (Pathak et al. 2016 §3; train.lua /
train_random.lua's data path), shared by `ce-ray inpaint` and `ce-ray serve`. Pure
numpy/PIL/torch; no Ray.

Strategy
--------
1. Scale. The model saw 128x128 crops of photos resized to a shorter side of `data.load_size`
   (350). A photo is therefore processed at that scale: a window of `L0 = 128 * min(H, W) / 350`
   image pixels is resampled to 128x128. Images whose shorter side is already <= 350 are never
   upscaled (L0 = 128): upscaling invents no detail, and a 128x128 input is then exactly a
   training crop.
2. Windows. The centre model fills only the 56x56 interior of its window (`[36:92]`; 64 - 2 *
   mask.overlap), with everything around it as context. The hole is split into groups (connected
   components, with specks closer than 8 model pixels joined) and each group gets a window whose
   interior contains the group's bounding box, centred on it. A group too large for that interior
   at the training scale gets a larger window, i.e. it is filled at a coarser scale (up to
   MAX_DOWNSCALE = 2x: holes up to 112x112 pixels at the training scale fill in one window).
   Larger groups are tiled with windows at 2x, each filling one cell of the group's bounding box.
   The full-image variant uses the same windows (56x56 cells: ~19 % of a window, inside the 20-30 %
   hole coverage it was trained on).
3. Order and batching. Windows run in rounds. Each round takes the pending windows with the
   fewest still-unfilled hole pixels in their context first (the hole's border before its middle:
   the onion order), as long as no two chosen windows touch each other's cells. Unfilled pixels in a
   window's context are mean-filled like the hole itself; filled ones are context for later rounds.
   All windows of a round, from every image being served, go through the generator as one batch.
4. Paste back. The prediction is resampled to image pixels and copied into the hole only: every
   pixel outside the hole is returned bit-identical. Windows that run past the image's edge see a
   mirror image of it there.

Limits (each raises a UserError naming it): the hole may cover at most MAX_HOLE_FRACTION (50 %) of
the image; an image needs MIN_SIDE (16) pixels a side; one image needs at most MAX_WINDOWS (256)
windows. Tiled holes (more than 112 pixels across at the training scale) have no window that sees
all of their context, so their middles are filled from earlier predictions and get blurrier; the
model never saw holes like that, and the result says so by looking like it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from ce_ray.config import Config
from ce_ray.core.masks import center_box
from ce_ray.core.pixels import to_uint8, to_unit
from ce_ray.core.step import predict
from ce_ray.errors import InpaintError
from ce_ray.infer.resolve import LoadedGenerator

MAX_DOWNSCALE = 2.0  # a hole may be filled at up to 2x coarser than the training scale in one window
MAX_HOLE_FRACTION = 0.5  # beyond this there is too little context left to inpaint from
MAX_WINDOWS = 256  # per image: bounds the work one request can cause
MIN_SIDE = 16  # px; smaller images have no usable context
MERGE_GAP = 8  # model px: hole specks closer than this share one window
FORWARD_CHUNK = 32  # windows per generator forward (bounds memory when many requests batch)
FULL_CELL = 56  # model px: the cell a full-image model fills per window (same as the centre interior)


# --- Geometry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What a checkpoint's config says about its windows (all in model pixels)."""

    size: int  # the window: data.fine_size (128)
    load_size: int  # the shorter side photos were resized to in training (350)
    interior: tuple[int, int]  # (lo, hi): the square each window fills, [36, 92) for the centre model
    variant: str

    @classmethod
    def of(cls, cfg: Config) -> Geometry:
        s = cfg.data.fine_size
        if cfg.model.variant == "center":
            lo, hi = center_box(s)
            interior = (lo + cfg.mask.overlap, hi - cfg.mask.overlap)
        else:
            interior = ((s - FULL_CELL) // 2, (s + FULL_CELL) // 2)
        return cls(size=s, load_size=cfg.data.load_size, interior=interior, variant=cfg.model.variant)

    def base_side(self, h: int, w: int) -> float:
        """L0: image pixels per window at the training scale (never smaller than the window)."""
        return self.size * max(1.0, min(h, w) / self.load_size)

    @property
    def cell_fraction(self) -> float:
        return (self.interior[1] - self.interior[0]) / self.size


def default_hole(h: int, w: int, geo: Geometry) -> np.ndarray:
    """The centre region: the interior of one training-scale window centred on the image
    (exactly `[36:92, 36:92]` of a 128x128 image)."""
    side = geo.base_side(h, w)
    c = side * geo.cell_fraction
    y0, x0 = round(h / 2 - c / 2), round(w / 2 - c / 2)
    y1, x1 = round(h / 2 + c / 2), round(w / 2 + c / 2)
    hole = np.zeros((h, w), dtype=bool)
    hole[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)] = True
    return hole


@dataclass(frozen=True)
class Window:
    top: int  # the window's side x side box in image pixels; may run past the image's edges
    left: int
    side: int
    cell: tuple[int, int, int, int]  # (y0, y1, x0, x1): it writes the pixels of `group` in here
    group: int
    count: int  # how many pixels it writes


def _place(lo: int, hi: int, side: int, geo: Geometry) -> int | None:
    """The window start that puts [lo, hi) inside its interior, as centred as possible; None if
    no integer start does."""
    a, b = geo.interior[0] * side / geo.size, geo.interior[1] * side / geo.size
    first, last = math.ceil(hi - b - 1e-9), math.floor(lo - a + 1e-9)
    if first > last:
        return None
    return min(max(round((lo + hi) / 2 - side / 2), first), last)


def _window_for(cell: tuple[int, int, int, int], min_side: float, geo: Geometry) -> tuple[int, int, int]:
    """(top, left, side): the smallest window >= min_side whose interior holds the cell."""
    y0, y1, x0, x1 = cell
    side = max(round(min_side), math.ceil(max(y1 - y0, x1 - x0) / geo.cell_fraction))
    while True:
        top, left = _place(y0, y1, side, geo), _place(x0, x1, side, geo)
        if top is not None and left is not None:
            return top, left, side
        side += 1  # rounding left no integer position: one pixel more always fits eventually


def _split(lo: int, hi: int, max_len: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil((hi - lo) / max_len))
    edges = [lo + round(k * (hi - lo) / n) for k in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


# --- One image's plan ----------------------------------------------------------------------------


class Plan:
    """The windows that fill one image's hole and the state between rounds. `inpaint_many` runs
    several plans together so every round of every image is one batch."""

    def __init__(self, rgb: np.ndarray, hole: np.ndarray, geo: Geometry):
        self.rgb, self.hole, self.geo = rgb, hole, geo
        self.current = rgb.copy()  # (H, W, 3) uint8: filled pixels land here
        self.unfilled = hole.copy()  # (H, W) bool: hole pixels no window has written yet
        h, w = hole.shape
        base = geo.base_side(h, w)
        # Group the hole: components of the hole dilated by MERGE_GAP model px, restricted to the hole.
        gap = max(1, round(MERGE_GAP * base / geo.size))
        near = ndimage.maximum_filter(hole, size=2 * gap + 1) if gap > 1 else hole  # square dilation, separable: O(HW)
        labels, _ = ndimage.label(near, structure=np.ones((3, 3), bool))
        self.groups = np.where(hole, labels, 0).astype(np.int32)  # (H, W): group id of each hole pixel
        self.windows: list[Window] = []
        max_side = base * MAX_DOWNSCALE
        for g, sl in enumerate(ndimage.find_objects(self.groups), start=1):
            if sl is None:
                continue
            box = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
            top, left, side = _window_for(box, base, geo)
            if side <= max_side:
                cells = [box]
            else:
                # Tile. Cells as wide as the group's narrow side, between the training-scale cell
                # and the largest window's (a thin stroke keeps full resolution; a blob gets the
                # coarsest, most coherent windows). 1 px margin so a window position always fits.
                narrow = min(box[1] - box[0], box[3] - box[2])
                cell = min(
                    max(narrow, math.floor(base * geo.cell_fraction)), math.floor(max_side * geo.cell_fraction) - 1
                )
                cells = [(a, b, c, d) for a, b in _split(box[0], box[1], cell) for c, d in _split(box[2], box[3], cell)]
            for cell_box in cells:
                y0, y1, x0, x1 = cell_box
                count = int((self.groups[y0:y1, x0:x1] == g).sum())
                if count == 0:
                    continue  # a tile of the bounding box that misses the hole
                top, left, side = _window_for(cell_box, base, geo)
                self.windows.append(Window(top, left, side, cell_box, g, count))
            if len(self.windows) > MAX_WINDOWS:
                break
        if len(self.windows) > MAX_WINDOWS:
            raise InpaintError(
                "mask_too_complex",
                f"this mask needs more than {MAX_WINDOWS} model windows (many scattered holes, or very large ones); "
                "paint fewer, larger holes",
            )
        self.pending = set(range(len(self.windows)))

    @property
    def done(self) -> bool:
        return not self.pending

    def next_round(self) -> list[int]:
        """Windows to run now: fewest unfilled context pixels first, no two touching each other's cells."""
        h, w = self.unfilled.shape

        def unfilled_in(win: Window) -> int:  # count_nonzero on bools: ~1 GB/s, cheaper than an integral image
            box = self.unfilled[
                max(0, win.top) : min(h, win.top + win.side), max(0, win.left) : min(w, win.left + win.side)
            ]
            return int(np.count_nonzero(box)) - win.count

        order = sorted(self.pending, key=lambda i: (unfilled_in(self.windows[i]), i))
        chosen: list[int] = []
        for i in order:
            if all(not _touches(self.windows[i], self.windows[j]) for j in chosen):
                chosen.append(i)
        return chosen

    def window_input(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """((3, S, S) float32 in [-1, 1], (1, S, S) float32 hole) for window i."""
        win, S = self.windows[i], self.geo.size
        rgb = _crop(self.current, win)
        unfilled = _crop(self.unfilled, win).astype(np.uint8) * 255
        if win.side != S:
            rgb = np.asarray(Image.fromarray(rgb).resize((S, S), Image.Resampling.BICUBIC))
            # Any unfilled pixel under a model pixel makes it unknown (conservative).
            unfilled = np.asarray(Image.fromarray(unfilled).resize((S, S), Image.Resampling.BILINEAR))
        hole = unfilled > 0
        if self.geo.variant == "center":  # the centre model always sees its whole interior filled, as in training
            lo, hi = self.geo.interior
            hole[lo:hi, lo:hi] = True
        return to_unit(rgb), hole[None].astype(np.float32)

    def paste(self, i: int, out: np.ndarray) -> None:
        """Copy window i's prediction ((3, S, S) in [-1, 1]) into its cell's hole pixels."""
        win, S = self.windows[i], self.geo.size
        y0, y1, x0, x1 = win.cell
        pred = to_uint8(out)  # (S, S, 3)
        if win.side == S:
            patch = pred[y0 - win.top : y1 - win.top, x0 - win.left : x1 - win.left]
        else:  # resample just the cell: PIL maps the source box with pixel-area semantics
            k = S / win.side
            box = ((x0 - win.left) * k, (y0 - win.top) * k, (x1 - win.left) * k, (y1 - win.top) * k)
            patch = np.asarray(Image.fromarray(pred).resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC, box=box))
        mine = self.groups[y0:y1, x0:x1] == win.group
        region = self.current[y0:y1, x0:x1]
        region[mine] = patch[mine]
        self.unfilled[y0:y1, x0:x1][mine] = False
        self.pending.discard(i)

    def result(self) -> np.ndarray:
        # By construction only hole pixels were written; keep that a guarantee, not a hope.
        return np.where(self.hole[..., None], self.current, self.rgb)


def _touches(a: Window, b: Window) -> bool:
    """Whether one window's cell lies in the other's view (they must then run in different rounds)."""

    def overlap(cell: tuple[int, int, int, int], win: Window) -> bool:
        y0, y1, x0, x1 = cell
        return y0 < win.top + win.side and win.top < y1 and x0 < win.left + win.side and win.left < x1

    return overlap(a.cell, b) or overlap(b.cell, a)


def _crop(img: np.ndarray, win: Window) -> np.ndarray:
    """The window's box of `img`, mirrored at the image's edges where it runs past them."""
    h, w = img.shape[:2]
    t, left, s = win.top, win.left, win.side
    y0, y1, x0, x1 = max(0, t), min(h, t + s), max(0, left), min(w, left + s)
    if y0 >= y1 or x0 >= x1:  # entirely outside (cannot happen: the cell is inside the image)
        raise AssertionError(f"window {win} misses the {w}x{h} image")
    part = img[y0:y1, x0:x1]
    pads = ((y0 - t, t + s - y1), (x0 - left, left + s - x1)) + ((0, 0),) * (img.ndim - 2)
    if any(p for pair in pads for p in pair):
        part = np.pad(part, pads, mode="symmetric")
    return part


# --- A full-image model's plan --------------------------------------------------------------------

WINDOW_STRIDE = 2  # full-image windows overlap by half: each pixel's correction blends 4 windows
FULL_RADIUS_QUANTILE = 90  # percentile of the training holes' widest point that sets a photo's scale
FULL_RADIUS_SAMPLES = 256  # training holes drawn (seeded) to measure it


@functools.lru_cache(maxsize=16)
def trained_hole_radius(mask_key: str, size: int) -> float:
    """How wide a hole the model learnt to fill, in model pixels: the FULL_RADIUS_QUANTILE
    percentile, over a seeded sample of its training holes, of each hole's largest inscribed radius
    (the distance transform's maximum). `mask_key`: the MaskConfig as JSON (a cache key); `size`:
    the training crop (data.fine_size)."""
    import json

    from ce_ray.config import MaskConfig
    from ce_ray.core.masks import holes_for

    m = MaskConfig(**json.loads(mask_key))
    holes = holes_for(m, size, FULL_RADIUS_SAMPLES, np.random.default_rng(0))
    radii = [float(ndimage.distance_transform_edt(h[0] > 0).max()) for h in holes]
    return float(np.percentile(radii, FULL_RADIUS_QUANTILE))


def full_scale(h: int, w: int, hole: np.ndarray, cfg: Config) -> float:
    """The scale a full-image model runs a photo at (1 = the photo's own pixels). The largest
    scale, never above 1 (no upscaling) nor above the largest photo size the model was trained at
    (data.load_size x (1 + data.scale_jitter), shorter side), at which the hole's widest point is no
    wider than the holes it learnt; never so small that the shorter side drops below a window."""
    d = cfg.data
    short = min(h, w)
    s_hi = min(1.0, d.load_size * (1 + d.scale_jitter) / short)
    s_lo = min(1.0, d.fine_size / short)
    radius = float(ndimage.distance_transform_edt(hole).max())
    trained = trained_hole_radius(json.dumps(dataclasses.asdict(cfg.mask), sort_keys=True), d.fine_size)
    s = s_hi if radius <= 0 else min(s_hi, trained / radius)
    return max(s_lo, min(s_hi, s))


def _tent(n: int) -> np.ndarray:
    """Blend weights across a window: highest in the middle, small but > 0 at the edges, so
    windows overlapping by half sum to a smooth, seamless weight."""
    i = np.arange(n, dtype=np.float32)
    return np.minimum(i + 1, n - i) / (n / 2)


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [(length - size) // 2]  # one window, centred; the mirror pad fills its edges
    out = list(range(0, length - size, stride))
    return out + [length - size]


class FullPlan:
    """How a full-image model (model.variant=full) fills one photo: every known pixel stays known
    and visible to the network; the model corrects a smooth fill of the actual hole.

    1. Fill. The hole is filled at the photo's own resolution as in training (mask.fill: the
       harmonic fill, solved on the hole's bounding box plus a 1-px ring of known pixels, which is
       exact: the fill depends only on the pixels next to the hole).
    2. Scale (full_scale). The photo and its filled hole are resampled to that scale; the hole
       there covers every model pixel any hole pixel touches.
    3. Windows. S x S windows at stride S/2 over the resampled photo, those holding any hole
       pixel; all run in one batch (no window depends on another: each sees the fill, not another
       window's output).
    4. Correction. Each window's output minus its input is the model's correction at its hole
       pixels; corrections are blended across overlapping windows with tent weights (no seams),
       resampled to the photo's resolution (normalised: no fading at the hole's edge) and added
       to the full-resolution fill inside the hole only. At scale 1
       this is exactly the model's output; below 1 the fill keeps its full-resolution detail at
       the hole's edge and the model adds what it learnt at its own scale. Every pixel outside
       the hole is returned bit-identical.
    """

    def __init__(self, rgb: np.ndarray, hole: np.ndarray, cfg: Config):
        self.rgb, self.hole, self.cfg = rgb, hole, cfg
        S = cfg.data.fine_size
        H, W = hole.shape
        self.filled = _fill_full(rgb, hole, cfg)  # (H, W, 3) float32 in [-1, 1]
        self.scale = full_scale(H, W, hole, cfg)
        h, w = max(1, round(H * self.scale)), max(1, round(W * self.scale))
        self.size = (h, w)
        x = torch.from_numpy(self.filled.transpose(2, 0, 1))[None]
        m = torch.from_numpy(hole.astype(np.float32))[None, None]
        if (h, w) != (H, W):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            m = F.interpolate(m, size=(h, w), mode="area")
        self.small = x[0].numpy().transpose(1, 2, 0)  # (h, w, 3) the filled photo at the model's scale
        self.small_hole = m[0, 0].numpy() > 0  # any hole pixel under a model pixel makes it a hole
        step = S // WINDOW_STRIDE
        self.windows = [
            Window(t, left, S, (0, 0, 0, 0), 0, 0)
            for t in _starts(h, S, step)
            for left in _starts(w, S, step)
            if self.small_hole[max(0, t) : t + S, max(0, left) : left + S].any()
        ]
        if len(self.windows) > MAX_WINDOWS:
            raise InpaintError(
                "mask_too_complex", f"this mask needs more than {MAX_WINDOWS} model windows; paint a smaller area"
            )
        wt = _tent(S)
        self.weight = np.outer(wt, wt)[..., None]  # (S, S, 1)
        self.num = np.zeros((h, w, 3), np.float32)
        self.den = np.zeros((h, w, 1), np.float32)
        self.pending = set(range(len(self.windows)))

    prefilled = True  # window inputs already hold the hole's fill (predict must not fill again)

    @property
    def done(self) -> bool:
        return not self.pending

    def next_round(self) -> list[int]:
        return sorted(self.pending)

    def window_input(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        win = self.windows[i]
        x = _crop(self.small, win)  # (S, S, 3), mirrored past the edges
        hole = _crop(self.small_hole, win)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32), hole[None].astype(np.float32)

    def paste(self, i: int, out: np.ndarray) -> None:
        """Blend window i's correction (output - input, (3, S, S)) into the photo-wide field."""
        win, (h, w) = self.windows[i], self.size
        x, hole = self.window_input(i)
        weight = self.weight * hole.transpose(1, 2, 0)  # (S, S, 1): only hole pixels carry a correction
        corr = (out - x).transpose(1, 2, 0) * weight  # (S, S, 3)
        y0, x0 = max(0, win.top), max(0, win.left)
        y1, x1 = min(h, win.top + win.side), min(w, win.left + win.side)
        sy, sx = slice(y0 - win.top, y1 - win.top), slice(x0 - win.left, x1 - win.left)
        self.num[y0:y1, x0:x1] += corr[sy, sx]
        self.den[y0:y1, x0:x1] += weight[sy, sx]
        self.pending.discard(i)

    def result(self) -> np.ndarray:
        num, den = self.num, self.den
        if self.size != self.hole.shape:
            # Normalised interpolation: the weighted corrections and their weights are resampled
            # separately, so a hole pixel next to the known context gets the mean correction of
            # the hole pixels around it, not one faded towards the zero outside the hole.
            t = torch.from_numpy(np.concatenate([num, den], axis=-1).transpose(2, 0, 1))[None]
            resized = (
                F.interpolate(t, size=self.hole.shape, mode="bilinear", align_corners=False)[0]
                .numpy()
                .transpose(1, 2, 0)
            )
            num, den = resized[..., :3], resized[..., 3:]
        corr = num / np.maximum(den, 1e-6)  # (H, W, 3): 0 where no hole pixel is near
        out = to_uint8((self.filled + corr).transpose(2, 0, 1))
        return np.where(self.hole[..., None], out, self.rgb)


def _fill_full(rgb: np.ndarray, hole: np.ndarray, cfg: Config) -> np.ndarray:
    """(H, W, 3) float32 in [-1, 1]: the photo with its hole filled as the model was trained
    (mask.fill), at the photo's own resolution, solved on the hole's bounding box + 1 px."""
    from ce_ray.core.masks import fill_hole

    out = to_unit(rgb).transpose(1, 2, 0).copy()
    ys, xs = np.nonzero(hole)
    if len(ys) == 0:
        return out
    H, W = hole.shape
    y0, y1 = max(0, ys.min() - 1), min(H, ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(W, xs.max() + 2)
    box = torch.from_numpy(np.ascontiguousarray(out[y0:y1, x0:x1].transpose(2, 0, 1)))[None]
    h = torch.from_numpy(np.ascontiguousarray(hole[y0:y1, x0:x1]))[None, None]
    filled = fill_hole(box, h, cfg.mask.fill)[0].numpy().transpose(1, 2, 0)
    out[y0:y1, x0:x1] = filled
    return out


# --- Public API ----------------------------------------------------------------------------------


def check_inputs(rgb: np.ndarray, hole: np.ndarray | None, geo: Geometry) -> np.ndarray:
    """Validate an image and hole (None = the centre region); returns the hole."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InpaintError("bad_image", f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {tuple(rgb.shape)}")
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InpaintError("image_too_small", f"the image is {w}x{h}; it needs at least {MIN_SIDE} pixels a side")
    if hole is None:
        return default_hole(h, w, geo)
    hole = np.asarray(hole, dtype=bool)
    if hole.shape != (h, w):
        raise InpaintError(
            "mask_size_mismatch",
            f"the mask is {hole.shape[1] if hole.ndim == 2 else '?'}x{hole.shape[0]} but the image is {w}x{h}; "
            "send a mask of the same size",
        )
    n = int(hole.sum())
    if n == 0:
        raise InpaintError("empty_mask", "the mask has no hole: paint the area to fill in white (white = hole)")
    if n == hole.size:
        raise InpaintError("all_white_mask", "the mask is all white: nothing is left to inpaint from (white = hole)")
    if n > MAX_HOLE_FRACTION * hole.size:
        raise InpaintError(
            "hole_too_large",
            f"the hole covers {100 * n / hole.size:.0f}% of the image; at most {100 * MAX_HOLE_FRACTION:.0f}% "
            "can be filled (the model needs context around it)",
        )
    return hole


def make_plan(rgb: np.ndarray, hole: np.ndarray, cfg: Config) -> Plan | FullPlan:
    """The plan for a model trained with `cfg`: windows around the hole for a centre model
    (Plan), the whole-photo correction of a full-image model (FullPlan)."""
    if cfg.model.variant == "full":
        return FullPlan(rgb, hole, cfg)
    return Plan(rgb, hole, Geometry.of(cfg))


def plan(loaded: LoadedGenerator, rgb: np.ndarray, hole: np.ndarray | None = None) -> Plan | FullPlan:
    """Validate and plan one image (raises InpaintError for bad input; no model call)."""
    geo = Geometry.of(loaded.config)
    return make_plan(rgb, check_inputs(rgb, hole, geo), loaded.config)


def inpaint_many(loaded: LoadedGenerator, plans: list[Plan | FullPlan]) -> list[np.ndarray]:
    """Run plans to completion, all images' windows of a round in one batch. -> (H, W, 3) uint8 each."""
    cfg = loaded.config
    device = next(loaded.model.parameters()).device
    while True:
        work = [(p, i) for p in plans if not p.done for i in p.next_round()]
        if not work:
            return [p.result() for p in plans]
        for start in range(0, len(work), FORWARD_CHUNK):
            chunk = work[start : start + FORWARD_CHUNK]
            pairs = [p.window_input(i) for p, i in chunk]
            images = torch.from_numpy(np.stack([a for a, _ in pairs])).to(device)  # (B, 3, S, S)
            holes = torch.from_numpy(np.stack([b for _, b in pairs])).to(device)  # (B, 1, S, S)
            prefilled = getattr(chunk[0][0], "prefilled", False)  # one model, one kind of plan
            out = predict(loaded.model, images, holes, cfg, fill=images if prefilled else None).cpu().numpy()
            for (p, i), o in zip(chunk, out):
                p.paste(i, o)


def inpaint_image(loaded: LoadedGenerator, rgb: np.ndarray, hole: np.ndarray | None = None) -> np.ndarray:
    """Inpaint one (H, W, 3) uint8 image inside `hole` ((H, W) bool, None = the centre region).
    Every pixel outside the hole is returned bit-identical."""
    return inpaint_many(loaded, [plan(loaded, rgb, hole)])[0]
