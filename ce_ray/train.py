"""Ray Train: DDP Context Encoder training across Ray Train workers, on one machine or a cluster,
with checkpoints, fault tolerance and MLflow (shared/RAY.md §1, §4, §7).

    train_fn_per_worker   every worker: the shared loop (loop.run) with DDP-wrapped G and D (gloo on
                          CPU, NCCL on GPU), its shard of the Ray Data pipeline, rank 0 validating,
                          checkpointing and logging to MLflow; ray.train.report on every rank.
    build_trainer         TorchTrainer from a Config: ScalingConfig, RunConfig (name + storage =
                          the run's identity), FailureConfig, CheckpointConfig (latest + best val_l2).
    train                 the driver behind `ce-ray train`: paths, run name, Ray, MLflow run, fit,
                          registered generator, and where everything is.

Run layout: <scale.storage_path>/<run name>/
    checkpoint_step0000200/   checkpoint directories (checkpoint.py), latest + best kept by Ray
    metrics.jsonl             one line per report (rank 0's metrics; "checkpoint" names a saved one)
    checkpoint_manager_snapshot.json, ...   Ray's own bookkeeping (what --resume reads)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ce_ray import checkpoint as ckpt_io
from ce_ray import config as C
from ce_ray import tracking
from ce_ray.errors import UserError

# Set before the trainer starts: Ray Train propagates these from the driver to its controller and
# workers (RAY.md §7). Without the first two every progress line prints twice and a
# preemption-watcher actor logs constructor noise. The third: each worker's report queue holds one
# report and the controller takes it only when it polls, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (2 s by default), so a loop reporting more often than that blocks in ray.train.report (measured
# with log_every=1 and ~1.3 s steps: 9.0 img/s on Ray Train vs 12.2 locally). A missed poll is
# harmless: a worker counts as hung only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (600 s).
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}
VAL_SCORE = "val_l2"  # CheckpointConfig keeps the best checkpoint by this (lower is better)
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint_step"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


# --- Worker ---------------------------------------------------------------------------------------


def _write_probe(probe_dir: str | None, name: str, record: dict[str, Any]) -> None:
    """Fault-injection / multi-node tests read these: which process is which rank on which node,
    what it restored, and what it ended with."""
    if not probe_dir:
        return
    path = Path(probe_dir) / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # readers never see half a file


def _digest(module) -> str:
    """SHA-256 of a module's parameters and buffers, in state_dict order."""
    import hashlib

    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _param_digest(module) -> str:
    """SHA-256 of the trainable parameters only: equal on every DDP rank after every step.
    (BatchNorm running statistics differ between ranks unless model.sync_bn is on.)"""
    import hashlib

    h = hashlib.sha256()
    for k, p in module.named_parameters():
        h.update(k.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _materialise_val(cfg: C.Config):
    """Rank 0's validation set as two tensors, read once from the "val" dataset (small: at most
    data.val_images crops). Returns (images (N,3,S,S), holes (N,1,S,S))."""
    import numpy as np
    import ray.train
    import torch

    shard = ray.train.get_dataset_shard("val")
    images, holes = [], []
    for b in shard.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy"):
        images.append(b["image"])  # (n, 3, S, S) float32; the "key" column is ignored
        holes.append(b["hole"])
    if not images:
        raise UserError(f"the val split of {cfg.data.shards} gave no validation crops; re-run `ce-ray prepare` with a larger --val-fraction")
    return torch.from_numpy(np.concatenate(images)).float(), torch.from_numpy(np.concatenate(holes)).float()


class _BackgroundVal:
    """The val set, read in a thread while training runs: it is only needed at the first
    evaluation, and reading it up front would delay the first step by a Ray Data execution.
    `start()` is called once the first training batch has arrived, so its tasks do not compete
    with the train pipeline's start-up. Behaves like the (images, holes) tuple loop.run expects;
    the first access waits for it (and starts it, if nothing did)."""

    def __init__(self, cfg: C.Config):
        import threading

        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._read, args=(cfg,), name="ce-ray-val", daemon=True)

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def _read(self, cfg: C.Config) -> None:
        try:
            self._value = _materialise_val(cfg)
        except BaseException as e:  # re-raised in the training thread at first use
            self._error = e

    def get(self):
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def __iter__(self):
        return iter(self.get())

    def __getitem__(self, i):
        return self.get()[i]

    def __len__(self) -> int:
        return 2


