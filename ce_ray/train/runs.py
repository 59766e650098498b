"""One run root and one pre-flight for both drivers: where a run lives and what is checked before it starts.

`ce-ray train` (Ray Train, driver.py) and `ce-ray train --local` (local.py) keep a run in the same
place and the same layout (checkpoint.py):

    <scale.storage_path>/<run name>/   checkpoint_step*/, metrics.jsonl, samples/ (--local)

and run the same checks before anything starts (plan_run): the run name (fresh, or an existing run
only with --resume), a checkpoint that can continue under this config, enough photos for a full
batch per worker, a val split, a usable MLflow store when mlflow.enabled. The validation set is
built by one function (val_set) for both. MLflow's store (mlflow.db, mlartifacts/) stays under
train.output_dir (tracking.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ce_ray import config as C
from ce_ray import tracking
from ce_ray.errors import UserError
from ce_ray.fsutil import absolute, exists, is_uri
from ce_ray.train import checkpoint as ckpt_io

if TYPE_CHECKING:
    import torch


def resolve_paths(cfg: C.Config) -> C.Config:
    """The config with data.shards, train.output_dir and scale.storage_path made absolute; this
    resolved config is what workers get and what every checkpoint records."""
    return C.replace(
        cfg,
        data={"shards": absolute(cfg.data.shards)},
        train={"output_dir": absolute(cfg.train.output_dir)},
        scale={"storage_path": absolute(cfg.scale.storage_path)},
    )


def run_path(cfg: C.Config, run_name: str) -> str:
    return f"{cfg.scale.storage_path.rstrip('/')}/{run_name}"


@dataclass(frozen=True)
class RunPlan:
    """A run about to start: its name and folder, and the checkpoint it continues (or None)."""

    name: str
    path: str
    resume: bool
    latest: str | None  # the checkpoint folder a resumed run restores
    # The run's newest checkpoint when it is damaged and `latest` is the newest intact one before
    # it (the Ray workers get it from Ray's record and must restore `latest` instead); else None.
    damaged: str | None = None
    warnings: tuple[str, ...] = ()  # lines for the user: each damaged checkpoint skipped


def latest_in_folder(path: str) -> str | None:
    """The newest checkpoint folder of a local run folder (either run layout), or None; plan_run
    checks it is intact."""
    found = ckpt_io.run_checkpoints(path) if not is_uri(path) else []
    return str(found[-1]) if found else None


def plan_run(
    cfg: C.Config,
    run_name: str | None,
    resume: bool,
    *,
    workers: int,
    latest_of: Callable[[str], str | None] = latest_in_folder,
) -> RunPlan:
    """Every check both drivers make before starting (module docstring). `cfg` has absolute
    paths (resolve_paths); `latest_of(run folder)` finds the checkpoint a resume restores (Ray's
    own record for Ray Train runs, the newest checkpoint folder for --local)."""
    name = run_name or cfg.scale.run_name
    if resume and not name:
        raise UserError("--resume needs the run to continue: pass --run-name NAME (the name printed when it started)")
    name = name or ckpt_io.fresh_run_name(cfg.scale.storage_path)
    path = run_path(cfg, name)
    found = exists(path)
    if found and not resume:
        raise UserError(
            f"run {name!r} already exists in {cfg.scale.storage_path}; pass --resume to continue it from its latest "
            "checkpoint, or choose another --run-name (or none, for a fresh one)"
        )
    if resume and not found:
        raise UserError(
            f"nothing to resume: no run {name!r} in {cfg.scale.storage_path} (check --run-name and scale.storage_path)"
        )
    latest = latest_of(path) if resume else None
    damaged, warnings = None, []
    if latest is not None and not is_uri(latest):
        try:
            ckpt_io.verify(latest)
        except ckpt_io.DamagedCheckpointError as e:
            damaged = latest
            warnings.append(f"warning: {e.summary}; skipping it")
            intact = ckpt_io.latest_intact(path, skip=lambda p: str(p) == damaged, warn=warnings.append)
            if intact is None:
                raise UserError(
                    f"run {name!r} has no intact checkpoint to resume from ({e.summary}); "
                    "start a fresh run (no --resume, or another --run-name)"
                ) from None
            latest = str(intact)
            warnings.append(f"warning: continuing from the newest intact checkpoint, {intact.name}")
    if latest is not None:
        check_resumable(cfg, name, latest)
    check_enough_data(cfg, workers)
    if cfg.mlflow.enabled:
        tracking.tracking_uri(cfg)  # a bad URI fails now, not after start-up
    return RunPlan(name=name, path=path, resume=resume, latest=latest, damaged=damaged, warnings=tuple(warnings))


def check_resumable(cfg: C.Config, name: str, ckpt_path: str) -> None:
    """Fail before any worker starts when the checkpoint cannot continue under this config."""
    if is_uri(ckpt_path):
        return  # remote storage: the workers' load reports a mismatch
    meta = ckpt_io.read_meta(ckpt_path)
    old = C.from_dict(meta["config"])
    diffs = [
        f"model.{k}: {getattr(old.model, k)!r} -> {getattr(cfg.model, k)!r}"
        for k in C.to_dict(cfg.model)
        if getattr(old.model, k) != getattr(cfg.model, k) and k != "sync_bn"
    ]  # sync_bn keeps the same weights
    if diffs:
        raise UserError(
            f"run {name!r} cannot resume with a different network ({'; '.join(diffs)}); "
            "use the run's original model settings, or start a fresh run"
        )
    if meta["step"] >= cfg.train.steps:
        raise UserError(
            f"run {name!r} is already at step {meta['step']} of train.steps={cfg.train.steps}: nothing to do; "
            f"pass a larger train.steps=N to train further"
        )


def check_enough_data(cfg: C.Config, workers: int) -> None:
    """Every worker needs at least one full batch per epoch (its share of the crops); say so
    before starting instead of from inside a worker. Counts rows from the Parquet footers of local
    shards (remote ones are checked by the workers); a missing val split is an error now too."""
    if is_uri(cfg.data.shards):
        return
    import pyarrow.parquet as pq

    from ce_ray.data.shards import shard_files

    photos = sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(cfg.data.shards, "train"))
    shard_files(cfg.data.shards, "val")
    d = cfg.data
    per_worker = photos * d.repeat // workers
    if per_worker < d.batch_size:
        raise UserError(
            f"{photos} train photos x data.repeat={d.repeat} crops / {workers} worker(s) = {per_worker} crops "
            f"per worker per epoch, fewer than data.batch_size={d.batch_size}: raise data.repeat, "
            "lower data.batch_size or scale.num_workers, or prepare more photos"
        )


def val_set(cfg: C.Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation set, for both drivers: (images (N, 3, S, S), holes (N, 1, S, S)) tensors,
    every tile of each val photo with holes seeded by (photo, tile), capped at data.val_images; the
    same in every run (data.local_stream.load_val reads the val shards with pyarrow)."""
    from ce_ray.data.local_stream import load_val

    images, holes = load_val(cfg)
    if len(images) == 0:
        raise UserError(
            f"the val split of {cfg.data.shards} gave no validation crops; "
            "re-run `ce-ray prepare` with a larger --val-fraction"
        )
    return images.float(), holes.float()


def describe(plan: RunPlan) -> str:
    """What the run starts from, one line; after the plan's warnings (describe_lines)."""
    return f"{'resuming' if plan.resume else 'starting'} run {plan.name} in {plan.path}" + (
        f" from {os.path.basename(plan.latest)}" if plan.latest else ""
    )


def describe_lines(plan: RunPlan) -> list[str]:
    """The lines a driver prints before it starts: each damaged checkpoint it skips, then describe."""
    return [*plan.warnings, describe(plan)]
