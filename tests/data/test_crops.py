"""ce_ray/data/crops.py: training crops cut from the resized photo's windows, the packed holes."""

import numpy as np
import pytest

from ce_ray import config
from ce_ray.core.masks import holes_for
from ce_ray.data import crops
from ce_ray.data.bundled import load_bundled


@pytest.fixture(scope="module")
def photo():
    return load_bundled()[0][1]


@pytest.mark.parametrize("load_size", [160, 300, 437, 700])
def test_window_resize_equals_resizing_the_photo_then_cropping(photo, load_size):
    """Resampling only each crop's window gives the pixels of resize_shorter + crop (what the
    pipeline did before), within a grey level, at scales below and above the stored photo's."""
    cfg = config.replace(config.Config(), data={"flip": False})
    full = crops.resize_shorter(photo, load_size)
    got = crops.random_crops_of(photo, load_size, 12, cfg, np.random.default_rng(3))
    rng = np.random.default_rng(3)  # the same draws: y then x per crop
    for crop in got:
        y, x = int(rng.integers(0, full.shape[0] - 127)), int(rng.integers(0, full.shape[1] - 127))
        ref = full[y : y + 128, x : x + 128].transpose(2, 0, 1).astype(np.int16)
        diff = np.abs(ref - crop)
        assert crop.shape == (3, 128, 128) and crop.dtype == np.uint8
        assert diff.mean() < 0.05 and diff.max() <= 2


def test_crops_without_resize_are_plain_windows(photo):
    h, w = photo.shape[:2]
    cfg = config.replace(config.Config(), data={"flip": False})
    got = crops.random_crops_of(photo, min(h, w), 4, cfg, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for crop in got:
        y, x = int(rng.integers(0, h - 127)), int(rng.integers(0, w - 127))
        assert np.array_equal(crop, photo[y : y + 128, x : x + 128].transpose(2, 0, 1))


def test_centre_holes_are_packed_once_and_equal_the_built_ones():
    cfg = config.Config()
    rows = crops.stack_crops([np.zeros((3, 128, 128), np.uint8)] * 5, cfg, np.random.default_rng(0))
    assert np.array_equal(rows["hole"], crops.pack_holes(holes_for(cfg.mask, 128, 5, np.random.default_rng(0))))
    rows["hole"][0, 0] ^= 0xFF  # each batch owns its rows: the cached hole is not shared
    again = crops.stack_crops([np.zeros((3, 128, 128), np.uint8)], cfg, np.random.default_rng(0))
    assert np.array_equal(again["hole"], rows["hole"][1:2])
