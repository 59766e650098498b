"""Losses on hand-computed cases: lambda_rec and lambda_adv each applied exactly once."""

import math

import pytest
import torch

from ce_ray.core.losses import discriminator_loss, generator_adversarial_loss, reconstruction_loss
from ce_ray.core.masks import center_weights


def test_weighted_l2_by_hand():
    pred = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])
    w = torch.tensor([[0.5, 1.0], [1.0, 1.0]])
    loss, m = reconstruction_loss(pred, target, w, "l2")
    assert loss.item() == pytest.approx((0.5 * 1 + 1 * 4) / 4)
    assert m["loss_rec"].item() == pytest.approx(loss.item())
    loss1, _ = reconstruction_loss(pred, target, w, "l1")
    assert loss1.item() == pytest.approx((0.5 * 1 + 2) / 4)


def test_lambda_rec_applied_once():
    # Error 1 everywhere: mean(W) with W = lambda_rec inside, 10 * lambda_rec on the ring.
    lam = 0.999
    w = center_weights(128, 4, lam, 10.0)
    loss, _ = reconstruction_loss(torch.ones(2, 3, 64, 64), torch.zeros(2, 3, 64, 64), w)
    expected = lam * (56 * 56 + 10 * (64 * 64 - 56 * 56)) / (64 * 64)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_adversarial_losses_by_hand():
    logits = torch.tensor([0.0, 0.0])
    loss, m = generator_adversarial_loss(logits, lambda_adv=0.001)
    assert loss.item() == pytest.approx(0.001 * math.log(2))  # lambda_adv once
    assert m["loss_g_adv"].item() == pytest.approx(math.log(2))  # reported unscaled
    ld, md = discriminator_loss(torch.tensor([0.0]), torch.tensor([0.0]))
    assert ld.item() == pytest.approx(2 * math.log(2))
    assert md["d_real"].item() == pytest.approx(0.5) and md["d_fake"].item() == pytest.approx(0.5)


def test_adversarial_losses_are_numerically_safe():
    big = torch.tensor([80.0, -80.0])
    ld, _ = discriminator_loss(big, -big)
    lg, _ = generator_adversarial_loss(-big, 1.0)
    assert torch.isfinite(ld) and torch.isfinite(lg)
    lb, _ = discriminator_loss(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([-1.0], dtype=torch.bfloat16))
    assert lb.dtype == torch.float32  # computed in fp32 even from bf16 logits


def test_losses_do_not_call_backward():
    pred = torch.zeros(1, 3, 4, 4, requires_grad=True)
    loss, _ = reconstruction_loss(pred, torch.ones(1, 3, 4, 4), torch.ones(4, 4))
    assert pred.grad is None
    loss.backward()
    assert pred.grad is not None


def test_log_l2_is_the_mean_of_per_image_logs_and_weighs_smooth_images_equally():
    from ce_ray.core.losses import LOG_L2_EPS

    target = torch.zeros(2, 3, 4, 4)
    pred = torch.zeros(2, 3, 4, 4)
    pred[0] += 0.5  # a large error on image 0
    pred[1] += 0.01  # a tiny one on image 1
    w = torch.full((4, 4), 0.9)
    loss, m = reconstruction_loss(pred, target, w, "log_l2", lambda_rec=0.9)
    expected = 0.9 * (math.log(0.25 + LOG_L2_EPS) + math.log(1e-4 + LOG_L2_EPS)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["loss_rec"] == loss.detach()
    # Halving each image's error lowers the loss by the same amount whatever its size: the
    # small-error image counts as much as the large one (the plain mean would not see it).
    p = pred.clone().requires_grad_(True)
    reconstruction_loss(p, target, w, "log_l2", 0.9)[0].backward()
    g = p.grad.abs().flatten(1).sum(1)
    assert g[1] > 10 * g[0]
