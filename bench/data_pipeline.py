r"""Data-path benchmark: Ray Data vs a plain torch Dataset + DataLoader, data stall, memory vs size.

    .venv/bin/python bench/data_pipeline.py                    # ~3-4 min on a shared 2-core box
    .venv/bin/python bench/data_pipeline.py --skip memory      # ~1 min: throughput and stall only
    .venv/bin/python bench/data_pipeline.py --shards 32 --mem-shards 32 --mem-repeats 5 \
        --train-batch 64 --train-steps 10

Prints key=value lines, all measured in this one run on this machine:
- ray_img_per_s: the Ray Data pipeline alone (ce_ray.data.stream: read -> decode -> crop -> flip -> hole
  -> iter_train_batches), second epoch, so it includes one epoch start; ray_cached_*: the same with
  data.cache on (decoded once into the object store when the dataset is built; each epoch crops the
  cached photos anew). --cache picks the designs measured.
- torch_img_per_s: ce_ray.data.local_stream.LocalTrainStream (an IterableDataset + torch DataLoader with
  --loader-workers processes) over the same shards.
- ray[_cached]_img_per_s_per_core / loader_img_per_s_per_core / ray[_cached]_vs_loader_per_core: crops per CPU-second
  that each pipeline's whole process tree spent (target ratio >= 0.8); bytes_per_crop: what one
  crop costs as delivered (uint8 crop + bit-packed hole); cores_per_gpu_needed: a GPU step's img/s
  (--gpu-img-per-s, else estimated from FLOPs) / ray_img_per_s_per_core.
- stall_ratio: GanStep (the real Context Encoder step, ce_ray/core/step.py) images/s fed by Ray Data /
  the same steps fed from in-memory tensors (target >= 0.90). The in-memory runs bracket the Ray
  run and are averaged, so drift from other load on the machine cancels out. The step uses
  --train-threads torch threads (default 1: what a Ray Train worker gets, OMP_NUM_THREADS=1), so
  the data path has the rest of the machine, as it does under Ray Train.
- peak_rss_ratio / peak_pss_ratio: median (over --mem-repeats runs) peak memory of the whole
  process tree (driver, GCS, raylet, Ray workers) streaming --scale x more shards (--mem-shards
  for 1x) / the 1x case (target <= 1.10). Both cases stream
  the same number of crops (1x: --scale epochs; --scale x: one epoch), so the ratio isolates the
  dataset's size from allocator warm-up, which grows with work done, not with data. Each case
  runs in a fresh subprocess with its own Ray cluster; /proc is sampled every 0.2 s. RSS counts
  shared pages once per process; PSS splits them, so it is the fair sum (Linux only). A single
  run's peak moves by up to ~10% with which Ray worker processes are alive and how warm their
  heaps are at that moment, so use --mem-repeats 5 for a tighter ratio.
Ray workers run at niceness 0 here (RAY_worker_niceness=0), like the driver and the DataLoader
processes. Ray's default (+15) would give the driver's training threads and the DataLoader
processes ~30x the CPU share of the decode workers whenever anything else loads the machine;
under Ray Train the training workers are Ray workers too, so the two sides are equal there as
well.
The shards are the bundled photos (prepared once) replicated under new keys: --photos-per-shard
rows per file, --shards files for the 1x case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ce_ray import config  # noqa: E402
from ce_ray.data.prepare import prepare  # noqa: E402
from ce_ray.data.shards import KEY_COLUMN  # noqa: E402


def make_shards(root: Path, base: pa.Table, n_shards: int, rows: int) -> str:
    """n_shards files of `rows` photos each, cycling through `base` under fresh keys."""
    (root / "train").mkdir(parents=True)
    for s in range(n_shards):
        idx = [(s * rows + i) % base.num_rows for i in range(rows)]
        t = base.take(idx)
        keys = pa.array([f"{k}#{s}-{i}" for i, k in enumerate(t.column(KEY_COLUMN).to_pylist())])
        t = t.set_column(t.schema.get_field_index(KEY_COLUMN), KEY_COLUMN, keys)
        # No dictionary: with the photos repeated it would shrink the files to the 12 unique photos.
        pq.write_table(t, root / "train" / f"part-{s:05d}.parquet", compression="none", use_dictionary=False)
    return str(root)


# --- Memory of a process tree (/proc) ---------------------------------------------------------


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            vals = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split(":")[0] in ("Rss", "Pss")}
        return vals.get("Rss", 0), vals.get("Pss", 0)
    except (OSError, ValueError):
        return 0, 0  # the process ended between listing and reading


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, with reaped children) of a process and everything below it:
    the cores a pipeline burned, whichever processes did the work."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def peak_memory(cmd: list[str]) -> tuple[float, float, str, int]:
    """Run cmd; return (peak summed RSS MiB, peak summed PSS MiB, its stdout, processes at the
    PSS peak)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0, 0, 0]

    def sample() -> None:
        while proc.poll() is None:
            rss = pss = 0
            tree = _tree(proc.pid)
            for p in tree:
                r, s = _rss_pss_kb(p)
                rss, pss = rss + r, pss + s
            if pss > peak[1]:
                peak[2] = len(tree)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"memory child failed ({proc.returncode}): {' '.join(cmd)}")
    return peak[0] / 1024, peak[1] / 1024, out, peak[2]


