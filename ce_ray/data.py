"""Ray Data: Parquet shards -> decoded, cropped, flipped, masked training crops -> torch batches.

train.lua's data path (decode -> random 128 crop -> horizontal flip -> [-1, 1] -> hole) as a
streaming Ray Data pipeline feeding any number of Ray Train workers through
`get_dataset_shard("train")` (Train splits it with `streaming_split(world_size, equal=True)`):

    read_parquet(train/*.parquet, file order shuffled per epoch)   encoded JPEGs, ~6 MB a shard
      -> map_batches(samples.train_batch)                          decode + crop + flip + hole
      -> iter_torch_batches(local shuffle buffer, drop_last)       in the training worker

Nothing is materialised: blocks stream through the object store under Ray Data's backpressure, so
memory stays flat however many shards there are (bench/data_pipeline.py measures it).

CPU starvation (shared/RAY.md §2): every data task asks for DATA_TASK_CPUS (half a logical CPU),
so Ray Data can still schedule work beside Train workers that hold fractional CPUs (2 workers x
0.75 on 2 CPUs leave exactly one task's worth), and `check_cpu_budget` turns the hang that follows
when the workers hold every CPU into a UserError. Half, not less: each decode worker process
imports torch (via ce_ray.masks), ~300 MB private memory, so a smaller share would start more
processes on a small machine for no extra throughput. Decoding a 350-px JPEG crop costs ~2 ms,
far below a Context Encoder step per image, so a fraction of one core keeps a worker fed
(bench/data_pipeline.py: data-stall ratio).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ce_ray import samples
from ce_ray.config import Config
from ce_ray.errors import UserError
from ce_ray.local_data import shard_files

if TYPE_CHECKING:  # Ray is imported lazily, inside the functions
    import ray.data
    import ray.train
    import torch

DATA_TASK_CPUS = 0.5  # logical CPUs per read / decode task: fits beside workers at 0.5 or 0.75 CPU
ROWS_PER_MAP = 16  # photos per samples.train_batch call (x data.repeat crops)
PREFETCH_BATCHES = 2  # batches decoded ahead of the training step


def _read_parquet(files: list[str], num_cpus: float = DATA_TASK_CPUS, **kwargs) -> "ray.data.Dataset":
    """read_parquet on the V1 datasource. Ray 2.60's default V2 reader plans a `ListFiles` task
    with a hard-wired 1-CPU request (no argument reaches it), so whenever Train workers leave less
    than one whole CPU free, e.g. 2 workers x 0.75 on 2 CPUs, the read never starts and training
    hangs (verified: tests/test_data.py). V1 read tasks take our DATA_TASK_CPUS."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read at call time only
    try:
        return ray.data.read_parquet(files, num_cpus=num_cpus, **kwargs)
    finally:
        ctx.use_datasource_v2 = old


def _train_map(batch: dict[str, np.ndarray], cfg: Config, with_keys: bool) -> dict[str, np.ndarray]:
    """map_batches body: {"image_bytes": (n,) object} -> {"image": (n*repeat, 3, S, S) float32,
    "hole": (n*repeat, 1, S, S) float32} (+ "key" when asked, for tests)."""
    # A fresh OS-entropy generator per call: crops and holes differ per task and per epoch
    # (each epoch re-executes the pipeline). Ray's task scheduling order is not deterministic,
    # so a fixed seed would not make training crops reproducible anyway; validation is.
    rng = np.random.default_rng()
    out = samples.train_batch(list(batch[samples.IMAGE_COLUMN]), cfg, rng)
    if with_keys:
        out["key"] = np.repeat(batch[samples.KEY_COLUMN], cfg.data.repeat)
    return out


def _val_map(batch: dict[str, np.ndarray], cfg: Config) -> dict[str, np.ndarray]:
    """map_batches body: each val photo -> all its tiles, holes seeded by (key, tile)."""
    parts = [samples.val_samples(data, key, cfg) for key, data in zip(batch[samples.KEY_COLUMN], batch[samples.IMAGE_COLUMN])]
    s = cfg.data.fine_size
    if not parts:
        return {"image": np.zeros((0, 3, s, s), np.float32), "hole": np.zeros((0, 1, s, s), np.float32), "key": np.zeros((0,), object)}
    return {
        "image": np.concatenate([p["image"] for p in parts]),
        "hole": np.concatenate([p["hole"] for p in parts]),
        "key": np.concatenate([np.repeat(np.array([k], dtype=object), len(p["image"])) for k, p in zip(batch[samples.KEY_COLUMN], parts)]),
    }


