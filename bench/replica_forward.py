"""The Serve replica's work without Serve: decode a PNG request, plan its windows, one batched
generator forward per round (inpaint.inpaint_many), encode the PNG reply. Prints key=value lines
for batch sizes 1 and 8 (requests per forward), on CPU or GPU, no Ray.

    .venv/bin/python bench/replica_forward.py --device cuda [--config tune_configs/quality_corpus.yaml]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ce_ray.config as C  # noqa: E402
from bench.kvlines import emit_lines  # noqa: E402
from ce_ray.core.model import build_generator  # noqa: E402
from ce_ray.data import images
from ce_ray.infer import planner as inpaint  # noqa: E402
from ce_ray.infer.resolve import LoadedGenerator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--config", default=None, help="the model to build (default: the paper's network)")
    ap.add_argument("--size", type=int, default=128, help="request image side (128: one window)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default=None, help="also append the key=value lines to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = C.load(args.config)
    torch.manual_seed(0)
    loaded = LoadedGenerator(
        model=build_generator(cfg.model).to(device).eval(), config=cfg, step=0, metrics={}, source="untrained"
    )
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    request = buf.getvalue()
    lines = []
    for b in (int(x) for x in args.batches.split(",")):

        def once(b: int = b) -> None:
            plans = [inpaint.plan(loaded, images.decode_rgb(request)) for _ in range(b)]
            for out in inpaint.inpaint_many(loaded, plans):
                images.encode_png(out)

        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.iters
        lines += [f"replica_batch{b}_ms={1000 * dt:.2f}", f"replica_batch{b}_img_per_s={b / dt:.1f}"]
    emit_lines(lines, args.out)


if __name__ == "__main__":
    main()