def _quiet_worker_logs() -> None:
    """Rank 0's progress line is the output; Ray Train configures the worker's root logger at INFO
    (a "Reporting training result ..." line per report) and Ray Data logs each epoch's execution."""
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
            h.setLevel(logging.WARNING)  # console only: Ray Data's log files keep everything


def train_fn_per_worker(config: dict) -> dict[str, float]:
    """Runs on every Ray Train worker. `config` = train_loop_config from build_trainer:
    {"config": Config as a dict, "tracking": RunHandle as a dict or None, "probe_dir": str or None}."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from ce_ray import data
    from ce_ray.loop import WorkerEnv, run
    from ce_ray.model import Generator
    from ce_ray.step import unwrap

    cfg = C.from_dict(config["config"])
    _quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.train.threads == 0 and device.type == "cpu":
        # Ray starts workers with one torch thread (OMP_NUM_THREADS=1); share the node's cores
        # between the workers on it instead, as the local trainer's torch default would.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ctx.get_local_world_size()))

    restore = None
    ray_ckpt = ray.train.get_checkpoint()  # set on every rank after a failure or a --resume
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            restore = ckpt_io.load(d, map_location="cpu")  # reads everything into memory
    probe_dir = config.get("probe_dir")
    _write_probe(probe_dir, f"start-{os.getpid()}.json", {
        "pid": os.getpid(), "rank": rank, "ray_node_id": ray.get_runtime_context().get_node_id(),
        "restored_step": restore.step if restore else None})

    shard = ray.train.get_dataset_shard("train")
    wrapped: list = []

    def wrap(model):
        # prepare_model: DDP over gloo (CPU) or NCCL (GPU) when world_size > 1, else the bare model.
        # loop.run has already moved it to `device`.
        m = ray.train.torch.prepare_model(model, move_to_device=False)
        wrapped.append(m)
        return m

    def report(metrics: dict[str, float], ckpt_dir: Path | None) -> None:
        checkpoint, name = None, None
        if ckpt_dir is not None:
            # loop.run validates at every checkpoint step; should val ever be missing, rank the
            # checkpoint last instead of letting CheckpointConfig fail on the missing score.
            metrics = metrics if VAL_SCORE in metrics else {**metrics, VAL_SCORE: float("inf")}
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
            name = checkpoint_dir_name(int(metrics["step"]))
        # A barrier: every rank calls it at the same steps; only rank 0 passes a checkpoint (and
        # only rank 0's name and metrics count). Upload is synchronous, so ckpt_dir may go after.
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def log(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    val_holder: list[_BackgroundVal] = []

    def val_data() -> _BackgroundVal:
        val_holder.append(_BackgroundVal(cfg))
        return val_holder[0]

    def train_batches(epoch: int):
        for i, batch in enumerate(data.iter_train_batches(shard, cfg, device)):
            yield batch
            if i == 0 and val_holder:  # the train pipeline is up: now read the val set beside it
                val_holder[0].start()

    env = WorkerEnv(
        train_batches=train_batches,
        val_data=val_data,
        report=report,
        restore=restore,
        rank=rank,
        world_size=world_size,
        device=device,
        wrap=wrap,
        tracker=tracking.worker_tracker(tracking.RunHandle.from_dict(config.get("tracking")), rank),
        log=log,
    )
    last = run(cfg, env)
    if probe_dir:
        G = next((unwrap(m) for m in wrapped if isinstance(unwrap(m), Generator)), None)
        _write_probe(probe_dir, f"end-rank{rank}-{os.getpid()}.json", {
            "pid": os.getpid(), "rank": rank, "ray_node_id": ray.get_runtime_context().get_node_id(),
            "step": int(last.get("step", restore.step if restore else 0)),
            "g_params": _param_digest(G) if G is not None else None, "g_state": _digest(G) if G is not None else None})
    return last


# --- Driver ---------------------------------------------------------------------------------------


def _metrics_log_callback(path: str):
    """A Ray Train UserCallback (runs in the controller actor) appending every report of rank 0 to
    <run>/metrics.jsonl: result.metrics only holds the latest checkpoint's (RAY.md §1)."""
    import ray.train

    class MetricsLog(ray.train.UserCallback):
        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
            record = dict(metrics[0])
            if checkpoint is not None:
                record["checkpoint"] = os.path.basename(checkpoint.path.rstrip("/"))
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsLog(path)


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _abs(path: str) -> str:
    """Absolute local path (Ray workers and data tasks run in another working directory), URIs as is."""
    if _is_uri(path):
        return path
    if path.startswith("file://"):
        path = path[len("file://"):]
    return str(Path(path).expanduser().resolve())


