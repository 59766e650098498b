"""Connecting to Ray (the only ray.init), the env Ray Train reads, local cluster ports, log quieting.

connect_ray / start_local, RAY_ENV_DEFAULTS, the local cluster's ports and address pin, and the
quieting of Ray Data and worker logs, used by prepare, train, tune, serve, the tests and the
benchmarks. Ray is imported inside the functions: importing this module costs nothing.

Why each setting is there: docs/ray-notes.md ("Job submission and clusters", "Tune and placement
groups", "Train V2 reports", "Noise in logs").
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import random
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ce_ray.errors import UserError
from ce_ray.fsutil import write_atomic

if TYPE_CHECKING:
    from ray.data import DataContext

# Set before a trainer starts: Ray Train propagates RAY_TRAIN_* variables from the driver to its
# controller and workers. Without the first two every worker print comes out twice and a
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
# Below Linux's ephemeral range (32768-60999): a port the kernel hands out for outgoing
# connections (Ray's own processes open many while starting) could otherwise be taken between
# choosing it and the GCS binding it.
PORT_RANGE = (20000, 32000)
LOOPBACK = "127.0.0.1"


def set_env_defaults() -> None:
    """RAY_ENV_DEFAULTS into this process's environment (values already set win)."""
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


# --- Connecting ----------------------------------------------------------------------------------


def connect_ray(address: str | None = None, *, log_to_driver: bool = True, dashboard: bool = True) -> bool:
    """Attach to `address`, else to the cluster named by RAY_ADDRESS (set inside `ray job submit`
    jobs), else start a private local one (start_local); nothing when this process is already
    connected. Never a bare ray.init(): that silently joins whatever cluster
    /tmp/ray/ray_current_cluster names. `log_to_driver=False` keeps the workers' output (rank 0's
    progress line) out of this process's stdout (benchmarks); `dashboard=False` starts a local
    cluster without one (Serve has no use for it). Returns True when it started a cluster."""
    import ray

    set_env_defaults()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        start_local(log_to_driver=log_to_driver, dashboard=dashboard)
        return True
    # A job-level LoggingConfig also drops the "(RayTrainWorker pid=...)" prefix from forwarded
    # worker lines, so rank 0's progress line reaches the terminal as printed.
    ray.init(address=address, logging_config=ray.LoggingConfig(log_level="WARNING"), log_to_driver=log_to_driver)
    return False


def start_local(
    *, log_to_driver: bool = True, dashboard: bool = True, log_level: str = "WARNING", **init_kwargs: Any
) -> None:
    """Start a private local cluster for this process (ray.init(address="local"): never another
    cluster on this machine) with its GCS port pinned and named to its own processes
    (own_cluster_address), Ray Data's console logging at WARNING, and, with `dashboard`, the
    dashboard on 127.0.0.1 (its State API is what frees the placement groups of stopped Tune
    trials). `init_kwargs` go to ray.init as they are (num_cpus, object_store_memory, _temp_dir:
    the tests and benchmarks)."""
    import ray

    set_env_defaults()
    # Processes of the cluster inherit this environment: Ray Data's console handler at WARNING
    # hides its per-epoch "execution finished" lines in every worker and actor.
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = ray_data_logging_file()
        from ray.data._internal.logging import configure_logging

        configure_logging()  # this process may have imported Ray Data before the variable was set
    # Our local clusters listen on 127.0.0.1 only and keep Ray's token authentication on; Ray's
    # start-up notice that it turned it on by default is noise on every command.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    kwargs: dict[str, Any] = {
        "address": "local",
        "logging_config": ray.LoggingConfig(log_level=log_level),
        "log_to_driver": log_to_driver,
        "include_dashboard": dashboard,
    }
    if dashboard:
        kwargs["dashboard_host"] = LOOPBACK
    kwargs.update(init_kwargs)
    with own_cluster_address():
        ray.init(**kwargs)


def free_ports(n: int) -> list[int]:
    """n distinct ports in PORT_RANGE that 127.0.0.1 can bind now (for a Ray cluster, or a Serve
    proxy, to take)."""
    rng = random.Random()
    ports: list[int] = []
    for _ in range(1000):
        port = rng.randrange(*PORT_RANGE)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise UserError(
        f"not enough free TCP ports in {PORT_RANGE[0]}-{PORT_RANGE[1]} for a local Ray cluster; "
        "free some, or start Ray yourself and set RAY_ADDRESS"
    )


@contextlib.contextmanager
def own_cluster_address() -> Iterator[int]:
    """For the local cluster started inside the block: pin its GCS port (yielded) and name it in
    RAY_ADDRESS, which its processes inherit; this process drops both afterwards (it must not
    keep a stale address). Train's PlacementGroupCleaner looks its cluster up without an address;
    with several Ray clusters on one machine it otherwise fails or, worse, asks another cluster
    whether our controller is alive and, told no, removes our placement group mid-run."""
    port = free_ports(1)[0]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{LOOPBACK}:{port}"
    try:
        yield port
    finally:
        for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT"):
            os.environ.pop(k, None)


# --- Quieting ------------------------------------------------------------------------------------


def ray_data_logging_file() -> str:
    """Ray Data's default logging config with the console handler at WARNING (its log files under
    the session directory keep INFO), as a file for RAY_DATA_LOGGING_CONFIG."""
    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    conf: dict[str, Any] = copy.deepcopy(DEFAULT_CONFIG)
    conf["handlers"]["console"]["level"] = "WARNING"
    text = yaml.safe_dump(conf)
    path = Path(tempfile.gettempdir()) / f"ce_ray_data_logging_{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml"
    if not path.exists():
        write_atomic(path, text)
    return str(path)


def quiet_data_context(ctx: DataContext | None = None, *, progress_to_logs: bool = False) -> None:
    """No Ray Data progress bars or plan banners above the progress line, in `ctx` (default: this
    process's current DataContext, which a trainer copies when it is constructed: call this
    before). `progress_to_logs`: on a cluster whose Ray Data console handler is at WARNING
    (start_local), keep progress as INFO log lines instead (use_ray_tqdm off), i.e. in the log
    files only; elsewhere the bars go off (and each process warns once that they are)."""
    if ctx is None:
        import ray.data

        ctx = ray.data.DataContext.get_current()
    if progress_to_logs and os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        ctx.use_ray_tqdm = False
    else:
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def quiet_worker_logs() -> None:
    """In a Ray Train worker: rank 0's progress line is the output. Ray Train configures the
    worker's root logger at INFO (a "Reporting training result ..." line per report) and Ray Data
    logs each epoch's execution; both go to WARNING on the console (Ray Data's log files keep
    everything)."""
    logging.getLogger().setLevel(logging.WARNING)
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler":
            h.setLevel(logging.WARNING)


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """The logger `name` at `level` for a block (e.g. a warning that does not apply there)."""
    log = logging.getLogger(name)
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)
