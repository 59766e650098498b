"""Shared fixtures: one local Ray cluster per pytest session, and prepared shards of the bundled photos.

The RAY_* variables must be set before Ray starts (and before Train builds its controller), so
they sit at the top of this file (docs/ray-notes.md, "Train V2 reports" and "Noise in logs").
"""

import os
import sys

from ce_ray import cluster

cluster.set_env_defaults()  # what production sets: one print per worker line, no watcher noise, prompt reports
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway local cluster
os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "120")  # a report/barrier hang fails instead
# Serve's autoscaler sees load from metrics its replicas and handles push every 10 s by default;
# the autoscaling test scales within seconds.
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A private local Ray cluster shared by every `@pytest.mark.ray` test; yields a storage
    folder for RunConfig.storage_path. Tests give Train workers fractional CPUs ({"CPU": 0.5})
    so Ray Data and Serve still get CPU (docs/ray-notes.md, "Ray Data on few CPUs")."""
    import ray

    # As connect_ray does for its own clusters: never someone else's cluster on this machine, a
    # pinned GCS port named in RAY_ADDRESS for the cluster's processes (so Train's placement-group
    # cleaner asks this cluster, not another one here), the dashboard's State API on loopback.
    cluster.start_local(
        num_cpus=2,
        object_store_memory=256 * 1024**2,
        _temp_dir=f"/tmp/ce_ray_tests/{os.getpid()}",  # distinct per pytest run: sessions run side by side
    )
    cluster.quiet_data_context()
    try:
        yield tmp_path_factory.mktemp("ray_storage")
    finally:
        if "ray.serve" in sys.modules:  # importing Serve just to stop it costs time and warnings
            try:
                sys.modules["ray.serve"].shutdown()
            except Exception:  # Serve was imported but never started
                pass
        ray.shutdown()


@pytest.fixture(scope="session")
def bundled_shards(tmp_path_factory):
    """`ce-ray prepare bundled` (12 photos: 9 train, 3 val) with 2 rows per shard, so file-order
    shuffling and sharding have several files to work with. Prepared in-process (no Ray).
    Read-only: tests that need to modify shards make their own."""
    from ce_ray.data.prepare import prepare

    out = tmp_path_factory.mktemp("bundled") / "shards"
    prepare("bundled", str(out), rows_per_shard=2, engine="local", progress=False)
    return str(out)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny but really trained centre-hole checkpoint directory (Path): 60 GAN steps on 128x128
    crops of the bundled photos, so the generator's output is not trivial. Used by inpaint and serve
    tests; no Ray. ~3 s on 2 cores."""
    import numpy as np
    import torch
    from helpers import random_crops

    from ce_ray import config as C
    from ce_ray.core.masks import holes_for
    from ce_ray.core.metrics import hole_errors, summarize
    from ce_ray.core.model import build_discriminator, build_generator
    from ce_ray.core.step import GanStep, predict
    from ce_ray.data.bundled import load_bundled
    from ce_ray.data.crops import resize_shorter
    from ce_ray.train import checkpoint

    cfg = C.from_dict(
        {"model": {"bottleneck": 64, "ngf": 8, "ndf": 8}, "data": {"batch_size": 16}, "train": {"steps": 60}}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core box: 1 thread ran 10x faster than 2
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    photos = [resize_shorter(rgb, cfg.data.load_size) for _, rgb in load_bundled()]
    train, val = photos[:-2], photos[-2:]  # the last two are only validated on
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    step = GanStep(G, D, cfg, torch.device("cpu"))
    for _ in range(cfg.train.steps):
        crops = [
            c
            for i in rng.integers(0, len(train), cfg.data.batch_size)
            for c in random_crops(train[i], 128, 1, rng, True)
        ]
        step(torch.from_numpy(np.stack(crops)), torch.from_numpy(holes_for(cfg.mask, 128, len(crops), rng)))
    images = torch.from_numpy(np.stack([c for p in val for c in random_crops(p, 128, 4, rng, False)]))
    holes = torch.from_numpy(holes_for(cfg.mask, 128, len(images), rng))
    metrics = {f"val_{k}": v for k, v in summarize(hole_errors(predict(G, images, holes, cfg), images, holes)).items()}
    torch.set_num_threads(threads)
    return checkpoint.save(
        tmp_path_factory.mktemp("tiny") / "tiny-ce", G=G, D=D, step=cfg.train.steps, config=cfg, metrics=metrics
    )


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STRAYS = ("mlflow.db", "mlruns", "outputs")  # what a test must never leave in the checkout


@pytest.fixture(autouse=True)
def _no_files_left_in_the_checkout():
    """Tests write under tmp_path only: a store or run folder appearing in the repository (or the
    working directory) means some code path fell back to a default location; fail the test that did it."""
    places = {_REPO, os.getcwd()}
    before = {(p, s) for p in places for s in _STRAYS if os.path.exists(os.path.join(p, s))}
    yield
    after = {(p, s) for p in places for s in _STRAYS if os.path.exists(os.path.join(p, s))}
    new = sorted(os.path.join(p, s) for p, s in after - before)
    assert not new, f"this test left {new} behind (a default path instead of tmp_path)"
