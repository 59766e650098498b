"""Free-form holes as people paint them: LaMa's thin / medium / thick stroke-and-box families.

Not in the Context Encoder paper (its free-form masks are train_random.lua's smoothed noise, in
masks.py). These follow LaMa (Suvorov et al. 2022, advimman/lama): the polyline brush of
`saicinpainting/training/data/masks.py` and the three evaluation sets of `configs/data_gen/
random_{thin,medium,thick}_256.yaml`. docs/masks.md lists every parameter and how it scales.

A family is defined for a 256-px image (LaMa's protocol) and scaled by `min(H, W) / 256`: lengths,
brush widths, box sides and margins grow with the image, so a 512-px photo gets strokes twice as
wide (LaMa's 512-px sets are "roughly double" the 256 ones) and a 128-px training crop half. The
stroke count does not scale. A mask covering more than MAX_COVERAGE of the image is redrawn
(LaMa's `max_tamper_area`). Pure numpy + OpenCV's line drawing; no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_SIDE = 256  # LaMa's evaluation sets are defined on 256x256 images
MAX_COVERAGE = 0.5  # LaMa's gen_mask_dataset.py drops masks covering more than half the image
MAX_REDRAWS = 100  # bounded time: after this many, the last draw is thinned below MAX_COVERAGE


@dataclass(frozen=True)
class StrokeParams:
    """LaMa's `make_random_irregular_mask` arguments (256-px units)."""

    min_times: int  # strokes per mask, randint(min_times, max_times + 1)
    max_times: int
    max_width: int  # brush width = BASE_WIDTH + randint(max_width)
    max_len: int  # segment length = BASE_LEN + randint(max_len)
    max_angle: int = 4  # segment angle = 0.01 + randint(max_angle) radians, mirrored on every other stroke


@dataclass(frozen=True)
class BoxParams:
    """LaMa's `make_random_rectangle_mask` arguments (256-px units)."""

    min_times: int
    max_times: int
    min_size: int  # box sides in randint(min_size, max_size)
    max_size: int
    margin: int  # boxes keep this far from the border


BASE_WIDTH = 5  # LaMa: brush_w = 5 + randint(max_width)
BASE_LEN = 10  # LaMa: length = 10 + randint(max_len)
MAX_SEGMENTS = 5  # LaMa: 1 + randint(5) segments per stroke


@dataclass(frozen=True)
class Family:
    strokes: StrokeParams
    boxes: BoxParams | None = None
    # LaMa's MixedMaskGenerator draws one generator per mask: irregular_proba 1 and box_proba 0.3,
    # renormalised, so a mask is all boxes with probability 0.3 / 1.3 (~23 %), else all strokes.
    box_share: float = 0.0


FAMILIES: dict[str, Family] = {
    # random_thin_256.yaml: 4-50 strokes, width <= 10, length <= 40, no boxes.
    "thin": Family(StrokeParams(min_times=4, max_times=50, max_width=10, max_len=40)),
    # random_medium_256.yaml: 4-5 strokes, width <= 50, length <= 100; 1-5 boxes of 10-50 px, margin 0.
    "medium": Family(
        StrokeParams(min_times=4, max_times=5, max_width=50, max_len=100),
        BoxParams(min_times=1, max_times=5, min_size=10, max_size=50, margin=0),
        box_share=0.3 / 1.3,
    ),
    # random_thick_256.yaml: 1-5 strokes, width <= 100, length <= 200; 1-3 boxes of 30-150 px, margin 10.
    "thick": Family(
        StrokeParams(min_times=1, max_times=5, max_width=100, max_len=200),
        BoxParams(min_times=1, max_times=3, min_size=30, max_size=150, margin=10),
        box_share=0.3 / 1.3,
    ),
}


def _draw_strokes(h: int, w: int, p: StrokeParams, k: float, rng: np.random.Generator) -> np.ndarray:
    import cv2  # lazy: only stroke masks need it (Ray Data's decode workers import this module)

    mask = np.zeros((h, w), np.uint8)
    for i in range(int(rng.integers(p.min_times, p.max_times + 1))):
        x, y = int(rng.integers(w)), int(rng.integers(h))
        for _ in range(1 + int(rng.integers(MAX_SEGMENTS))):
            angle = 0.01 + int(rng.integers(p.max_angle))
            if i % 2 == 0:
                angle = 2 * np.pi - angle
            length = k * (BASE_LEN + int(rng.integers(p.max_len)))
            width = max(1, round(k * (BASE_WIDTH + int(rng.integers(p.max_width)))))
            ex = int(np.clip(x + length * np.sin(angle), 0, w))
            ey = int(np.clip(y + length * np.cos(angle), 0, h))
            cv2.line(mask, (x, y), (ex, ey), 1, width)
            x, y = ex, ey
    return mask.astype(bool)


def _draw_boxes(h: int, w: int, p: BoxParams, k: float, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    margin = round(k * p.margin)
    lo = max(1, round(k * p.min_size))
    hi = max(lo + 1, min(round(k * p.max_size), h - 2 * margin, w - 2 * margin))
    for _ in range(int(rng.integers(p.min_times, p.max_times + 1))):
        bw, bh = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        x = int(rng.integers(margin, max(margin + 1, w - margin - bw + 1)))
        y = int(rng.integers(margin, max(margin + 1, h - margin - bh + 1)))
        mask[y : y + bh, x : x + bw] = True
    return mask


def stroke_hole(family: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One (h, w) bool hole of a LaMa family ("thin", "medium", "thick"), scaled by
    min(h, w) / 256. Never empty; redrawn while it covers more than MAX_COVERAGE."""
    if family not in FAMILIES:
        raise ValueError(f"unknown stroke family {family!r}; use one of {', '.join(FAMILIES)}")
    f = FAMILIES[family]
    k = min(h, w) / REFERENCE_SIDE
    hole = np.zeros((h, w), bool)
    for _ in range(MAX_REDRAWS):
        if f.boxes is not None and rng.random() < f.box_share:
            hole = _draw_boxes(h, w, f.boxes, k, rng)
        else:
            hole = _draw_strokes(h, w, f.strokes, k, rng)
        if 0 < hole.mean() <= MAX_COVERAGE:
            return hole
    # Bounded time: keep the last draw but only its pixels within the budget (row-major), never empty.
    if not hole.any():
        hole[h // 2, w // 2] = True
    keep = np.cumsum(hole.reshape(-1)) <= MAX_COVERAGE * hole.size
    return (hole.reshape(-1) & keep).reshape(h, w)
