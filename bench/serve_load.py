"""Load test of `ce-ray serve` on 127.0.0.1: latency percentiles, requests/s and errors at 1, 16 and
32 concurrent clients, with batching on and off in the same run, next to the raw generator forward
(and the image codec + windowing) for the same batch sizes; then a soak of 1,000 requests at 32.

    .venv/bin/python bench/serve_load.py                       # paper-size generator (71M), ~3-4 min on 2 cores
    .venv/bin/python bench/serve_load.py --model models:/ce-ray-generator@best --soak 0

Prints key=value lines. Without --model the generator is the paper's architecture with untrained
weights: timings do not depend on the weights. Each request is one PNG with the default centre hole
(one 128x128 window). --image crop (default) sends a 128x128 crop, the model's native input, so the
numbers are about serving and batching; --image photo sends the bundled 451x300 photo (decode +
PNG encode then cost about as much as the forward); or pass a path.
The clients are Python threads in this process, on the same cores as the server: on a 2-core
machine they compete with the replica for CPU, so these are conservative numbers. Beside the Serve
apps, bench/plain_server.py (one uvicorn + FastAPI process, the same decode -> batched forward ->
encode and batching knobs) is measured in the same run: serve_vs_plain_c{N}_latency and
serve_vs_plain_c{N}_throughput are Serve's cost against that limit.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ce_ray.data import images  # noqa: E402

os.environ.setdefault(
    "RAY_AUTH_MODE", "disabled"
)  # a throwaway local cluster (docs/ray-notes.md, "Job submission and clusters")


def kv(**items) -> None:
    for k, v in items.items():
        print(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}", flush=True)


def paper_checkpoint(dest: Path) -> str:
    """The paper's generator (bottleneck 4000, ngf 64) with fresh weights, as a checkpoint directory."""
    import torch

    from ce_ray import config as C
    from ce_ray.core.model import build_discriminator, build_generator
    from ce_ray.train import checkpoint

    cfg = C.Config()
    torch.manual_seed(0)
    return str(
        checkpoint.save(
            dest, G=build_generator(cfg.model), D=build_discriminator(cfg.model), step=0, config=cfg, rng=False
        )
    )


class Raw:
    """The generator forward per batch size, and everything else one request costs in the replica
    (decode, plan, window crop, paste, PNG encode), with the replica's thread count. Runs as a Ray
    actor: Ray workers (replicas included) run at nice 15, so on a busy machine a measurement in
    this (nice 0) process would flatter the raw forward. Measured again before every load level
    and averaged: on a shared machine the load drifts."""

    def __init__(self, model_uri: str, image: bytes, batch_sizes: list[int], threads: int):
        import torch

        from ce_ray.infer.resolve import load_generator

        torch.set_num_threads(threads)
        self.loaded, self.image, self.batch_sizes = load_generator(model_uri, "cpu"), image, batch_sizes
        self.samples: dict[str, list[float]] = {}

    def measure(self, repeats: int) -> None:
        import torch

        from ce_ray.infer import planner as I

        with torch.no_grad():
            for b in self.batch_sizes:
                x = torch.randn(b, 3, 128, 128)
                self.loaded.model(x)  # warm-up
                t = time.perf_counter()
                for _ in range(repeats):
                    self.loaded.model(x)
                self.samples.setdefault(f"raw_forward_ms_batch{b}", []).append(
                    (time.perf_counter() - t) / repeats * 1e3
                )
        spent = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            p = I.plan(self.loaded, images.decode_rgb(self.image), None)
            chosen = p.next_round()
            for i in chosen:
                p.window_input(i)
            for i in chosen:  # the forward is timed above
                p.paste(i, np.zeros((3, 128, 128), np.float32))
            images.encode_png(p.result())
            spent += time.perf_counter() - t
        self.samples.setdefault("codec_ms", []).append(spent / repeats * 1e3)

    def summary(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.samples.items()}


