"""Masks: centre hole and ring, fill constants, random block / region coverage, determinism."""

import numpy as np
import pytest
import torch

from ce_ray.config import MaskConfig
from ce_ray.core import masks as M
from ce_ray.errors import UserError


def test_fill_constants_are_the_mean_pixel():
    assert M.MEAN_PIXEL_FILL == pytest.approx((2 * 117 / 255 - 1, 2 * 104 / 255 - 1, 2 * 123 / 255 - 1))


def test_center_hole_is_inner_56_with_4px_ring():
    hole = M.center_hole(128, 4)
    assert hole.sum() == 56 * 56
    ys, xs = np.nonzero(hole)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (36, 91, 36, 91)
    assert M.center_box(128) == (32, 96)


def test_center_weights_ring_is_10x_and_lambda_once():
    w = M.center_weights(128, 4, lambda_rec=0.999, overlap_weight=10.0)
    assert w.shape == (64, 64)
    assert w[32, 32] == pytest.approx(0.999)  # interior
    assert w[0, 0] == pytest.approx(9.99) and w[3, 40] == pytest.approx(9.99)  # ring
    assert w[4, 4] == pytest.approx(0.999)  # first interior pixel
    ring = (w > 1).sum().item()
    assert ring == 64 * 64 - 56 * 56  # exactly a 4-px ring


def test_fill_hole_only_touches_the_hole():
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    hole = torch.from_numpy(M.center_hole(128, 4))
    y = M.fill_hole(x, hole)
    assert torch.equal(y[:, :, ~hole], x[:, :, ~hole])
    for c, v in enumerate(M.MEAN_PIXEL_FILL):
        assert torch.allclose(y[:, c][:, hole], torch.full_like(y[:, c][:, hole], v))
    assert np.allclose(M.fill_hole_np(x.numpy(), hole.numpy()[None, None].repeat(2, 0)), y.numpy())


@pytest.mark.parametrize("seed", range(20))
def test_random_block_coverage_bounded(seed):
    hole = M.random_block_hole(128, np.random.default_rng(seed), max_coverage=0.25, num_blocks=5)
    assert 0 < hole.mean() <= 0.25


@pytest.mark.parametrize("seed", range(10))
def test_random_region_coverage_in_range(seed):
    hole = M.random_region_hole(128, np.random.default_rng(seed), 0.2, 0.3)
    assert 0.2 <= hole.mean() <= 0.3 + 1e-3
    assert hole.shape == (128, 128)


def test_random_masks_are_deterministic_with_a_seed():
    for kind in ("random_block", "random_region"):
        a = M.make_hole(kind, 128, np.random.default_rng(7))
        b = M.make_hole(kind, 128, np.random.default_rng(7))
        c = M.make_hole(kind, 128, np.random.default_rng(8))
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_random_region_is_smooth_blobs_not_salt_and_pepper():
    hole = M.random_region_hole(128, np.random.default_rng(0))
    # Neighbouring pixels agree almost everywhere: the pattern is upscaled noise (~17 px cells).
    agree = (hole[:, 1:] == hole[:, :-1]).mean()
    assert agree > 0.95


def test_holes_for_batch_shapes():
    for kind in ("center", "random_block", "random_region"):
        h = M.holes_for(MaskConfig(kind=kind), 128, 3, np.random.default_rng(0))
        assert h.shape == (3, 1, 128, 128) and h.dtype == np.float32
        assert set(np.unique(h)) <= {0.0, 1.0}


def test_full_weights():
    hole = torch.zeros(1, 1, 4, 4)
    hole[..., :2, :2] = 1
    w = M.full_weights(hole, 0.5, 10.0)
    assert w[0, 0, 0, 0] == pytest.approx(0.5) and w[0, 0, 3, 3] == pytest.approx(5.0)


def test_user_mask_from_image():
    m = np.zeros((10, 12, 3), np.uint8)
    m[2:5, 3:6] = 255
    hole = M.hole_from_image(m, (10, 12))
    assert hole.sum() == 9 and hole[3, 4]
    with pytest.raises(UserError, match="same size"):
        M.hole_from_image(m, (12, 10))


def test_the_decode_path_does_not_import_torch():
    # Ray Data's decode workers import ce_ray.data.stream -> crops -> masks; torch there costs each
    # worker process ~2 s and ~300 MB for nothing (centre and block holes are numpy).
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, ce_ray.data.stream, ce_ray.config as C, ce_ray.data.crops as s;"
        "s.holes_for(C.MaskConfig(kind='random_block'), 128, 2, np.random.default_rng(0));"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_diffusion_fill_reproduces_harmonic_images_and_solves_laplace():
    # A linear ramp is harmonic: the exact fill recovers it inside any hole.
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    img = torch.stack([0.5 * xx, 0.3 * yy - 0.2, 0.25 * (xx + yy)])[None]  # (1, 3, 32, 32)
    hole = torch.from_numpy(M.center_hole(32, 2))[None, None]
    out = M.fill_hole(img, hole, "diffusion")
    assert (out - img).abs().max() < 1e-5
    # On any image: every hole pixel is the mean of its 4 neighbours, context untouched.
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 24, 24)).astype(np.float32))
    h = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    h[:, :, 5:15, 8:20] = True
    f = M.diffusion_fill(x, h)
    assert torch.equal(f[~h.expand_as(f)], x[~h.expand_as(x)])
    p = f.double()
    avg = 0.25 * (p[..., 4:14, 8:20] + p[..., 6:16, 8:20] + p[..., 5:15, 7:19] + p[..., 5:15, 9:21])
    assert (p[..., 5:15, 8:20] - avg).abs().max() < 1e-4


def test_diffusion_fill_shared_and_per_image_holes_agree_and_edge_cases():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(-1, 1, (3, 3, 20, 20)).astype(np.float32))
    h = torch.zeros(3, 1, 20, 20, dtype=torch.bool)
    h[:, :, 0:8, 0:9] = True  # touches the image border: no flux across it
    shared = M.diffusion_fill(x, h)
    h2 = h.clone()
    h2[2, 0, 19, 19] = True  # one image differs: every image is solved on its own
    per_image = M.diffusion_fill(x, h2)
    assert (shared[:2] - per_image[:2]).abs().max() < 2 / 255  # within 1/255 on [0, 1] pixels: the multigrid solver
    assert (shared[2, :, :8, :9] - per_image[2, :, :8, :9]).abs().max() < 1e-3
    # Nothing to diffuse from: the mean pixel. No hole: unchanged.
    full = M.diffusion_fill(x[:1], torch.ones(1, 1, 20, 20, dtype=torch.bool))
    assert torch.allclose(full[0, :, 3, 3], torch.tensor(M.MEAN_PIXEL_FILL))
    assert torch.equal(M.diffusion_fill(x, torch.zeros(3, 1, 20, 20, dtype=torch.bool)), x)
    with pytest.raises(UserError, match="unknown hole fill"):
        M.fill_hole(x, h, "zeros")
