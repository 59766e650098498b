"""Context Encoder generator and discriminator, the channel-wise FC bottleneck, and the paper's init.

Pathak et al. 2016 (the layer tables are in docs/paper.md) and the authors' train.lua /
train_random.lua; the channel-wise fully-connected bottleneck is the paper's §3.1. Pure torch; no
Ray.

Order: blocks -> models -> builders. All kernels are 4x4; conv biases are off because the authors
zero them every step (`bias=False` is the same thing without the work).
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ce_ray.config import ModelConfig

LEAK = 0.2  # LeakyReLU slope in encoder and discriminator
INIT_STD = 0.02  # N(0, 0.02) conv weights; BN gamma ~ N(1, 0.02)
KERNEL = 4
RESIZE_KERNEL = 3  # the conv after each nearest-neighbour resize (model.upsample=resize)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def down(cin: int, cout: int, bn: bool = True) -> nn.Sequential:
    """4x4 stride-2 conv halving H and W, [BN], LeakyReLU(0.2)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, KERNEL, 2, 1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(LEAK, inplace=True))
    return nn.Sequential(*layers)


def up(cin: int, cout: int, mode: str = "transposed") -> nn.Sequential:
    """Double H and W, BN, ReLU: a 4x4 stride-2 transposed conv (the paper), or a nearest 2x
    resize then a 3x3 conv (mode "resize": no checkerboard from uneven kernel overlap)."""
    return nn.Sequential(*upsample_conv(cin, cout, mode), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def upsample_conv(cin: int, cout: int, mode: str) -> list[nn.Module]:
    if mode == "resize":
        return [
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(cin, cout, RESIZE_KERNEL, 1, RESIZE_KERNEL // 2, bias=False),
        ]
    return [nn.ConvTranspose2d(cin, cout, KERNEL, 2, 1, bias=False)]


class DenseConv(nn.Conv2d):
    """A 4x4 valid conv on a 4x4 input (E6: 512x4x4 -> 4000x1x1), run as the matrix product it
    is. Same weight tensor, same maths; oneDNN's convolution backward for this shape ran ~20x
    slower than the equivalent GEMM on CPU and dominated the whole step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, 4, 4) -> (B, Cout, 1, 1)
        if x.shape[-2:] != self.kernel_size:
            return super().forward(x)
        y = F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1))
        return y[:, :, None, None]


class DenseConvTranspose(nn.ConvTranspose2d):
    """The decoder's first layer (D1: 4000x1x1 -> 512x4x4) as the matrix product it is; see
    DenseConv. Weight layout (Cin, Cout, 4, 4) is unchanged."""

    def forward(
        self, x: torch.Tensor, output_size: list[int] | None = None
    ) -> torch.Tensor:  # (B, Cin, 1, 1) -> (B, Cout, 4, 4)
        if x.shape[-2:] != (1, 1):
            return super().forward(x, output_size)
        w = self.weight.reshape(self.in_channels, -1)  # (Cin, Cout*16)
        y = F.linear(x.reshape(x.shape[0], -1), w.t())
        return y.reshape(x.shape[0], self.out_channels, *self.kernel_size)


class ChannelWiseFC(nn.Module):
    """Paper §3.1: each of the m feature maps (n x n) is fully connected to itself, with no
    weights across maps: m * n^4 parameters instead of m^2 * n^4 for a full FC layer."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.channels, self.size = channels, size
        self.weight = nn.Parameter(torch.empty(channels, size * size, size * size))  # (m, n², n²)
        # Initialised here too (init_weights re-draws it): torch.empty alone holds whatever was
        # in memory, NaNs included, for anyone who builds the layer on its own.
        nn.init.normal_(self.weight, 0.0, INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, m, n, n) -> (B, m, n, n)
        b = x.shape[0]
        y = torch.einsum("bmi,mio->bmo", x.reshape(b, self.channels, -1), self.weight)
        return y.reshape(b, self.channels, self.size, self.size)


class Generator(nn.Module):
    """Encoder -> bottleneck -> decoder. variant 'center': 3x128x128 context -> 3x64x64 centre
    patch (train.lua). variant 'full': -> 3x128x128 image (train_random.lua's extra up-conv).

    Beyond the paper, each off by default: `mask_input` adds the hole as a 4th input channel (+1
    in the hole, -1 elsewhere: a free-form hole filled smoothly is otherwise invisible to the
    network); `skips` (full variant) concatenates each encoder level's features to the decoder
    level of the same size (U-Net, Ronneberger et al. 2015), so detail around a thin hole need not
    pass the 4x4 bottleneck."""

    def __init__(
        self,
        variant: str = "center",
        bottleneck: int = 4000,
        ngf: int = 64,
        channel_wise_fc: bool = False,
        dense_bottleneck: bool = True,
        upsample: str = "transposed",
        residual: bool = False,
        mask_input: bool = False,
        skips: bool = False,
    ):
        super().__init__()
        self.residual, self.skips = residual, skips
        # dense_bottleneck=False builds E6/D1 as plain conv layers, as the ports do (benchmarks).
        conv, convt = (DenseConv, DenseConvTranspose) if dense_bottleneck else (nn.Conv2d, nn.ConvTranspose2d)
        self.variant = variant
        self.in_channels = 4 if mask_input else 3
        c = ngf
        self.encoder = nn.Sequential(
            down(self.in_channels, c, bn=False),  # E1 (B, 64, 64, 64): no BN on the first layer (DCGAN practice)
            down(c, c),  # E2 (B, 64, 32, 32)
            down(c, 2 * c),  # E3 (B, 128, 16, 16)
            down(2 * c, 4 * c),  # E4 (B, 256, 8, 8)
            down(4 * c, 8 * c),  # E5 (B, 512, 4, 4)
        )
        if channel_wise_fc:
            # §3.1: channel-wise FC on the 4x4 maps, then a stride-1 conv to mix channels.
            self.bottleneck = nn.Sequential(
                ChannelWiseFC(8 * c, 4),
                nn.BatchNorm2d(8 * c),
                nn.LeakyReLU(LEAK, inplace=True),
                nn.Conv2d(8 * c, 8 * c, 1, bias=False),
                nn.BatchNorm2d(8 * c),
                nn.ReLU(inplace=True),
            )  # (B, 512, 4, 4)
        else:
            self.bottleneck = nn.Sequential(
                conv(8 * c, bottleneck, KERNEL, 1, 0, bias=False),
                nn.BatchNorm2d(bottleneck),
                nn.LeakyReLU(LEAK, inplace=True),  # E6 (B, 4000, 1, 1)
                convt(bottleneck, 8 * c, KERNEL, 1, 0, bias=False),
                nn.BatchNorm2d(8 * c),
                nn.ReLU(inplace=True),  # D1 (B, 512, 4, 4)
            )
        k = 2 if skips else 1  # a skip doubles each decoder layer's input channels
        layers: list[nn.Module] = [
            up(k * 8 * c, 4 * c, upsample),
            up(k * 4 * c, 2 * c, upsample),
            up(k * 2 * c, c, upsample),
        ]  # D2-D4 -> (B, 64, 32, 32)
        if variant == "full":
            layers.append(up(k * c, c, upsample))  # train_random.lua's extra up-conv -> (B, 64, 64, 64)
        layers += upsample_conv(k * c, 3, upsample)  # D5 -> (B, 3, 64|128, 64|128)
        if not residual:  # a residual output is a correction, unbounded; predict() clamps the sum
            layers.append(nn.Tanh())
        self.decoder = nn.Sequential(*layers)

    def last_conv(self) -> nn.Conv2d | nn.ConvTranspose2d:
        return [m for m in self.decoder if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3|4, S, S) context, hole filled -> (B, 3, S/2 | S, ...)
        if self.skips:
            y = self._forward_skips(x)
        else:
            y = self.decoder(self.bottleneck(self.encoder(x)))
        if not self.residual:
            return y
        if self.variant == "center":
            lo = x.shape[-1] // 4  # the predicted centre region, img[:, :, S/4:3S/4, S/4:3S/4]
            return x[:, :3, lo : x.shape[-1] - lo, lo : x.shape[-1] - lo] + y
        return x[:, :3] + y

    def _forward_skips(self, x: torch.Tensor) -> torch.Tensor:
        feats: list[torch.Tensor] = []
        for layer in self.encoder:
            x = layer(x)
            feats.append(x)  # E1..E5: (B, c, 64, 64) ... (B, 8c, 4, 4)
        y: torch.Tensor = self.bottleneck(x)  # (B, 8c, 4, 4)
        ups = [m for m in self.decoder if isinstance(m, nn.Sequential)]  # D2..D4 (+ the full variant's extra)
        tail = list(self.decoder)[len(ups) :]  # D5 (+ Tanh)
        for layer, skip in zip(ups, reversed(feats)):
            y = layer(torch.cat([y, skip], dim=1))
        y = torch.cat([y, feats[len(feats) - 1 - len(ups)]], dim=1)  # E1 (full) or E2 (centre), beside D5's input
        for layer in tail:
            y = layer(y)
        return y


class Discriminator(nn.Module):
    """Unconditional patch critic: sees only the predicted region (64x64 centre, or the whole
    128x128 image for the full variant, which gets one extra stride-2 conv). Returns logits (B,)
    so the loss can use BCEWithLogits (numerically safe, autocast-safe)."""

    def __init__(self, in_size: int = 64, ndf: int = 64):
        super().__init__()
        c = ndf
        layers: list[nn.Module] = [down(3, c, bn=False)]  # (B, 64, S/2, S/2)
        if in_size == 128:
            layers.append(down(c, c))  # train_random.lua's extra conv: 128 -> the 64 path
        layers += [down(c, 2 * c), down(2 * c, 4 * c), down(4 * c, 8 * c)]  # (B, 512, 4, 4)
        layers.append(nn.Conv2d(8 * c, 1, KERNEL, 1, 0, bias=False))  # (B, 1, 1, 1)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        return logits.flatten()


def init_weights(model: ModuleT) -> ModuleT:
    """The paper's (DCGAN) init: conv weights N(0, 0.02); BN gamma N(1, 0.02), beta 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
        elif isinstance(m, ChannelWiseFC):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, INIT_STD)
            nn.init.zeros_(m.bias)
    return model


def build_generator(cfg: ModelConfig) -> Generator:
    G = init_weights(
        Generator(
            cfg.variant,
            cfg.bottleneck,
            cfg.ngf,
            cfg.channel_wise_fc,
            upsample=cfg.upsample,
            residual=cfg.residual,
            mask_input=cfg.mask_input,
            skips=cfg.skips,
        )
    )
    if cfg.residual:  # start as the identity on the fill: the correction grows from zero
        nn.init.zeros_(G.last_conv().weight)
    return G


def build_discriminator(cfg: ModelConfig, fine_size: int = 128) -> Discriminator:
    in_size = fine_size // 2 if cfg.variant == "center" else fine_size
    return init_weights(Discriminator(in_size, cfg.ndf))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_macs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> int:
    """Multiply-accumulates of the conv / FC layers for one forward of one sample (the model
    FLOPs used for throughput and utilisation figures; BN and activations are not counted)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.ConvTranspose2d):
            total += inp[0][0].numel() * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, ChannelWiseFC):
            total += mod.weight.numel()

    if input_shape is None:
        input_shape = (getattr(model, "in_channels", 3), 128, 128)
    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, ChannelWiseFC))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