def load(url: str, image: bytes, concurrency: int, n: int) -> dict[str, float]:
    """n POSTs from `concurrency` threads, each with its own keep-alive session. The multipart body is
    encoded once: the client's own CPU use would otherwise compete with the server on a small machine."""
    import requests
    from urllib3.filepost import encode_multipart_formdata

    body, content_type = encode_multipart_formdata({"image": ("photo.png", image, "image/png")})

    local = threading.local()
    lat: list[float] = []
    batches: list[int] = []
    server: list[dict[str, float]] = []  # the replica's Server-Timing: decode, batch (queue + model), model, encode
    errors = 0
    lock = threading.Lock()

    def one(_):
        nonlocal errors
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        t = time.perf_counter()
        try:
            r = s.post(url, data=body, headers={"Content-Type": content_type}, timeout=120)
            ok = r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        except requests.RequestException:
            ok, r = False, None
        dt = time.perf_counter() - t
        with lock:
            if ok:
                lat.append(dt)
                batches.append(int(r.headers.get("X-Ce-Ray-Batch", 1)))
                timing = dict(
                    part.strip().split(";dur=")
                    for part in r.headers.get("Server-Timing", "").split(",")
                    if ";dur=" in part
                )
                server.append({k: float(v) for k, v in timing.items()})
            else:
                errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return {
        "lat": lat,
        "batches": batches,
        "server": server,
        "errors": errors,
        "wall": time.perf_counter() - start,
        "n": n,
    }


