"""Shared fixtures: one local Ray cluster per pytest session, and prepared shards of the bundled photos.

The RAY_* variables must be set before Ray starts (and before Train builds its controller), so
they sit at the top of this file (shared/RAY.md §7).
"""

import os

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints once, not twice
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # its actor only logs noise
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway local cluster
os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "120")  # a report/barrier hang fails instead

import pytest


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A private local Ray cluster shared by every `@pytest.mark.ray` test; yields a storage
    folder for RunConfig.storage_path. Tests give Train workers fractional CPUs ({"CPU": 0.5})
    so Ray Data and Serve still get CPU (RAY.md §2)."""
    import ray

    ray.init(
        address="local",  # never attach to someone else's cluster on this machine
        num_cpus=2,
        include_dashboard=True,  # the State API cleans up Train/Tune placement groups (RAY.md §3)
        dashboard_host="127.0.0.1",
        object_store_memory=256 * 1024**2,
        _temp_dir=f"/tmp/ce_ray_tests/{os.getpid()}",  # distinct per pytest run: sessions run side by side
        logging_config=ray.LoggingConfig(log_level="WARNING"),
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        yield tmp_path_factory.mktemp("ray_storage")
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # serve was never started, or is already gone
            pass
        ray.shutdown()


@pytest.fixture(scope="session")
def bundled_shards(tmp_path_factory):
    """`ce-ray prepare bundled` (12 photos: 9 train, 3 val) with 2 rows per shard, so file-order
    shuffling and sharding have several files to work with. Prepared in-process (no Ray).
    Read-only: tests that need to modify shards make their own."""
    from ce_ray.prepare import prepare

    out = tmp_path_factory.mktemp("bundled") / "shards"
    prepare("bundled", str(out), rows_per_shard=2, engine="local", progress=False)
    return str(out)
