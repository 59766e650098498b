"""Training-step throughput of the pure-torch core against the popular port's formulation.

    .venv/bin/python bench/train_step.py --device cpu --precision bf16 --batch 64 --iters 5

Prints key=value lines. `img_per_s` is ce-ray's GanStep (2 D forwards, backward limited to the
weights each loss updates, dense bottleneck GEMMs, fused Adam, the chosen precision).
`naive_img_per_s` is the same architecture run the way the popular PyTorch port does, measured in
the same run: fp32 eager, sigmoid + BCELoss, 3 D forwards with full backwards, the bottleneck as
plain convolutions, the default (per-tensor) Adam. No Ray is imported: this also runs on GPU hosts
without Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ce_ray.config as C  # noqa: E402
from bench.kvlines import emit_lines  # noqa: E402
from ce_ray.core.masks import center_hole, center_weights, fill_hole  # noqa: E402
from ce_ray.core.model import (
    Generator,
    build_discriminator,
    build_generator,
    conv_macs,
    count_params,
    init_weights,
)  # noqa: E402
from ce_ray.core.step import GanStep  # noqa: E402

# Dense bf16 peaks (TFLOP/s) for model-FLOP utilisation on known cards.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class NaivePortStep:
    """The popular port's iteration: D(real).backward, D(fake.detach()).backward, optD.step, then
    D(fake) again for G, full backward through D (D's weight grads computed and thrown away)."""

    def __init__(self, cfg: C.Config, device: torch.device):
        G = Generator(cfg.model.variant, cfg.model.bottleneck, cfg.model.ngf, dense_bottleneck=False)
        self.G = init_weights(G).to(device)
        self.D = nn.Sequential(build_discriminator(cfg.model), nn.Sigmoid()).to(device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.optim.lr_g, betas=(0.5, 0.999), foreach=False)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.optim.lr_d, betas=(0.5, 0.999), foreach=False)
        self.bce = nn.BCELoss()
        self.w = center_weights(128, cfg.mask.overlap, 1.0, cfg.mask.overlap_weight).to(device)
        self.lam = cfg.loss.lambda_rec

    def __call__(self, images: torch.Tensor, holes: torch.Tensor) -> None:
        real = images[:, :, 32:96, 32:96]
        context = fill_hole(images, holes)
        ones = torch.ones(images.shape[0], device=images.device)
        self.D.zero_grad()
        out = self.D(real)
        self.bce(out, ones).backward()
        fake = self.G(context)
        out = self.D(fake.detach())
        self.bce(out, ones * 0).backward()
        self.opt_d.step()
        self.G.zero_grad()
        out = self.D(fake)
        err_adv = self.bce(out, ones)
        err_rec = ((fake - real).pow(2) * self.w).mean()
        ((1 - self.lam) * err_adv + self.lam * err_rec).backward()
        self.opt_g.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, images, holes, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step(images, holes)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step(images, holes)
    sync(device)
    return images.shape[0] * iters / (time.perf_counter() - t0)


def bf16_matmul_peak(device: torch.device, n: int = 2048, iters: int = 20) -> float:
    """GFLOP/s of an n x n bf16 matmul on this device, measured now: the practical peak that
    model-FLOP utilisation is quoted against on a CPU (no datasheet number fits a shared VM)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e9


class Emit:
    """key=value lines as they are measured (bench.kvlines: stdout and, with --out, a file)."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, key: str, value) -> None:
        emit_lines([f"{key}={value}"], self.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile G and D (GPU)")
    ap.add_argument("--no-naive", action="store_true", help="skip the port baseline (long GPU sweeps)")
    ap.add_argument(
        "--config", default=None, help="training config whose model / mask / loss to measure (default: the paper's)"
    )
    ap.add_argument("--prefix", default="", help="prefix for every key (several runs into one --out file)")
    ap.add_argument("--out", default=None, help="also append the key=value lines to this file")
    args = ap.parse_args()
    emit = Emit(args.out)
    out = lambda k, v: emit(f"{args.prefix}{k}", v)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = C.load(
        args.config, [f"train.precision={args.precision}", f"train.channels_last={str(args.channels_last).lower()}"]
    )
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    G = build_generator(cfg.model).to(device, memory_format=mf)
    D = build_discriminator(cfg.model).to(device, memory_format=mf)
    g_macs, d_macs = conv_macs(G.cpu(), (3, 128, 128)), conv_macs(D.cpu(), (3, 64, 64))
    G, D = G.to(device), D.to(device)
    # Model FLOPs per image and iteration, the usual MFU convention (backward = 2x forward): one G
    # forward + backward, two D forwards + backwards (real and fake). 1 MAC = 2 FLOPs.
    d_passes = 0 if cfg.loss.lambda_adv == 0 else 2  # GanStep skips D when nothing depends on it
    gflop_per_img = 2 * (3 * g_macs + d_passes * 3 * d_macs) / 1e9
    if args.compile:
        G, D = torch.compile(G), torch.compile(D)
    step = GanStep(G, D, cfg, device)
    images = torch.rand(args.batch, 3, 128, 128, device=device) * 2 - 1
    holes = (
        torch.from_numpy(center_hole(128, cfg.mask.overlap))
        .to(device)
        .float()
        .expand(args.batch, 1, 128, 128)
        .contiguous()
    )
    ips = measure(step, images, holes, args.iters, args.warmup, device)
    out("device", args.device)
    if device.type == "cuda":
        out("device_name", torch.cuda.get_device_name().replace(" ", "_"))
    out("torch", torch.__version__)
    out("threads", torch.get_num_threads())
    out("precision", args.precision)
    out("batch", args.batch)
    out("channels_last", args.channels_last)
    out("compile", args.compile)
    out("g_params", count_params(G))
    out("d_params", count_params(D))
    out("gflop_per_img", f"{gflop_per_img:.3f}")
    out("img_per_s", f"{ips:.2f}")
    out("gflop_per_s", f"{ips * gflop_per_img:.1f}")
    peak = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        tflops = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        peak = tflops * 1e3 if tflops else None
    else:  # no datasheet peak for a shared CPU: measure a large bf16 GEMM in the same run
        peak = bf16_matmul_peak(device)
        out("bf16_matmul_gflop_s", f"{peak:.1f}")
    if peak:
        out("mfu_vs_bf16_peak", f"{ips * gflop_per_img / peak:.3f}")
    if not args.no_naive:
        del step, G, D
        naive = NaivePortStep(cfg, device)
        nps = measure(naive, images, holes, args.iters, args.warmup, device)
        out("naive_img_per_s", f"{nps:.2f}")
        out("speedup_vs_naive", f"{ips / nps:.2f}")


if __name__ == "__main__":
    main()