# --- Ray side --------------------------------------------------------------------------------------


def init_ray(cpus: int, object_store_mb: int, tmp: str) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_worker_niceness"] = "0"  # see the module docstring
    import logging

    from ce_ray import cluster

    cluster.start_local(
        num_cpus=cpus,
        dashboard=False,
        log_level="ERROR",
        log_to_driver=False,
        object_store_memory=object_store_mb * 2**20,
        _temp_dir=tmp,
    )
    cluster.quiet_data_context()
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def ray_epoch(ds, cfg) -> tuple[int, float, float, int]:
    """(images, seconds, first-batch seconds, bytes per crop as delivered) for one epoch through
    iter_train_batches."""
    from ce_ray.data.stream import iter_train_batches

    n, t0, first, per_crop = 0, time.perf_counter(), None, 0
    for images, holes in iter_train_batches(ds.iterator(), cfg, "cpu"):
        if first is None:
            first = time.perf_counter() - t0
            per_crop = images.element_size() * images[0].numel() + holes.element_size() * holes[0].numel()
        n += len(images)
    return n, time.perf_counter() - t0, first or 0.0, per_crop


def rss_child(args) -> None:
    """--rss-child: stream --epochs epochs of args.rss_child's shards on a fresh Ray cluster."""
    init_ray(args.cpus, args.object_store_mb, args.ray_tmp)
    from ce_ray.data.stream import build_train_dataset

    cfg = bench_cfg(args.rss_child, args.batch, args)
    # Streaming only: memory that stays flat with the dataset's size is what these runs check.
    ds = build_train_dataset(cfg, cpus_per_task=args.data_task_cpus, read_ahead=args.read_ahead, cache=False)
    n = secs = 0
    for _ in range(args.epochs):
        ni, si, _, _ = ray_epoch(ds, cfg)
        n, secs = n + ni, secs + si
    print(json.dumps({"images": n, "seconds": secs}))


