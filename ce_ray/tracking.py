"""Everything that talks to MLflow: stores, training, sweep and evaluation runs, registry, downloads.

Only ce_ray/infer/pyfunc.py, the logged model's code, imports mlflow too. Here: where the
tracking store is, one MLflow run per training run, rank 0's metrics and picture grids, the final
checkpoint, the generator registered as a model version; the sweep's parent and child runs
(tune.py); evaluation results (evaluate.py); models:/ and runs:/ downloads (resolve.py)
and registry versions (serve.py). mlflow is imported inside the functions.

Who does what in a training run (docs/ray-notes.md, "MLflow stores"):
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
import shlex
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.fsutil import is_uri

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
TAG_RUN_PATH = "ce_ray.run_path"  # the Ray Train run folder: identifies the MLflow run to reopen on resume
TAG_RUN_NAME = "ce_ray.run_name"
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")  # model URIs that resolve through MLflow
WARN_EVERY_S = 60.0  # best-effort writes warn at most this often
# MLflow's own HTTP defaults (7 retries, backoff factor 2 with jitter, 120 s timeout) hold a call to
# a server that is gone for minutes. Rank 0's per-step writes make one attempt and wait at most 5 s
# for an answer: its queue is the retry (what it could not send is kept and sent later:
# mlflow_run.MlflowTracker).
BEST_EFFORT_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 0,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 0,
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": 0,
    "MLFLOW_HTTP_REQUEST_TIMEOUT": 5,
}
# The end of a run (final checkpoint, registered model, run status) tries three times (at once,
# then after 2 s) and waits a minute for an answer (the model upload is the largest request), then
# says which command records it later.
FINAL_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": 2,
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 1,
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": 0,
    "MLFLOW_HTTP_REQUEST_TIMEOUT": 60,
}
_HTTP_ENV_LOCK = threading.RLock()  # re-entrant: a bounded call may make another


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
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if not is_uri(uri):  # a path or file:// URI: MLflow's file store
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise UserError(
                f"MLflow tracking URI {uri!r} is a file store, which MLflow 3.17 keeps in maintenance mode; "
                "use sqlite:///path/to/mlflow.db or a server (http://127.0.0.1:5000) via mlflow.tracking_uri "
                "or MLFLOW_TRACKING_URI"
            )
    return uri


def resolve_uri(explicit: str | None = None) -> str:
    """`explicit`, else the trainer's default store (tracking_uri of the default config:
    $MLFLOW_TRACKING_URI, else SQLite under outputs/), so a run id printed by `ce-ray train` is
    found without naming its store."""
    return explicit or tracking_uri(C.Config())


def current_uri() -> str:
    """MLflow's process-wide tracking URI (MLFLOW_TRACKING_URI or its default)."""
    import mlflow

    return mlflow.get_tracking_uri()


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
    train_loop_config). `run_path`: the training run's folder, which `sync_command` names."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    run_path: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, str] | None) -> RunHandle | None:
        return cls(**d) if d else None


@contextlib.contextmanager
def using(uri: str) -> Iterator[None]:
    """MLflow's fluent API (and `download`, i.e. resolve.checkpoint_dir of models:/ URIs) pointed at `uri` for a block.
    mlflow.set_tracking_uri alone would also export MLFLOW_TRACKING_URI to this process for good,
    and every later run in it (and every subprocess) would silently log to that store."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # _use_tracking_uri restores MLflow's global but *unsets* MLFLOW_TRACKING_URI on the way out
    # when that global was unset, dropping a store the user exported; put the variable back as it was.
    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


@contextlib.contextmanager
def bounded_http(limits: dict[str, int] = BEST_EFFORT_HTTP) -> Iterator[None]:
    """MLflow's HTTP retries, backoff and timeout at most `limits` for a block (a lower value the
    user exported stays). MLflow reads these variables at every request; they are process-wide,
    so the block holds a lock: ce-ray's bounded calls never interleave their settings."""
    with _HTTP_ENV_LOCK:
        saved = {k: os.environ.get(k) for k in limits}
        for k, limit in limits.items():
            try:
                lower = saved[k] is not None and float(saved[k] or "") <= limit
            except ValueError:
                lower = False
            if not lower:
                os.environ[k] = str(limit)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def sync_command(handle: RunHandle) -> str:
    """The one command that logs what a run's folder has and its MLflow run lacks (metrics,
    pictures, the registered generator): mlflow_run.sync_run."""
    folder = handle.run_path or "<run folder>"
    return f"ce-ray train --sync-mlflow {shlex.quote(folder)} mlflow.tracking_uri={shlex.quote(handle.tracking_uri)}"


