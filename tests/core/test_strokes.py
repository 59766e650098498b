"""Painted-stroke holes (LaMa's thin / medium / thick families): coverage, scaling, determinism, mixtures."""

import numpy as np
import pytest

from ce_ray.config import MaskConfig, parse_families
from ce_ray.core import masks as M
from ce_ray.core import strokes as S
from ce_ray.errors import UserError


def coverages(family: str, n: int = 120, size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.array([S.stroke_hole(family, size, size, rng).mean() for _ in range(n)])


@pytest.mark.parametrize("family", ["thin", "medium", "thick"])
def test_every_hole_is_non_empty_and_at_most_half_the_image(family):
    cov = coverages(family)
    assert cov.min() > 0 and cov.max() <= S.MAX_COVERAGE


def test_families_differ_as_their_parameters_say():
    """Measured on 120 seeded 128-px holes each: the widest point of a hole (its largest inscribed
    radius) grows from thin to thick (medians 8.4 / 16.9 / 26.9 px: thin strokes are 2-7 px wide
    but up to 50 of them cross into wider knots)."""
    from scipy import ndimage

    def widest(family):  # the largest inscribed radius of each hole, in px
        rng = np.random.default_rng(1)
        return np.array(
            [ndimage.distance_transform_edt(S.stroke_hole(family, 128, 128, rng)).max() for _ in range(120)]
        )

    thin, medium, thick = np.median(widest("thin")), np.median(widest("medium")), np.median(widest("thick"))
    assert thin < medium < thick
    assert thin <= 12 and thick >= 20 and medium >= 1.5 * thin
    # Coverage distributions (mean over 120 holes): none is degenerate.
    for fam in ("thin", "medium", "thick"):
        cov = coverages(fam)
        assert 0.1 < cov.mean() < 0.4
        assert np.percentile(cov, 90) - np.percentile(cov, 10) > 0.15  # a spread of sizes, as LaMa's


def test_box_share_of_medium_and_thick():
    rng = np.random.default_rng(3)
    boxes = 0
    for _ in range(400):
        h = S.stroke_hole("thick", 128, 128, rng)
        ys, xs = np.nonzero(h)
        filled = h[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].mean()
        boxes += filled == 1.0 and h.sum() > 50  # a single box fills its bounding box exactly
    # Single boxes are a subset of box masks (1-3 boxes, sometimes overlapping into non-rectangles).
    assert 0.05 < boxes / 400 < 0.3


def test_holes_scale_with_the_image():
    """A 512-px photo gets strokes about 4x as wide as a 128-px crop (min(H, W) / 256)."""
    from scipy import ndimage

    def median_radius(size):
        rng = np.random.default_rng(2)
        return np.median(
            [ndimage.distance_transform_edt(S.stroke_hole("medium", size, size, rng)).max() for _ in range(60)]
        )

    ratio = median_radius(512) / median_radius(128)
    assert 3.0 < ratio < 5.0


def test_deterministic_per_seed_and_non_square():
    a = S.stroke_hole("thin", 96, 160, np.random.default_rng(7))
    b = S.stroke_hole("thin", 96, 160, np.random.default_rng(7))
    c = S.stroke_hole("thin", 96, 160, np.random.default_rng(8))
    assert a.shape == (96, 160) and a.dtype == bool
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown stroke family"):
        S.stroke_hole("huge", 64, 64, np.random.default_rng(0))


def test_mixture_parsing():
    assert parse_families("thin,medium,thick") == pytest.approx({"thin": 1 / 3, "medium": 1 / 3, "thick": 1 / 3})
    assert parse_families("thin:3, random_region:1") == pytest.approx({"thin": 0.75, "random_region": 0.25})
    for bad, msg in (
        ("thin,huge", "unknown mask family 'huge'"),
        ("thin:x", "not a number"),
        ("thin:-1", "> 0"),
        ("", "no mask family"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_families(bad)


def test_config_rejects_a_bad_mixture_naming_the_key():
    from ce_ray import config as C

    with pytest.raises(UserError, match="mask.families"):
        C.from_dict({"mask": {"kind": "strokes", "families": "thin,wide"}, "model": {"variant": "full"}})


def test_mixture_draws_each_family_in_proportion():
    """holes_for with a mixture: thin holes (narrow) and random regions (blobs of 20-30 %) both appear."""
    cfg = MaskConfig(kind="strokes", families="thin:1,random_region:1")
    holes = M.holes_for(cfg, 128, 200, np.random.default_rng(0))
    from scipy import ndimage

    radius = np.array([ndimage.distance_transform_edt(h[0] > 0).max() for h in holes])
    regions = ((holes.mean(axis=(1, 2, 3)) >= 0.2) & (holes.mean(axis=(1, 2, 3)) <= 0.3) & (radius > 6)).mean()
    assert 0.3 < regions < 0.7


def test_make_hole_rejects_unknown_kind():
    with pytest.raises(UserError, match="unknown mask kind"):
        M.make_hole("blob", 64, np.random.default_rng(0))