def bench_cfg(shards: str, batch: int, args) -> config.Config:
    """The bench's config: --config's (the recipe's network, crops and masks) or the paper's, on
    the bench's shards, with its batch, buffer and loader settings (--repeat when given)."""
    base = config.load(args.config) if getattr(args, "config", "") else config.Config()
    data = {
        "shards": shards,
        "batch_size": batch,
        "shuffle_buffer": args.shuffle_buffer,
        "loader_workers": args.loader_workers,
    }
    if getattr(args, "repeat", 0):
        data["repeat"] = args.repeat
    return config.replace(base, data=data, train={"precision": args.precision})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=8, help="shards in the 1x dataset (throughput, stall, memory)")
    ap.add_argument("--mem-shards", type=int, default=8, help="shards in the 1x dataset of the memory runs")
    ap.add_argument(
        "--mem-repeats", type=int, default=2, help="memory runs per case (alternating); the median peak counts"
    )
    ap.add_argument("--photos-per-shard", type=int, default=64)
    ap.add_argument("--scale", type=int, default=10, help="the large memory case has scale x more shards")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the throughput runs")
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes of the torch baseline")
    ap.add_argument(
        "--train-batch",
        type=int,
        default=16,
        help="batch of the stall runs (the paper's 64 takes ~8 s a step on 2 cores)",
    )
    ap.add_argument("--train-steps", type=int, default=6, help="timed steps per stall run (after 1 warm-up step)")
    ap.add_argument("--train-threads", type=int, default=1, help="torch threads of the stall runs' step")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--data-task-cpus", type=float, default=None, help="ce_ray.data.stream.DATA_TASK_CPUS override")
    ap.add_argument(
        "--read-ahead-mb",
        type=int,
        default=0,
        help="read-ahead cap override in MiB (0: ce_ray.data.stream.read_ahead_bytes())",
    )
    ap.add_argument(
        "--object-store-mb",
        type=int,
        default=1024,
        help="object store of the memory runs (fixed so both cases get the same)",
    )
    ap.add_argument("--skip", default="", help="comma list of parts to skip: throughput,stall,memory")
    ap.add_argument("--repeat", type=int, default=0, help="data.repeat: crops cut per decoded photo (0: the config's)")
    ap.add_argument("--config", default="", help="a recipe YAML: its network, crops and masks (default: the paper's)")
    ap.add_argument(
        "--cache",
        default="off,on,device",
        help="designs to measure: off (Ray Data decodes every epoch), on (data.cache: decoded once), device "
        "(data.device_crops: crops cut on the training device; host CPU per crop)",
    )
    ap.add_argument(
        "--gpu-img-per-s",
        type=float,
        default=0.0,
        help="a GPU training step's img/s (bench/gpu_check.sh); 0: estimate it",
    )
    ap.add_argument(
        "--gpu-peak-tflops", type=float, default=989.0, help="the estimate's dense bf16 peak (H100 / H200 SXM)"
    )
    ap.add_argument("--assumed-mfu", type=float, default=0.35, help="the estimate's model-FLOP utilisation")
    ap.add_argument("--device-batch", type=int, default=0, help="crops per device batch (0: the config's batch)")
    ap.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--ray-tmp", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.read_ahead = args.read_ahead_mb * 2**20 or None  # None: data.read_ahead_bytes()
    from ce_ray.data.stream import DATA_TASK_CPUS

    if args.data_task_cpus is None:
        args.data_task_cpus = DATA_TASK_CPUS
    if args.rss_child:
        return rss_child(args)
    skip = set(filter(None, args.skip.split(",")))

    import torch

    work = Path(tempfile.mkdtemp(prefix="ce_bench_data_"))
    ray_tmp = f"/tmp/ce_bench_ray_{os.getpid()}"
    args.ray_tmp = ray_tmp
    prepared = work / "bundled"
    prepare("bundled", str(prepared), engine="local", progress=False)
    base = pa.concat_tables([pq.read_table(prepared / "train"), pq.read_table(prepared / "val")])
    small = make_shards(work / "x1", base, args.shards, args.photos_per_shard)
    n1 = args.shards * args.photos_per_shard
    print(f"cpus={args.cpus}")
    print("ray_worker_niceness=0")
    print(f"torch_threads={torch.get_num_threads()}")
    print(f"data_task_cpus={args.data_task_cpus}")
    print(f"read_ahead_mb={args.read_ahead_mb or 'default (ce_ray.data.stream.read_ahead_bytes)'}")
    print(f"dataset_images={n1}")
    print(f"shard_mb={os.path.getsize(Path(small) / 'train' / 'part-00000.parquet') / 2**20:.1f}")

    if not {"throughput", "stall"} <= skip:
        init_ray(args.cpus, args.object_store_mb, ray_tmp)
        from ce_ray.data.local_stream import LocalTrainStream
        from ce_ray.data.stream import build_train_dataset

    if "throughput" not in skip:
        cfg = bench_cfg(small, args.batch, args)
        me = os.getpid()
        ray_pc: dict[str, float] = {}
        for design in [d for d in args.cache.split(",") if d in ("off", "on")]:
            # Built (and, cached, decoded once) before the timing; the first epoch warms the
            # worker processes (they import torch) and is not measured.
            ds = build_train_dataset(
                cfg, cpus_per_task=args.data_task_cpus, read_ahead=args.read_ahead, cache=design == "on"
            )
            key = "ray" if design == "off" else "ray_cached"
            ray_epoch(ds, cfg)
            c0 = tree_cpu_seconds(me)
            n, secs, first, crop_bytes = ray_epoch(ds, cfg)
            ray_cpu = tree_cpu_seconds(me) - c0  # driver, raylet, GCS and every Ray worker: all below us
            print(f"{key}_img_per_s={n / secs:.1f}")
            print(f"{key}_first_batch_s={first:.2f}")
            print(f"{key}_cpu_s={ray_cpu:.1f}")
            ray_pc[key] = n / max(ray_cpu, 1e-9)
            del ds
        if "device" in args.cache.split(","):
            # data.device_crops: what the host spends per crop when a GPU cuts them. The cropper
            # runs on the `meta` device, where every kernel is shape-only, so the CPU time left
            # is the host's part (Python, dispatch) of launching the same kernels on a GPU. The
            # photos are decoded once per run (printed apart: amortised over every epoch).
            from ce_ray.data.device_crops import DeviceCropper, decode_photos
            from ce_ray.data.local_stream import train_photo_bytes

            encoded = train_photo_bytes(cfg)
            c0 = time.process_time()
            photos = decode_photos(encoded, cfg)
            decode_cpu = time.process_time() - c0
            cropper = DeviceCropper(photos, cfg, torch.device("meta"), seed=0)
            # The host's cost is per batch (kernel launches), so per crop it falls with the batch a
            # GPU worker draws: --device-batch (default: the config's batch).
            device_batch = args.device_batch or cfg.data.batch_size
            cropper.batch(device_batch)
            batches = 200
            c0 = time.process_time()
            for _ in range(batches):
                cropper.batch(device_batch)
            host_per_batch = (time.process_time() - c0) / batches
            print(f"device_decode_cpu_s_per_photo={decode_cpu / len(photos):.5f}")
            print(f"device_batch={device_batch}")
            print(f"device_host_cpu_s_per_batch={host_per_batch:.5f}")
            ray_pc["device"] = device_batch / host_per_batch
        stream = LocalTrainStream(cfg)
        list(stream.epoch(0))  # warm-up, as above
        t0, c0 = time.perf_counter(), tree_cpu_seconds(me)
        n_l = sum(len(i) for i, _ in stream.epoch(1))
        loader_secs, loader_cpu = time.perf_counter() - t0, tree_cpu_seconds(me) - c0
        print(f"torch_img_per_s={n_l / loader_secs:.1f}")
        print(f"torch_loader_workers={args.loader_workers}")
        print(f"loader_cpu_s={loader_cpu:.1f}")
        # Per core: crops per CPU-second actually spent, whichever processes spent it. What a
        # cluster must provision per GPU depends on this, not on one machine's wall clock.
        loader_pc = n_l / max(loader_cpu, 1e-9)
        print(f"loader_img_per_s_per_core={loader_pc:.1f}")
        print(f"loader_cpu_s_per_crop={1 / loader_pc:.6f}")
        for key, pc in ray_pc.items():
            print(f"{key}_img_per_s_per_core={pc:.1f}")
            print(f"{key}_cpu_s_per_crop={1 / pc:.6f}")
            print(f"{key}_vs_loader_per_core={pc / loader_pc:.3f}")
        s_ = cfg.data.fine_size
        if ray_pc.keys() - {"device"}:  # what a crop costs as Ray Data delivers it
            print(f"bytes_per_crop={crop_bytes}")
            print(f"bytes_per_crop_float32_form={3 * s_ * s_ * 4 + s_ * s_ * 4}")
        print(f"data_repeat={cfg.data.repeat}")
        gpu = args.gpu_img_per_s
        source = "measured (--gpu-img-per-s)"
        if not gpu:
            from ce_ray.core.model import build_discriminator, build_generator, conv_macs

            # One step per image: G forward + backward (~3 forwards); with the adversarial term
            # on, D on the real and the fake (2 x 3 forwards). D sees the centre (centre
            # variant) or the whole crop; G's input carries the mask channel when it has one.
            g = conv_macs(build_generator(cfg.model))
            d = 0
            if cfg.loss.lambda_adv > 0:
                d_side = s_ // 2 if cfg.model.variant == "center" else s_
                d = conv_macs(build_discriminator(cfg.model, s_), (3, d_side, d_side))
            gflop = 2 * (3 * g + 2 * 3 * d) / 1e9
            gpu = args.assumed_mfu * args.gpu_peak_tflops * 1e3 / gflop
            source = (
                f"estimated: {args.assumed_mfu:.0%} of {args.gpu_peak_tflops:g} TFLOP/s bf16 / "
                f"{gflop:.2f} GFLOP per image"
            )
        print(f"gpu_step_img_per_s={gpu:.0f}")
        print(f"gpu_step_img_per_s_source={source.replace(' ', '_')}")
        for key, pc in ray_pc.items():
            print(f"{key}_cores_per_gpu_needed={gpu / pc:.1f}")
        print(f"cores_per_gpu_needed={gpu / max(ray_pc.values()):.1f}")  # the better design's

    if "stall" not in skip:
        from ce_ray.core.model import build_discriminator, build_generator
        from ce_ray.core.step import GanStep

        cfg = bench_cfg(small, args.train_batch, args)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.train_threads)
        torch.manual_seed(0)
        step = GanStep(
            build_generator(cfg.model), build_discriminator(cfg.model, cfg.data.fine_size), cfg, torch.device("cpu")
        )
        mem = list(LocalTrainStream(config.replace(cfg, data={"loader_workers": 0})).epoch(0))[: args.train_steps + 1]

        def in_memory() -> float:
            step(*mem[0])  # warm-up
            t0 = time.perf_counter()
            for b in mem[1 : args.train_steps + 1]:
                step(*b)
            return args.train_steps * args.train_batch / (time.perf_counter() - t0)

        def from_ray() -> float:
            from ce_ray.data.stream import iter_train_batches

            it = iter_train_batches(
                build_train_dataset(cfg, cpus_per_task=args.data_task_cpus, read_ahead=args.read_ahead).iterator(),
                cfg,
                "cpu",
            )
            step(*next(it))  # warm-up; includes the epoch start
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                step(*next(it))
            rate = args.train_steps * args.train_batch / (time.perf_counter() - t0)
            it.close()
            return rate

        a = in_memory()
        r = from_ray()
        b = in_memory()
        m_ = cfg.model
        print(f"train_step=GanStep_{m_.variant}_variant_bottleneck_{m_.bottleneck}_ngf_{m_.ngf}")
        print(f"train_batch={args.train_batch}")
        print(f"train_threads={args.train_threads}")
        print(f"train_img_per_s_in_memory={(a + b) / 2:.2f}")
        print(f"train_img_per_s_ray_data={r:.2f}")
        print(f"stall_ratio={r / ((a + b) / 2):.3f}")
        torch.set_num_threads(threads)

    if {"throughput", "stall"} - skip:
        import ray

        ray.shutdown()  # the memory runs start their own clusters

    if "memory" not in skip:
        one = make_shards(work / "m1", base, args.mem_shards, args.photos_per_shard)
        big = make_shards(work / f"m{args.scale}", base, args.mem_shards * args.scale, args.photos_per_shard)
        me = [
            sys.executable,
            __file__,
            "--batch",
            str(args.batch),
            "--cpus",
            str(args.cpus),
            "--object-store-mb",
            str(args.object_store_mb),
            "--shuffle-buffer",
            str(args.shuffle_buffer),
            "--data-task-cpus",
            str(args.data_task_cpus),
            "--read-ahead-mb",
            str(args.read_ahead_mb),
            "--ray-tmp",
            ray_tmp,
        ]
        runs: dict[str, list] = {"1": [], "k": []}
        for _ in range(args.mem_repeats):  # alternate, so drifting machine load hits both cases
            runs["1"].append(peak_memory(me + ["--rss-child", one, "--epochs", str(args.scale)]))
            runs["k"].append(peak_memory(me + ["--rss-child", big]))
        # Median: a run's peak moves by +-10% with which worker processes happen to be alive and
        # how fragmented their heaps are at that moment (measured), independent of the data size.
        med = lambda rs, i: statistics.median(r[i] for r in rs)  # noqa: E731
        rss1, pss1, rssk, pssk = med(runs["1"], 0), med(runs["1"], 1), med(runs["k"], 0), med(runs["k"], 1)
        i1, ik = (json.loads(runs[c][-1][2].strip().splitlines()[-1]) for c in ("1", "k"))
        print(f"mem_repeats={args.mem_repeats}")
        print(f"peak_pss_mb_each_1x={','.join(f'{r[1]:.0f}' for r in runs['1'])}")
        print(f"peak_pss_mb_each_{args.scale}x={','.join(f'{r[1]:.0f}' for r in runs['k'])}")
        print(f"procs_at_peak_each_1x={','.join(str(r[3]) for r in runs['1'])}")
        print(f"procs_at_peak_each_{args.scale}x={','.join(str(r[3]) for r in runs['k'])}")
        print(f"mem_shards_1x={args.mem_shards}")
        print(f"mem_shards_{args.scale}x={args.mem_shards * args.scale}")
        print(f"mem_images_1x={i1['images']} ({args.scale} epochs)")
        print(f"mem_images_{args.scale}x={ik['images']} (1 epoch)")
        print(f"peak_rss_mb_1x={rss1:.0f}")
        print(f"peak_rss_mb_{args.scale}x={rssk:.0f}")
        print(f"peak_rss_ratio={rssk / rss1:.3f}")
        print(f"peak_pss_mb_1x={pss1:.0f}")
        print(f"peak_pss_mb_{args.scale}x={pssk:.0f}")
        print(f"peak_pss_ratio={pssk / pss1:.3f}")
        print(f"stream_img_per_s_{args.scale}x={ik['images'] / ik['seconds']:.1f}")

    import shutil

    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
