"""ce_ray/data/device_crops.py: crops, flips and holes cut on the training device."""

import numpy as np
import pytest
import torch

from ce_ray import config
from ce_ray.core.masks import center_hole
from ce_ray.data.device_crops import DeviceCropper, batches_per_epoch


def _photos(rng, shapes=((150, 200), (170, 130), (128, 128))):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _cfg(**data):
    return config.from_dict(
        {"data": {"batch_size": 4, **data}, "mask": {"kind": "strokes"}, "model": {"variant": "full"}}
    )


def test_unscaled_crops_are_exact_windows_of_a_photo():
    """At a photo's own scale (load_size = its shorter side, no jitter) each crop is a 128 window
    of that photo, pixel for pixel (possibly mirrored), in [-1, 1]."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (140, 170, 3), dtype=np.uint8)
    cfg = _cfg(load_size=140)
    images, holes = DeviceCropper([photo], cfg, torch.device("cpu"), seed=1).batch(6)
    assert images.shape == (6, 3, 128, 128) and images.dtype == torch.float32
    windows = (
        torch.from_numpy(photo).permute(2, 0, 1).float().unfold(1, 128, 1).unfold(2, 128, 1)
    )  # (3, 13, 43, 128, 128)
    for img in images:
        pixels = (img + 1) * 127.5
        found = any(
            torch.equal(pixels.round(), w) or torch.equal(pixels.round(), w.flip(-1))
            for w in windows.permute(1, 2, 0, 3, 4).reshape(-1, 3, 128, 128)
        )
        assert found


def test_scaled_crops_sample_the_resized_photo():
    """A photo resized down (load_size below its shorter side): the crop matches the same window of
    the photo resized by area averaging to within a few grey levels (roi_align's adaptive
    sampling), and the scale is right (a uniform half-scale photo has constant 2x2 means)."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (130, 160, 3), dtype=np.uint8)
    photo = small.repeat(2, axis=0).repeat(2, axis=1)  # (260, 320): every 2x2 block one value
    cfg = _cfg(load_size=130, flip=False)
    images, _ = DeviceCropper([photo], cfg, torch.device("cpu"), seed=2).batch(4)
    windows = torch.from_numpy(small).permute(2, 0, 1).float().unfold(1, 128, 1).unfold(2, 128, 1)
    windows = windows.permute(1, 2, 0, 3, 4).reshape(-1, 3, 128, 128)
    for img in images:
        pixels = ((img + 1) * 127.5).round()
        assert (windows - pixels).abs().amax(dim=(1, 2, 3)).min() <= 1  # one window of the half-scale photo


def test_holes_come_from_the_mask_config_under_the_squares_symmetries():
    rng = np.random.default_rng(3)
    cropper = DeviceCropper(_photos(rng), _cfg(), torch.device("cpu"), seed=3, bank_size=16)
    _, holes = cropper.batch(64)
    assert holes.shape == (64, 1, 128, 128) and set(holes.unique().tolist()) == {0.0, 1.0}
    bank = {tuple(h.flatten().nonzero().flatten().tolist()) for h in cropper.bank.float()}
    variants = set()
    for h in cropper.bank.float():
        for t in (h, h.transpose(-1, -2)):
            for f in (t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)):
                variants.add(tuple(f.flatten().nonzero().flatten().tolist()))
    got = {tuple(h.flatten().nonzero().flatten().tolist()) for h in holes}
    assert got <= variants and not got <= bank  # every hole a bank hole's symmetry, not only the bank's own
    cfg = config.from_dict({"data": {"batch_size": 4}})
    _, centre = DeviceCropper(_photos(rng), cfg, torch.device("cpu"), seed=0).batch(3)
    assert torch.equal(centre, torch.from_numpy(center_hole(128, cfg.mask.overlap)).float().expand(3, 1, 128, 128))


def test_crops_are_random_and_seeded():
    rng = np.random.default_rng(4)
    photos = _photos(rng)
    cfg = _cfg(scale_jitter=0.3)
    a = DeviceCropper(photos, cfg, torch.device("cpu"), seed=5)
    b = DeviceCropper(photos, cfg, torch.device("cpu"), seed=5)
    first, again = a.batch(8), b.batch(8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], a.batch(8)[0])
    assert batches_per_epoch(3, config.replace(cfg, data={"repeat": 5})) == 3  # 15 crops / batch 4


def test_cropping_never_reads_back_to_the_host():
    """On the `meta` device every read of a value back to the host raises: a GPU never waits."""
    rng = np.random.default_rng(6)
    meta = torch.device("meta")
    cropper = DeviceCropper(_photos(rng), _cfg(scale_jitter=0.5), meta, seed=0, bank_size=8)
    images, holes = cropper.batch(4)
    assert images.device == holes.device == meta and images.shape == (4, 3, 128, 128)


@pytest.mark.parametrize("device_crops", [False, True])
def test_local_training_runs_on_either_crop_path(tmp_path, bundled_shards, device_crops):
    from ce_ray.train.local import train_local

    cfg = config.from_dict(
        {
            "data": {"shards": bundled_shards, "batch_size": 4, "repeat": 2, "device_crops": device_crops},
            "model": {"bottleneck": 16, "ngf": 8, "ndf": 8},
            "train": {"steps": 3, "log_every": 1, "eval_every": 3, "ckpt_every": 3, "output_dir": str(tmp_path / "o")},
            "scale": {"storage_path": str(tmp_path / "runs")},
            "mlflow": {"enabled": False},
        }
    )
    r = train_local(cfg, run_name="dc", log=lambda line: None)
    assert r.metrics["step"] == 3 and np.isfinite(r.metrics["loss_rec"])
