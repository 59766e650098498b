"""The per-worker training loop shared by Ray Train and --local, with its WorkerEnv and Tracker.

Build models -> resume -> GAN steps -> log / validate / checkpoint -> report. Pure torch; what
differs between the runners (train.py, local.py: rank, DDP wrapping, data, reporting, tracking)
comes in a `WorkerEnv`.

Rank rules: every rank calls `env.report` at the same steps (Ray Train's report is a barrier:
docs/ray-notes.md, "Train V2 reports"); only rank 0 validates, writes picture grids and
checkpoints, logs, and talks to the tracker.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch
import torch.nn as nn

from ce_ray.config import Config
from ce_ray.core.metrics import hole_errors, summarize
from ce_ray.core.model import build_discriminator, build_generator
from ce_ray.core.step import GanStep, lr_factor, predict, resolve_device, unwrap
from ce_ray.data.grids import inpainting_grid, save_png
from ce_ray.errors import UserError
from ce_ray.train import checkpoint as ckpt_io

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, S, S) in [-1, 1], holes (B, 1, S, S)


class Tracker(Protocol):
    """Where rank 0's metrics and picture grids go: MLflow (mlflow_run.MlflowTracker), the run
    folder (local.FolderTracker) or nowhere (NullTracker)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def close(self) -> None: ...  # the driver's, after loop.run: send what is still kept, say what is not


