"""Ray Data: Parquet shards -> decoded, cropped, flipped, masked training crops -> torch batches.

train.lua's data path (decode -> random 128 crop -> horizontal flip -> [-1, 1] -> hole) as a
streaming Ray Data pipeline feeding any number of Ray Train workers through
`get_dataset_shard("train")` (Train splits it with `streaming_split(world_size, equal=True)`):

    read_parquet(train/*.parquet, file order shuffled per epoch)   encoded JPEGs, ~6 MB a shard
      -> map_batches(crops.train_batch)                          decode + crop + flip + hole: uint8
                                                                   crops, bit-packed holes (51 KB a crop)
      -> iter_torch_batches(local shuffle buffer, drop_last)       in the training worker, onto its device
      -> step.prepare_batch                                        [-1, 1] floats, channel shuffle, hole fill

Nothing is materialised: blocks stream through the object store under Ray Data's backpressure, so
memory stays flat however many shards there are (bench/data_pipeline.py measures it). The
read-ahead is capped (`read_ahead_bytes`: READ_AHEAD_PER_CPU per cluster CPU, at least
READ_AHEAD_MIN): uncapped, a slow consumer (a training step) let Ray Data fill ~0.5 GB of a 2 GB
store with decoded crops, i.e. a share of the object store rather than what decoding needs in
flight; capped at 128 MiB it held ~0.2 GB.

CPU starvation (docs/ray-notes.md, "Ray Data on few CPUs") has two faces on a small machine, both
measured here:
- Train workers hold every CPU: no data task can start and training hangs. `check_cpu_budget`
  turns that into a UserError naming the fix; with 2 workers x 0.5 CPU on 2 CPUs one CPU is left.
- Data tasks asking for a fraction of a CPU: Ray then runs more task workers than CPUs, and its
  worker pool kills idle workers above that number (the soft limit is num_cpus), so every epoch
  restarts decode processes. Measured on 2 CPUs beside two 0.5-CPU consumers, when each decode
  process still imported torch: 0.5-CPU tasks fed 30 img/s per consumer with new worker pids every
  epoch; 1-CPU tasks fed 140 img/s from one persistent worker. Hence DATA_TASK_CPUS = 1 by default.
  (ce_ray.core.masks now imports torch lazily, so the decode path no longer loads it.)
Decoding, cropping and masking a 350-px JPEG costs ~1.5 ms of CPU, far below a Context Encoder
step per image, so one core keeps several training workers fed (bench/data_pipeline.py reports
the data-stall ratio).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ce_ray.config import Config
from ce_ray.data import crops
from ce_ray.data.images import decode_rgb
from ce_ray.data.shards import IMAGE_COLUMN, KEY_COLUMN, open_shard, shard_files
from ce_ray.errors import UserError

if TYPE_CHECKING:  # Ray is imported lazily, inside the functions
    import ray.data
    import ray.train
    import torch

DATA_TASK_CPUS = 1.0  # logical CPUs per read / decode task (module docstring: why not less)
ROWS_PER_MAP = 32  # photos per decode task: ~50 ms of work, so per-task overhead stays small
# Object store the train pipeline may fill ahead of the trainer: a decode task's output is ~8 MB
# (ROWS_PER_MAP crops), so 32 MB per CPU keeps every decode task's output queued 4 deep.
READ_AHEAD_PER_CPU = 32 * 2**20
READ_AHEAD_MIN = 64 * 2**20
PREFETCH_BATCHES = 2  # batches decoded ahead of the training step
# data.cache=auto caches the decoded train split when it takes at most this share of the object
# store: the rest stays for the crops in flight, the val set and other datasets.
CACHE_STORE_FRACTION = 0.25
# Photos per cached block: every epoch reshuffles the cache's block order, so small blocks give a
# finer epoch order (the trainer's shuffle buffer mixes the crops further); 4 decoded 512-px photos
# are ~4 MB, well above Ray's per-block overhead.
CACHE_ROWS_PER_BLOCK = 4
# How long Ray Data's scheduling loop sleeps on an iteration that changed nothing and did not
# block (IdleBackoff). Its own wait (ray.wait, up to 0.1 s) is the same granularity, and a training
# batch takes far longer than either.
IDLE_BACKOFF_S = 0.05
IDLE_STEP_S = 0.01  # a loop iteration shorter than this did not block in ray.wait


def _idle_backoff_class() -> type:
    """IdleBackoff, defined on first use (it subclasses a Ray Data class; this module imports Ray
    lazily).

    Ray 2.60's streaming executor does not block in its scheduling loop when it cannot read:
    its ray.wait returns at once for tasks that hold outputs the backpressure does not let it
    take, and it skips the wait when no task runs. A training pipeline that has filled its
    read-ahead cap (read_ahead_bytes) and waits for the trainer is in exactly that state most of
    the time, and the loop spun at 0.5-0.9 of a core in the SplitCoordinator actor on a 2-core
    machine (py-spy: ResourceManager.update_usages, _scheduling_loop_step), CPU the training step
    needed. The callback sleeps IDLE_BACKOFF_S after an iteration that was fast (no blocking
    wait) and changed nothing: no task submitted, no output generated, taken or received, no
    output queue grown or drained. It reads private executor fields (`_topology`, the operators'
    metrics): tests/data/test_stream.py checks they still exist."""
    global _IDLE_BACKOFF
    if _IDLE_BACKOFF is None:
        import time

        from ray.data._internal.execution.execution_callback import ExecutionCallback

        class IdleBackoff(ExecutionCallback):
            sleeps = 0  # per process: the tests read it

            def __init__(self) -> None:
                self.last: tuple[tuple[int, ...], ...] | None = None
                self.t_last = time.perf_counter()

            def on_execution_step(self, executor: Any) -> None:
                topology = getattr(executor, "_topology", None) or {}
                state = tuple(
                    (
                        op.metrics.num_tasks_submitted,
                        op.metrics.num_task_outputs_generated,
                        op.metrics.num_outputs_taken,
                        op.metrics.num_inputs_received,
                        op_state.output_queue.num_blocks,
                    )
                    for op, op_state in topology.items()
                )
                now = time.perf_counter()
                if state and state == self.last and now - self.t_last < IDLE_STEP_S:
                    type(self).sleeps += 1
                    time.sleep(IDLE_BACKOFF_S)
                    now = time.perf_counter()
                self.last, self.t_last = state, now

        IdleBackoff.__module__ = __name__  # pickled by reference with the dataset's context
        IdleBackoff.__qualname__ = "IdleBackoff"
        _IDLE_BACKOFF = IdleBackoff
    return _IDLE_BACKOFF


_IDLE_BACKOFF: type | None = None


def __getattr__(name: str) -> Any:
    if name == "IdleBackoff":  # so pickle finds the class by its module and name
        return _idle_backoff_class()
    raise AttributeError(name)


def _read_parquet(files: list[str], num_cpus: float = DATA_TASK_CPUS, **kwargs: Any) -> ray.data.Dataset:
    """read_parquet on the V1 datasource, so `num_cpus` governs every task of the read. Ray 2.60's
    default V2 reader adds a `ListFiles` task with a hard-wired 1-CPU request that no argument
    reaches: with cpus_per_task < 1 and less than one CPU left by the Train workers, the read
    never starts and training hangs (verified with 2 consumers x 0.75 CPU on 2 CPUs)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read at call time only
    try:
        return ray.data.read_parquet(files, num_cpus=num_cpus, **kwargs)
    finally:
        ctx.use_datasource_v2 = old


