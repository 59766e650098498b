"""The no-Ray runner (`ce-ray train --local`): the shared loop in one process, in Ray Train's run layout.

The same per-worker loop (loop.py), world size 1. For debugging, for hosts without Ray (GPU
benchmarks), and for quick CPU runs.

A run lives where a Ray Train run does, in the same layout (runs.py, checkpoint.py):
<scale.storage_path>/<run name>/
    checkpoint_step0000200/   checkpoint directories, newest `scale.checkpoints_to_keep` kept
    metrics.jsonl             one line per report ("checkpoint" names a saved one)
    samples/*.png             eval picture grids (masked input | output | truth)
A run folder from before that layout (checkpoints/step_0000200/) resumes too. With mlflow.enabled
the run is recorded in MLflow as the Ray driver records it (one run, metrics, grids, the final
checkpoint, the generator registered).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ce_ray import tracking
from ce_ray.config import Config
from ce_ray.core.step import resolve_device
from ce_ray.errors import UserError
from ce_ray.train import checkpoint as ckpt_io
from ce_ray.train import mlflow_run, runs
from ce_ray.train.loop import Batch, Tracker, WorkerEnv, run


class FolderTracker:
    """loop.Tracker for --local: artifacts go into the run folder (the local stand-in for MLflow)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass  # metrics.jsonl is written by the report function

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        dest = self.run_dir / (artifact_path or "") / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)

    def close(self) -> None:
        pass


class BothTrackers:
    """The run folder and MLflow, when mlflow.enabled."""

    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def device_batches(cfg: Config, device: torch.device, seed: int) -> Callable[[int], Iterator[Batch]]:
    """data.device_crops for --local: the train photos decoded once onto `device`, then every
    epoch's crops, flips and holes made there (data/device_crops.py)."""
    from ce_ray.data.device_crops import decode_photos, epoch_batches
    from ce_ray.data.local_stream import train_photo_bytes

    return epoch_batches(decode_photos(train_photo_bytes(cfg), cfg), cfg, device, seed)


@dataclass
class LocalResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float]
    model_uri: str | None = None  # models:/<name>/<version> when mlflow.enabled
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None


def train_local(
    cfg: Config,
    *,
    run_name: str | None = None,
    resume: bool = False,
    tracker: Tracker | None = None,
    log: Callable[[str], None] | None = None,
) -> LocalResult:
    """`ce-ray train --local`: the shared loop in this process, after the same pre-flight as the
    Ray driver (runs.plan_run), in the same run root (scale.storage_path) and layout, with the same
    MLflow run and registered model when mlflow.enabled. `tracker` replaces the run's (tests)."""
    from ce_ray.data.local_stream import LocalTrainStream  # pyarrow readers, no Ray

    log = log or functools.partial(print, flush=True)
    cfg = runs.resolve_paths(cfg)
    plan = runs.plan_run(cfg, run_name, resume, workers=1)
    run_dir = Path(plan.path)
    restore = ckpt_io.load(plan.latest) if plan.latest else None
    for line in runs.describe_lines(plan):
        log(line)
    if resume:
        for p in ckpt_io.remove_partial_writes(run_dir):  # one process writes a --local run: this one
            log(f"removed {p.name}: a checkpoint write that was cut off")
    handle = (
        tracking.start_run(cfg, run_name=plan.name, run_path=plan.path, resume=resume) if cfg.mlflow.enabled else None
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    seed = cfg.train.seed + (restore.step if restore else 0)
    train_batches = (
        device_batches(cfg, device, seed) if cfg.data.device_crops else LocalTrainStream(cfg, seed=seed).epoch
    )
    state: dict[str, Any] = {"checkpoint": Path(plan.latest) if plan.latest else None, "metrics": {}}

    def report(metrics: dict[str, float], ckpt_dir: Path | None) -> None:
        record: dict[str, float | str] = dict(metrics)
        if ckpt_dir is not None:
            # meta.json last, renamed into place; a full disk is a UserError and the run's
            # earlier checkpoints stay as they were.
            dest = ckpt_io.copy(ckpt_dir, run_dir / ckpt_io.checkpoint_dir_name(int(metrics["step"])))
            state["checkpoint"] = dest
            record["checkpoint"] = dest.name  # as Ray Train's metrics.jsonl names it
            for old in ckpt_io.run_checkpoints(run_dir)[: -cfg.scale.checkpoints_to_keep]:
                shutil.rmtree(old, ignore_errors=True)
        with open(run_dir / ckpt_io.METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        state["metrics"] = metrics

    if tracker is None:
        tracker = (
            FolderTracker(run_dir)
            if handle is None
            else BothTrackers(FolderTracker(run_dir), mlflow_run.MlflowTracker(handle))
        )
    env = WorkerEnv(
        train_batches=train_batches,
        val_data=lambda: runs.val_set(cfg),
        report=report,
        restore=restore,
        device=device,
        tracker=tracker,
        log=log,
    )
    try:
        try:
            run(cfg, env)
        finally:
            tracker.close()  # what a store that was away still lacks goes now, or is named
    except BaseException:
        tracking.end_run(handle, "KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
        raise
    if state["checkpoint"] is None:
        raise UserError(
            "training finished without writing a checkpoint"
        )  # cannot happen: the last step always checkpoints
    model_uri = None
    if handle is not None:
        ckpt = str(state["checkpoint"])
        model_uri = mlflow_run.record_final(handle, ckpt, lambda: contextlib.nullcontext(ckpt), cfg)
    return LocalResult(
        run_dir=run_dir,
        checkpoint=state["checkpoint"],
        metrics=state["metrics"],
        model_uri=model_uri,
        mlflow_run_id=handle.run_id if handle else None,
        mlflow_tracking_uri=handle.tracking_uri if handle else None,
    )
