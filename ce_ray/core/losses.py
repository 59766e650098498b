"""Context Encoder losses (paper §3, train.lua): overlap-weighted reconstruction and adversarial.

The reconstruction loss and the non-saturating adversarial loss, as pure functions returning
(loss, metrics); they never call backward and never touch optimisers. lambda_rec lives in the
weights W (masks.py), lambda_adv is applied here: each exactly once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# loss.rec=log_l2: per-image mean squared error (in [-1, 1] units, ring-weighted) is floored at
# this before the log, i.e. a fill counts as perfect at ~56 dB PSNR.
LOG_L2_EPS = 1e-5


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, kind: str = "l2", lambda_rec: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean(W * (pred - target)^2) (or |.| for 'l1') over B, C, H, W, computed in fp32.
    pred/target: (B, 3, H, W); weights: (H, W) or (B, 1, H, W), already holding lambda_rec.

    kind 'log_l2' (not in the paper): lambda_rec * mean over images of log(mse_i + eps), mse_i
    being image i's W-weighted squared error with lambda_rec divided out. The mean of per-image
    logs is what the reported per-image-averaged PSNR measures (-10 log10 mse), so a smooth tile,
    whose small error the plain mean hardly sees, weighs as much as a textured one."""
    diff = pred.float() - target.float()
    if kind == "log_l2":
        per_image = (weights * diff.square()).flatten(1).mean(dim=1) / max(lambda_rec, 1e-12)  # (B,)
        loss = lambda_rec * torch.log(per_image + LOG_L2_EPS).mean()
        return loss, {"loss_rec": loss.detach()}
    err = diff.square() if kind == "l2" else diff.abs()
    loss = (weights * err).mean()
    return loss, {"loss_rec": loss.detach()}


def generator_adversarial_loss(
    fake_logits: torch.Tensor, lambda_adv: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda_adv * BCE(D(G(x)), 1): the non-saturating generator loss."""
    bce = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32))
    loss = lambda_adv * bce
    return loss, {"loss_g_adv": bce.detach()}


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE(D(y), 1) + BCE(D(G(x)), 0), plus the mean probabilities D assigns to each (the
    collapse signal users watch: D(real) -> 1 and D(fake) -> 0 means D is winning)."""
    real, fake = real_logits.float(), fake_logits.float()
    loss_real = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    loss_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    loss = loss_real + loss_fake
    return loss, {
        "loss_d": loss.detach(),
        "d_real": torch.sigmoid(real).mean().detach(),
        "d_fake": torch.sigmoid(fake).mean().detach(),
    }
