"""`ce-ray train` on Ray Train: DDP workers, checkpoints, fault tolerance, MLflow; one machine or a cluster.

DDP Context Encoder training across Ray Train workers (docs/ray-notes.md, "Train V2 reports").

    train_fn_per_worker   every worker: the shared loop (loop.run) with DDP-wrapped G and D (gloo on
                          CPU, NCCL on GPU), its shard of the Ray Data pipeline, rank 0 validating,
                          checkpointing and logging to MLflow; ray.train.report on every rank.
    build_trainer         TorchTrainer from a Config: ScalingConfig, RunConfig (name + storage =
                          the run's identity), FailureConfig, CheckpointConfig (latest + best val_l2).
    train                 the driver behind `ce-ray train`: paths, run name, Ray, MLflow run, fit,
                          registered generator, and where everything is.

Run layout (checkpoint.py, runs.py; `--local` writes the same, in the same place):
<scale.storage_path>/<run name>/
    checkpoint_step0000200/   checkpoint directories, latest + best kept by Ray
    metrics.jsonl             one line per report (rank 0's metrics; "checkpoint" names a saved one)
    checkpoint_manager_snapshot.json, ...   Ray's own bookkeeping (what --resume reads)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ce_ray import cluster, tracking
from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.fsutil import is_uri
from ce_ray.train import checkpoint as ckpt_io
from ce_ray.train import mlflow_run, runs
from ce_ray.train.checkpoint import METRICS_FILE

if TYPE_CHECKING:
    from ray.data import Dataset
    from ray.train import Checkpoint as RayCheckpoint
    from ray.train import UserCallback
    from ray.train.torch import TorchTrainer
    from torch import nn

    from ce_ray.train.loop import Batch

VAL_SCORE = "val_l2"  # CheckpointConfig keeps the best checkpoint by this (lower is better)


# --- Worker ---------------------------------------------------------------------------------------


class WorkerHook(Protocol):
    """Optional calls into every worker process (train_loop_config["hook"]): the fault-injection
    and multi-node tests record which process is which rank on which node, what it restored and
    what weights it ended with (tests/probes.py). Production runs pass none. It travels pickled to
    the workers."""

    def started(self, rank: int, restored: ckpt_io.Checkpoint | None) -> None: ...
    def finished(self, rank: int, step: int, models: list[nn.Module]) -> None: ...  # models: the bare G and D


def _val_in_background(cfg: C.Config) -> tuple[Future[Batch], Callable[[], None]]:
    """(future, start): the val set read in a thread while training runs. It is only needed at the
    first evaluation, and reading it up front would delay the first step by a Ray Data execution;
    `start()` (idempotent) is called once the first training batch has arrived, so the read does
    not compete with the train pipeline's start-up. loop.run waits on the future when it first
    evaluates; an error in the read is raised there."""
    future: Future[Batch] = Future()

    def read() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(runs.val_set(cfg))
        except BaseException as e:  # re-raised in the training thread by future.result()
            future.set_exception(e)

    thread = threading.Thread(target=read, name="ce-ray-val", daemon=True)

    def start() -> None:
        if thread.ident is None:
            thread.start()

    return future, start


def _upload_fn(run_path: str) -> Callable[[RayCheckpoint, str], RayCheckpoint] | None:
    """Ray Train's checkpoint upload for a local (or shared) run folder: ckpt_io.copy, so a rank
    killed mid-upload leaves only a hidden temp folder, never a partial checkpoint_step* folder,
    and a full disk is a UserError naming the folder and the space needed. Ray's own upload
    (remote storage, or a run folder this node does not see) copies file by file into place;
    checkpoint.verify catches a folder it left incomplete."""
    import ray.train

    if is_uri(run_path) or not os.path.isdir(run_path):
        return None

    def upload(checkpoint: RayCheckpoint, dir_name: str) -> RayCheckpoint:
        dest = ckpt_io.copy(checkpoint.path, os.path.join(run_path, dir_name))
        return ray.train.Checkpoint.from_directory(str(dest))

    return upload


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Runs on every Ray Train worker. `config` = train_loop_config from build_trainer:
    {"config": Config as a dict, "tracking": RunHandle as a dict or None, "hook": WorkerHook or None,
    "run_path": the run folder, "restore_instead": the checkpoint to restore when Ray's latest is
    damaged (runs.RunPlan.damaged) or None}."""
    import ray.train
    import ray.train.torch
    import torch

    from ce_ray.core.step import unwrap
    from ce_ray.data import stream as data
    from ce_ray.train.loop import WorkerEnv, run

    cfg = C.from_dict(config["config"])
    hook: WorkerHook | None = config.get("hook")
    cluster.quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if cfg.train.threads == 0 and device.type == "cpu":
        # Ray starts workers with one torch thread (OMP_NUM_THREADS=1); share the node's cores
        # between the workers on it instead, as the local trainer's torch default would.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // ctx.get_local_world_size()))

    restore = None
    run_path: str = config["run_path"]
    instead: str | None = config.get("restore_instead")
    ray_ckpt = ray.train.get_checkpoint()  # set on every rank after a failure or a --resume
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            try:
                restore = ckpt_io.load(d, map_location="cpu")  # reads everything into memory
            except ckpt_io.DamagedCheckpointError:
                if instead is None:  # damaged since the driver checked it, or remote: nothing to fall back on
                    raise
        if restore is None and instead is not None:
            restore = ckpt_io.load(instead, map_location="cpu")  # the driver said so, with a warning
    if hook is not None:
        hook.started(rank, restore)

    shard = ray.train.get_dataset_shard("train")
    models: list[nn.Module] = []

    def wrap(model: nn.Module) -> nn.Module:
        # prepare_model: DDP over gloo (CPU) or NCCL (GPU) when world_size > 1, else the bare model.
        # loop.run has already moved it to `device`.
        m = ray.train.torch.prepare_model(model, move_to_device=False)
        models.append(m)
        return m

    def report(metrics: dict[str, float], ckpt_dir: Path | None) -> None:
        checkpoint, name, upload = None, None, None
        if ckpt_dir is not None:
            # loop.run validates at every checkpoint step; should val ever be missing, rank the
            # checkpoint last instead of letting CheckpointConfig fail on the missing score.
            metrics = metrics if VAL_SCORE in metrics else {**metrics, VAL_SCORE: float("inf")}
            checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
            name = ckpt_io.free_checkpoint_name(run_path, int(metrics["step"]))
            upload = _upload_fn(run_path)
        # A barrier: every rank calls it at the same steps; only rank 0 passes a checkpoint (and
        # only rank 0's name and metrics count). Upload is synchronous, so ckpt_dir may go after.
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_fn=upload)

    def log(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    val, start_val = _val_in_background(cfg)  # only rank 0 validates: loop.run asks only there

    def train_batches(epoch: int) -> Iterator[Batch]:
        for i, batch in enumerate(data.iter_train_batches(shard, cfg, device)):
            if i == 0 and rank == 0:
                start_val()  # the train pipeline is up: now read the val set beside it
            yield batch

    batches: Callable[[int], Iterator[Batch]] = train_batches
    if cfg.data.device_crops:
        batches = _device_batches(shard, cfg, device, seed=cfg.train.seed + 7919 * rank, start_val=start_val)

    tracker = mlflow_run.worker_tracker(tracking.RunHandle.from_dict(config.get("tracking")), rank)
    env = WorkerEnv(
        train_batches=batches,
        val_data=lambda: val,
        report=report,
        restore=restore,
        rank=rank,
        world_size=world_size,
        device=device,
        wrap=wrap,
        tracker=tracker,
        log=log,
    )
    try:
        last = run(cfg, env)
    finally:
        tracker.close()  # what a store that was away still lacks goes now, or is named
    if hook is not None:
        hook.finished(rank, int(last.get("step", restore.step if restore else 0)), [unwrap(m) for m in models])
    return last


def _device_batches(
    shard: Any, cfg: C.Config, device: Any, *, seed: int, start_val: Callable[[], None]
) -> Callable[[int], Iterator[Batch]]:
    """data.device_crops: this worker's share of the decoded photos (stream.build_photo_dataset,
    split equally across workers) loaded onto its device once, then every epoch cut there."""
    from ce_ray.data.device_crops import epoch_batches

    photos = [rgb for b in shard.iter_batches(batch_size=None, batch_format="numpy") for rgb in b["rgb"]]
    start_val()
    return epoch_batches(photos, cfg, device, seed)


# --- Driver ---------------------------------------------------------------------------------------


def _metrics_log_callback(path: str) -> UserCallback:
    """A Ray Train UserCallback (runs in the controller actor) appending every report of rank 0 to
    <run>/metrics.jsonl: result.metrics only holds the latest checkpoint's metrics."""
    import ray.train

    class MetricsLog(ray.train.UserCallback):
        def __init__(self, path: str):
            self.path = path

        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: ray.train.Checkpoint | None
        ) -> None:
            record = dict(metrics[0])
            if checkpoint is not None:
                record["checkpoint"] = os.path.basename(checkpoint.path.rstrip("/"))
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsLog(path)