def merge(parts: list[dict]) -> dict[str, float]:
    """Percentiles over all latencies; requests/s = successes / wall time, over all parts."""
    lat = [x for p in parts for x in p["lat"]]
    batches = [x for p in parts for x in p["batches"]]
    ms = np.array(lat) * 1e3 if lat else np.array([float("nan")])
    server = [x for p in parts for x in p["server"] if x]  # the plain server sends no Server-Timing
    out = {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "req_per_s": len(lat) / sum(p["wall"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "mean_batch": float(np.mean(batches)) if batches else 0.0,
        "requests": sum(p["n"] for p in parts),
    }
    if server:  # medians of what the replica itself measured
        for key in ("decode", "batch", "model", "encode"):
            out[f"replica_{key}_p50_ms"] = float(np.median([t.get(key, np.nan) for t in server]))
        handler = [t["decode"] + t["batch"] + t["encode"] for t in server]
        out["outside_handler_p50_ms"] = float(
            np.median(np.array(lat) * 1e3 - np.array(handler))
        )  # HTTP, proxy, multipart
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model URI (default: the paper-size generator, untrained)")
    ap.add_argument("--image", default="crop", help="crop (128x128, default), photo (451x300) or a PNG/JPEG path")
    ap.add_argument("--concurrency", default="1,16,32")
    ap.add_argument(
        "--requests", type=int, default=160, help="per concurrency level and batching mode (c=1 uses a quarter)"
    )
    ap.add_argument("--soak", type=int, default=1000, help="requests at the highest concurrency, batching on (0: skip)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the replica (and for the raw forward)")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    ap.add_argument(
        "--no-plain", action="store_true", help="skip the plain uvicorn + FastAPI baseline (bench/plain_server.py)"
    )
    args = ap.parse_args()

    import ray
    from ray import serve

    from ce_ray import cluster
    from ce_ray.data.bundled import load_bundled
    from ce_ray.infer.serve import build_app

    tmp = Path(tempfile.mkdtemp(prefix="ce_ray_bench_"))
    model = args.model or paper_checkpoint(tmp / "paper-untrained")
    if args.image in ("crop", "photo"):
        from PIL import Image

        rgb = dict(load_bundled())["skimage/chelsea"]  # 451x300
        if args.image == "crop":
            rgb = rgb[100:228, 160:288]
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        image = buf.getvalue()
    else:
        image = Path(args.image).read_bytes()
    levels = [int(c) for c in args.concurrency.split(",")]
    kv(
        model=args.model or "paper-size generator (untrained)",
        image=args.image,
        image_bytes=len(image),
        threads=args.threads,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
    )

    cluster.start_local(num_cpus=2, dashboard=False, log_level="ERROR", _temp_dir=f"/tmp/ce_ray_bench/{os.getpid()}")
    raw = ray.remote(num_cpus=0)(Raw).remote(model, image, sorted({1, args.max_batch_size}), args.threads)
    results: dict[tuple[str, int], dict] = {}
    quiet = {"enable_access_log": False, "log_level": "ERROR"}
    try:
        port = cluster.free_ports(1)[0]
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)  # loopback only
        # Batching on and off as two apps side by side (one replica each, idle when not called), so
        # the two modes are measured in alternating halves under the same machine load.
        urls = {}
        plain = None
        if not args.no_plain:
            # The same work in one plain uvicorn + FastAPI process, at the niceness Ray gives its
            # workers (15), measured in the same run: the limit Serve's overhead is judged against.
            import subprocess

            pport = cluster.free_ports(1)[0]
            plain = subprocess.Popen(
                [
                    "nice",
                    "-n",
                    "15",
                    sys.executable,
                    str(Path(__file__).with_name("plain_server.py")),
                    "--model",
                    model,
                    "--port",
                    str(pport),
                    "--max-batch-size",
                    str(args.max_batch_size),
                    "--batch-wait-ms",
                    str(args.batch_wait_ms),
                    "--threads",
                    str(args.threads),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            import requests

            for _ in range(240):
                try:
                    if requests.get(f"http://127.0.0.1:{pport}/healthz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.5)
            urls["plain"] = f"http://127.0.0.1:{pport}/v1/inpaint"
            warm = load(urls["plain"], image, 4, 16)
            if warm["errors"]:
                raise SystemExit(
                    f"bench/plain_server.py answered {warm['errors']:.0f} of 16 warm-up requests with errors; "
                    f"run it by hand to see why: {' '.join(plain.args)}"
                )
        for mode, size in (("on", args.max_batch_size), ("off", 1)):
            serve.run(
                build_app(
                    model,
                    max_batch_size=size,
                    batch_wait_ms=args.batch_wait_ms if size > 1 else 0.0,
                    threads=args.threads,
                    cpus_per_replica=args.cpus_per_replica,
                ),
                name=f"bench-{mode}",
                route_prefix=f"/{mode}",
                logging_config=quiet,
            )
            urls[mode] = f"http://127.0.0.1:{port}/{mode}/v1/inpaint"
            load(urls[mode], image, 4, 16)  # warm-up: connections, first batches
        for c in levels:
            ray.get(raw.measure.remote(repeats=5))
            n = max(10, args.requests // 4) if c == 1 else args.requests
            order = ("on", "off", "plain", "on", "off", "plain") if "plain" in urls else ("on", "off", "on", "off")
            parts: dict[str, list[dict]] = {m: [] for m in order}
            for mode in order:
                parts[mode].append(load(urls[mode], image, c, n // 2))
            for mode, halves in parts.items():
                r = merge(halves)
                results[(mode, c)] = r
                kv(**{f"batching_{mode}_c{c}_{k}": v for k, v in r.items()})
        ray.get(raw.measure.remote(repeats=5))
        summary = ray.get(raw.summary.remote())
        b = args.max_batch_size
        kv(**summary, **{f"raw_forward_ms_per_image_batch{b}": summary[f"raw_forward_ms_batch{b}"] / b})
        if args.soak:
            c = max(levels)
            r = merge([load(urls["on"], image, c, args.soak)])
            kv(**{f"soak_c{c}_{k}": v for k, v in r.items()})
        for mode in urls:
            if mode != "plain":
                serve.delete(f"bench-{mode}")
    finally:
        if plain is not None:
            plain.terminate()
            plain.wait(timeout=30)
        serve.shutdown()
        ray.shutdown()

    raw = summary
    # The serving targets as ratios: a lone request's latency over the raw forward + codec, and
    # batching's throughput gain (all measured above, in this same run).
    base = raw["raw_forward_ms_batch1"] + raw["codec_ms"]
    if ("off", 1) in results:
        kv(single_latency_over_raw_plus_codec_batching_off=results[("off", 1)]["p50_ms"] / base)
    if ("on", 1) in results:
        kv(single_latency_over_raw_plus_codec_batching_on=results[("on", 1)]["p50_ms"] / base)
    if ("off", 1) in results and "replica_model_p50_ms" in results[("off", 1)]:
        r = results[("off", 1)]  # the same ratio against the forward the replica itself timed
        kv(
            single_latency_over_replica_model_plus_codec_batching_off=r["p50_ms"]
            / (r["replica_model_p50_ms"] + raw["codec_ms"])
        )
    for c in levels:
        if c > 1 and ("on", c) in results and ("off", c) in results:
            kv(**{f"throughput_gain_batching_c{c}": results[("on", c)]["req_per_s"] / results[("off", c)]["req_per_s"]})
    # Against the plain one-process server doing the same work (goals: latency <= 1.15x, throughput >= 0.9x).
    for c in levels:
        if ("plain", c) in results and ("on", c) in results:
            kv(
                **{
                    f"serve_vs_plain_c{c}_latency": results[("on", c)]["p50_ms"] / results[("plain", c)]["p50_ms"],
                    f"serve_vs_plain_c{c}_throughput": results[("on", c)]["req_per_s"]
                    / results[("plain", c)]["req_per_s"],
                }
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
