"""Context Encoder losses (paper §3, train.lua): overlap-weighted reconstruction and the
non-saturating adversarial loss. Pure functions returning (loss, metrics); they never call
backward and never touch optimisers. lambda_rec lives in the weights W (masks.py), lambda_adv is
applied here: each exactly once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, kind: str = "l2") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean(W * (pred - target)^2) (or |.| for 'l1') over B, C, H, W, computed in fp32.
    pred/target: (B, 3, H, W); weights: (H, W) or (B, 1, H, W), already holding lambda_rec."""
    diff = pred.float() - target.float()
    err = diff.square() if kind == "l2" else diff.abs()
    loss = (weights * err).mean()
    return loss, {"loss_rec": loss.detach()}


def generator_adversarial_loss(fake_logits: torch.Tensor, lambda_adv: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda_adv * BCE(D(G(x)), 1): the non-saturating generator loss."""
    bce = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32))
    loss = lambda_adv * bce
    return loss, {"loss_g_adv": bce.detach()}


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