def _train_map(batch: dict[str, np.ndarray], cfg: Config, with_keys: bool) -> dict[str, np.ndarray]:
    """map_batches body: {"image_bytes": (n,) object} -> {"image": (n*repeat, 3, S, S) uint8,
    "hole": (n*repeat, S*S/8) uint8 packed bits} (+ "key" when asked, for tests)."""
    # A fresh OS-entropy generator per call: crops and holes differ per task and per epoch
    # (each epoch re-executes the pipeline). Ray's task scheduling order is not deterministic,
    # so a fixed seed would not make training crops reproducible anyway; validation is.
    rng = np.random.default_rng()
    out = crops.train_batch(list(batch[IMAGE_COLUMN]), cfg, rng)
    if with_keys:
        out["key"] = np.repeat(batch[KEY_COLUMN], cfg.data.repeat)
    return out


def _decode_map(batch: dict[str, np.ndarray], cfg: Config, with_keys: bool) -> dict[str, np.ndarray]:
    """map_batches body of the cached pipeline's decode pass: {"image_bytes": (n,) object} ->
    {"rgb": (n,) object array of (H, W, 3) uint8 photos} (+ "key"), each decoded no smaller than
    the largest size training resizes it to (crops.largest_load_size)."""
    size = crops.largest_load_size(cfg)
    rgb = np.empty(len(batch[IMAGE_COLUMN]), dtype=object)
    rgb[:] = [decode_rgb(data, draft_shorter=size) for data in batch[IMAGE_COLUMN]]
    out = {"rgb": rgb}
    if with_keys:
        out[KEY_COLUMN] = batch[KEY_COLUMN]
    return out


def _crop_map(batch: dict[str, np.ndarray], cfg: Config, with_keys: bool) -> dict[str, np.ndarray]:
    """map_batches body of the cached pipeline's per-epoch pass: decoded photos -> the same rows as
    _train_map (random crops, flips and holes drawn anew on every execution)."""
    rng = np.random.default_rng()  # fresh per call, as _train_map
    out: list[np.ndarray] = []
    for rgb in batch["rgb"]:
        out += crops.random_crops_of(rgb, crops.jittered_load_size(cfg, rng), cfg.data.repeat, cfg, rng)
    rows = crops.stack_crops(out, cfg, rng)
    if with_keys:
        rows["key"] = np.repeat(batch[KEY_COLUMN], cfg.data.repeat)
    return rows


