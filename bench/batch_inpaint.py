"""`ce-ray inpaint FOLDER`: the Ray Data pipeline vs a one-process loop over the same photos, in the
same run. Prints key=value lines: img_per_s of each and their ratio (aim >= 1.3 on 2 cores; on a
cluster the scaling comes from more replicas).

    .venv/bin/python bench/batch_inpaint.py [--photos 200] [--replicas 1] [--config tune_configs/demo.yaml]

The photos are crops and resizes of the bundled photos at several sizes (128 to 600 px), written as
PNGs to a temp folder; the generator is the --config's network with fresh weights (timings do not
depend on the weights). Both engines run the same stages (batch_inpaint.py): read + decode + hole,
generator forward, PNG encode + write. The loop runs them one after another in one process
(torch's default threads); the pipeline overlaps them in Ray tasks and actors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def make_photos(folder: Path, n: int) -> None:
    from PIL import Image

    from ce_ray.data.bundled import load_bundled

    photos = [rgb for _, rgb in load_bundled()]
    rng = np.random.default_rng(0)
    sizes = [128, 200, 300, 450, 600]
    for i in range(n):
        src = photos[i % len(photos)]
        side = sizes[i % len(sizes)]
        h, w = src.shape[:2]
        crop = src[: min(h, int(rng.integers(min(h, 200), h + 1))), : min(w, int(rng.integers(min(w, 200), w + 1)))]
        scale = side / min(crop.shape[:2])
        im = Image.fromarray(crop).resize(
            (max(16, round(crop.shape[1] * scale)), max(16, round(crop.shape[0] * scale))), Image.BICUBIC
        )
        sub = folder / f"set{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        im.save(sub / f"p{i:04d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--config", default="tune_configs/demo.yaml", help="the network to build (fresh weights)")
    args = ap.parse_args()
    import torch

    from ce_ray import cluster
    from ce_ray import config as C
    from ce_ray.core.model import build_discriminator, build_generator
    from ce_ray.infer import batch as BI
    from ce_ray.train import checkpoint

    work = Path(tempfile.mkdtemp(prefix="ce_ray_bench_inpaint_"))
    try:
        make_photos(work / "src", args.photos)
        cfg = C.load(args.config)
        torch.manual_seed(0)
        model = str(
            checkpoint.save(
                work / "model",
                G=build_generator(cfg.model),
                D=build_discriminator(cfg.model),
                step=0,
                config=cfg,
                rng=False,
            )
        )
        print(f"photos={args.photos}")
        print(f"config={args.config}")
        print(f"replicas={args.replicas}")
        print(f"cpus={os.cpu_count()}")
        quiet = lambda _m: None  # noqa: E731
        cluster.start_local(num_cpus=os.cpu_count() or 2, dashboard=False, log_level="ERROR", log_to_driver=False)
        # Warm-up of both (imports, Ray worker processes), on a few photos.
        make_photos(work / "warm", 8)
        BI.run(str(work / "warm"), model, str(work / "w1"), engine="local", progress=False, log=quiet)
        BI.run(
            str(work / "warm"),
            model,
            str(work / "w2"),
            engine="ray",
            replicas=args.replicas,
            device="cpu",
            progress=False,
            log=quiet,
        )
        rates = {}
        for engine in ("local", "ray", "local", "ray"):  # alternating: machine drift hits both
            out = work / f"out-{engine}-{len(rates)}"
            t0 = time.perf_counter()
            m = BI.run(
                str(work / "src"),
                model,
                str(out),
                engine=engine,
                replicas=args.replicas,
                device="cpu",
                progress=False,
                log=quiet,
            )
            rate = len(m["done"]) / (time.perf_counter() - t0)
            rates.setdefault(engine, []).append(rate)
            shutil.rmtree(out, ignore_errors=True)
        loop, ray_ = float(np.mean(rates["local"])), float(np.mean(rates["ray"]))
        print(f"loop_img_per_s={loop:.2f}")
        print(f"ray_data_img_per_s={ray_:.2f}")
        print(f"ray_vs_loop={ray_ / loop:.2f}")
        print(f"runs_loop={','.join(f'{r:.2f}' for r in rates['local'])}")
        print(f"runs_ray={','.join(f'{r:.2f}' for r in rates['ray'])}")
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
