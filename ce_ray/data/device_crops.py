"""Training crops cut on the training device (data.device_crops, beyond the paper): for GPUs.

The host pipelines (stream.py, local_stream.py) cut every crop, flip and hole on CPUs: ~2.3 ms of
CPU per free-form crop (window resample 0.7, stroke hole 1.2, packing 0.3), so a GPU that steps
thousands of crops a second needs dozens to hundreds of decode cores (bench/data_pipeline.py,
`cores_per_gpu_needed`). Here the host decodes each photo once; everything per crop runs on the
training device in a few batched kernels:

    photos       every decoded photo of this rank, zero-padded into one (N, 3, Hmax, Wmax) tensor
    windows      per crop: a photo, a scale (data.load_size with data.scale_jitter), a window of the
                 photo resized to that scale: torchvision's roi_align samples exactly that window of
                 the unresized photo (adaptive sampling: an area average when it shrinks)
    flips        data.flip, p = 0.5, a where() over the batch
    holes        a bank of HOLE_BANK holes drawn once on the host from cfg.mask (the same generators
                 as the host pipelines), each used under the 8 symmetries of the square (strokes,
                 blocks and regions have no preferred orientation), picked per crop on the device

The resampling differs from the host path's PIL bicubic (an area-averaging bilinear filter), and
the holes repeat across epochs from a finite bank (HOLE_BANK x 8 shapes): both are why this is an
option, off by default. Crops per epoch match the host pipelines': photos x data.repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ce_ray.config import Config
from ce_ray.core.masks import center_hole, holes_for
from ce_ray.errors import UserError

HOLE_BANK = 4096  # holes drawn once per worker; x 8 symmetries = 32,768 shapes (~8 MB as bool at 128 px)


class DeviceCropper:
    """Random training crops, flips and holes made on `device` from decoded photos.

    photos: (H, W, 3) uint8 RGB arrays, each decoded at least as large as training resizes it
    (crops.largest_load_size); `seed` seeds the device generator and the hole bank. `batch(B)`
    returns (images (B, 3, S, S) float32 in [-1, 1], holes (B, 1, S, S) float32), the form
    step.prepare_batch passes through."""

    def __init__(
        self,
        photos: list[np.ndarray],
        cfg: Config,
        device: torch.device,
        seed: int,
        bank_size: int = HOLE_BANK,
    ):
        if not photos:
            raise ValueError("no photos to crop from")
        self.cfg, self.device, self.n = cfg, device, len(photos)
        hmax, wmax = max(p.shape[0] for p in photos), max(p.shape[1] for p in photos)
        # float16 on a GPU halves the copy of every photo it holds; roi_align samples in it.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.photos = torch.zeros(self.n, 3, hmax, wmax, dtype=dtype, device=device)  # (N, 3, Hmax, Wmax) 0..255
        for i, p in enumerate(photos):
            self.photos[i, :, : p.shape[0], : p.shape[1]] = torch.from_numpy(np.array(p)).permute(2, 0, 1)
        self.hw = torch.tensor([p.shape[:2] for p in photos], dtype=torch.float32, device=device)  # (N, 2)
        # `meta` (shape-only dry runs: the no-host-read test) has no generator; its draws are empty.
        self.gen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
        s, m = cfg.data.fine_size, cfg.mask
        if m.kind == "center":
            bank = center_hole(s, m.overlap)[None, None]
        else:
            bank = holes_for(m, s, bank_size, np.random.default_rng(seed))
        self.bank = torch.from_numpy(np.ascontiguousarray(bank)).to(device).bool()  # (K, 1, S, S)

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.ops import roi_align

        d, s = self.cfg.data, self.cfg.data.fine_size
        # One draw for every random choice of the batch (photo, scale, window, flip, hole and its
        # symmetry): few kernel launches, so the host's share per crop stays small.
        u = torch.rand(b, 9, generator=self.gen, device=self.device)  # (B, 9) uniform [0, 1)
        idx = (u[:, 0] * self.n).long().clamp_max(self.n - 1)
        h, w = self.hw[idx].unbind(1)
        load = torch.full((b,), float(d.load_size), device=self.device)
        if d.scale_jitter:
            load = (load * (1 + d.scale_jitter * (2 * u[:, 1] - 1))).round().clamp_min(s)
        # crops.resized_dims: the shorter side to `load`, the longer one scaled alike, both >= load
        scale = load / torch.minimum(h, w)
        H, W = torch.maximum(load, (h * scale).round()), torch.maximum(load, (w * scale).round())
        y, x = (u[:, 2] * (H - s + 1)).floor(), (u[:, 3] * (W - s + 1)).floor()
        sy, sx = h / H, w / W  # photo pixels per resized pixel
        boxes = torch.stack([idx.to(torch.float32), x * sx, y * sy, (x + s) * sx, (y + s) * sy], dim=1)  # (B, 5)
        crops = roi_align(self.photos, boxes.to(self.photos.dtype), output_size=s, sampling_ratio=0, aligned=True)
        crops = crops.float()  # (B, 3, S, S) 0..255
        if d.flip:
            crops = torch.where((u[:, 4] < 0.5)[:, None, None, None], crops.flip(-1), crops)
        images = crops.round_().clamp_(0, 255).mul_(2.0 / 255.0).sub_(1.0)  # as crops.to_unit of uint8 pixels
        return images, self._holes(u[:, 5:])

    def _holes(self, u: torch.Tensor) -> torch.Tensor:
        """u: (B, 4) uniform draws -> (B, 1, S, S) holes: a bank hole under one of the 8 symmetries."""
        k = (u[:, 0] * len(self.bank)).long().clamp_max(len(self.bank) - 1)
        holes = self.bank[k]  # (B, 1, S, S)
        if len(self.bank) > 1:  # the 8 symmetries of the square: transpose, then flips
            sym = (u[:, 1:] < 0.5)[:, :, None, None, None]  # (B, 3, 1, 1, 1)
            holes = torch.where(sym[:, 0], holes.transpose(-1, -2), holes)
            holes = torch.where(sym[:, 1], holes.flip(-1), holes)
            holes = torch.where(sym[:, 2], holes.flip(-2), holes)
        return holes.float()


def batches_per_epoch(photos: int, cfg: Config) -> int:
    """Batches in one epoch of `photos` photos: photos x data.repeat crops, incomplete batch dropped
    (as the host pipelines)."""
    return photos * cfg.data.repeat // cfg.data.batch_size


def epoch_batches(
    photos: list[np.ndarray], cfg: Config, device: torch.device, seed: int
) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """epoch -> that epoch's batches, cut on `device` from this worker's decoded `photos` (both
    drivers' train_batches under data.device_crops). UserError when an epoch holds no full batch."""
    n = batches_per_epoch(len(photos), cfg)
    if n == 0:
        raise UserError(
            f"an epoch yields no full batch: {len(photos)} train photos (this worker's share) x "
            f"data.repeat={cfg.data.repeat} crops < data.batch_size={cfg.data.batch_size}; raise data.repeat, "
            "lower data.batch_size (or scale.num_workers), or prepare more photos"
        )
    cropper = DeviceCropper(photos, cfg, device, seed)
    return lambda epoch: (cropper.batch(cfg.data.batch_size) for _ in range(n))


def decode_photos(encoded: list[bytes], cfg: Config) -> list[np.ndarray]:
    """Encoded train photos -> (H, W, 3) uint8 arrays decoded for DeviceCropper (the --local path;
    under Ray the decoded photos come from stream.build_photo_dataset)."""
    from ce_ray.data.crops import largest_load_size
    from ce_ray.data.images import decode_rgb

    size = largest_load_size(cfg)
    return [decode_rgb(data, draft_shorter=size) for data in encoded]