def decoded_bytes(cfg: Config) -> int:
    """What the train split takes decoded for the cache: from the shards' width / height columns
    (footer and two int columns: no image is read), each photo at most as large as a JPEG draft
    decode for crops.largest_load_size leaves it (shorter side < 2x that size)."""
    cap = 2 * crops.largest_load_size(cfg)
    total = 0
    for f in shard_files(cfg.data.shards, "train"):
        table = open_shard(f).read(columns=["width", "height"])
        w = table.column("width").to_numpy().astype(np.int64)
        h = table.column("height").to_numpy().astype(np.int64)
        shorter = np.minimum(w, h)
        scale = np.minimum(1.0, cap / np.maximum(shorter, 1))
        total += int(np.sum(w * h * 3 * scale**2))
    return total


def use_cache(cfg: Config, store_bytes: float | None = None) -> bool:
    """data.cache: "on" / "off" as said; "auto" when decoded_bytes fits CACHE_STORE_FRACTION of the
    object store (`store_bytes`, default: the connected cluster's)."""
    mode = cfg.data.cache
    if mode != "auto":
        return mode == "on"
    if store_bytes is None:
        import ray

        store_bytes = float(ray.cluster_resources().get("object_store_memory", 0))  # type: ignore[no-untyped-call]  # ray: unannotated
    return decoded_bytes(cfg) <= CACHE_STORE_FRACTION * store_bytes


def build_photo_dataset(
    cfg: Config, *, with_keys: bool = False, cpus_per_task: float = DATA_TASK_CPUS, max_tasks: int | None = None
) -> ray.data.Dataset:
    """The train photos decoded once, in the object store (materialized here): rows {"rgb": (H, W,
    3) uint8} (+ "key"), each at least crops.largest_load_size on its shorter side. What the
    cached pipeline crops every epoch, and what data.device_crops workers load onto their device."""
    files = shard_files(cfg.data.shards, "train")
    cols = [KEY_COLUMN, IMAGE_COLUMN] if with_keys else [IMAGE_COLUMN]
    decoded: ray.data.Dataset = (
        _read_parquet(files, num_cpus=cpus_per_task)
        .select_columns(cols)
        .map_batches(
            _decode_map,  # type: ignore[arg-type]  # ray types fn as one-argument; fn_kwargs supplies the rest
            fn_kwargs={"cfg": cfg, "with_keys": with_keys},
            batch_size=CACHE_ROWS_PER_BLOCK,
            batch_format="numpy",
            num_cpus=cpus_per_task,
            concurrency=max_tasks,
        )
        .materialize()
    )
    return decoded


def build_train_dataset(
    cfg: Config,
    *,
    with_keys: bool = False,
    cpus_per_task: float = DATA_TASK_CPUS,
    max_tasks: int | None = None,
    read_ahead: int | None = None,
    cache: bool | None = None,
) -> ray.data.Dataset:
    """Streaming training crops from cfg.data.shards/train: rows {"image": (3, S, S) uint8 RGB,
    "hole": (S*S/8,) uint8 packed bits} (crops.train_batch); cfg.data.repeat crops per photo per
    epoch.
    Uncached, the file order is reshuffled on every execution, i.e. every epoch, and every epoch
    decodes the photos. Cached (`cache`, default use_cache(cfg)), the photos are decoded once,
    here, into the object store (materialize), and every execution reshuffles the cached blocks
    and cuts new random crops from them. Either way the trainer's local shuffle buffer
    (iter_train_batches) mixes crops across files. `with_keys` adds each crop's
    photo key (tests; iter_train_batches needs it off). `cpus_per_task` is the logical CPU share
    of each read / decode task; `max_tasks` caps concurrent decode tasks (default: as many as
    the CPUs left to Ray Data allow); `read_ahead` caps the object store (bytes) it fills ahead
    of the consumer (default `read_ahead_bytes()`). Under Ray Train pass `data_config()`, which
    carries the same cap: Train replaces each dataset's execution options."""

    files = shard_files(cfg.data.shards, "train")
    cols = [KEY_COLUMN, IMAGE_COLUMN] if with_keys else [IMAGE_COLUMN]
    kwargs = {"cfg": cfg, "with_keys": with_keys}
    cached = use_cache(cfg) if cache is None else cache
    if cached:
        decoded = build_photo_dataset(cfg, with_keys=with_keys, cpus_per_task=cpus_per_task, max_tasks=max_tasks)
        ds = decoded.randomize_block_order()  # no seed: a new block order on every execution
        fn = _crop_map
    else:
        # shuffle="files": a new random file order per execution, i.e. per epoch.
        ds = _read_parquet(files, num_cpus=cpus_per_task, shuffle="files").select_columns(cols)
        fn = _train_map
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=read_ahead or read_ahead_bytes())
    if _idle_backoff_class() not in ds.context.custom_execution_callback_classes:
        ds.context.custom_execution_callback_classes.append(_idle_backoff_class())
    crops_ds: ray.data.Dataset = ds.map_batches(
        fn,  # type: ignore[arg-type]  # ray types fn as one-argument; fn_kwargs supplies the rest
        fn_kwargs=kwargs,
        batch_size=ROWS_PER_MAP,
        batch_format="numpy",
        num_cpus=cpus_per_task,
        concurrency=max_tasks,
    )
    return crops_ds


