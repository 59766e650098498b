"""ce_ray/data/stream.py: Ray Data streaming of masked crops (masks as configured, per-epoch randomness,
disjoint worker shares, deterministic validation) and the CPU-budget guard."""

import numpy as np
import pytest
import ray
import torch

from ce_ray import config
from ce_ray.core.masks import center_hole
from ce_ray.data import stream as data
from ce_ray.errors import UserError

TRAIN_KEYS = {
    "skimage/astronaut",
    "skimage/chelsea",
    "skimage/coffee",
    "sklearn/china",
    "sklearn/flower",
    "sporco/kodim23",
    "sporco/monarch",
    "sporco/sail",
    "sporco/tulips",
}


def _cfg(shards, mask="center", **d):
    variant = "center" if mask == "center" else "full"  # config: random masks need the full-image model
    return config.replace(
        config.Config(),
        data={"shards": shards, "batch_size": 8, "shuffle_buffer": 16, **d},
        mask={"kind": mask},
        model={"variant": variant},
    )


@pytest.mark.ray
@pytest.mark.parametrize("kind", ["center", "random_block", "random_region"])
def test_masks_arrive_as_configured(ray_session, bundled_shards, kind):
    cfg = _cfg(bundled_shards, kind, repeat=4)
    # A DataIterator, as Train's get_dataset_shard returns.
    batches = list(data.iter_train_batches(data.build_train_dataset(cfg).iterator(), cfg, "cpu"))
    assert len(batches) == (9 * 4) // 8  # 36 crops, incomplete batch dropped
    # The compact form crosses the object store: uint8 crops, bit-packed holes (51 KB a crop);
    # the step expands it on the training device.
    packed = [b for b in batches]
    assert all(
        i.dtype == h.dtype == torch.uint8 and i.shape == (8, 3, 128, 128) and h.shape == (8, 128 * 128 // 8)
        for i, h in packed
    )
    from ce_ray.core.step import prepare_batch

    expanded = [prepare_batch(i, h, 128, torch.device("cpu")) for i, h in packed]
    images = torch.cat([i for i, _ in expanded])
    holes = torch.cat([h for _, h in expanded])
    assert images.shape == (32, 3, 128, 128) and holes.shape == (32, 1, 128, 128)
    assert images.dtype == holes.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    assert set(holes.unique().tolist()) <= {0.0, 1.0}
    coverage = holes.mean(dim=(1, 2, 3))
    m = cfg.mask
    if kind == "center":
        assert torch.equal(holes, torch.from_numpy(center_hole(128, m.overlap)).float().expand(32, 1, 128, 128))
    elif kind == "random_block":
        assert coverage.min() > 0 and coverage.max() <= m.max_coverage + 1e-6
        assert len(set(coverage.tolist())) > 1  # a new block layout per crop
    else:
        assert coverage.min() >= m.region_min - 0.01 and coverage.max() <= m.region_max + 0.01
        assert len(set(coverage.tolist())) > 1


@pytest.mark.ray
def test_each_epoch_cuts_new_crops(ray_session, bundled_shards):
    cfg = _cfg(bundled_shards, "center", repeat=1)
    ds = data.build_train_dataset(cfg, with_keys=True)

    def by_key():
        rows = {}
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows.update(zip(b["key"], b["image"]))
        return rows

    e0, e1 = by_key(), by_key()  # each iteration re-executes the pipeline: a new epoch
    assert set(e0) == set(e1) == TRAIN_KEYS
    assert all(not np.array_equal(e0[k], e1[k]) for k in e0)  # fresh crop position / flip per epoch


@ray.remote(num_cpus=0.5)
class Consumer:
    """Stands in for a Train worker at 0.5 CPU (what the smoke config gives each): two of them hold
    1 of the 2 CPUs, so the data tasks must run in what is left (the starvation case of
    docs/ray-notes.md, "Ray Data on few CPUs")."""

    def keys(self, it, epochs: int) -> list[list[str]]:
        return [
            [k for b in it.iter_batches(batch_size=2, batch_format="numpy") for k in b["key"]] for _ in range(epochs)
        ]


@pytest.mark.ray
def test_two_workers_see_disjoint_data_each_epoch(ray_session, bundled_shards):
    cfg = _cfg(bundled_shards, "center", repeat=1)
    its = data.build_train_dataset(cfg, with_keys=True).streaming_split(2, equal=True)
    consumers = [Consumer.remote(), Consumer.remote()]
    # Both consume concurrently, as Train workers do; a starved pipeline would time out here.
    k0, k1 = ray.get([c.keys.remote(it, 2) for c, it in zip(consumers, its)], timeout=120)
    for a, b in zip(k0, k1):
        assert len(a) == len(b) == 4  # equal=True: 9 photos -> 4 + 4
        assert not set(a) & set(b) and set(a) | set(b) <= TRAIN_KEYS
    for c in consumers:
        ray.kill(c)


@pytest.mark.ray
def test_epoch_without_a_full_batch_is_a_user_error(ray_session, bundled_shards):
    cfg = _cfg(bundled_shards, "center", batch_size=64)
    with pytest.raises(UserError, match="no full batch"):
        list(data.iter_train_batches(data.build_train_dataset(cfg), cfg, "cpu"))


def test_missing_shards_say_how_to_make_them(tmp_path):
    cfg = _cfg(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="ce-ray prepare"):
        data.build_train_dataset(cfg)


def test_cpu_budget_guard():
    def cfg(workers, cpus):
        return config.replace(config.Config(), scale={"num_workers": workers, "cpus_per_worker": cpus})

    with pytest.raises(UserError, match="cpus_per_worker=0.5"):
        data.check_cpu_budget(cfg(2, 1.0), cluster_cpus=2)  # 2 workers x 1 CPU on 2 CPUs: this configuration hangs
    data.check_cpu_budget(cfg(2, 0.5), cluster_cpus=2)
    with pytest.raises(UserError, match="more \\(logical\\) CPUs"):
        data.check_cpu_budget(cfg(1, 0.5), cluster_cpus=1)
    data.check_cpu_budget(cfg(2, 1.0), cluster_cpus=4)
    dc = data.data_config()
    # only "train" is a Ray dataset: validation reads its fixed tiles on the rank-0 worker (runs.val_set)
    assert dc._datasets_to_split == ["train"] and set(dc._user_execution_options) == {"train"}
    assert (
        dc._resolve_execution_options("train").resource_limits.object_store_memory == data.READ_AHEAD_MIN
    )  # Ray not started
    assert (
        data.data_config(123 << 20)._resolve_execution_options("train").resource_limits.object_store_memory == 123 << 20
    )


@pytest.mark.ray
@pytest.mark.parametrize("cache", ["off", "on"])
def test_file_order_is_reshuffled_each_epoch(ray_session, bundled_shards, cache, monkeypatch):
    monkeypatch.setattr(data, "CACHE_ROWS_PER_BLOCK", 1)  # cached: one photo per block, 9! block orders
    cfg = _cfg(bundled_shards, "center", repeat=1, cache=cache)
    ds = data.build_train_dataset(cfg, with_keys=True)
    # Keep rows in read order so the output order is the file order (5 shards of <= 2 photos).
    ds.context.execution_options.preserve_order = True
    orders = {
        tuple(k for b in ds.iter_batches(batch_size=None, batch_format="numpy") for k in b["key"]) for _ in range(3)
    }
    assert len(orders) > 1 and all(sorted(o) == sorted(TRAIN_KEYS) for o in orders)


@pytest.mark.ray
def test_scheduling_loop_sleeps_while_the_trainer_lags(ray_session, bundled_shards):
    """A pipeline held back by its read-ahead cap has no running task; Ray Data's scheduling loop
    would then spin without blocking. The pipeline's IdleBackoff callback sleeps on those
    iterations (it runs in this process: no split coordinator here), and the data still arrives
    complete."""
    import time

    from ray.data._internal.execution.interfaces.op_runtime_metrics import OpRuntimeMetrics
    from ray.data._internal.execution.streaming_executor import StreamingExecutor
    from ray.data._internal.execution.streaming_executor_state import OpState

    # The private fields the callback reads: a Ray upgrade that renames them fails here, not silently.
    assert "_topology" in StreamingExecutor.__init__.__code__.co_names
    fields = set(OpRuntimeMetrics.__dataclass_fields__)
    assert {"num_tasks_submitted", "num_task_outputs_generated", "num_outputs_taken", "num_inputs_received"} <= fields
    assert "output_queue" in OpState.__init__.__code__.co_names

    cfg = _cfg(bundled_shards, repeat=4)
    ds = data.build_train_dataset(cfg, read_ahead=1)  # a 1-byte cap: one task's output at a time
    backoff = data.IdleBackoff
    assert backoff in ds.context.custom_execution_callback_classes
    before = backoff.sleeps
    n = 0
    for _ in data.iter_train_batches(ds.iterator(), cfg, "cpu", prefetch_batches=0):
        time.sleep(0.3)  # a slow training step: the executor waits on it with nothing running
        n += 1
    assert n == (9 * 4) // 8
    assert backoff.sleeps > before


@pytest.mark.ray
def test_cached_photos_are_decoded_once_and_cropped_anew_each_epoch(ray_session, bundled_shards, tmp_path):
    """data.cache: the decode pass runs once, when the dataset is built; the shards can then
    vanish and every epoch still streams every photo, with new random crops."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(bundled_shards, shards)
    cfg = _cfg(str(shards), "random_block", repeat=2, cache="on", scale_jitter=0.3)
    ds = data.build_train_dataset(cfg, with_keys=True)
    shutil.rmtree(shards)  # nothing is read from the files after the first pass
    epochs = [list(ds.iter_batches(batch_size=None, batch_format="numpy")) for _ in range(2)]
    keys = [sorted(k for b in e for k in b["key"]) for e in epochs]
    assert keys[0] == keys[1] == sorted(list(TRAIN_KEYS) * 2)  # data.repeat=2 crops of every photo
    images = [np.concatenate([b["image"] for b in e]) for e in epochs]
    assert images[0].shape == images[1].shape == (18, 3, 128, 128)
    first = {k: img for b in epochs[0] for k, img in zip(b["key"], b["image"])}
    second = {k: img for b in epochs[1] for k, img in zip(b["key"], b["image"])}
    assert sum(np.array_equal(first[k], second[k]) for k in TRAIN_KEYS) == 0  # new crops every epoch


def test_auto_cache_when_the_decoded_split_fits_a_quarter_of_the_store(bundled_shards):
    cfg = _cfg(bundled_shards)
    need = data.decoded_bytes(cfg)
    assert 9 * 128 * 128 * 3 < need < 9 * 2000 * 2000 * 3  # nine photos, decoded no larger than needed
    assert data.use_cache(cfg, store_bytes=4 * need)
    assert not data.use_cache(cfg, store_bytes=4 * need - 4)
    assert data.use_cache(config.replace(cfg, data={"cache": "on"}), store_bytes=0)
    assert not data.use_cache(config.replace(cfg, data={"cache": "off"}), store_bytes=1e15)
    with pytest.raises(UserError, match="data.cache"):
        config.replace(cfg, data={"cache": "yes"})
