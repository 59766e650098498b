"""The batched multigrid harmonic fill: equal to the exact sparse solve within 1/255, on any holes."""

import numpy as np
import pytest
import torch

from ce_ray.core import harmonic as Hm
from ce_ray.core import masks as M
from ce_ray.core import strokes as S

ONE_GREY_LEVEL = 2 / 255  # 1/255 on [0, 1] pixels, in the [-1, 1] units the fill works in


def photo_crops(n: int, size: int = 128) -> torch.Tensor:
    """Real texture: crops of the bundled photos (smooth noise would make the test easy)."""
    from helpers import random_crops

    from ce_ray.data.bundled import load_bundled
    from ce_ray.data.crops import resize_shorter

    rng = np.random.default_rng(0)
    photos = [resize_shorter(rgb, 350) for _, rgb in load_bundled()]
    crops = [random_crops(photos[i % len(photos)], size, 1, rng, False)[0] for i in range(n)]
    return torch.from_numpy(np.stack(crops))


@pytest.fixture(scope="module")
def crops():
    return photo_crops(24)


@pytest.mark.parametrize("family", ["thin", "medium", "thick"])
def test_matches_the_exact_solve_within_one_grey_level(crops, family):
    rng = np.random.default_rng(1)
    holes = torch.from_numpy(np.stack([S.stroke_hole(family, 128, 128, rng) for _ in range(len(crops))]))[:, None]
    exact = M.harmonic_fill_exact(crops, holes)
    fast = Hm.harmonic_fill(crops, holes)
    assert (fast - exact).abs().max() <= ONE_GREY_LEVEL
    assert torch.equal(fast[~holes.expand_as(fast)], crops[~holes.expand_as(crops)])  # known pixels untouched


def test_odd_sizes_border_holes_and_non_square():
    """Holes touching the border (no flux across it), odd sides, a 1-px hole, a 1-px-wide line."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.uniform(-1, 1, (3, 3, 37, 53)).astype(np.float32))
    h = torch.zeros(3, 1, 37, 53, dtype=torch.bool)
    h[0, 0, :10, :20] = True  # a corner
    h[1, 0, 18, 26] = True  # one pixel
    h[2, 0, :, 30] = True  # a column from border to border
    exact = M.harmonic_fill_exact(x, h)
    assert (Hm.harmonic_fill(x, h) - exact).abs().max() <= ONE_GREY_LEVEL
    # One pixel: exactly the mean of its 4 neighbours.
    assert Hm.harmonic_fill(x, h)[1, :, 18, 26] == pytest.approx(
        ((x[1, :, 17, 26] + x[1, :, 19, 26] + x[1, :, 18, 25] + x[1, :, 18, 27]) / 4).tolist(), abs=1e-4
    )


def test_reproduces_harmonic_images():
    """A linear ramp is harmonic: the fill of any hole inside it is the ramp itself (holes kept off
    the border, where the no-flux condition would bend it)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    ramp = (0.3 * xx - 0.5 * yy)[None, None].repeat(2, 3, 1, 1)
    h = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    for i in range(2):
        h[i, 0, 4:60, 4:60] = torch.from_numpy(S.stroke_hole("thick", 56, 56, np.random.default_rng(i)))
    assert (Hm.harmonic_fill(ramp, h) - ramp).abs().max() < 1e-3


def test_training_mode_fixed_iterations_close_and_improving(crops):
    """cycles=k never reads back to the host; each preconditioned CG iteration brings it closer."""
    rng = np.random.default_rng(3)
    holes = torch.from_numpy(np.stack([S.stroke_hole("thick", 128, 128, rng) for _ in range(len(crops))]))[:, None]
    exact = M.harmonic_fill_exact(crops, holes)
    err = [
        float((Hm.harmonic_fill(crops, holes, cycles=k) - exact).abs()[holes.expand_as(crops)].mean())
        for k in (0, 1, 2)
    ]
    assert err[0] < 3 / 255  # the full-multigrid start alone: ~1/255 on average on [0, 1] pixels
    assert err[2] < err[1] < err[0]


def test_no_known_pixel_and_no_hole():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(Hm.harmonic_fill(x, torch.zeros(2, 1, 16, 16, dtype=torch.bool)), x)
    all_hole = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    assert torch.equal(Hm.harmonic_fill(x, all_hole), x)  # nothing to diffuse from: returned as is
    filled = M.diffusion_fill(x, all_hole)  # the mask module's policy: the mean pixel
    assert torch.allclose(filled[:, 0], torch.full((2, 16, 16), M.MEAN_PIXEL_FILL[0]))


def test_diffusion_fill_routes_shared_holes_to_the_exact_operator(crops):
    hole = torch.from_numpy(M.center_hole(128, 4))
    shared = M.diffusion_fill(crops[:4], hole)  # (H, W): one cached exact operator
    exact = M.harmonic_fill_exact(crops[:4], hole[None, None].expand(4, 1, 128, 128))
    assert (shared - exact).abs().max() < 1e-4