def resolve_paths(cfg: C.Config) -> C.Config:
    """The config with data.shards, train.output_dir and scale.storage_path made absolute; this
    resolved config is what workers get and what every checkpoint records."""
    return C.replace(cfg, data={"shards": _abs(cfg.data.shards)}, train={"output_dir": _abs(cfg.train.output_dir)},
                     scale={"storage_path": _abs(cfg.scale.storage_path)})


def run_path(cfg: C.Config, run_name: str) -> str:
    return f"{cfg.scale.storage_path.rstrip('/')}/{run_name}"


def _exists(path: str) -> bool:
    if not _is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs

    fs, p = pyarrow.fs.FileSystem.from_uri(path)
    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def fresh_run_name(cfg: C.Config) -> str:
    """A name no run in the storage folder has: a fresh run never picks up an old one's checkpoints."""
    while True:
        name = f"run-{secrets.token_hex(4)}"
        if not _exists(run_path(cfg, name)):
            return name


def build_trainer(cfg: C.Config, *, run_name: str, storage_path: str | None = None, callbacks: Iterable = (),
                  tracking_run: tracking.RunHandle | None = None, placement_strategy: str = "PACK",
                  probe_dir: str | None = None):
    """A TorchTrainer for `cfg` (paths already absolute: see resolve_paths). The run's identity is
    (storage_path, run_name): fit() on an existing one resumes it from its latest checkpoint.
    `placement_strategy` ("PACK", "SPREAD", "STRICT_SPREAD") places the workers' bundles;
    `probe_dir` makes each worker write probe files (tests)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    scaling = ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                      placement_strategy=placement_strategy)
    run_config = ray.train.RunConfig(
        name=run_name,
        storage_path=storage_path or s.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
        # num_to_keep best by val_l2, plus the latest (Ray always keeps the latest too).
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=s.checkpoints_to_keep, checkpoint_score_attribute=VAL_SCORE,
                                                     checkpoint_score_order="min"),
        callbacks=list(callbacks),
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Train's INFO lines are noise here
    )
    from ce_ray import data

    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": C.to_dict(cfg), "tracking": tracking_run.to_dict() if tracking_run else None,
                           "probe_dir": probe_dir},
        scaling_config=scaling,
        run_config=run_config,
        # NCCL needs GPUs; gloo runs DDP on CPUs (and is what TorchConfig picks without GPUs).
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        datasets=_build_datasets(cfg),
        dataset_config=data.data_config(),
    )


def _build_datasets(cfg: C.Config) -> dict:
    """data.py's "train" and "val" datasets. Reading the Parquet footers shows a sampling progress
    bar on the driver, noise above the progress line: off while they are built; the datasets
    then get the context's own setting back for their executions in the workers."""
    import ray.data

    from ce_ray import data

    ctx = ray.data.DataContext.get_current()
    enabled = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        # with_keys: the keyless variant ends in a drop_columns step that runs as its own task
        # asking a whole CPU (it cannot fuse past the val cap), which never schedules when the
        # workers hold part of every node's CPUs; rank 0 just ignores the key column.
        datasets = {"train": data.build_train_dataset(cfg), "val": data.build_val_dataset(cfg, with_keys=True)}
    finally:
        ctx.enable_progress_bars = enabled
    for ds in datasets.values():
        ds.context.enable_progress_bars = enabled
    return datasets


def connect_ray(log_to_driver: bool = True) -> None:
    """Attach to the cluster named by RAY_ADDRESS (set inside `ray job submit` jobs), else start a
    private local one. Never a bare ray.init(): that silently joins whatever cluster
    /tmp/ray/ray_current_cluster names (RAY.md §0). `log_to_driver=False` keeps the workers'
    output (rank 0's progress line) out of this process's stdout (benchmarks)."""
    import ray

    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    # A job-level LoggingConfig also drops the "(RayTrainWorker pid=...)" prefix from forwarded
    # worker lines, so rank 0's progress line reaches the terminal as printed.
    kwargs: dict[str, Any] = {"address": address, "logging_config": ray.LoggingConfig(log_level="WARNING"),
                              "log_to_driver": log_to_driver}
    if address == "local":
        # Processes of a cluster we start inherit this environment: Ray Data's console handler
        # at WARNING hides its per-epoch "execution finished" lines in every worker and actor.
        if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
            os.environ["RAY_DATA_LOGGING_CONFIG"] = _ray_data_logging_file()
            from ray.data._internal.logging import configure_logging

            configure_logging()  # this process imported Ray Data before the variable was set
        # The dashboard's State API lets Train clean up placement groups (RAY.md §3); loopback only.
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1")
    with own_cluster_address() if address == "local" else contextlib.nullcontext():
        ray.init(**kwargs)


