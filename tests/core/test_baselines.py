"""ce_ray/core/baselines.py: every classical method runs on the model's batch API, changes only hole
pixels, never sees the truth in the hole, and beats mean fill where it obviously should."""

import numpy as np
import pytest
import torch

from ce_ray.core.baselines import BASELINES, run_baseline
from ce_ray.core.masks import MEAN_PIXEL_FILL, center_hole, random_region_hole
from ce_ray.core.metrics import hole_errors, summarize
from ce_ray.errors import UserError

SIZE = 64  # small tiles keep the biharmonic solve (the slow one) to milliseconds


def _gradient(b: int = 2) -> np.ndarray:
    """(b, 3, SIZE, SIZE) smooth ramps in [-1, 1]: different direction per channel and image."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    out = np.empty((b, 3, SIZE, SIZE), np.float32)
    for i in range(b):
        out[i] = np.stack([0.8 * x - 0.4 + 0.1 * i, 0.6 * y - 0.5, 0.5 * (x + y) - 0.3])
    return out


def _holes(b: int = 2) -> np.ndarray:
    return np.broadcast_to(center_hole(SIZE, 2), (b, 1, SIZE, SIZE)).astype(np.float32)


@pytest.mark.parametrize("name", BASELINES)
def test_runs_and_keeps_pixels_outside_the_hole(name):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32)
    holes = np.stack([center_hole(SIZE, 2)[None], random_region_hole(SIZE, rng)[None]]).astype(np.float32)
    out = run_baseline(name, images, holes)
    assert isinstance(out, np.ndarray) and out.shape == images.shape and out.dtype == np.float32
    outside = ~holes.astype(bool).repeat(3, axis=1)
    np.testing.assert_array_equal(out[outside], images[outside])
    assert np.isfinite(out).all() and out.min() >= -1 and out.max() <= 1

    t = run_baseline(name, torch.from_numpy(images), torch.from_numpy(holes).bool())  # tensors in, tensor out
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), out)


@pytest.mark.parametrize("name", BASELINES)
def test_never_sees_the_truth_inside_the_hole(name):
    images, holes = _gradient(), _holes()
    scrambled = images.copy()
    scrambled[holes.astype(bool).repeat(3, axis=1)] = 0.9  # different "truth" in the hole only
    np.testing.assert_array_equal(run_baseline(name, images, holes), run_baseline(name, scrambled, holes))


def test_mean_fill_is_the_mean_pixel():
    images, holes = _gradient(1), _holes(1)
    out = run_baseline("mean_fill", images, holes)
    np.testing.assert_allclose(out[0, :, SIZE // 2, SIZE // 2], MEAN_PIXEL_FILL, rtol=1e-6)


def test_diffusion_beats_mean_fill_on_a_smooth_gradient():
    images, holes = _gradient(), _holes()
    score = {n: summarize(hole_errors(run_baseline(n, images, holes), images, holes)) for n in BASELINES}
    for n in ("telea", "navier_stokes", "biharmonic"):
        assert score[n]["l1"] < score["mean_fill"]["l1"] / 3, (n, score)
        assert score[n]["psnr"] > score["mean_fill"]["psnr"] + 10, (n, score)
    # A linear ramp is biharmonic: the solver reproduces it almost exactly.
    assert score["biharmonic"]["psnr"] > 40, score


@pytest.mark.parametrize("name", ["telea", "biharmonic"])
def test_no_hole_and_all_hole_tiles(name):
    images = _gradient()
    holes = np.zeros((2, 1, SIZE, SIZE), np.float32)
    holes[1] = 1  # no context at all: nothing to diffuse from, the mean fill is kept
    out = run_baseline(name, images, holes)
    np.testing.assert_array_equal(out[0], images[0])
    np.testing.assert_allclose(out[1, :, 0, 0], MEAN_PIXEL_FILL, rtol=1e-6)


def test_bad_input_is_a_user_error():
    images, holes = _gradient(), _holes()
    with pytest.raises(UserError, match="unknown baseline"):
        run_baseline("photoshop", images, holes)
    with pytest.raises(UserError, match="holes must be"):
        run_baseline("telea", images, holes[:1])
    with pytest.raises(UserError, match="images must be"):
        run_baseline("telea", images[:, :1], holes)