def _client(uri: str | None) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """The one parameter batcher: params as strings, MAX_PARAMS_PER_BATCH per log_batch."""
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])


def _metrics(metrics: dict[str, float], step: int) -> list[Metric]:
    """MLflow Metric entities for one step, stamped now."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]


class RateLimitedWarning:
    """The one warning for best-effort MLflow writes (a tracking-store hiccup must not end a
    training run or a sweep): printed to stderr at most every WARN_EVERY_S seconds."""

    def __init__(self, every_s: float = WARN_EVERY_S):
        self.every_s = every_s
        self._last = -float("inf")

    def __call__(self, what: str, uri: str | None, e: Exception) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(f"warning: MLflow {what} failed ({uri}): {type(e).__name__}: {e}", file=sys.stderr, flush=True)


class Store:
    """A client bound to one tracking store: the runs tune.py writes (a sweep's parent run and one
    child per trial) go through these methods, never through MLflow's process-wide URI."""

    def __init__(self, uri: str):
        self.uri = uri
        self.client = _client(uri)

    def create_run(
        self, experiment_id: str, run_name: str, tags: dict[str, str], params: dict[str, Any] | None = None
    ) -> str:
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        if params:
            _log_params(self.client, run.info.run_id, params)
        return cast(str, run.info.run_id)

    def reopen(self, run_id: str) -> None:
        """A finished or killed run back to RUNNING (a resumed sweep or trial writes on into it)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        _log_params(self.client, run_id, params)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.client.log_batch(run_id, metrics=_metrics(metrics, step))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def tag_model_version(self, model_uri: str, tags: dict[str, Any]) -> None:
        """Tags on a registered version, given as models:/<name>/<version>."""
        name, version = model_uri[len("models:/") :].rsplit("/", 1)
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version, k, str(v))


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
        raise UserError(
            f"cannot reach the MLflow tracking store {uri}: {e.message}; "
            "check mlflow.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None
    if exp is None:  # created by another run, then gone again before we could read it
        raise UserError(f"MLflow experiment {name!r} was created concurrently but is not found in {uri}; try again")
    if exp.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {name!r} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) "
            "or set mlflow.experiment to another name"
        )
    return exp.experiment_id


def _params(cfg: C.Config) -> dict[str, str]:
    return {k: str(v) for k, v in C.flatten(cfg).items()}


def _quiet_store_setup() -> None:
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."


def start_run(cfg: C.Config, *, run_name: str, run_path: str, resume: bool) -> RunHandle | None:
    """Create (or, when resuming, reopen) the MLflow run of a training run; None when MLflow is off.
    The run is found again by the Ray run folder it trains into."""
    if not cfg.mlflow.enabled:
        return None
    _quiet_store_setup()
    uri = tracking_uri(cfg)
    exp_id = ensure_experiment(cfg, uri)
    store = Store(uri)
    params = _params(cfg)
    if resume:
        found = store.client.search_runs(
            [exp_id],
            filter_string=f"tags.`{TAG_RUN_PATH}` = '{run_path}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            run = found[0]
            store.reopen(run.info.run_id)
            # MLflow params are immutable: record a changed value (e.g. more train.steps) as a tag.
            old = run.data.params
            store.set_tags(run.info.run_id, {f"resumed.{k}": v for k, v in params.items() if k in old and old[k] != v})
            store.log_params(run.info.run_id, {k: v for k, v in params.items() if k not in old})
            return RunHandle(uri, exp_id, run.info.run_id, run_path)
    run_id = store.create_run(exp_id, run_name, tags={TAG_RUN_PATH: run_path, TAG_RUN_NAME: run_name}, params=params)
    return RunHandle(uri, exp_id, run_id, run_path)


def start_sweep_run(cfg: C.Config, *, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> RunHandle:
    """A sweep's parent run in the store and experiment `cfg` names (tune.py)."""
    _quiet_store_setup()
    uri = tracking_uri(cfg)
    exp_id = ensure_experiment(cfg, uri)
    return RunHandle(uri, exp_id, Store(uri).create_run(exp_id, run_name, tags=tags, params=params))