# Below Linux's ephemeral range (32768-60999): a port the kernel hands out for outgoing
# connections (Ray's own processes open many while starting) could otherwise be taken between
# choosing it and the GCS binding it (the same race made test_job_submit flaky).
PORT_RANGE = (20000, 32000)


def free_ports(n: int) -> list[int]:
    """n distinct ports in PORT_RANGE that 127.0.0.1 can bind now (for a Ray cluster to take)."""
    import random
    import socket

    rng = random.Random()
    ports: list[int] = []
    for _ in range(1000):
        port = rng.randrange(*PORT_RANGE)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise UserError(f"not enough free TCP ports in {PORT_RANGE[0]}-{PORT_RANGE[1]} for a local Ray cluster; "
                    "free some, or start Ray yourself and set RAY_ADDRESS")


@contextlib.contextmanager
def own_cluster_address() -> Iterator[None]:
    """For the local cluster started inside the block: pin its GCS port and name it in
    RAY_ADDRESS, which its processes inherit; this process drops both afterwards (it must not
    keep a stale address). Train's PlacementGroupCleaner looks its cluster up without an address;
    with several Ray clusters on one machine it otherwise fails or, worse, asks another cluster
    whether our controller is alive and, told no, removes our placement group mid-run."""
    port = free_ports(1)[0]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        yield
    finally:
        for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT"):
            os.environ.pop(k, None)


def _ray_data_logging_file() -> str:
    """Ray Data's default logging config with the console handler at WARNING (its log files under
    the session directory keep INFO), as a file for RAY_DATA_LOGGING_CONFIG."""
    import copy
    import hashlib
    import tempfile

    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    conf = copy.deepcopy(DEFAULT_CONFIG)
    conf["handlers"]["console"]["level"] = "WARNING"
    text = yaml.safe_dump(conf)
    path = Path(tempfile.gettempdir()) / f"ce_ray_data_logging_{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


