"""ce_ray/data/local_stream.py: the no-Ray loader (batches, per-epoch shuffling, rank sharding, val)."""

import numpy as np
import pytest
import torch

from ce_ray import config
from ce_ray.core.masks import center_hole
from ce_ray.data import images as image_io
from ce_ray.data.local_stream import LocalTrainStream, load_val, val_arrays
from ce_ray.data.shards import shard_files
from ce_ray.errors import UserError


def _cfg(shards, **data):
    return config.replace(config.Config(), data={"shards": shards, "batch_size": 4, "shuffle_buffer": 8, **data})


def test_batches_shapes_ranges_and_count(bundled_shards):
    cfg = _cfg(bundled_shards, repeat=2)
    s = LocalTrainStream(cfg)
    batches = list(s.epoch(0))
    assert len(batches) == len(s) == (9 * 2) // 4  # 9 train photos x 2 crops, incomplete batch dropped
    from ce_ray.core.step import prepare_batch

    for packed_image, packed_hole in batches:
        # The compact form the pipelines deliver: uint8 crops, one bit per hole pixel.
        assert packed_image.shape == (4, 3, 128, 128) and packed_hole.shape == (4, 128 * 128 // 8)
        assert packed_image.dtype == packed_hole.dtype == torch.uint8
        image, hole = prepare_batch(packed_image, packed_hole, 128, torch.device("cpu"))
        assert image.shape == (4, 3, 128, 128) and hole.shape == (4, 1, 128, 128)
        assert image.dtype == hole.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
        assert torch.equal(hole[0, 0], torch.from_numpy(center_hole(128, cfg.mask.overlap)).float())
    # Iterating the object runs epoch after epoch without end.
    it = iter(s)
    assert len([next(it) for _ in range(len(s) + 1)]) == len(s) + 1


def test_epochs_reshuffle_and_are_reproducible(bundled_shards):
    cfg = _cfg(bundled_shards)
    s = LocalTrainStream(cfg, seed=3)
    orders = [s.keys(e) for e in range(4)]
    assert all(sorted(o) == sorted(orders[0]) for o in orders) and len(orders[0]) == 9
    assert len({tuple(o) for o in orders}) > 1  # the file order changes between epochs
    a = torch.cat([i for i, _ in s.epoch(1)])
    b = torch.cat([i for i, _ in LocalTrainStream(cfg, seed=3).epoch(1)])
    c = torch.cat([i for i, _ in s.epoch(2)])
    assert torch.equal(a, b)  # same (seed, epoch): same crops
    assert not torch.equal(a, c)  # new epoch: new crops


def test_ranks_get_disjoint_equal_shares(bundled_shards):
    cfg = _cfg(bundled_shards)
    for e in range(2):
        k0 = LocalTrainStream(cfg, rank=0, world_size=2).keys(e)
        k1 = LocalTrainStream(cfg, rank=1, world_size=2).keys(e)
        assert len(k0) == len(k1) == 4 and not set(k0) & set(k1)  # 9 photos: 4 + 4, one left out


def test_loader_workers(bundled_shards):
    cfg = _cfg(bundled_shards, repeat=4, loader_workers=2)
    s = LocalTrainStream(cfg)
    batches = list(s.epoch(0))
    # Each worker decodes an equal share (4 photos x 4 crops = 4 batches): 8 in all.
    assert len(batches) == len(s) == 8 and all(i.shape == (4, 3, 128, 128) for i, _ in batches)


def test_val_is_deterministic_and_capped(bundled_shards):
    cfg = config.replace(_cfg(bundled_shards, val_images=10), mask={"kind": "random_region"}, model={"variant": "full"})
    images, holes = load_val(cfg)
    assert images.shape == (10, 3, 128, 128) and holes.shape == (10, 1, 128, 128)
    again_i, again_h = load_val(cfg)
    assert torch.equal(images, again_i) and torch.equal(holes, again_h)
    assert len({h.sum().item() for h in holes}) > 1  # random regions, but the same ones each call
    full, _, keys = val_arrays(config.replace(cfg, data={"val_images": 10_000}))
    assert len(full) < 10_000 and len(set(keys)) == 3  # capped only by the 3 val photos' tiles


def test_missing_or_tiny_shards_are_user_errors(tmp_path, bundled_shards):
    with pytest.raises(UserError, match="ce-ray prepare"):
        shard_files(str(tmp_path / "nope"), "train")
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match="--val-fraction"):
        shard_files(str(tmp_path / "empty"), "val")
    with pytest.raises(UserError, match="no full batch"):
        LocalTrainStream(_cfg(bundled_shards, batch_size=64))
    files = shard_files(bundled_shards, "train")
    assert len(files) == 5 and files == sorted(files)  # 9 rows at 2 per shard
    assert shard_files("file://" + bundled_shards, "train") == files


def test_scale_jitter_resizes_each_photo_within_its_range(monkeypatch):
    from ce_ray import config as C
    from ce_ray.data import crops

    sizes = []
    real = crops.random_crops_of
    monkeypatch.setattr(crops, "random_crops_of", lambda rgb, size, *a: sizes.append(size) or real(rgb, size, *a))
    photo = image_io.encode_png(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    rng = np.random.default_rng(0)

    out = crops.train_batch([photo] * 40, C.from_dict({"data": {"repeat": 2, "scale_jitter": 0.4}}), rng)
    assert out["image"].shape == (80, 3, 128, 128) and out["hole"].shape == (80, 128 * 128 // 8)
    assert all(210 <= s <= 490 for s in sizes) and len(set(sizes)) > 20  # one draw per decoded photo
    assert min(sizes) < 300 < max(sizes)

    sizes.clear()
    crops.train_batch([photo] * 5, C.from_dict({}), rng)
    assert sizes == [350] * 5  # the paper's fixed load size when off


def test_channel_shuffle_permutes_each_crops_colours_on_the_training_device():
    import torch

    from ce_ray import config as C
    from ce_ray.core.step import prepare_batch, shuffle_channels
    from ce_ray.data import crops

    rgb = np.zeros((200, 200, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 0, 128
    photo = image_io.encode_png(rgb)
    rng = np.random.default_rng(0)
    out = crops.train_batch([photo] * 16, C.from_dict({"data": {"load_size": 200, "repeat": 4}}), rng)
    images, _ = prepare_batch(torch.from_numpy(out["image"]), torch.from_numpy(out["hole"]), 128, torch.device("cpu"))
    means = lambda x: {tuple(np.round(im.mean(dim=(1, 2)).numpy(), 2)) for im in x}  # noqa: E731
    assert means(images) == {(1.0, -1.0, 0.0)}  # [-1, 1] scale: 255, 0, 128 (128 -> 0.004)
    torch.manual_seed(0)
    orders = means(shuffle_channels(images))
    assert len(orders) == 6 and all(sorted(o) == [-1.0, 0.0, 1.0] for o in orders)  # all 6 orders in 64 crops


def test_jpeg_draft_decodes_large_photos_at_a_fraction_never_below_the_target():
    import io

    from PIL import Image

    big = np.random.default_rng(0).integers(0, 256, (1600, 2000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=90)
    full = image_io.decode_rgb(buf.getvalue())
    small = image_io.decode_rgb(buf.getvalue(), draft_shorter=350)
    assert full.shape == (1600, 2000, 3)
    assert min(small.shape[:2]) >= 350 and small.shape[0] < 1600  # libjpeg scaled it down (here 1/4: 400x500)
    assert image_io.decode_rgb(buf.getvalue(), draft_shorter=1000).shape == full.shape  # 1000/1600 > 1/2: no draft