def end_run(handle: RunHandle | None, status: str = "FINISHED") -> None:
    """Mark the run FINISHED / FAILED / KILLED (best effort, bounded: never hides the real error)."""
    if handle is None:
        return
    try:
        with bounded_http(FINAL_HTTP):
            _client(handle.tracking_uri).set_terminated(handle.run_id, status=status)
    except Exception as e:  # the store being unreachable must not mask why training ended
        print(f"warning: could not mark MLflow run {handle.run_id} {status}: {e}", file=sys.stderr)


def artifact_dir(handle: RunHandle) -> str:
    """The run's artifact root: a local folder for local stores, else the artifact URI."""
    uri = cast(str, _client(handle.tracking_uri).get_run(handle.run_id).info.artifact_uri)
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(uri).path)
    return uri


def log_checkpoint(handle: RunHandle, ckpt_dir: str | os.PathLike[str]) -> None:
    """The final checkpoint (weights, optimiser states, RNG, config) as run artifacts under checkpoint/."""
    with bounded_http(FINAL_HTTP):
        _client(handle.tracking_uri).log_artifacts(handle.run_id, str(ckpt_dir), artifact_path="checkpoint")


def is_mlflow_uri(uri: str) -> bool:
    """models:/name/version, models:/name@alias, runs:/id/path or mlflow-artifacts:/ (vs a path)."""
    return str(uri).startswith(MLFLOW_SCHEMES)


def download(uri: str) -> Path:
    """The local copy of a models:/, runs:/ or mlflow-artifacts:/ URI, through the current
    tracking URI (`using` sets one for a block)."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:
        raise UserError(
            f"cannot fetch {uri!r} from MLflow ({mlflow.get_tracking_uri()}): {e}. "
            "Check the name/version and MLFLOW_TRACKING_URI"
        ) from None


def registered_version(name: str, alias: str | None = None) -> str | None:
    """The version number a registered model's `alias` (None: its latest version) points at now,
    in the current registry; None when the registry cannot say (unreachable, unknown name)."""
    try:
        client = _client(None)
        if alias is not None:
            return str(client.get_model_version_by_alias(name, alias).version)
        return str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
    except Exception:
        return None


def log_to_run(
    run_id: str,
    metrics: dict[str, float],
    *,
    step: int,
    files: Iterable[str | os.PathLike[str]] = (),
    artifact_path: str | None = None,
    tracking_uri: str | None = None,
    hint: str = "",
) -> None:
    """Metrics (at `step`) and files (under `artifact_path`) into an existing run of the store
    `tracking_uri` (default: resolve_uri()), through a client bound to it: neither MLflow's
    process-wide URI changes nor a finished run is reopened. UserError (plus `hint`) when the run
    or store is wrong."""
    from mlflow.exceptions import MlflowException

    uri = resolve_uri(tracking_uri)
    client = _client(uri)
    try:
        client.get_run(run_id)  # a clear error for a wrong id before anything is written
        client.log_batch(run_id, metrics=_metrics(metrics, step))
        for f in files:
            client.log_artifact(run_id, str(f), artifact_path=artifact_path)
    except MlflowException as e:
        raise UserError(
            f"cannot log to MLflow run {run_id!r} at {client.tracking_uri}: {e}.{' ' + hint if hint else ''}"
        ) from None