def iter_train_batches(
    shard: ray.data.DataIterator,
    cfg: Config,
    device: str | torch.device = "cpu",
    *,
    prefetch_batches: int = PREFETCH_BATCHES,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (image (B, 3, S, S) uint8, hole (B, S*S/8) uint8 packed bits) tensors on
    `device` (crops.train_batch's compact form; step.prepare_batch converts it there) from a Train
    dataset shard (or a Dataset), B = cfg.data.batch_size, incomplete batch dropped so every rank
    steps the same number of times. Raises UserError when the epoch holds no full batch (the loop
    would otherwise spin without ever stepping)."""
    import torch

    n = 0
    for b in shard.iter_torch_batches(
        batch_size=cfg.data.batch_size,
        dtypes={"image": torch.uint8, "hole": torch.uint8},
        device=device,
        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        drop_last=True,
        prefetch_batches=prefetch_batches,
    ):
        n += 1
        yield b["image"], b["hole"]
    if n == 0:
        raise UserError(
            f"an epoch of the train shards yielded no full batch of data.batch_size={cfg.data.batch_size} "
            "crops per worker; raise data.repeat (crops per photo), lower data.batch_size, or prepare more photos"
        )


def read_ahead_bytes() -> int:
    """The default read-ahead cap for the connected cluster (READ_AHEAD_PER_CPU x its CPUs)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else 1  # type: ignore[no-untyped-call]  # ray: unannotated
    return int(max(READ_AHEAD_MIN, READ_AHEAD_PER_CPU * cpus))


def data_config(read_ahead: int | None = None) -> ray.train.DataConfig:
    """DataConfig for TorchTrainer(datasets={"train": ...}): split "train" across workers
    (streaming_split(equal=True)) with the read-ahead cap (Train replaces a dataset's own execution
    options with these, so the cap must be here too). Given explicitly: for a dataset without
    options, Train derives them from the DataContext and trips Ray Data's exclude_resources
    deprecation warning on every run."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    ctx = ray.data.DataContext.get_current().execution_options
    cap = ctx.resource_limits.copy(object_store_memory=read_ahead or read_ahead_bytes())
    train = ExecutionOptions(
        resource_limits=cap, preserve_order=ctx.preserve_order, verbose_progress=ctx.verbose_progress
    )
    return DataConfig(datasets_to_split=["train"], execution_options={"train": train})


def check_cpu_budget(cfg: Config, cluster_cpus: float | None = None) -> None:
    """Raise UserError when the Train workers would hold every CPU: Ray Data then gets none and
    the run hangs ("Cluster resources are not enough to run any task"). `cluster_cpus` defaults to
    the connected cluster's CPUs."""
    if cluster_cpus is None:
        import ray

        cluster_cpus = float(ray.cluster_resources().get("CPU", 0))  # type: ignore[no-untyped-call]  # ray: unannotated
    s = cfg.scale
    need = s.num_workers * s.cpus_per_worker + DATA_TASK_CPUS
    if need > cluster_cpus + 1e-9:
        fit = math.floor(100 * (cluster_cpus - DATA_TASK_CPUS) / s.num_workers) / 100
        if fit <= 0:
            raise UserError(
                f"this {cluster_cpus:g}-CPU cluster cannot run training workers beside Ray Data's "
                f"{DATA_TASK_CPUS}-CPU decode tasks; start Ray with more (logical) CPUs, e.g. "
                f"`ray start --head --num-cpus=4` (and RAY_ADDRESS naming it), or num_cpus=4 in ray.init"
            )
        raise UserError(
            f"{s.num_workers} workers x scale.cpus_per_worker={s.cpus_per_worker} leave Ray Data less than the "
            f"{DATA_TASK_CPUS} CPU its decode tasks need on this {cluster_cpus:g}-CPU cluster, so training would hang "
            f"waiting for data; set scale.cpus_per_worker={fit:.2f} (a logical share; torch still uses its threads) "
            "or fewer scale.num_workers"
        )
