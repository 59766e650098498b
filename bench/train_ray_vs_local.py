"""Ray Train overhead: steady-state img/s of Ray Train with 1 worker against the local no-Ray loop
on the same shards and config, and the time from `ce-ray train` to its first completed step.

    .venv/bin/python bench/train_ray_vs_local.py --rounds 3             # paper model, batch 16, 40 steps
    .venv/bin/python bench/train_ray_vs_local.py --config tune_configs/smoke.yaml --steps 200 --warmup 50 --log-every 50

Prints key=value lines:
  local_img_per_s / ray_img_per_s   steady state: images over time for the steps after --warmup, from
                                    the loop's own img_per_s of each log window (--log-every), so both
                                    paths are measured by the same code
  ray_over_local                    their ratio (target >= 0.95)
  first_step_s                      wall time from starting `python -m ce_ray.cli train` (a fresh
                                    process: imports, local Ray, MLflow store, worker group, data
                                    pipeline) until rank 0 prints "step 1/"; smoke config, 2 workers
                                    (what `make demo` runs; target <= 30 s)
  first_step_attached_s             the same attached to a running cluster (RAY_ADDRESS, as under
                                    `ray job submit`; target <= 20 s)
Both throughput runs use the same torch threads per process (all cores: the Ray worker is alone on
the node) and run back to back; timings on a shared machine are noisy, use --rounds for medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray starts its workers at niceness 15, the local loop runs at this process's 0: on a machine with
# any other load the Ray worker would lose the CPU to it and the ratio would measure the scheduler's
# priorities, not the two code paths. Both run at 0 here (as bench/data_pipeline.py's runs do).
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from ce_ray import config as C  # noqa: E402


def steady_img_per_s(history: list[dict], warmup: int) -> float:
    """Images / seconds over the log windows after `warmup` steps: the harmonic mean of the
    windows' img/s (every window has the same number of steps and batch size)."""
    rates = [h["img_per_s"] for h in history if h["step"] > warmup]
    if not rates:
        raise SystemExit(f"no steps after warmup={warmup}: raise --steps")
    return statistics.harmonic_mean(rates)


def run_local(cfg: C.Config, out: Path) -> float:
    import json

    from ce_ray.train.local import train_local

    r = train_local(cfg, run_name=f"local-{time.time_ns()}", log=lambda line: None)
    return steady_img_per_s(
        [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()], WARMUP
    )


def run_ray(cfg: C.Config) -> float:
    from ce_ray.train.driver import train

    s = train(cfg, run_name=f"ray-{time.time_ns()}", log=lambda line: None)
    return steady_img_per_s(s.history, WARMUP)