class NullTracker:
    """A Tracker that drops everything (ranks other than 0, MLflow off)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def close(self) -> None: ...


@dataclass
class WorkerEnv:
    train_batches: Callable[[int], Iterable[Batch]]  # epoch -> this worker's batches
    # The deterministic val set, or a Future of it (read in the background: train.py), waited on
    # at the first evaluation; only rank 0 calls it.
    val_data: Callable[[], Batch | Future[Batch] | None]
    report: Callable[[dict[str, float], Path | None], None]  # every rank; a checkpoint dir from rank 0
    restore: ckpt_io.Checkpoint | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m  # DDP under Ray Train
    tracker: Tracker = field(default_factory=NullTracker)
    log: Callable[[str], None] = functools.partial(print, flush=True)  # progress shows up in logs promptly


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    """One log line with only the losses that ran: with lambda_adv = 0 no discriminator is
    trained and its loss and D(real) / D(fake) are left out (a `nan` there would read as a failure)."""
    if "loss_d" in m:
        losses = (
            f"loss_d {m['loss_d']:.3f} loss_g {m['loss_g']:.4f} rec {m['loss_rec']:.4f} "
            f"| D(real) {m['d_real']:.2f} D(fake) {m['d_fake']:.2f}"
        )
    else:
        losses = f"rec {m['loss_rec']:.4f}"
    line = f"step {step}/{total} | {losses} | {m['img_per_s']:.1f} img/s | ETA {_fmt_eta(m['eta_s'])}"
    if "val_psnr" in m:
        line += f" | val L1 {100 * m['val_l1']:.2f}% L2 {100 * m['val_l2']:.2f}% PSNR {m['val_psnr']:.2f} dB"
    return line


@torch.no_grad()
def validate(G: nn.Module, val: Batch, cfg: Config, device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
    """L1 / L2 / PSNR over the hole on the fixed val set; returns (metrics, first outputs)."""
    images, holes = val
    errs: dict[str, list[np.ndarray]] = {"l1": [], "l2": [], "psnr": []}
    first = None
    bs = cfg.data.batch_size
    for i in range(0, len(images), bs):
        x, h = images[i : i + bs].to(device), holes[i : i + bs].to(device)
        out = predict(G, x, h, cfg)
        if first is None:
            first = out[: cfg.train.samples].cpu()
        for k, v in hole_errors(out.cpu(), x.cpu(), h.cpu()).items():
            errs[k].append(v)
    summary = summarize({k: np.concatenate(v) for k, v in errs.items()})
    if first is None:  # not reached: an empty val set already fails in np.concatenate above
        raise UserError("the validation set is empty")
    return {f"val_{k}": v for k, v in summary.items()}, first


def _batches_forever(env: WorkerEnv, start_epoch: int) -> Iterator[tuple[int, Batch]]:
    epoch = start_epoch
    while True:
        n = 0
        for batch in env.train_batches(epoch):
            n += 1
            yield epoch, batch
        if n == 0:
            raise UserError(
                "the training data gave no full batch: add photos, lower data.batch_size, or raise data.repeat"
            )
        epoch += 1


def run(cfg: Config, env: WorkerEnv) -> dict[str, float]:
    """Train until cfg.train.steps; returns rank 0's last reported metrics."""
    t = cfg.train
    device = env.device or resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    mf = torch.channels_last if t.channels_last else torch.contiguous_format
    G: nn.Module = build_generator(cfg.model)
    D: nn.Module = build_discriminator(cfg.model, cfg.data.fine_size)
    step = 0
    if env.restore is not None:
        G.load_state_dict(env.restore.G)
        D.load_state_dict(env.restore.D)
        step = env.restore.step
    if cfg.model.sync_bn and env.world_size > 1:
        G = nn.SyncBatchNorm.convert_sync_batchnorm(G)  # type: ignore[no-untyped-call]  # torch: unannotated
        D = nn.SyncBatchNorm.convert_sync_batchnorm(D)  # type: ignore[no-untyped-call]  # torch: unannotated
    # torch's stubs have no Module.to(device, memory_format=...) overload; the call is valid.
    G = G.to(device, memory_format=mf)  # type: ignore[call-overload]
    D = D.to(device, memory_format=mf)  # type: ignore[call-overload]
    G, D = env.wrap(G), env.wrap(D)
    if t.compile:
        G, D = cast(nn.Module, torch.compile(G)), cast(nn.Module, torch.compile(D))
    stepper = GanStep(G, D, cfg, device)
    if env.restore is not None:
        if env.restore.optim is not None:
            stepper.load_state_dict(env.restore.optim)
        if env.restore.rng is not None:
            ckpt_io.restore_rng(env.restore.rng)
        # Different data order after a resume than in an uninterrupted run is fine; the same
        # order as the first attempt (re-seen batches) would bias the model towards them.
        torch.manual_seed(t.seed + step)
    if step >= t.steps:
        env.log(f"already at step {step} of {t.steps}: nothing to do")
        return dict(env.restore.metrics) if env.restore else {}

    val = env.val_data() if env.rank == 0 else None
    last: dict[str, float] = {}
    window_imgs, window_t0, run_t0 = 0, time.perf_counter(), time.perf_counter()
    start_step = step
    for epoch, (images, holes) in _batches_forever(env, start_epoch=0):
        stepper.set_lr_scale(lr_factor(cfg.optim, step, t.steps))
        m = stepper(images, holes)
        step += 1
        window_imgs += images.shape[0]
        final = step >= t.steps
        do_ckpt = step % t.ckpt_every == 0 or final
        # Validate at every checkpoint too: the "best" checkpoint is chosen by val_l2.
        do_eval = step % t.eval_every == 0 or do_ckpt
        if not (step % t.log_every == 0 or do_eval or do_ckpt):
            continue
        now = time.perf_counter()
        metrics = {k: float(v) for k, v in m.items()}
        # Global throughput: every worker runs the same number of equal batches.
        metrics["img_per_s"] = window_imgs * env.world_size / max(now - window_t0, 1e-9)
        per_step = (now - run_t0) / (step - start_step)
        metrics.update(step=step, epoch=epoch, eta_s=per_step * (t.steps - step), **stepper.lrs())
        window_imgs, window_t0 = 0, now
        tmp = None
        if env.rank == 0:
            if do_eval and val is not None:
                if isinstance(val, Future):
                    val = val.result()
                vm, outputs = validate(unwrap(G), val, cfg, device)
                metrics.update(vm)
                tmp = Path(tempfile.mkdtemp(prefix="ce_ray_step_"))
                n = outputs.shape[0]
                png = save_png(inpainting_grid(val[0][:n], val[1][:n], outputs), tmp / f"samples_step{step:07d}.png")
                env.tracker.log_artifact(png, ckpt_io.SAMPLES_DIR)
            env.tracker.log_metrics(metrics, step)
            env.log(progress_line(step, t.steps, metrics))
        ckpt_dir = None
        if do_ckpt and env.rank == 0:
            tmp = tmp or Path(tempfile.mkdtemp(prefix="ce_ray_step_"))
            ckpt_dir = ckpt_io.save(
                tmp / "checkpoint", G=G, D=D, step=step, config=cfg, optim=stepper.state_dict(), metrics=metrics
            )
        try:
            env.report(metrics, ckpt_dir)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        last = metrics
        if final:
            break
    return last
