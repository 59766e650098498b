"""Train / val batches from the Parquet shards without Ray: pyarrow + crops.py + a torch DataLoader.

The no-Ray twin of data.py, for the local trainer, hosts without Ray, and the "plain torch Dataset +
DataLoader" baseline of bench/data_pipeline.py. The same crop functions (crops.train_batch,
crops.val_samples) cut the crops, so both paths train on the same distribution and validate on
exactly the same crops and holes.

Shuffling per epoch (like data.py): the train files are put in a random order seeded by
(seed, epoch); each rank takes an equal, contiguous share of the rows in that order (so ranks see
disjoint photos and the same number of batches); crops then pass through a shuffle buffer of
cfg.data.shuffle_buffer crops.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ce_ray.config import Config
from ce_ray.data import crops
from ce_ray.data.shards import IMAGE_COLUMN, KEY_COLUMN, open_shard, shard_files
from ce_ray.errors import UserError

DECODE_CHUNK = 16  # photos decoded per crops.train_batch call


def _read_rows(path: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    return open_shard(path).read(columns=columns).slice(start, stop - start)


@dataclass(frozen=True)
class _Slice:
    path: str
    start: int  # rows [start, stop) of the file
    stop: int


def _slices(files: list[str], counts: list[int], order: np.ndarray, a: int, b: int) -> list[_Slice]:
    """Rows [a, b) of the concatenation of `files` taken in `order`, as per-file slices."""
    out, pos = [], 0
    for i in order:
        lo, hi = max(a, pos), min(b, pos + counts[i])
        if lo < hi:
            out.append(_Slice(files[i], lo - pos, hi - pos))
        pos += counts[i]
        if pos >= b:
            break
    return out


class _EpochCrops(IterableDataset[tuple[np.ndarray, np.ndarray]]):
    """One epoch of one rank as single (image, hole) samples: (3, S, S) uint8 and (S*S/8,) uint8
    packed bits (crops.train_batch's compact form).
    Each DataLoader worker takes an equal contiguous part of the rank's rows."""

    def __init__(self, stream: LocalTrainStream, epoch: int):
        self.stream, self.epoch = stream, epoch

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for _, image, hole in self.stream._crops(self.epoch, wid, nw):
            yield image, hole


class LocalTrainStream:
    """Shuffled (image, hole) training batches for one rank, read with pyarrow.

    `epoch(e)` is one pass (cfg.data.batch_size per batch, incomplete batches dropped), reshuffled
    for every e; iterating the object itself runs epochs 0, 1, 2, ... forever. The crops of epoch e
    depend only on (seed, e, rank, world_size, loader_workers): runs are reproducible. With
    cfg.data.loader_workers > 0, that many DataLoader processes decode in parallel, each on an
    equal share of the rank's rows (so every rank still gets `batches_per_epoch` batches)."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.files = shard_files(cfg.data.shards, "train")
        self.counts: list[int] = [open_shard(f).metadata.num_rows for f in self.files]  # footer only: cheap
        self.total = sum(self.counts)
        # Equal shares: DDP ranks must run the same number of steps or the last all-reduce hangs.
        self.rows_per_rank = self.total // world_size
        self.workers = max(1, cfg.data.loader_workers)
        per_worker = self.rows_per_rank // self.workers
        self.batches_per_epoch = self.workers * ((per_worker * cfg.data.repeat) // cfg.data.batch_size)
        if self.batches_per_epoch == 0:
            raise UserError(
                f"an epoch yields no full batch: {self.total} train photos / {world_size} rank(s) / "
                f"{self.workers} loader worker(s) x data.repeat={cfg.data.repeat} crops < "
                f"data.batch_size={cfg.data.batch_size}; "
                "raise data.repeat, lower data.batch_size, or prepare more photos"
            )

    def _order(self, epoch: int) -> np.ndarray:
        """The file order of an epoch: the same on every rank (they must agree to split rows)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def _plan(self, epoch: int, worker: int, num_workers: int) -> list[_Slice]:
        per_worker = self.rows_per_rank // num_workers
        a = self.rank * self.rows_per_rank + worker * per_worker
        return _slices(self.files, self.counts, self._order(epoch), a, a + per_worker)

    def keys(self, epoch: int) -> list[str]:
        """Keys of the photos this rank reads in `epoch` (all loader workers), without decoding."""
        out = []
        for w in range(self.workers):
            for s in self._plan(epoch, w, self.workers):
                out += _read_rows(s.path, s.start, s.stop, [KEY_COLUMN]).column(0).to_pylist()
        return out

    def _crops(self, epoch: int, worker: int, num_workers: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(key, image (3,S,S) uint8, hole (S*S/8,) packed) through a shuffle buffer of cfg.data.shuffle_buffer."""
        d = self.cfg.data
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        buf: list[tuple[str, np.ndarray, np.ndarray]] = []

        def drain(keep: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
            while len(buf) > keep:
                i = int(rng.integers(len(buf)))
                buf[i], buf[-1] = buf[-1], buf[i]  # O(1) random removal
                yield buf.pop()

        for s in self._plan(epoch, worker, num_workers):
            table = _read_rows(s.path, s.start, s.stop, [KEY_COLUMN, IMAGE_COLUMN])
            keys, data = table.column(0).to_pylist(), table.column(1).to_pylist()
            for c in range(0, len(data), DECODE_CHUNK):
                out = crops.train_batch(data[c : c + DECODE_CHUNK], self.cfg, rng)
                ks = np.repeat(keys[c : c + DECODE_CHUNK], d.repeat)  # train_batch: repeat crops per photo, in order
                buf += zip(ks, out["image"], out["hole"])
                yield from drain(d.shuffle_buffer)
        yield from drain(0)

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass: (image (B, 3, S, S) uint8, hole (B, S*S/8) uint8 packed bits) batches, the
        compact form step.prepare_batch converts on the training device."""
        d = self.cfg.data
        loader = DataLoader(
            _EpochCrops(self, e),
            batch_size=d.batch_size,
            drop_last=True,
            num_workers=d.loader_workers,
            persistent_workers=False,
            prefetch_factor=2 if d.loader_workers else None,
        )
        # default_collate stacks the samples and gives each batch as a list: unpacked to a tuple here
        yield from ((images, holes) for images, holes in loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for e in itertools.count():
            yield from self.epoch(e)

    def __len__(self) -> int:
        return self.batches_per_epoch


def train_photo_bytes(cfg: Config, rank: int = 0, world_size: int = 1) -> list[bytes]:
    """The encoded train photos of one rank (an equal, contiguous share in shard order): what
    data.device_crops decodes once."""
    files = shard_files(cfg.data.shards, "train")
    rows: list[bytes] = []
    for f in files:
        rows += open_shard(f).read(columns=[IMAGE_COLUMN]).column(0).to_pylist()
    per_rank = len(rows) // world_size
    return rows[rank * per_rank : (rank + 1) * per_rank]


def val_arrays(cfg: Config) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The validation crops: every tile of each val photo in shard order, capped at
    cfg.data.val_images, with holes seeded by (key, tile). Returns (images (N,3,S,S),
    holes (N,1,S,S), key of each tile)."""
    images, holes, keys, n = [], [], [], 0
    for path in shard_files(cfg.data.shards, "val"):
        for batch in open_shard(path).iter_batches(batch_size=16, columns=[KEY_COLUMN, IMAGE_COLUMN]):
            for key, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                v = crops.val_samples(data, key, cfg)
                take = min(len(v["image"]), cfg.data.val_images - n)
                images.append(v["image"][:take])
                holes.append(v["hole"][:take])
                keys += [key] * take
                n += take
                if n >= cfg.data.val_images:
                    return np.concatenate(images), np.concatenate(holes), keys
    return np.concatenate(images), np.concatenate(holes), keys


def load_val(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic validation set: (images (N, 3, S, S) in [-1, 1], holes (N, 1, S, S)), the same
    in every run and on every machine, N <= cfg.data.val_images."""
    images, holes, _ = val_arrays(cfg)
    return torch.from_numpy(images), torch.from_numpy(holes)
