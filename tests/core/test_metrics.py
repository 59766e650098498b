"""ce_ray/core/metrics.py on hand-computed cases: L1 / L2 / PSNR over the hole in [0, 1] range, per image,
averaged over images (docs/paper.md, "Results to compare against")."""

import numpy as np
import pytest
import torch

from ce_ray.core.metrics import hole_errors, summarize


def _hole(b: int, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """(b, 1, size, size) float holes, 1 inside rows y0:y1, cols x0:x1."""
    y0, y1, x0, x1 = box
    h = np.zeros((b, 1, size, size), np.float32)
    h[:, :, y0:y1, x0:x1] = 1
    return h


def test_constant_offset_gives_known_l1_l2_psnr():
    # +0.2 in [-1, 1] is +0.1 in [0, 1]: L1 = 0.1, L2 = 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB.
    truth = np.zeros((2, 3, 16, 16), np.float32)
    holes = _hole(2, 16, (4, 12, 4, 12))
    pred = truth + 0.2 * holes
    e = hole_errors(pred, truth, holes)
    np.testing.assert_allclose(e["l1"], [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(e["l2"], [0.01, 0.01], rtol=1e-6)
    np.testing.assert_allclose(e["psnr"], [20.0, 20.0], rtol=1e-6)


def test_errors_outside_the_hole_do_not_count():
    truth = np.zeros((1, 3, 16, 16), np.float32)
    holes = _hole(1, 16, (4, 12, 4, 12))
    pred = truth + 0.2 * holes + 1.0 * (1 - holes)  # huge error everywhere outside the hole
    e = hole_errors(pred, truth, holes)
    np.testing.assert_allclose(e["l1"], [0.1], rtol=1e-6)
    np.testing.assert_allclose(e["l2"], [0.01], rtol=1e-6)


def test_perfect_prediction_is_zero_error_and_capped_psnr():
    truth = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    holes = _hole(3, 16, (2, 10, 3, 9))
    e = hole_errors(truth.copy(), truth, holes)
    np.testing.assert_array_equal(e["l1"], 0)
    np.testing.assert_array_equal(e["l2"], 0)
    np.testing.assert_allclose(e["psnr"], 100.0)  # documented cap: l2 clamped at 1e-10


def test_holes_of_different_sizes_normalise_per_image():
    # One wrong pixel (off by 0.5 in [0, 1] in every channel) inside a 2x2 and a 4x4 hole:
    # L1 = 0.5 / 4 and 0.5 / 16, L2 = 0.25 / 4 and 0.25 / 16.
    truth = np.zeros((2, 3, 8, 8), np.float32)
    holes = np.zeros((2, 1, 8, 8), np.float32)
    holes[0, :, 0:2, 0:2] = 1
    holes[1, :, 0:4, 0:4] = 1
    pred = truth.copy()
    pred[:, :, 1, 1] = 1.0  # +1.0 in [-1, 1] = +0.5 in [0, 1]
    e = hole_errors(pred, truth, holes)
    np.testing.assert_allclose(e["l1"], [0.125, 0.03125], rtol=1e-6)
    np.testing.assert_allclose(e["l2"], [0.0625, 0.015625], rtol=1e-6)
    np.testing.assert_allclose(e["psnr"], 10 * np.log10(1 / np.array([0.0625, 0.015625])), rtol=1e-6)


def test_channels_are_averaged():
    # Errors 0.1 / 0.2 / 0.3 in [0, 1] on the three channels: L1 = 0.2, L2 = (0.01+0.04+0.09)/3.
    truth = np.zeros((1, 3, 4, 4), np.float32)
    holes = np.ones((1, 1, 4, 4), np.float32)
    pred = truth + np.array([0.2, 0.4, 0.6], np.float32).reshape(1, 3, 1, 1)
    e = hole_errors(pred, truth, holes)
    np.testing.assert_allclose(e["l1"], [0.2], rtol=1e-6)
    np.testing.assert_allclose(e["l2"], [0.14 / 3], rtol=1e-6)


def test_psnr_is_averaged_per_image_not_from_the_mean_l2():
    # L2 0.01 and 0.0001 -> 20 and 40 dB -> 30 dB averaged (pooled MSE would give ~22.97 dB).
    truth = np.zeros((2, 3, 4, 4), np.float32)
    holes = np.ones((2, 1, 4, 4), np.float32)
    pred = truth.copy()
    pred[0] += 0.2  # 0.1 in [0, 1]
    pred[1] += 0.02  # 0.01 in [0, 1]
    s = summarize(hole_errors(pred, truth, holes))
    assert s["psnr"] == pytest.approx(30.0, rel=1e-6)
    assert s["l2"] == pytest.approx((0.01 + 0.0001) / 2, rel=1e-6)
    assert s["l1"] == pytest.approx((0.1 + 0.01) / 2, rel=1e-6)
    assert all(isinstance(v, float) for v in s.values())


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(1)
    truth = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    pred = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    holes = _hole(2, 8, (1, 6, 2, 7))
    a = hole_errors(pred, truth, holes)
    b = hole_errors(torch.from_numpy(pred), torch.from_numpy(truth), torch.from_numpy(holes).bool())
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
