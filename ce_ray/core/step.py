"""One Context Encoder GAN iteration on a batch: the only code that changes weights. Pure torch.

The formulation (why it is faster than the popular port and still the original's maths):
  fake = G(context)                          one G forward
  D(real), D(fake)                           two D forwards; D(fake) keeps its graph to G
  L_D = BCE(D(real), 1) + BCE(D(fake), 0)    backward to D's weights only
  L_G = lambda_adv BCE(D(fake), 1) + rec     backward to G's weights only, through D's graph
The G step reuses the D forward on `fake` from before D's update, exactly as train.lua does (2 D
forwards per iteration; the popular port does 3). `backward(inputs=...)` limits each backward to
the weights it updates: the G backward computes only D's input gradients, never D's weight
gradients, so under DDP D's gradient hooks do not fire during the G step (no wasted all-reduce).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ce_ray.config import Config, OptimConfig
from ce_ray.core.losses import discriminator_loss, generator_adversarial_loss, reconstruction_loss
from ce_ray.core.masks import (
    SharedHoleFill,
    center_box,
    center_hole,
    center_weights,
    fill_hole,
    full_weights,
    unpack_holes,
)
from ce_ray.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """fp32: no autocast; bf16: autocast on CPU or GPU; fp16: autocast + grad scaler (GPU only)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(
    params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.Adam:
    # The fused kernel updates all 71M parameters in one pass: the update is memory-bound and
    # costs ~15% of a CPU step with the per-tensor loop.
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def prepare_batch(
    images: torch.Tensor, holes: torch.Tensor, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on `device` as the step computes with it: images (B, 3, S, S) float32 in [-1, 1],
    holes (B, 1, S, S) float32 in {0, 1}. Takes the compact form the data pipelines deliver
    (uint8 RGB crops and bit-packed holes, crops.train_batch), moved to the device first so only
    the small form crosses the bus, or tensors already in the step's form."""
    images = images.to(device, non_blocking=True)
    holes = holes.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().mul_(2.0 / 255.0).sub_(1.0)  # as crops.to_unit
    if holes.dtype == torch.uint8 and holes.dim() == 2:
        holes = unpack_holes(holes, size)
    return images, holes.float()


def shuffle_channels(images: torch.Tensor) -> torch.Tensor:
    """Each image's RGB channels in a random order (one of the 6, uniformly; torch's RNG on the
    images' device). images: (B, 3, H, W)."""
    order = torch.rand(images.shape[0], images.shape[1], device=images.device).argsort(dim=1)  # (B, 3) permutations
    return images.gather(1, order[:, :, None, None].expand_as(images))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def lr_factor(optim: OptimConfig, step: int, total: int) -> float:
    """Multiplier on the configured learning rates for the update that makes step `step + 1`
    of `total`. A function of the step alone, so a resumed run follows the same schedule."""
    if optim.lr_decay == "none":
        return 1.0
    decay_steps = max(1, round(optim.decay_fraction * total))
    start = total - decay_steps
    return 1.0 if step < start else max(0.0, 1.0 - (step - start) / decay_steps)


class GanStep:
    """Holds G, D (bare or DDP-wrapped), their Adam optimisers and the precision policy."""

    def __init__(self, G: nn.Module, D: nn.Module, cfg: Config, device: torch.device):
        if cfg.train.precision == "fp16" and device.type != "cuda":
            raise UserError("train.precision=fp16 needs a CUDA GPU (grad scaler); use bf16 or fp32 on CPU")
        self.G, self.D, self.cfg, self.device = G, D, cfg, device
        o = cfg.optim
        self.opt_g = make_optimizer(G.parameters(), o.lr_g, (o.beta1, o.beta2), device)
        self.opt_d = make_optimizer(D.parameters(), o.lr_d, (o.beta1, o.beta2), device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        m, size = cfg.mask, cfg.data.fine_size
        self.center = center_box(size)
        self.center_w = center_weights(size, m.overlap, cfg.loss.lambda_rec, m.overlap_weight).to(device)  # (64, 64)
        # The centre hole is the same for every crop: its harmonic fill is one exact operator kept
        # on the device (masks.SharedHoleFill) instead of a solve per image, and nothing about it
        # is read back to the host during a step.
        hole = center_hole(size, m.overlap)
        self.center_hole = torch.from_numpy(hole).to(device) if m.kind == "center" else None
        self.center_fill = SharedHoleFill(hole, device) if m.kind == "center" and m.fill == "diffusion" else None

    def inputs(
        self, images: torch.Tensor, holes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(generator input, target, loss weights, holes) for a training batch, in either form
        prepare_batch takes; the channel shuffle (data.channel_shuffle) and the hole fill happen
        here, on the training device."""
        images, holes = prepare_batch(images, holes, self.cfg.data.fine_size, self.device)
        if self.cfg.data.channel_shuffle:
            images = shuffle_channels(images)
        if self.center_fill is not None:
            context = _with_mask(self.center_fill(images), holes, self.cfg)
        else:
            fill_holes = self.center_hole if self.center_hole is not None else holes
            context = model_input(images, holes, self.cfg, cycles=self.cfg.mask.fill_cycles, fill_holes=fill_holes)
        context = context.contiguous(memory_format=self.memory_format)
        if self.cfg.model.variant == "center":
            lo, hi = self.center
            return context, images[:, :, lo:hi, lo:hi], self.center_w, holes  # target (B, 3, 64, 64)
        weights = full_weights(holes, self.cfg.loss.lambda_rec, self.cfg.mask.overlap_weight)  # (B, 1, S, S)
        return context, images, weights, holes

    def _for_d(self, fake: torch.Tensor, real: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
        """What D judges. A full-image model trained on the hole alone (mask.overlap_weight=0)
        never learns its context output, which inference replaces with the photo's own pixels: D
        then sees that composite, the generated hole in the real context."""
        if self.cfg.model.variant == "full" and self.cfg.mask.overlap_weight == 0:
            return torch.where(holes.bool(), fake, real.to(fake.dtype))
        return fake

    def __call__(self, images: torch.Tensor, holes: torch.Tensor) -> dict[str, torch.Tensor]:
        """One iteration; returns detached metric tensors (call .item() only when logging, so a
        GPU step never waits on the host)."""
        G, D, cfg = self.G, self.D, self.cfg
        context, target, weights, holes = self.inputs(images, holes)
        real = target.contiguous(memory_format=self.memory_format)
        G.train()
        D.train()
        if cfg.loss.lambda_adv == 0:
            return self._reconstruction_only(context, target, weights)
        with autocast(self.device, cfg.train.precision):
            fake = G(context)  # (B, 3, 64, 64) centre, or (B, 3, S, S) full
            real_logits = D(real)  # (B,)
            fake_logits = D(self._for_d(fake, real, holes))  # (B,), graph reaches back into G
            loss_d, m_d = discriminator_loss(real_logits, fake_logits)
            loss_adv, m_adv = generator_adversarial_loss(fake_logits, cfg.loss.lambda_adv)
        loss_rec, m_rec = reconstruction_loss(fake, target, weights, cfg.loss.rec, cfg.loss.lambda_rec)
        loss_g = loss_adv + loss_rec

        self.opt_d.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)
        scale = self.scaler.scale if self.scaler else (lambda t: t)
        # D's weights from L_D only; keep D's graph on `fake` for the G backward below.
        scale(loss_d).backward(inputs=list(D.parameters()), retain_graph=True)
        # G's weights from L_G only; D's weight gradients are never computed here.
        scale(loss_g).backward(inputs=list(G.parameters()))
        if self.scaler:
            self.scaler.step(self.opt_d)
            self.scaler.step(self.opt_g)
            self.scaler.update()
        else:
            self.opt_d.step()
            self.opt_g.step()
        return {**m_d, **m_adv, **m_rec, "loss_g": loss_g.detach()}

    def _reconstruction_only(
        self, context: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """lambda_adv = 0: L_G is the reconstruction loss alone and nothing depends on D, so D is
        neither run nor updated (a third of a step's work), and no D metric is reported."""
        cfg = self.cfg
        with autocast(self.device, cfg.train.precision):
            fake = self.G(context)
        loss_rec, m_rec = reconstruction_loss(fake, target, weights, cfg.loss.rec, cfg.loss.lambda_rec)
        self.opt_g.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss_rec).backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            self.scaler.step(self.opt_g)
            self.scaler.update()
        else:
            loss_rec.backward()  # type: ignore[no-untyped-call]  # torch's Tensor.backward is unannotated
            self.opt_g.step()
        return {**m_rec, "loss_g": loss_rec.detach()}  # only what ran: no D, no adversarial term

    def set_lr_scale(self, factor: float) -> None:
        """Both learning rates = the configured ones x factor (the schedule in lr_factor)."""
        o = self.cfg.optim
        for opt, base in ((self.opt_g, o.lr_g), (self.opt_d, o.lr_d)):
            for group in opt.param_groups:
                group["lr"] = base * factor

    def lrs(self) -> dict[str, float]:
        return {"lr_g": self.opt_g.param_groups[0]["lr"], "lr_d": self.opt_d.param_groups[0]["lr"]}

    def state_dict(self) -> dict[str, Any]:
        out = {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}
        if self.scaler:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def model_input(
    images: torch.Tensor,
    holes: torch.Tensor,
    cfg: Config,
    *,
    cycles: int | None = None,
    fill_holes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generator's input for images (B, 3, S, S) in [-1, 1] and holes (B, 1, S, S): the hole
    filled as in training (mask.fill; `cycles`: masks.diffusion_fill), plus the hole itself as a
    4th channel (+1 hole, -1 known) for a model.mask_input generator. `fill_holes`: the holes to
    fill when they differ in form from `holes` (the centre hole as one (S, S) tensor)."""
    x = fill_hole(images, holes if fill_holes is None else fill_holes, cfg.mask.fill, cycles=cycles)
    if cfg.model.mask_input:
        x = torch.cat([x, holes.to(x.dtype) * 2 - 1], dim=1)  # (B, 4, S, S)
    return x


@torch.no_grad()
def predict(
    G: nn.Module, images: torch.Tensor, holes: torch.Tensor, cfg: Config, *, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """Inpaint a batch in eval mode and paste the prediction into the hole only: every pixel
    outside the hole is the input's. images: (B, 3, S, S) in [-1, 1]; holes (B, 1, S, S); `cfg`:
    the model's training config (its variant, hole fill and inputs). `fill`: the images with the
    hole already filled (the planner's full-resolution harmonic fill), else it is computed here.
    Returns (B, 3, S, S) in [-1, 1]."""
    was_training = G.training
    G.eval()
    try:
        x = model_input(images, holes, cfg) if fill is None else _with_mask(fill, holes, cfg)
        out = G(x).float().clamp(-1.0, 1.0)  # a residual output is unbounded
    finally:
        G.train(was_training)
    full = images.clone()
    if cfg.model.variant == "center":
        lo, hi = center_box(cfg.data.fine_size)
        full[:, :, lo:hi, lo:hi] = out
    else:
        full = out
    return torch.where(holes.bool(), full, images)


def _with_mask(filled: torch.Tensor, holes: torch.Tensor, cfg: Config) -> torch.Tensor:
    if cfg.model.mask_input:
        return torch.cat([filled, holes.to(filled.dtype) * 2 - 1], dim=1)
    return filled
