"""JPEG decode throughput: torchvision.io.decode_jpeg on the GPU (batched) vs PIL on one CPU core,
over the JPEGs of a shards folder (what training decodes), or synthetic 350-px JPEGs when none is
given. Prints key=value lines. No Ray.

    python bench/gpu_decode.py --device cuda [--shards outputs/shards]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kvlines import emit_lines  # noqa: E402


def jpegs(shards: str | None, n: int) -> list[bytes]:
    if shards:
        import pyarrow.parquet as pq

        from ce_ray.data.shards import IMAGE_COLUMN, shard_files

        out: list[bytes] = []
        for split in ("train", "val"):
            for f in shard_files(shards, split):
                out += pq.read_table(f, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN).to_pylist()
        return (out * (n // max(1, len(out)) + 1))[:n]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(min(n, 16)):
        yy, xx = np.mgrid[0:350, 0:525] / 525
        a = (
            np.stack([np.sin(9 * xx + i), np.cos(7 * yy), np.sin(5 * (xx + yy))], -1) * 100
            + 128
            + rng.normal(0, 8, (350, 525, 3))
        )
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95, subsampling=0)
        out.append(buf.getvalue())
    return (out * (n // len(out) + 1))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--shards", default=None)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from PIL import Image

    data = jpegs(args.shards, args.n)
    lines = []
    t0 = time.perf_counter()
    for d in data[: min(len(data), 128)]:
        np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
    pil = min(len(data), 128) / (time.perf_counter() - t0)
    lines.append(f"pil_decode_img_per_s_one_core={pil:.1f}")
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        lines.append("gpu_decode=unavailable_no_torchvision")
    else:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        dev = args.device
        decode_jpeg(tensors[: args.batch], device=dev)  # warm-up (nvjpeg handles, allocations)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(tensors), args.batch):
            decode_jpeg(tensors[i : i + args.batch], device=dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        rate = len(tensors) / (time.perf_counter() - t0)
        lines.append(f"torchvision_decode_{dev}_img_per_s={rate:.1f}")
        lines.append(f"torchvision_decode_{dev}_vs_pil_core={rate / pil:.1f}")
    emit_lines(lines, args.out)


if __name__ == "__main__":
    main()
