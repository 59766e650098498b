"""MLflow for training runs: where the tracking store is, one MLflow run per training run, rank 0's
metrics and picture grids, the final checkpoint, and the generator registered as a model version.

Who does what (shared/RAY.md §4):
  driver   resolves the tracking URI, creates the experiment with an absolute artifact location
           (an experiment first created inside a worker would keep its artifacts in the worker's
           temporary directory), creates or reopens the MLflow run, logs the flattened config as
           params; after fit(): logs the final checkpoint, registers the generator, ends the run.
  rank 0   MlflowTracker: per-step metrics and the eval picture grids, into the driver's run.
  others   nothing.

The run is created on the driver so that a restarted worker group (FailureConfig) and a resumed
run (`--resume`) keep writing into the same MLflow run.

Default store: SQLite at <train.output_dir>/mlflow.db, artifacts under <train.output_dir>/mlartifacts
(MLflow 3.17's file store is in maintenance mode). `mlflow.tracking_uri` in the config, else
$MLFLOW_TRACKING_URI, points elsewhere (e.g. http://127.0.0.1:5000 for a tracking server, which
multi-node clusters need: a SQLite file is only visible on its own machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from ce_ray import config as C
from ce_ray.errors import UserError

DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
TAG_RUN_PATH = "ce_ray.run_path"  # the Ray Train run folder: identifies the MLflow run to reopen on resume
TAG_RUN_NAME = "ce_ray.run_name"
MODEL_NAME = "generator"  # artifact name of the logged pyfunc model
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"  # logged as source ("models from code")


# --- Where things go -----------------------------------------------------------------------------


def _remote(uri: str) -> bool:
    """Tracking servers own their artifact store; local stores need us to choose one."""
    return uri.split(":", 1)[0] in ("http", "https", "databricks", "databricks-uc")


def tracking_uri(cfg: C.Config) -> str:
    """cfg.mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite under train.output_dir.
    Relative SQLite paths are made absolute: Ray workers run in a different working directory."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path(cfg.train.output_dir).resolve() / DB_FILE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri or uri.startswith("file:"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise UserError(f"MLflow tracking URI {uri!r} is a file store, which MLflow 3.17 keeps in maintenance mode; "
                            "use sqlite:///path/to/mlflow.db or a server (http://127.0.0.1:5000) via mlflow.tracking_uri or MLFLOW_TRACKING_URI")
    return uri


def artifact_location(cfg: C.Config, uri: str) -> str | None:
    """Absolute artifact folder for experiments we create in a local store; None lets a server decide."""
    if _remote(uri):
        return None
    return (Path(cfg.train.output_dir).resolve() / ARTIFACT_DIR).as_uri()


def ui_command(uri: str) -> str:
    """How to look at a local store (loopback only)."""
    if _remote(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


@dataclass(frozen=True)
class RunHandle:
    """What a worker needs to write into the driver's MLflow run (plain strings: it travels in
    train_loop_config)."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, str] | None) -> "RunHandle | None":
        return cls(**d) if d else None


@contextlib.contextmanager
def using(uri: str) -> Iterator[None]:
    """MLflow's fluent API (and checkpoint.resolve of models:/ URIs) pointed at `uri` for a block.
    mlflow.set_tracking_uri alone would also export MLFLOW_TRACKING_URI to this process for good,
    and every later run in it (and every subprocess) would silently log to that store."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --- Driver side ---------------------------------------------------------------------------------


def ensure_experiment(cfg: C.Config, uri: str) -> str:
    """Experiment id of cfg.mlflow.experiment, created with an absolute artifact location if new."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    name = cfg.mlflow.experiment
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location(cfg, uri))
            except MlflowException as e:  # created concurrently (another run starting): use it
                if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
                    raise
                exp = client.get_experiment_by_name(name)
    except MlflowException as e:
        raise UserError(f"cannot reach the MLflow tracking store {uri}: {e.message}; check mlflow.tracking_uri / MLFLOW_TRACKING_URI") from None
    if exp.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
                        "or set mlflow.experiment to another name")
    return exp.experiment_id


def _params(cfg: C.Config) -> dict[str, str]:
    return {k: str(v) for k, v in C.flatten(cfg).items()}


def start_run(cfg: C.Config, *, run_name: str, run_path: str, resume: bool) -> RunHandle | None:
    """Create (or, when resuming, reopen) the MLflow run of a training run; None when MLflow is off.
    The run is found again by the Ray run folder it trains into."""
    if not cfg.mlflow.enabled:
        return None
    from mlflow.entities import Param, RunStatus

    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    uri = tracking_uri(cfg)
    exp_id = ensure_experiment(cfg, uri)
    client = _client(uri)
    params = _params(cfg)
    if resume:
        found = client.search_runs([exp_id], filter_string=f"tags.`{TAG_RUN_PATH}` = '{run_path}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            run = found[0]
            client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            # MLflow params are immutable: record a changed value (e.g. more train.steps) as a tag.
            old = run.data.params
            new = [Param(k, v) for k, v in params.items() if k not in old]
            for k, v in params.items():
                if k in old and old[k] != v:
                    client.set_tag(run.info.run_id, f"resumed.{k}", v)
            for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
                client.log_batch(run.info.run_id, params=new[i : i + MAX_PARAMS_PER_BATCH])
            return RunHandle(uri, exp_id, run.info.run_id)
    run = client.create_run(exp_id, run_name=run_name, tags={TAG_RUN_PATH: run_path, TAG_RUN_NAME: run_name})
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
    return RunHandle(uri, exp_id, run.info.run_id)


def end_run(handle: RunHandle | None, status: str = "FINISHED") -> None:
    """Mark the run FINISHED / FAILED / KILLED (best effort: never hides the real error)."""
    if handle is None:
        return
    try:
        _client(handle.tracking_uri).set_terminated(handle.run_id, status=status)
    except Exception as e:  # the store being unreachable must not mask why training ended
        print(f"warning: could not mark MLflow run {handle.run_id} {status}: {e}", file=sys.stderr)


def artifact_dir(handle: RunHandle) -> str:
    """The run's artifact root: a local folder for local stores, else the artifact URI."""
    uri = _client(handle.tracking_uri).get_run(handle.run_id).info.artifact_uri
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(uri).path)
    return uri


