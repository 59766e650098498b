"""The DDP code path without Ray: torch.distributed initialised the way Ray Train's TorchConfig
does (NCCL on GPUs, gloo on CPUs), G and D wrapped in DistributedDataParallel as
`ray.train.torch.prepare_model` wraps them, then GanStep iterations. Prints key=value lines
(rank 0). For GPU hosts that cannot carry Ray:

    torchrun --nproc_per_node 1 bench/ddp_step.py --device cuda --precision bf16 --steps 3
    torchrun --nproc_per_node 2 bench/ddp_step.py --device cpu --precision bf16 --steps 2 --small
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ce_ray.config as C  # noqa: E402
from bench.kvlines import emit_lines  # noqa: E402
from ce_ray.core.masks import center_hole  # noqa: E402
from ce_ray.core.model import build_discriminator, build_generator  # noqa: E402
from ce_ray.core.step import GanStep, unwrap  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="the demo-size network (CPU dry runs)")
    ap.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (GPU only, as model.sync_bn)")
    ap.add_argument("--out", default=None, help="also append the key=value lines to this file")
    args = ap.parse_args()
    rank, world, local = (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )
    backend = "nccl" if args.device == "cuda" else "gloo"
    t0 = time.perf_counter()
    dist.init_process_group(backend)
    init_s = time.perf_counter() - t0
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    overrides = [f"train.precision={args.precision}"]
    if args.small:
        overrides += ["model.ngf=32", "model.ndf=32", "model.bottleneck=1000"]
    cfg = C.load(None, overrides)
    torch.manual_seed(0)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    if args.sync_bn:
        G, D = torch.nn.SyncBatchNorm.convert_sync_batchnorm(G), torch.nn.SyncBatchNorm.convert_sync_batchnorm(D)
    G, D = G.to(device), D.to(device)
    ids = [device.index] if device.type == "cuda" else None
    G, D = DDP(G, device_ids=ids), DDP(D, device_ids=ids)
    step = GanStep(G, D, cfg, device)
    images = torch.rand(args.batch, 3, 128, 128, device=device) * 2 - 1
    holes = (
        torch.from_numpy(center_hole(128, cfg.mask.overlap))
        .to(device)
        .float()
        .expand(args.batch, 1, 128, 128)
        .contiguous()
    )
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        m = step(images, holes)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    # Every rank holds the same weights after the steps (DDP all-reduced the gradients).
    w = unwrap(G).encoder[0][0].weight.detach().float().sum()
    ws = [torch.zeros_like(w) for _ in range(world)]
    dist.all_gather(ws, w)
    same = all(torch.allclose(ws[0], x) for x in ws)
    if rank == 0:
        lines = [
            f"ddp_backend={backend}",
            f"ddp_world_size={world}",
            f"ddp_init_s={init_s:.2f}",
            f"ddp_steps={args.steps}",
            f"ddp_first_step_s={times[0]:.3f}",
            f"ddp_img_per_s={args.batch * world * (len(times) - 1) / max(sum(times[1:]), 1e-9):.1f}"
            if len(times) > 1
            else "ddp_img_per_s=nan",
            f"ddp_loss_g={float(m['loss_g']):.4f}",
            f"ddp_weights_equal_across_ranks={same}",
        ]
        emit_lines(lines, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
