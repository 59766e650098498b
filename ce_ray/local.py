"""The no-Ray runner (`ce-ray train --local`): the shared loop in one process, in Ray Train's run layout.

The same per-worker loop (loop.py), world size 1. For debugging, for hosts without Ray (GPU
benchmarks), and for quick CPU runs.

A run keeps Ray Train's layout (checkpoint.py), under train.output_dir instead of
scale.storage_path: <train.output_dir>/<run name>/
    checkpoint_step0000200/   checkpoint directories, newest `scale.checkpoints_to_keep` kept
    metrics.jsonl             one line per report ("checkpoint" names a saved one)
    samples/*.png             eval picture grids (masked input | output | truth)
A run folder from before that layout (checkpoints/step_0000200/) resumes too.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ce_ray import checkpoint as ckpt_io
from ce_ray.config import Config
from ce_ray.errors import UserError
from ce_ray.fsutil import copy_dir
from ce_ray.loop import WorkerEnv, run
from ce_ray.step import resolve_device


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


@dataclass
class LocalResult:
    run_dir: Path
    checkpoint: Path
    metrics: dict[str, float]


def train_local(cfg: Config, *, run_name: str | None = None, resume: bool = False, tracker=None, log=None) -> LocalResult:
    from ce_ray.local_data import LocalTrainStream, load_val  # pyarrow readers, no Ray

    log = log or functools.partial(print, flush=True)
    root = Path(cfg.train.output_dir).resolve()
    name = run_name or cfg.scale.run_name or ckpt_io.fresh_run_name(str(root))
    run_dir = root / name
    existing = ckpt_io.run_checkpoints(run_dir)
    if existing and not resume:
        raise UserError(f"run {name!r} already has checkpoints in {run_dir}; pass --resume to continue it or choose a new run name")
    restore = ckpt_io.load(existing[-1]) if (existing and resume) else None
    if restore is not None:
        log(f"resuming {name} from {existing[-1].name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    stream = LocalTrainStream(cfg, rank=0, world_size=1, seed=cfg.train.seed + (restore.step if restore else 0))
    state: dict = {"checkpoint": existing[-1] if existing else None, "metrics": {}}

    def report(metrics: dict[str, float], ckpt_dir: Path | None) -> None:
        record = dict(metrics)
        if ckpt_dir is not None:
            dest = copy_dir(ckpt_dir, run_dir / ckpt_io.checkpoint_dir_name(int(metrics["step"])))
            state["checkpoint"] = dest
            record["checkpoint"] = dest.name  # as Ray Train's metrics.jsonl names it
            for old in ckpt_io.run_checkpoints(run_dir)[: -cfg.scale.checkpoints_to_keep]:
                shutil.rmtree(old, ignore_errors=True)
        with open(run_dir / ckpt_io.METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        state["metrics"] = metrics

    env = WorkerEnv(train_batches=stream.epoch, val_data=lambda: load_val(cfg), report=report, restore=restore,
                    device=device, tracker=tracker or FolderTracker(run_dir), log=log)
    run(cfg, env)
    if state["checkpoint"] is None:
        raise UserError("training finished without writing a checkpoint")  # cannot happen: the last step always checkpoints
    return LocalResult(run_dir=run_dir, checkpoint=state["checkpoint"], metrics=state["metrics"])
