"""The crop pipeline: encoded photo -> training / validation crops, and uint8 <-> [-1, 1] pixels.

Decode, resize to loadSize, random 128 crop, horizontal flip, [-1, 1], hole: train.lua's data
path; and the conversions between uint8 RGB and the model's [-1, 1] CHW. Pure numpy/PIL (no
torch: Ray Data's decode workers import it); used by Ray Data (data.py), the no-Ray loader
(local_data.py), evaluation and serving alike. The shard format the photos come from is shards.py."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from ce_ray.config import Config
from ce_ray.core.masks import holes_for
from ce_ray.core.pixels import to_unit
from ce_ray.data.images import decode_rgb


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any values, identical on every machine."""
    return int.from_bytes(hashlib.sha1("|".join(map(str, parts)).encode()).digest()[:8], "big")


def resize_shorter(rgb: np.ndarray, load_size: int) -> np.ndarray:
    """Resize so the shorter side is `load_size` (train.lua's loadSize), keeping the aspect."""
    h, w = rgb.shape[:2]
    if min(h, w) == load_size:
        return rgb
    s = load_size / min(h, w)
    size = (max(load_size, round(w * s)), max(load_size, round(h * s)))  # PIL takes (W, H)
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


def tiles(rgb: np.ndarray, size: int) -> list[np.ndarray]:
    """Non-overlapping `size` tiles, row-major from the top-left: the deterministic validation /
    evaluation crops (evaluate.py's folder protocol)."""
    h, w = rgb.shape[:2]
    return [rgb[y : y + size, x : x + size] for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]


def pack_holes(holes: np.ndarray) -> np.ndarray:
    """(N, 1, S, S) holes -> (N, S*S/8) uint8, one bit per pixel (row-major, high bit first):
    what training batches carry (masks.unpack_holes restores them on the training device)."""
    n = len(holes)
    return np.packbits(np.asarray(holes).reshape(n, -1).astype(bool), axis=1)


def train_batch(encoded: list[bytes], cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of encoded photos -> {"image": (N, 3, S, S) uint8 RGB crops, "hole": (N, S*S/8) uint8
    packed bits}, with N = len(encoded) * cfg.data.repeat. Compact on purpose: crops cross Ray's
    object store (or a DataLoader's pipe) 4x smaller than float32 and holes 32x smaller; the step
    converts them on the training device (step.prepare_batch), where the channel shuffle
    (data.channel_shuffle) and the hole fill also happen."""
    d = cfg.data
    out: list[np.ndarray] = []
    for data in encoded:
        size = d.load_size
        if d.scale_jitter:
            size = max(d.fine_size, round(d.load_size * rng.uniform(1 - d.scale_jitter, 1 + d.scale_jitter)))
        rgb = resize_shorter(decode_rgb(data, draft_shorter=size), size)
        h, w = rgb.shape[:2]
        for _ in range(d.repeat):
            y, x = int(rng.integers(0, h - d.fine_size + 1)), int(rng.integers(0, w - d.fine_size + 1))
            crop = rgb[y : y + d.fine_size, x : x + d.fine_size]
            if d.flip and rng.random() < 0.5:
                crop = crop[:, ::-1]
            out.append(crop.transpose(2, 0, 1))  # (3, S, S) uint8
    images = np.ascontiguousarray(np.stack(out)) if out else np.zeros((0, 3, d.fine_size, d.fine_size), np.uint8)
    return {"image": images, "hole": pack_holes(holes_for(cfg.mask, d.fine_size, len(out), rng))}


def val_samples(encoded: bytes, key: str, cfg: Config) -> dict[str, np.ndarray]:
    """Every tile of one val photo, with holes seeded by (key, tile index): the same crops and
    masks in every run, so validation metrics are comparable across runs."""
    d = cfg.data
    rgb = resize_shorter(decode_rgb(encoded), d.load_size)
    ts = tiles(rgb, d.fine_size)
    holes = [holes_for(cfg.mask, d.fine_size, 1, np.random.default_rng(stable_seed(key, i)))[0] for i in range(len(ts))]
    return {"image": np.stack([to_unit(t) for t in ts]), "hole": np.stack(holes)}