def _quiet_ray_data() -> None:
    """Ray Data's progress bars and plan banners drown the progress line. The DataContext is
    copied when the trainer is constructed, so this runs before that (RAY.md §2). On a cluster we
    started, Ray Data's console handler is at WARNING (connect_ray): progress then goes to its
    INFO log lines (use_ray_tqdm off), i.e. to the log files only. Elsewhere progress bars go off
    (and each process warns once that they are)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        ctx.use_ray_tqdm = False
    else:
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _latest_checkpoint(path: str) -> str | None:
    """The latest checkpoint Ray recorded for a run folder (what --resume restores), or None."""
    import ray.train

    try:
        result = ray.train.Result.from_path(path)
    except Exception:  # no snapshot yet: the run died before its first checkpoint
        return None
    return result.checkpoint.path if result.checkpoint is not None else None


def _check_resumable(cfg: C.Config, name: str, ckpt_path: str) -> None:
    """Fail before any worker starts when the checkpoint cannot continue under this config."""
    if _is_uri(ckpt_path):
        return  # remote storage: the workers' load reports a mismatch
    meta = ckpt_io.read_meta(ckpt_path)
    old = C.from_dict(meta["config"])
    diffs = [f"model.{k}: {getattr(old.model, k)!r} -> {getattr(cfg.model, k)!r}" for k in C.to_dict(cfg.model)
             if getattr(old.model, k) != getattr(cfg.model, k) and k != "sync_bn"]  # sync_bn keeps the same weights
    if diffs:
        raise UserError(f"run {name!r} cannot resume with a different network ({'; '.join(diffs)}); "
                        "use the run's original model settings, or start a fresh run")
    if meta["step"] >= cfg.train.steps:
        raise UserError(f"run {name!r} is already at step {meta['step']} of train.steps={cfg.train.steps}: nothing to do; "
                        f"pass a larger train.steps=N to train further")


def _check_enough_data(cfg: C.Config) -> None:
    """Every worker needs at least one full batch per epoch (its share of the crops after
    streaming_split(equal=True)); say so before starting workers instead of from inside them.
    Counts rows from the Parquet footers of local shards (remote ones are checked by the workers)."""
    if _is_uri(cfg.data.shards):
        return
    import pyarrow.parquet as pq

    from ce_ray.local_data import shard_files

    photos = sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(cfg.data.shards, "train"))
    shard_files(cfg.data.shards, "val")  # a clear error now if the val split is missing
    d, s = cfg.data, cfg.scale
    per_worker = photos * d.repeat // s.num_workers
    if per_worker < d.batch_size:
        raise UserError(f"{photos} train photos x data.repeat={d.repeat} crops / {s.num_workers} workers = {per_worker} crops per worker "
                        f"per epoch, fewer than data.batch_size={d.batch_size}: raise data.repeat, lower data.batch_size or "
                        "scale.num_workers, or prepare more photos")


def _user_error_in(err: BaseException) -> UserError | None:
    """A UserError raised inside a worker (Ray Train V2 keeps the original exception in
    WorkerGroupError.worker_failures) comes back as itself, so the CLI prints one clear line."""
    for exc in (getattr(err, "worker_failures", None) or {}).values():
        if isinstance(exc, UserError):
            return UserError(str(exc))
    return None


def _discard(pending) -> None:
    """Close the MLflow run that was being created when start-up failed."""
    try:
        tracking.end_run(pending.result(), "FAILED")
    except Exception:  # MLflow itself failed: the start-up error is the one to show
        pass


@dataclass
class TrainSummary:
    """Where a finished run put everything."""

    run_name: str
    run_path: str  # Ray Train run folder
    checkpoint: str  # latest checkpoint directory
    best_checkpoint: str | None  # best by val_l2 among those kept
    metrics: dict[str, float]  # the latest checkpoint's metrics
    step: int
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    mlflow_artifacts: str | None = None  # local folder (or URI) holding samples/, checkpoint/, the model
    model_uri: str | None = None  # models:/<name>/<version>
    history: list[dict] = field(default_factory=list)  # metrics.jsonl, when the storage is local

    def lines(self) -> list[str]:
        out = [f"run         {self.run_name} (step {self.step})",
               f"checkpoint  {self.checkpoint}"]
        if self.best_checkpoint and self.best_checkpoint != self.checkpoint:
            out.append(f"best        {self.best_checkpoint}")
        if VAL_SCORE in self.metrics:
            m = self.metrics
            out.append(f"val         L1 {100 * m['val_l1']:.2f}%  L2 {100 * m['val_l2']:.2f}%  PSNR {m['val_psnr']:.2f} dB "
                       "(over the hole, [0,1] pixels, PSNR averaged per image)")
        if self.mlflow_run_id:
            out.append(f"mlflow run  {self.mlflow_run_id} at {self.mlflow_tracking_uri}")
            out.append(f"pictures    {self.mlflow_artifacts}/samples")
            if self.model_uri:
                out.append(f"model       {self.model_uri}")
            out.append(f"mlflow ui   {tracking.ui_command(self.mlflow_tracking_uri)}")
        return out


def train(cfg: C.Config, *, run_name: str | None = None, resume: bool = False, callbacks: Iterable = (),
          placement_strategy: str = "PACK", probe_dir: str | None = None, log=print) -> TrainSummary:
    """`ce-ray train`: fit a TorchTrainer for `cfg` and record it in MLflow.

    A run is identified by (scale.storage_path, run name). Without a name a fresh unique one is
    made; a named run that already exists is only continued with resume=True (from its latest
    checkpoint: weights, optimiser states, step, RNG), otherwise UserError."""
    cfg = resolve_paths(cfg)
    name = run_name or cfg.scale.run_name
    if resume and not name:
        raise UserError("--resume needs the run to continue: pass --run-name NAME (the name printed when it started)")
    name = name or fresh_run_name(cfg)
    path = run_path(cfg, name)
    exists = _exists(path)
    if exists and not resume:
        raise UserError(f"run {name!r} already exists in {cfg.scale.storage_path}; pass --resume to continue it from its latest "
                        "checkpoint, or choose another --run-name (or none, for a fresh one)")
    if resume and not exists:
        raise UserError(f"nothing to resume: no run {name!r} in {cfg.scale.storage_path} (check --run-name and scale.storage_path)")
    latest = _latest_checkpoint(path) if resume else None
    if latest is not None:
        _check_resumable(cfg, name, latest)
    _check_enough_data(cfg)
    if cfg.mlflow.enabled:
        tracking.tracking_uri(cfg)  # a bad URI fails now, not after Ray has started

    log(f"{'resuming' if resume else 'starting'} run {name} in {path}" + (f" from {os.path.basename(latest)}" if latest else ""))
    # The MLflow run (import, schema creation on a fresh database, experiment, params: seconds)
    # is prepared while Ray starts: both sit before the first step.
    with ThreadPoolExecutor(1, thread_name_prefix="ce-ray-mlflow") as pool:
        pending = pool.submit(tracking.start_run, cfg, run_name=name, run_path=path, resume=resume)
        try:
            connect_ray()
            from ce_ray import data

            data.check_cpu_budget(cfg)
        except BaseException:
            _discard(pending)
            raise
        handle = pending.result()
    import ray.train

    _quiet_ray_data()
    cbs = list(callbacks)
    metrics_file = None
    if not _is_uri(path):
        os.makedirs(path, exist_ok=True)
        metrics_file = os.path.join(path, METRICS_FILE)
        cbs.insert(0, _metrics_log_callback(metrics_file))
    try:
        trainer = build_trainer(cfg, run_name=name, callbacks=cbs, tracking_run=handle, placement_strategy=placement_strategy,
                                probe_dir=probe_dir)
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        tracking.end_run(handle, "FAILED")
        user = _user_error_in(e)
        if user is not None:
            raise user from None
        raise
    except BaseException:  # Ctrl-C, or an error before fit started
        tracking.end_run(handle, "KILLED" if sys.exc_info()[0] is KeyboardInterrupt else "FAILED")
        raise
    if result.checkpoint is None:  # the loop always checkpoints its last step
        tracking.end_run(handle, "FAILED")
        raise RuntimeError(f"run {name} finished without a checkpoint in {path}")
    best = None
    if result.best_checkpoints:
        best = min(result.best_checkpoints, key=lambda cm: cm[1].get(VAL_SCORE, float("inf")))[0].path
    summary = TrainSummary(run_name=name, run_path=path, checkpoint=result.checkpoint.path, best_checkpoint=best,
                           metrics=dict(result.metrics or {}), step=int((result.metrics or {}).get("step", 0)))
    if metrics_file and os.path.exists(metrics_file):
        with open(metrics_file) as f:
            summary.history = [json.loads(line) for line in f if line.strip()]
    if handle is not None:
        try:
            with result.checkpoint.as_directory() as d:  # downloads when the storage is remote
                tracking.log_checkpoint(handle, d)
                summary.model_uri = tracking.register_generator(handle, d, cfg)
        except Exception as e:  # the store went away or refuses the registry: the training itself is safe
            tracking.end_run(handle, "FAILED")
            raise UserError(f"training finished (checkpoint: {summary.checkpoint}) but MLflow at {handle.tracking_uri} could not "
                            f"record it: {type(e).__name__}: {e}. Check mlflow.tracking_uri / MLFLOW_TRACKING_URI") from e
        tracking.end_run(handle, "FINISHED")
        summary.mlflow_tracking_uri, summary.mlflow_run_id = handle.tracking_uri, handle.run_id
        summary.mlflow_artifacts = tracking.artifact_dir(handle)
    for line in summary.lines():
        log(line)
    return summary


# --- CLI glue (cli.py owns the parser and calls these) -------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (tune_configs/*.yaml); omitted: the paper's defaults")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100 scale.num_workers=1")
    parser.add_argument("--run-name", help="name of the run under scale.storage_path (default: a fresh unique name)")
    parser.add_argument("--resume", action="store_true", help="continue the run named by --run-name from its latest checkpoint")
    parser.add_argument("--local", action="store_true", help="train in this process without Ray (ce_ray.local; debugging)")


def run_from_args(args: argparse.Namespace) -> int:
    cfg = C.load(args.config, args.overrides)
    if args.local:
        from ce_ray.local import train_local

        r = train_local(cfg, run_name=args.run_name, resume=args.resume)
        print(f"run         {r.run_dir.name} (step {int(r.metrics.get('step', 0))})\ncheckpoint  {r.checkpoint}\npictures    {r.run_dir / 'samples'}")
        return 0
    train(cfg, run_name=args.run_name, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ce_ray.train ...`: the same as `ce-ray train ...`."""
    parser = argparse.ArgumentParser(prog="python -m ce_ray.train", description="Train a Context Encoder on Ray Train")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