def build_train_dataset(cfg: Config, *, with_keys: bool = False, cpus_per_task: float = DATA_TASK_CPUS,
                        max_tasks: int | None = None) -> "ray.data.Dataset":
    """Streaming training crops from cfg.data.shards/train: rows {"image": (3, S, S) float32 in
    [-1, 1], "hole": (1, S, S) float32 in {0, 1}}; cfg.data.repeat crops per photo per epoch.
    The file order is reshuffled on every execution, i.e. every epoch; the trainer's local
    shuffle buffer (iter_train_batches) mixes crops across files. `with_keys` adds each crop's
    photo key (tests; iter_train_batches needs it off). `cpus_per_task` is the logical CPU share
    of each read / decode task; `max_tasks` caps concurrent decode tasks (default: as many as
    the CPUs left to Ray Data allow)."""
    import ray.data

    files = shard_files(cfg.data.shards, "train")
    cols = [samples.KEY_COLUMN, samples.IMAGE_COLUMN] if with_keys else [samples.IMAGE_COLUMN]
    # shuffle="files": a new random file order per execution, i.e. per epoch.
    ds = _read_parquet(files, num_cpus=cpus_per_task, shuffle="files").select_columns(cols)
    return ds.map_batches(_train_map, fn_kwargs={"cfg": cfg, "with_keys": with_keys}, batch_size=ROWS_PER_MAP,
                          batch_format="numpy", num_cpus=cpus_per_task, concurrency=max_tasks)


def build_val_dataset(cfg: Config, *, with_keys: bool = False) -> "ray.data.Dataset":
    """Deterministic validation crops: every tile of each val photo, in shard order, holes seeded
    by (key, tile index), capped at cfg.data.val_images rows: the same rows as
    local_data.load_val(cfg), in every run. Under Ray Train pass `data_config()` so Train keeps
    this dataset's preserve_order (it replaces each dataset's execution options)."""
    import ray.data

    files = shard_files(cfg.data.shards, "val")
    ds = _read_parquet(files).select_columns([samples.KEY_COLUMN, samples.IMAGE_COLUMN])
    # Order matters for the cap below: without it, which photos make the first val_images rows
    # would depend on task timing.
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(_val_map, fn_kwargs={"cfg": cfg}, batch_size=4, batch_format="numpy", num_cpus=DATA_TASK_CPUS)
    ds = ds.limit(cfg.data.val_images)
    return ds if with_keys else ds.drop_columns(["key"])


def iter_train_batches(shard: "ray.data.DataIterator", cfg: Config, device: "str | torch.device" = "cpu",
                       *, prefetch_batches: int = PREFETCH_BATCHES) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """One epoch of (image (B, 3, S, S), hole (B, 1, S, S)) float32 tensors on `device` from a
    Train dataset shard (or a Dataset), B = cfg.data.batch_size, incomplete batch dropped so every
    rank steps the same number of times. Raises UserError when the epoch holds no full batch
    (the loop would otherwise spin without ever stepping)."""
    import torch

    n = 0
    for b in shard.iter_torch_batches(batch_size=cfg.data.batch_size, dtypes=torch.float32, device=device,
                                      local_shuffle_buffer_size=cfg.data.shuffle_buffer or None, drop_last=True,
                                      prefetch_batches=prefetch_batches):
        n += 1
        yield b["image"], b["hole"]
    if n == 0:
        raise UserError(f"an epoch of the train shards yielded no full batch of data.batch_size={cfg.data.batch_size} crops per worker; "
                        f"raise data.repeat (crops per photo), lower data.batch_size, or prepare more photos")


def data_config() -> "ray.train.DataConfig":
    """DataConfig for TorchTrainer(datasets={"train": ..., "val": ...}): split "train" across
    workers (streaming_split(equal=True)); every worker reads the whole "val" in order."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=["train"], execution_options={"val": ExecutionOptions(preserve_order=True)})


def check_cpu_budget(cfg: Config, cluster_cpus: float | None = None) -> None:
    """Raise UserError when the Train workers would hold every CPU: Ray Data then gets none and
    the run hangs (RAY.md §2). `cluster_cpus` defaults to the connected cluster's CPUs."""
    if cluster_cpus is None:
        import ray

        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
    s = cfg.scale
    need = s.num_workers * s.cpus_per_worker + DATA_TASK_CPUS
    if need > cluster_cpus + 1e-9:
        fit = max(0.01, math.floor(100 * (cluster_cpus - DATA_TASK_CPUS) / s.num_workers) / 100)
        raise UserError(
            f"{s.num_workers} workers x scale.cpus_per_worker={s.cpus_per_worker} leave Ray Data less than the {DATA_TASK_CPUS} CPU "
            f"its decode tasks need on this {cluster_cpus:g}-CPU cluster, so training would hang waiting for data; "
            f"set scale.cpus_per_worker={fit:.2f} (a logical share; torch still uses its threads) or fewer scale.num_workers")