def build_trainer(
    cfg: C.Config,
    *,
    run_name: str,
    storage_path: str | None = None,
    callbacks: Iterable[UserCallback] = (),
    tracking_run: tracking.RunHandle | None = None,
    placement_strategy: str = "PACK",
    hook: WorkerHook | None = None,
    datasets: dict[str, Dataset] | None = None,
    restore_instead: str | None = None,
) -> TorchTrainer:
    """A TorchTrainer for `cfg` (paths already absolute: see resolve_paths). The run's identity is
    (storage_path, run_name): fit() on an existing one resumes it from its latest checkpoint.
    `placement_strategy` ("PACK", "SPREAD", "STRICT_SPREAD") places the workers' bundles;
    `hook` is called in every worker (WorkerHook: tests); `datasets`: built already (train()
    builds them while the MLflow run is created), else built here; `restore_instead` is the
    checkpoint the workers restore when Ray's latest one is damaged (runs.RunPlan.damaged)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scale
    storage = storage_path or s.storage_path
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    scaling = ray.train.ScalingConfig(
        num_workers=s.num_workers,
        use_gpu=s.use_gpu,
        resources_per_worker=resources,
        placement_strategy=placement_strategy,
    )
    # ray.train resolves to the Train V2 classes at runtime; its static types are V1's, whose
    # RunConfig has no logging_config and whose TorchTrainer wants a function returning None.
    run_config = ray.train.RunConfig(  # type: ignore[call-arg]
        name=run_name,
        storage_path=storage,
        failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
        # num_to_keep best by val_l2, plus the latest (Ray always keeps the latest too).
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=s.checkpoints_to_keep, checkpoint_score_attribute=VAL_SCORE, checkpoint_score_order="min"
        ),
        callbacks=list(callbacks),  # type: ignore[arg-type]  # V2's RunConfig takes UserCallbacks
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Train's INFO lines are noise here
    )
    from ce_ray.data import stream as data

    return TorchTrainer(
        train_fn_per_worker,  # type: ignore[arg-type]  # Ray ignores the function's return value
        train_loop_config={
            "config": C.to_dict(cfg),
            "tracking": tracking_run.to_dict() if tracking_run else None,
            "hook": hook,
            "run_path": f"{storage.rstrip('/')}/{run_name}",
            "restore_instead": restore_instead,
        },
        scaling_config=scaling,
        run_config=run_config,
        # NCCL needs GPUs; gloo runs DDP on CPUs (and is what TorchConfig picks without GPUs).
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        datasets=datasets or _build_datasets(cfg),  # type: ignore[arg-type]  # ray: an invariant dict of Dataset | factory
        dataset_config=data.data_config(),
    )


def _build_datasets(cfg: C.Config) -> dict[str, Dataset]:
    """The "train" dataset (data.stream; the val set is read by runs.val_set). Reading the Parquet
    footers shows a sampling progress bar on the driver, noise above the progress line: off while
    they are built; the datasets then get the context's own setting back for their executions in
    the workers."""
    import ray.data

    from ce_ray.data import stream as data

    ctx = ray.data.DataContext.get_current()
    enabled = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        train = data.build_photo_dataset(cfg) if cfg.data.device_crops else data.build_train_dataset(cfg)
        datasets = {"train": train}
    finally:
        ctx.enable_progress_bars = enabled
    for ds in datasets.values():
        ds.context.enable_progress_bars = enabled
    return datasets


def _latest_checkpoint(path: str) -> str | None:
    """The latest checkpoint Ray recorded for a run folder (what --resume restores), or None."""
    import ray.train

    try:
        result = ray.train.Result.from_path(path)
    except Exception:  # no snapshot yet: the run died before its first checkpoint
        return None
    return result.checkpoint.path if result.checkpoint is not None else None


def _user_error_in(err: BaseException) -> UserError | None:
    """A UserError raised inside a worker (Ray Train V2 keeps the original exception in
    WorkerGroupError.worker_failures) comes back as itself, so the CLI prints one clear line."""
    for exc in (getattr(err, "worker_failures", None) or {}).values():
        if isinstance(exc, UserError):
            return UserError(str(exc))
    return None


def _discard(pending: Future[tracking.RunHandle | None]) -> None:
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
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, when the storage is local

    def lines(self) -> list[str]:
        out = [f"run         {self.run_name} (step {self.step})", f"checkpoint  {self.checkpoint}"]
        if self.best_checkpoint and self.best_checkpoint != self.checkpoint:
            out.append(f"best        {self.best_checkpoint}")
        if VAL_SCORE in self.metrics:
            m = self.metrics
            out.append(
                f"val         L1 {100 * m['val_l1']:.2f}%  L2 {100 * m['val_l2']:.2f}%  PSNR {m['val_psnr']:.2f} dB "
                "(over the hole, [0,1] pixels, PSNR averaged per image)"
            )
        if self.mlflow_run_id:
            if self.mlflow_tracking_uri is None:  # train() sets both together
                raise ValueError(f"mlflow run {self.mlflow_run_id} has no tracking URI")
            out.append(f"mlflow run  {self.mlflow_run_id} at {self.mlflow_tracking_uri}")
            out.append(f"pictures    {self.mlflow_artifacts}/samples")
            if self.model_uri:
                out.append(f"model       {self.model_uri}")
            out.append(f"mlflow ui   {tracking.ui_command(self.mlflow_tracking_uri)}")
        return out


def train(
    cfg: C.Config,
    *,
    run_name: str | None = None,
    resume: bool = False,
    callbacks: Iterable[UserCallback] = (),
    placement_strategy: str = "PACK",
    hook: WorkerHook | None = None,
    log: Callable[[str], None] = print,
) -> TrainSummary:
    """`ce-ray train`: fit a TorchTrainer for `cfg` and record it in MLflow.

    A run is identified by (scale.storage_path, run name). Without a name a fresh unique one is
    made; a named run that already exists is only continued with resume=True (from its latest
    checkpoint: weights, optimiser states, step, RNG), otherwise UserError."""
    cfg = runs.resolve_paths(cfg)
    plan = runs.plan_run(cfg, run_name, resume, workers=cfg.scale.num_workers, latest_of=_latest_checkpoint)
    name, path = plan.name, plan.path
    for line in runs.describe_lines(plan):
        log(line)
    if resume and not is_uri(path):  # no worker writes into the run folder before fit()
        for p in ckpt_io.remove_partial_writes(path):
            log(f"removed {p.name}: a checkpoint write that was cut off")
    # The MLflow run (import, schema creation on a fresh database, experiment, params: seconds)
    # is prepared while Ray starts: both sit before the first step.
    with ThreadPoolExecutor(1, thread_name_prefix="ce-ray-mlflow") as pool:
        pending = pool.submit(tracking.start_run, cfg, run_name=name, run_path=path, resume=resume)
        try:
            cluster.connect_ray()
            from ce_ray.data import stream as data

            data.check_cpu_budget(cfg)
            # Datasets copy the DataContext when they are made: quiet it before. They are built
            # (and, with data.cache, decoded once) here, while the MLflow run is still being made.
            cluster.quiet_data_context(progress_to_logs=True)
            datasets = _build_datasets(cfg)
        except BaseException:
            _discard(pending)
            raise
        handle = pending.result()
    import ray.train

    cbs = list(callbacks)
    metrics_file = None
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        metrics_file = os.path.join(path, METRICS_FILE)
        cbs.insert(0, _metrics_log_callback(metrics_file))
    try:
        trainer = build_trainer(
            cfg,
            run_name=name,
            callbacks=cbs,
            tracking_run=handle,
            placement_strategy=placement_strategy,
            hook=hook,
            datasets=datasets,
            restore_instead=plan.latest if plan.damaged else None,
        )
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
    summary = TrainSummary(
        run_name=name,
        run_path=path,
        checkpoint=result.checkpoint.path,
        best_checkpoint=best,
        metrics=dict(result.metrics or {}),
        step=int((result.metrics or {}).get("step", 0)),
    )
    if metrics_file and os.path.exists(metrics_file):
        with open(metrics_file) as f:
            summary.history = [json.loads(line) for line in f if line.strip()]
    if handle is not None:
        summary.model_uri = mlflow_run.record_final(handle, summary.checkpoint, result.checkpoint.as_directory, cfg)
        summary.mlflow_tracking_uri, summary.mlflow_run_id = handle.tracking_uri, handle.run_id
        summary.mlflow_artifacts = tracking.artifact_dir(handle)
    for line in summary.lines():
        log(line)
    return summary


# --- CLI glue (cli.py owns the parser and calls these) -------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (tune_configs/*.yaml); omitted: the paper's defaults")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100 scale.num_workers=1"
    )
    parser.add_argument("--run-name", help="name of the run under scale.storage_path (default: a fresh unique name)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run named by --run-name from its latest checkpoint"
    )
    parser.add_argument(
        "--local", action="store_true", help="train in this process without Ray (ce_ray.train.local; debugging)"
    )
    parser.add_argument(
        "--sync-mlflow",
        metavar="RUN_DIR",
        help="no training: log what the finished run folder has and its MLflow run lacks (metrics, pictures, "
        "the registered model), e.g. after the tracking server was away; KEY=VALUE overrides its config",
    )


def run_from_args(args: argparse.Namespace) -> int:
    if args.sync_mlflow:
        mlflow_run.sync_run(args.sync_mlflow, args.overrides)
        return 0
    cfg = C.load(args.config, args.overrides)
    if args.local:
        from ce_ray.train.local import train_local

        r = train_local(cfg, run_name=args.run_name, resume=args.resume)
        print(
            f"run         {r.run_dir.name} (step {int(r.metrics.get('step', 0))})\n"
            f"checkpoint  {r.checkpoint}\n"
            f"pictures    {r.run_dir / 'samples'}"
        )
        if r.model_uri:
            print(f"mlflow run  {r.mlflow_run_id} at {r.mlflow_tracking_uri}\nmodel       {r.model_uri}")
        return 0
    train(cfg, run_name=args.run_name, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ce_ray.train.driver ...`: the same as `ce-ray train ...`."""
    parser = argparse.ArgumentParser(
        prog="python -m ce_ray.train.driver", description="Train a Context Encoder on Ray Train"
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
