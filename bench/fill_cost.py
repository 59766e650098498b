"""What the harmonic fill of 64 different holes costs inside the free-form recipe's training step.

    .venv/bin/python bench/fill_cost.py                    # quality_freeform.yaml, batch 64, thick holes, this CPU
    .venv/bin/python bench/fill_cost.py --device cuda      # the same on a GPU

Prints key=value lines, all measured in this run on the same batch (real photo crops, LaMa thick
holes at 128 px): `fill_ms` (harmonic.harmonic_fill as the step runs it: the full-multigrid start
plus `mask.fill_cycles` CG iterations), `step_ms` (the recipe's whole GanStep, fill included),
`fill_fraction` = fill_ms / step_ms (the goal is <= 0.10), the training fill's error against the
exact sparse solve (`fill_err_mean_255`, `fill_err_max_255`, in grey levels on [0, 1] pixels),
and the inference fill (solved to tolerance: `tol_fill_ms`, `tol_err_max_255`). Also the same
for each `--cycles` value, to show what accuracy each costs. No Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ce_ray.config as C  # noqa: E402
from bench.kvlines import emit_lines  # noqa: E402
from ce_ray.core.harmonic import harmonic_fill  # noqa: E402
from ce_ray.core.masks import harmonic_fill_exact  # noqa: E402
from ce_ray.core.model import build_discriminator, build_generator  # noqa: E402
from ce_ray.core.pixels import to_unit  # noqa: E402
from ce_ray.core.step import GanStep, resolve_device  # noqa: E402
from ce_ray.core.strokes import stroke_hole  # noqa: E402
from ce_ray.data.bundled import load_bundled  # noqa: E402
from ce_ray.data.crops import resize_shorter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def batch(n: int, family: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n real 128-px crops of the bundled photos and n seeded holes of one family."""
    rng = np.random.default_rng(seed)
    photos = [resize_shorter(rgb, 320) for _, rgb in load_bundled()]
    crops = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = int(rng.integers(0, p.shape[0] - 127)), int(rng.integers(0, p.shape[1] - 127))
        crops.append(to_unit(p[y : y + 128, x : x + 128]))
    holes = np.stack([stroke_hole(family, 128, 128, rng) for _ in range(n)])[:, None]
    return torch.from_numpy(np.stack(crops)), torch.from_numpy(holes)


def timed(fn, iters: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "tune_configs" / "quality_freeform.yaml"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--family", default="thick", choices=("thin", "medium", "thick"))
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--cycles", default="0,1,2", help="fill_cycles values to report beside the config's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also append the key=value lines to this file")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    cfg = C.load(args.config, [f"data.batch_size={args.batch}", f"train.device={device.type}"])
    images, holes = batch(args.batch, args.family)
    exact = harmonic_fill_exact(images, holes)  # the reference, on the host
    x, h = images.to(device), holes.to(device)
    torch.manual_seed(0)
    step = GanStep(build_generator(cfg.model).to(device), build_discriminator(cfg.model).to(device), cfg, device)
    u8 = ((images + 1) * 127.5).round().to(torch.uint8)  # what the data pipeline delivers

    def err(filled: torch.Tensor) -> tuple[float, float]:
        e = (filled.cpu() - exact).abs()[holes.expand_as(exact)] * 127.5  # grey levels on [0, 1] pixels
        return float(e.mean()), float(e.max())

    lines = [
        f"device={device}",
        f"torch_threads={torch.get_num_threads()}",
        f"batch={args.batch}",
        f"family={args.family}",
        f"hole_fraction={float(holes.float().mean()):.3f}",
        f"config={Path(args.config).name}",
        f"fill_cycles={cfg.mask.fill_cycles}",
    ]
    step_ms = timed(lambda: step(u8, holes.float()), args.iters, device)
    fill_ms = timed(lambda: harmonic_fill(x, h, cycles=cfg.mask.fill_cycles), args.iters, device)
    mean_e, max_e = err(harmonic_fill(x, h, cycles=cfg.mask.fill_cycles))
    lines += [
        f"step_ms={step_ms:.1f}",
        f"fill_ms={fill_ms:.1f}",
        f"fill_fraction={fill_ms / step_ms:.3f}",
        f"fill_err_mean_255={mean_e:.3f}",
        f"fill_err_max_255={max_e:.2f}",
    ]
    for k in (int(c) for c in args.cycles.split(",") if c.strip()):
        ms = timed(lambda k=k: harmonic_fill(x, h, cycles=k), args.iters, device)
        m, mx = err(harmonic_fill(x, h, cycles=k))
        lines += [
            f"cycles{k}_fill_ms={ms:.1f}",
            f"cycles{k}_fraction={ms / step_ms:.3f}",
            f"cycles{k}_err_mean_255={m:.3f}",
            f"cycles{k}_err_max_255={mx:.2f}",
        ]
    tol_ms = timed(lambda: harmonic_fill(x, h), 1, device)
    lines += [f"tol_fill_ms={tol_ms:.1f}", f"tol_err_max_255={err(harmonic_fill(x, h))[1]:.3f}"]
    t = time.perf_counter()
    harmonic_fill_exact(images, holes)
    lines.append(f"exact_sparse_ms={(time.perf_counter() - t) * 1000:.1f}")
    emit_lines(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