# The attached cluster listens on 127.0.0.1 only. A client given 127.0.0.1 as the address swaps in
# the machine's outward IP (ray._private.services.resolve_ip_for_localhost), where nothing listens:
# ray.init then spends 5-20 s failing before it connects, a cost no real `ray job submit` pays (its
# RAY_ADDRESS names the head's own IP). With Ray's single-machine mode the client keeps 127.0.0.1.
# Token auth is off: a throwaway cluster, as in the tests.
ATTACH_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def start_head(work: Path) -> tuple[subprocess.Popen, str]:
    """A running cluster to attach to, as under `ray job submit`: `ray start --head --block` on
    127.0.0.1 (this machine's CPUs, no dashboard, token auth off: a throwaway cluster). Returns the
    process (terminate it to stop the cluster it started) and the address for RAY_ADDRESS."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, **ATTACH_ENV}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", f"--temp-dir={work / 'ray_head'}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    probe = f"import ray; ray.init(address={address!r}); assert ray.cluster_resources().get('CPU', 0) > 0"
    deadline = time.time() + 120
    while True:  # ready when a client can connect and sees the node's CPUs
        env_probe = {**env, "RAY_ADDRESS": address}
        if subprocess.run([sys.executable, "-c", probe], env=env_probe, capture_output=True).returncode == 0:
            return proc, address
        if time.time() > deadline or proc.poll() is not None:
            proc.terminate()
            raise SystemExit("ray start --head did not come up")
        time.sleep(1)


def first_step_seconds(shards: str, work: Path, address: str | None = None) -> float:
    """`ce-ray train` on the smoke config in a fresh process, timed to rank 0's first step line;
    attached to the cluster at `address` (RAY_ADDRESS) when given, else on a private local one."""
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "ce_ray.cli",
        "train",
        "--config",
        str(ROOT / "tune_configs" / "smoke.yaml"),
        f"data.shards={shards}",
        f"train.output_dir={work / 'first_out'}",
        f"scale.storage_path={work / 'first_runs'}",
        "train.log_every=1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local cluster: a user's first run
    if address:
        env.update(RAY_ADDRESS=address, **ATTACH_ENV)  # as a job under `ray job submit` sees it
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.startswith("step 1/"):
            first = time.perf_counter() - t0
    if proc.wait() != 0 or first is None:
        raise SystemExit("ce-ray train failed:\n" + "".join(lines[-40:]))
    return first


WARMUP = 10


def main() -> None:
    import shutil

    work = Path(tempfile.mkdtemp(prefix="ce_ray_bench_train_"))
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # shards, checkpoints and MLflow stores of the runs


def run(work: Path) -> None:
    global WARMUP
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "tune_configs" / "default.yaml"))
    ap.add_argument("--shards", help="prepared shards (default: the bundled photos, prepared into a temp dir)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every: steps per measured window")
    ap.add_argument("--batch", type=int, default=16, help="data.batch_size (per worker)")
    ap.add_argument("--rounds", type=int, default=1, help="local/Ray pairs; medians are printed")
    ap.add_argument("--skip-first-step", action="store_true")
    ap.add_argument("--first-step-only", action="store_true", help="only time `ce-ray train` to its first step")
    ap.add_argument("--first-step-runs", type=int, default=1, help="timed `ce-ray train` runs; the median is printed")
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    args = ap.parse_args()
    WARMUP = args.warmup

    shards = args.shards
    if not shards:
        from ce_ray.data.prepare import prepare

        shards = str(work / "shards")
        prepare("bundled", shards, engine="local", progress=False, rows_per_shard=2)
    steps = args.steps
    # Evaluation and the checkpoint only at the last step, outside the measured windows (a
    # window's img/s is taken before its evaluation).
    if steps % args.log_every or args.warmup % args.log_every:
        raise SystemExit("--steps and --warmup must be multiples of --log-every")
    base = C.load(
        args.config,
        [
            f"data.shards={shards}",
            f"data.batch_size={args.batch}",
            f"train.steps={steps}",
            f"train.log_every={args.log_every}",
            f"train.eval_every={steps}",
            f"train.ckpt_every={steps}",
            f"train.output_dir={work / 'out'}",
            f"scale.storage_path={work / 'runs'}",
            "scale.num_workers=1",
            "scale.cpus_per_worker=1",
            "mlflow.enabled=false",
            *args.overrides,
        ],
    )
    # The bundled set has 9 train photos: cut enough crops per photo (data.repeat) that all the
    # measured steps fall in one epoch, as they would with a real photo collection. Otherwise the
    # per-epoch pipeline restart of a 9-photo epoch, an artifact of the tiny set, dominates both.
    import math

    import pyarrow.parquet as pq

    from ce_ray import cluster
    from ce_ray.data.shards import shard_files

    photos = sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(base.data.shards, "train"))
    if not any(o.startswith("data.repeat=") for o in args.overrides):
        base = C.replace(base, data={"repeat": max(1, math.ceil((steps + 1) * args.batch / photos))})
    if args.first_step_only:
        print_first_step(shards, work, args.first_step_runs)
        return
    cluster.connect_ray(log_to_driver=False)  # rank 0's progress lines stay out of the key=value output
    local_rates, ray_rates = [], []
    for _ in range(args.rounds):
        local_rates.append(run_local(base, work))
        ray_rates.append(run_ray(base))
    local, ray_ = statistics.median(local_rates), statistics.median(ray_rates)
    print(f"config={Path(args.config).name}")
    print(f"batch_size={args.batch}")
    print(f"steps={steps}")
    print(f"warmup_steps={args.warmup}")
    print(f"log_every={args.log_every}")
    print(f"rounds={args.rounds}")
    print(f"train_photos={photos}")
    print(f"data_repeat={base.data.repeat}")
    print(f"cpu_count={os.cpu_count()}")
    print(f"local_img_per_s={local:.2f}")
    print(f"ray_img_per_s={ray_:.2f}")
    print(f"ray_over_local={ray_ / local:.3f}")
    if len(local_rates) > 1:
        print("local_img_per_s_all=" + ",".join(f"{r:.2f}" for r in local_rates))
        print("ray_img_per_s_all=" + ",".join(f"{r:.2f}" for r in ray_rates))
    if not args.skip_first_step:
        import ray

        ray.shutdown()  # the timed runs start their own cluster, as a user's would
        print_first_step(shards, work, args.first_step_runs)


def print_first_step(shards: str, work: Path, runs: int) -> None:
    """first_step_s (a fresh local cluster per run) and first_step_attached_s (a running cluster
    attached through RAY_ADDRESS, one `ray start` for all its runs), alternating."""
    head, address = start_head(work)
    fresh, attached = [], []
    try:
        for i in range(runs):
            for kind, times, addr in (("fresh", fresh, None), ("attached", attached, address)):
                run_dir = work / f"first_{kind}{i}"
                run_dir.mkdir()
                times.append(first_step_seconds(shards, run_dir, addr))
    finally:
        head.terminate()  # `ray start --block` stops the cluster it started
        head.wait(60)
    for key, times in (("first_step_s", fresh), ("first_step_attached_s", attached)):
        print(f"{key}={statistics.median(times):.1f}")
        if runs > 1:
            print(f"{key}_all=" + ",".join(f"{t:.1f}" for t in times))
    print(f"load_average_1min={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