def log_checkpoint(handle: RunHandle, ckpt_dir: str | os.PathLike) -> None:
    """The final checkpoint (weights, optimiser states, RNG, config) as run artifacts under checkpoint/."""
    _client(handle.tracking_uri).log_artifacts(handle.run_id, str(ckpt_dir), artifact_path="checkpoint")


def _requirements() -> list[str]:
    """Pinned to what trained the model; explicit so that logging never asks pip (offline hosts)."""
    import mlflow
    import numpy
    import torch
    import yaml

    import ce_ray

    return [f"ce-ray=={ce_ray.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}",
            f"pyyaml=={yaml.__version__}", f"mlflow=={mlflow.__version__}"]


def _signature(cfg: C.Config):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    s = cfg.data.fine_size
    image = TensorSpec(np.dtype(np.float32), (-1, 3, s, s), name="image" if cfg.model.variant != "center" else None)
    out = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, s, s))])
    if cfg.model.variant == "center":  # the hole is always the centre: images only
        return ModelSignature(inputs=Schema([image]), outputs=out)
    return ModelSignature(inputs=Schema([image, TensorSpec(np.dtype(np.float32), (-1, 1, s, s), name="hole")]), outputs=out)


def export_generator_checkpoint(ckpt_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """meta.json + model.pt of a checkpoint (no optimiser or RNG state): what inference needs."""
    from ce_ray import checkpoint as ckpt_io

    src, dest = Path(ckpt_dir), Path(dest)
    ckpt_io.read_meta(src)  # a clear error if it is not a checkpoint
    dest.mkdir(parents=True, exist_ok=True)
    for f in (ckpt_io.META_FILE, ckpt_io.MODEL_FILE):
        shutil.copyfile(src / f, dest / f)
    return dest


def register_generator(handle: RunHandle, ckpt_dir: str | os.PathLike, cfg: C.Config) -> str:
    """Log the generator as a pyfunc model *from code* (ce_ray/mlflow_model.py + the checkpoint
    directory as an artifact, no pickle) and register it as a new version of
    cfg.mlflow.registered_model. Returns "models:/<name>/<version>"."""
    import mlflow

    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")  # offline: never run pip
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with using(handle.tracking_uri), tempfile.TemporaryDirectory(prefix="ce_ray_export_") as tmp, warnings.catch_warnings():
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
                pip_requirements=_requirements(),
            )
    version = info.registered_model_version
    if version is None:  # cannot happen with registered_model_name set; say so rather than guess
        raise RuntimeError("MLflow did not return a registered model version")
    return f"models:/{cfg.mlflow.registered_model}/{version}"


# --- Worker side (rank 0) ------------------------------------------------------------------------


class MlflowTracker:
    """loop.py's tracker on rank 0: metrics per step and picture grids into the driver's run.
    A tracking-store hiccup prints a warning and training goes on: losing a metric point is
    better than losing the run (the checkpoints and metrics.jsonl still have everything)."""

    WARN_EVERY_S = 60.0

    def __init__(self, handle: RunHandle):
        self.handle = handle
        self.client = _client(handle.tracking_uri)
        self._last_warning = -float("inf")

    def _warn(self, what: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= self.WARN_EVERY_S:
            self._last_warning = now
            print(f"warning: MLflow {what} failed ({self.handle.tracking_uri}): {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        try:
            self.client.log_batch(self.handle.run_id, metrics=items)
        except Exception as e:
            self._warn("log_metrics", e)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        try:
            self.client.log_artifact(self.handle.run_id, str(path), artifact_path)
        except Exception as e:
            self._warn("log_artifact", e)


def worker_tracker(handle: RunHandle | None, rank: int) -> Any:
    """The tracker a worker hands to loop.run: MLflow on rank 0, a no-op elsewhere or when off."""
    from ce_ray.loop import NullTracker

    return MlflowTracker(handle) if (handle is not None and rank == 0) else NullTracker()
