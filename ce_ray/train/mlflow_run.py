"""A training run's MLflow side: rank 0's tracker, and the generator logged and registered as a model.

Builds on tracking.py (stores, runs, downloads). The registered model is a pyfunc *from code*
(mlflow_model.py plus the checkpoint folder as an artifact): loading it never unpickles code.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from ce_ray import config as C
from ce_ray import tracking
from ce_ray.errors import UserError
from ce_ray.fsutil import absolute, is_uri
from ce_ray.tracking import (
    BEST_EFFORT_HTTP,
    FINAL_HTTP,
    RateLimitedWarning,
    RunHandle,
    _client,
    _metrics,
    bounded_http,
    sync_command,
    using,
)
from ce_ray.train import checkpoint as ckpt_io
from ce_ray.train.loop import NullTracker, Tracker

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.models import ModelSignature

MODEL_NAME = "generator"  # artifact name of the logged pyfunc model
MODEL_CODE = Path(__file__).resolve().parent.parent / "infer" / "pyfunc.py"  # logged as source ("models from code")


def _requirements() -> list[str]:
    """Pinned to what trained the model; explicit so that logging never asks pip (offline hosts)."""
    import mlflow
    import numpy
    import torch
    import yaml

    import ce_ray

    return [
        f"ce-ray=={ce_ray.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
        f"pyyaml=={yaml.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


# What the registered pyfunc accepts (mlflow_model.py). An MLflow signature holds one input layout
# and enforces it, so the signature declares the output and these forms live in the model's metadata.
PYFUNC_INPUTS = {
    "image": "(H, W, 3) uint8 RGB photo of any size -> (H, W, 3) uint8 with the centre region filled",
    "image+mask": "{'image': (H, W, 3) uint8, 'mask': (H, W) white = hole} -> (H, W, 3) uint8",
    "list": "a list of photos (arrays or encoded bytes) -> a list of (H, W, 3) uint8",
    "dataframe": (
        "columns 'image' (PNG/JPEG bytes, or base64 text in JSON) and optional 'mask' -> column 'image' of PNG bytes"
    ),
    "crops": (
        "(B, 3, S, S) float32 in [-1, 1] with the hole anywhere (filled by the model's own fill) -> the same shape, "
        "inpainted"
    ),
}


def _signature(cfg: C.Config) -> ModelSignature:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    # Inputs: every form of PYFUNC_INPUTS (no single schema holds them; a declared one would be
    # enforced and refuse the others). Output: an RGB image per input photo.
    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3), name="image")]))


def export_generator_checkpoint(ckpt_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """meta.json + model.pt of a checkpoint (no optimiser or RNG state): what inference needs."""
    return ckpt_io.copy_weights(ckpt_dir, dest)


def register_generator(handle: RunHandle, ckpt_dir: str | os.PathLike[str], cfg: C.Config) -> str:
    """Log the generator as a pyfunc model *from code* (ce_ray/infer/pyfunc.py + the checkpoint
    directory as an artifact, no pickle) and register it as a new version of
    cfg.mlflow.registered_model. Returns "models:/<name>/<version>"."""
    import mlflow

    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")  # offline: never run pip
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with (
        bounded_http(FINAL_HTTP),
        using(handle.tracking_uri),
        tempfile.TemporaryDirectory(prefix="ce_ray_export_") as tmp,
        warnings.catch_warnings(),
    ):
        # The explicit signature already says what goes in and out; an input example would
        # store a 200 KB tensor with every version.
        warnings.filterwarnings("ignore", message=r".*An input example was not provided")
        export = export_generator_checkpoint(ckpt_dir, Path(tmp) / "checkpoint")
        with mlflow.start_run(run_id=handle.run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(export)},
                registered_model_name=cfg.mlflow.registered_model,
                signature=_signature(cfg),
                metadata={"inputs": PYFUNC_INPUTS, "fine_size": cfg.data.fine_size, "variant": cfg.model.variant},
                pip_requirements=_requirements(),
            )
    version = info.registered_model_version
    if version is None:  # cannot happen with registered_model_name set; say so rather than guess
        raise RuntimeError("MLflow did not return a registered model version")
    return f"models:/{cfg.mlflow.registered_model}/{version}"


MAX_PENDING_POINTS = 20_000  # metric points kept while the store is away (~20 a log step); the oldest go first
MAX_PENDING_FILES = 16  # picture grids kept (copies in a temporary folder) while the store is away
# While the store is away the next (bounded) try waits RETRY_AFTER_S, then twice that after each
# failed try, up to MAX_RETRY_AFTER_S: a server that accepts connections but never answers costs
# one 5 s timeout per try, a shrinking share of the training time.
RETRY_AFTER_S = 10.0
MAX_RETRY_AFTER_S = 300.0
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit for metrics


def record_final(
    handle: RunHandle, checkpoint: str, open_dir: Callable[[], AbstractContextManager[str]], cfg: C.Config
) -> str:
    """The end of a finished run in MLflow (both drivers): log the final checkpoint (`open_dir()`
    gives it as a local folder: Ray downloads a remote one), register its generator, end the run
    FINISHED; returns the model URI. A store that went away or refuses the registry is a UserError
    naming the one command that records it later: the training itself is safe (`checkpoint`)."""
    try:
        with open_dir() as d:
            tracking.log_checkpoint(handle, d)
            model_uri = register_generator(handle, d, cfg)
    except Exception as e:
        tracking.end_run(handle, "FAILED")
        raise UserError(
            f"training finished (checkpoint: {checkpoint}) but MLflow at {handle.tracking_uri} could not "
            f"record it: {type(e).__name__}: {str(e)[:300]}. Once it answers, register the model (and log what it "
            f"missed) with: {tracking.sync_command(handle)}"
        ) from e
    tracking.end_run(handle, "FINISHED")
    return model_uri


def _permanent(e: Exception) -> bool:
    """A refusal that sending again cannot fix (a 4xx other than 429: a bad value, a deleted run);
    everything else (no connection, a timeout, a 5xx) is the store being away."""
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return False
    code = int(e.get_http_status_code())  # type: ignore[no-untyped-call]  # mlflow: unannotated
    return 400 <= code < 500 and code != 429


class MlflowTracker:
    """loop.py's Tracker on rank 0: metrics per step and picture grids into the driver's run.

    A store that is away must neither end nor stall training: every call is bounded
    (tracking.BEST_EFFORT_HTTP), what it could not send is kept (at most MAX_PENDING_POINTS metric
    points and MAX_PENDING_FILES pictures) and sent, oldest first, by the next call that gets
    through (tries while the store stays away: RETRY_AFTER_S apart, doubling), and by close().
    close() names what never got through and the command that logs it from the run folder."""

    def __init__(
        self, handle: RunHandle, *, retry_after_s: float | None = None, log: Callable[[str], None] | None = None
    ):
        self.handle = handle
        self.client = _client(handle.tracking_uri)
        self.retry_after_s = RETRY_AFTER_S if retry_after_s is None else retry_after_s
        self._wait = self.retry_after_s
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._warn = RateLimitedWarning()
        self._points: deque[Metric] = deque()
        self._files: deque[tuple[Path, str | None, bool]] = deque()  # (file, artifact path, a copy we own)
        self._spool: Path | None = None
        self._lost_points: set[int] = set()  # steps of points dropped (queue full, or refused)
        self._lost_files: list[str] = []
        self._down_since: float | None = None
        self._next_try = 0.0
        self._copies = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._points.extend(_metrics(metrics, step))
        while len(self._points) > MAX_PENDING_POINTS:
            self._lost_points.add(int(self._points.popleft().step))
        self._send()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._files.append((Path(path), artifact_path, False))
        self._send()
        if self._files and not self._files[-1][2]:  # this one is still unsent: the caller deletes it
            f, ap, _ = self._files.pop()
            try:
                if self._spool is None:
                    self._spool = Path(tempfile.mkdtemp(prefix="ce_ray_mlflow_pending_"))
                self._copies += 1
                copy = self._spool / str(self._copies) / f.name  # same name: it is the artifact's name
                copy.parent.mkdir()
                shutil.copyfile(f, copy)
                self._files.append((copy, ap, True))
            except OSError as e:
                self._lost_files.append(f.name)
                self._warn("log_artifact", self.handle.tracking_uri, e)
        while len(self._files) > MAX_PENDING_FILES:
            f, _, _ = self._files.popleft()
            self._lost_files.append(f.name)
            f.unlink(missing_ok=True)

    def _send(self, force: bool = False) -> bool:
        """Send what is kept, oldest first; False if something is still kept."""
        if not (self._points or self._files):
            return True
        if not force and self._down_since is not None and time.monotonic() < self._next_try:
            return False
        sent_points = sent_files = 0
        try:
            with bounded_http(BEST_EFFORT_HTTP):
                while self._points:
                    batch = [self._points[i] for i in range(min(METRICS_PER_BATCH, len(self._points)))]
                    try:
                        self.client.log_batch(self.handle.run_id, metrics=batch)
                    except Exception as e:
                        if not _permanent(e):
                            raise
                        self._lost_points.update(int(m.step) for m in batch)
                        self._warn("log_metrics", self.handle.tracking_uri, e)
                    for _ in batch:
                        self._points.popleft()
                    sent_points += len(batch)
                while self._files:
                    f, ap, owned = self._files[0]
                    try:
                        self.client.log_artifact(self.handle.run_id, str(f), ap)
                    except Exception as e:
                        if not _permanent(e) and not isinstance(e, FileNotFoundError):
                            raise
                        self._lost_files.append(f.name)
                        self._warn("log_artifact", self.handle.tracking_uri, e)
                    self._files.popleft()
                    if owned:
                        f.unlink(missing_ok=True)
                    sent_files += 1
        except Exception as e:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._log(
                    f"warning: MLflow at {self.handle.tracking_uri} does not answer ({type(e).__name__}: "
                    f"{str(e)[:200]}); training goes on and keeps its metrics and pictures to send when it answers"
                )
            self._next_try = time.monotonic() + self._wait
            self._wait = min(2 * self._wait, MAX_RETRY_AFTER_S)
            return False
        if self._down_since is not None:
            self._log(
                f"MLflow at {self.handle.tracking_uri} answers again after "
                f"{time.monotonic() - self._down_since:.0f} s: sent the {sent_points} metric points and "
                f"{sent_files} picture(s) kept meanwhile"
            )
            self._down_since = None
            self._wait = self.retry_after_s
        return True

    def close(self) -> None:
        """The end of training: one last (bounded) try to send what is kept; then name what could
        not be logged and the command that logs it from the run folder."""
        self._send(force=True)
        steps = sorted(self._lost_points | {int(m.step) for m in self._points})
        files = self._lost_files + [f.name for f, _, _ in self._files]
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        self._points.clear()
        self._files.clear()
        if not (steps or files):
            return
        what = []
        if steps:
            listed = ", ".join(map(str, steps[:20])) + (" ..." if len(steps) > 20 else "")
            what.append(f"the metrics of {len(steps)} step(s) ({listed})")
        if files:
            what.append(f"{len(files)} picture(s) ({', '.join(files[:5])}{' ...' if len(files) > 5 else ''})")
        self._log(
            f"warning: MLflow at {self.handle.tracking_uri} did not take {' and '.join(what)} of run "
            f"{self.handle.run_id}. The run folder has them (metrics.jsonl; samples/ of a --local run); "
            f"log them with: {sync_command(self.handle)}"
        )


def worker_tracker(handle: RunHandle | None, rank: int) -> Tracker:
    """The tracker a worker hands to loop.run: MLflow on rank 0, a no-op elsewhere or when off."""
    return MlflowTracker(handle) if (handle is not None and rank == 0) else NullTracker()


def sync_run(run_dir: str, overrides: list[str] | None = None, log: Callable[[str], None] = print) -> str:
    """`ce-ray train --sync-mlflow RUN_DIR [KEY=VALUE ...]`: what a finished run's folder has and
    its MLflow run lacks, logged after the fact (the store was away during training): the metric
    points of metrics.jsonl, the picture grids of samples/ (a --local run keeps them there), and
    the latest checkpoint as the registered generator when the run has no model version yet. The
    config is the checkpoint's own (overrides on top, e.g. mlflow.tracking_uri=...); the MLflow
    run is the one tagged with this run folder (a new one if there is none). Returns the models:/
    URI. Logging again logs nothing twice."""
    if is_uri(run_dir):
        raise UserError(f"--sync-mlflow {run_dir}: needs a local run folder (copy the run from its storage first)")
    folder = Path(absolute(run_dir))
    ckpts = ckpt_io.run_checkpoints(folder)
    if not ckpts:
        raise UserError(f"--sync-mlflow {run_dir}: no checkpoint in that folder; is it a ce-ray run folder?")
    latest = ckpts[-1]
    cfg = C.from_dict(C.apply_overrides(ckpt_io.read_meta(latest)["config"], overrides or []))
    cfg = C.replace(cfg, mlflow={"enabled": True})
    try:
        return _sync(folder, latest, cfg, log)
    except UserError:
        raise
    except Exception as e:  # the store is still away, or refuses: say so in one line
        raise UserError(
            f"could not sync {folder} to MLflow at {tracking.tracking_uri(cfg)}: {type(e).__name__}: {str(e)[:300]}; "
            "run the same command again once the store answers"
        ) from None


def _sync(folder: Path, latest: Path, cfg: C.Config, log: Callable[[str], None]) -> str:
    from mlflow.entities import Metric

    with bounded_http(FINAL_HTTP):
        handle = tracking.start_run(cfg, run_name=folder.name, run_path=str(folder), resume=True)
        if handle is None:  # enabled above; keeps the type checker honest
            raise UserError("MLflow is disabled")
        client = _client(handle.tracking_uri)
        records = []
        if (folder / ckpt_io.METRICS_FILE).is_file():
            records = [json.loads(x) for x in (folder / ckpt_io.METRICS_FILE).read_text().splitlines() if x.strip()]
        numeric = [
            (k, float(v), int(r["step"]))
            for r in records
            if "step" in r
            for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        have = {
            k: {int(m.step) for m in client.get_metric_history(handle.run_id, k)} for k in {k for k, _, _ in numeric}
        }
        ts = int(time.time() * 1000)
        missing = [Metric(k, v, ts, step) for k, v, step in numeric if step not in have[k]]
        for i in range(0, len(missing), METRICS_PER_BATCH):
            client.log_batch(handle.run_id, metrics=missing[i : i + METRICS_PER_BATCH])
        logged = {Path(f.path).name for f in client.list_artifacts(handle.run_id, ckpt_io.SAMPLES_DIR)}
        pictures = sorted(p for p in (folder / ckpt_io.SAMPLES_DIR).glob("*.png") if p.name not in logged)
        for p in pictures:
            client.log_artifact(handle.run_id, str(p), ckpt_io.SAMPLES_DIR)
        versions = client.search_model_versions(f"run_id='{handle.run_id}'")
        if versions:
            v = max(versions, key=lambda v: int(v.version))
            model_uri, how = f"models:/{v.name}/{v.version}", "was registered already"
        else:
            tracking.log_checkpoint(handle, latest)
            model_uri, how = register_generator(handle, latest, cfg), f"registered now from {latest.name}"
        tracking.end_run(handle, "FINISHED")
    log(
        f"MLflow run {handle.run_id} at {handle.tracking_uri}: logged {len(missing)} missing metric points and "
        f"{len(pictures)} picture(s); model {model_uri} {how}"
    )
    return model_uri
