"""The crop pipeline: encoded photo -> training / validation crops, and uint8 <-> [-1, 1] pixels.

Decode, resize to loadSize, random 128 crop, horizontal flip, [-1, 1], hole: train.lua's data
path; and the conversions between uint8 RGB and the model's [-1, 1] CHW. Pure numpy/PIL (no
torch: Ray Data's decode workers import it); used by Ray Data (data.py), the no-Ray loader
(local_data.py), evaluation and serving alike. The shard format the photos come from is shards.py."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from PIL import Image

from ce_ray.config import Config
from ce_ray.core.masks import center_hole, holes_for
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


def resized_dims(h: int, w: int, load_size: int) -> tuple[int, int]:
    """(H, W) of an (h, w) photo after resize_shorter(_, load_size)."""
    if min(h, w) == load_size:
        return h, w
    s = load_size / min(h, w)
    return max(load_size, round(h * s)), max(load_size, round(w * s))


def random_crops_of(rgb: np.ndarray, load_size: int, n: int, cfg: Config, rng: np.random.Generator) -> list[np.ndarray]:
    """`n` random fine_size crops of `rgb` as if it had first been resized so its shorter side is
    `load_size` (resize_shorter), each flipped with p=0.5 when data.flip: (3, S, S) uint8 each.

    Only each crop's window is resampled (PIL's resize with a source box), not the whole photo:
    the same pixels as resizing the photo and cropping it (within a grey level at the window's
    edges), for the cost of n windows instead of a whole photo at every training step's scale."""
    d, size = cfg.data, cfg.data.fine_size
    h, w = rgb.shape[:2]
    H, W = resized_dims(h, w, load_size)
    im = None if (H, W) == (h, w) else Image.fromarray(rgb)
    sy, sx = h / H, w / W  # source pixels per resized pixel
    out = []
    for _ in range(n):
        y, x = int(rng.integers(0, H - size + 1)), int(rng.integers(0, W - size + 1))
        if im is None:
            crop = rgb[y : y + size, x : x + size]
        else:
            box = (x * sx, y * sy, (x + size) * sx, (y + size) * sy)
            crop = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=box))
        if d.flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(crop.transpose(2, 0, 1))  # (3, S, S) uint8
    return out


def largest_load_size(cfg: Config) -> int:
    """The largest shorter side a training crop is cut at (data.load_size with the jitter's top):
    what a photo decoded once for many epochs (data.cache, data.device_crops) must keep."""
    d = cfg.data
    return max(d.fine_size, round(d.load_size * (1 + d.scale_jitter)))


def jittered_load_size(cfg: Config, rng: np.random.Generator) -> int:
    """train.lua's loadSize, times U[1 - j, 1 + j] with data.scale_jitter j (not in the paper)."""
    d = cfg.data
    if not d.scale_jitter:
        return d.load_size
    return max(d.fine_size, round(d.load_size * rng.uniform(1 - d.scale_jitter, 1 + d.scale_jitter)))


def stack_crops(out: list[np.ndarray], cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Crops -> the compact training rows: {"image": (N, 3, S, S) uint8, "hole": (N, S*S/8) packed bits}."""
    s, m = cfg.data.fine_size, cfg.mask
    images = np.ascontiguousarray(np.stack(out)) if out else np.zeros((0, 3, s, s), np.uint8)
    if m.kind == "center":  # the same hole for every crop: packed once, then repeated
        holes = np.repeat(_packed_center_hole(s, m.overlap), len(out), axis=0)
    else:
        holes = pack_holes(holes_for(m, s, len(out), rng))
    return {"image": images, "hole": holes}


@functools.lru_cache(maxsize=4)
def _packed_center_hole(size: int, overlap: int) -> np.ndarray:
    """(1, S*S/8): the centre hole, bit-packed (read-only: np.repeat copies it)."""
    packed = pack_holes(center_hole(size, overlap)[None, None])
    packed.flags.writeable = False
    return packed


def train_batch(encoded: list[bytes], cfg: Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows of encoded photos -> {"image": (N, 3, S, S) uint8 RGB crops, "hole": (N, S*S/8) uint8
    packed bits}, with N = len(encoded) * cfg.data.repeat. Compact on purpose: crops cross Ray's
    object store (or a DataLoader's pipe) 4x smaller than float32 and holes 32x smaller; the step
    converts them on the training device (step.prepare_batch), where the channel shuffle
    (data.channel_shuffle) and the hole fill also happen."""
    out: list[np.ndarray] = []
    for data in encoded:
        size = jittered_load_size(cfg, rng)
        out += random_crops_of(decode_rgb(data, draft_shorter=size), size, cfg.data.repeat, cfg, rng)
    return stack_crops(out, cfg, rng)


def val_samples(encoded: bytes, key: str, cfg: Config) -> dict[str, np.ndarray]:
    """Every tile of one val photo, with holes seeded by (key, tile index): the same crops and
    masks in every run, so validation metrics are comparable across runs."""
    d = cfg.data
    rgb = resize_shorter(decode_rgb(encoded), d.load_size)
    ts = tiles(rgb, d.fine_size)
    holes = [holes_for(cfg.mask, d.fine_size, 1, np.random.default_rng(stable_seed(key, i)))[0] for i in range(len(ts))]
    return {"image": np.stack([to_unit(t) for t in ts]), "hole": np.stack(holes)}
