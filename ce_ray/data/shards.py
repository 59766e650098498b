"""The shard format: schema, train/val split, manifest and file listing of prepared shards.

What `ce-ray prepare` writes and data.py, local_data.py, evaluate.py and the corpus read. No
Ray, no torch.

    <shards>/train/part-00000.parquet ...   SHARD_SCHEMA: key, image_bytes, source, width, height
    <shards>/val/part-00000.parquet ...     (rows sorted by key; the split is split_of(key))
    <shards>/manifest.json                  MANIFEST_FORMAT: counts, skipped files, options

A row's KEY_COLUMN is a stable id of the photo (its path relative to the source root); IMAGE_COLUMN
holds the encoded image. Which split a photo lands in is `split_of(key)`, a hash that never changes
between runs, machines or Python versions, so a val photo is never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.parquet as pq

from ce_ray.errors import UserError
from ce_ray.fsutil import fs_and_path, is_uri, local_path, write_atomic

KEY_COLUMN = "key"
IMAGE_COLUMN = "image_bytes"
SHARD_SCHEMA = pa.schema(
    [
        (KEY_COLUMN, pa.string()),
        (IMAGE_COLUMN, pa.binary()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
MANIFEST_FORMAT = "ce-ray-shards/1"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
VAL_FRACTION = 0.1  # default share of photos held out for validation
SPLIT_RULE = "val if int.from_bytes(sha1(key.encode('utf-8')).digest()[:8], 'big') / 2**64 < val_fraction else train"


def split_of(key: str, val_fraction: float = VAL_FRACTION) -> str:
    """'train' or 'val' from a SHA-1 of the key: stable across runs, machines and Python versions
    (unlike `hash()`)."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


def write_manifest(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """<folder>/manifest.json, written atomically."""
    return write_atomic(Path(folder) / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def has_manifest(shards: str) -> bool:
    """Whether a local folder or a URI prefix holds a manifest.json (False if it cannot be reached)."""
    try:
        fs, root = fs_and_path(shards)
        if fs is None:
            return (Path(root) / MANIFEST_FILE).is_file()
        return cast(bool, fs.isfile(root.rstrip("/") + "/" + MANIFEST_FILE))
    except Exception:  # not a reachable prefix: the caller reports what is wrong
        return False


def is_shards(data: str) -> bool:
    """A folder written by `ce-ray prepare` (its manifest.json, or a val/ folder of Parquet files)."""
    if is_uri(data):
        return has_manifest(data)  # False for an unreachable prefix: prepare.discover reports it
    p = Path(local_path(data))
    return has_manifest(str(p)) or (p / "val").is_dir() and any((p / "val").glob("*.parquet"))


def read_manifest(shards: str) -> dict[str, Any]:
    """<shards>/manifest.json of a prepared folder (local path or URI)."""
    fs, root = fs_and_path(shards)
    p = root.rstrip("/") + "/" + MANIFEST_FILE
    if not (fs.isfile(p) if fs is not None else os.path.isfile(p)):
        raise UserError(
            f"{shards.rstrip('/')}/{MANIFEST_FILE} not found: run `ce-ray prepare SRC --out {shards}` first"
        )
    with fs.open(p, "r") if fs is not None else open(p) as f:
        manifest: dict[str, Any] = json.load(f)
        return manifest


def shard_files(shards: str, split: str) -> list[str]:
    """Sorted Parquet files of one split of a prepared folder (local path or URI), or a UserError
    that says how to create them."""
    fs, root = fs_and_path(shards.rstrip("/") + "/" + split)
    how = f"run `ce-ray prepare SRC --out {shards}` first, or set data.shards to a folder written by `ce-ray prepare`"
    if fs is None:
        import glob

        if not os.path.isdir(root):
            raise UserError(f"no {split} shards: {root} does not exist; {how}")
        files = sorted(glob.glob(os.path.join(glob.escape(root), "*.parquet")))
    else:
        if not fs.isdir(root):
            raise UserError(f"no {split} shards: {shards}/{split} does not exist; {how}")
        files = sorted(fs.unstrip_protocol(f) for f in fs.glob(root.rstrip("/") + "/*.parquet"))
    if not files:
        extra = (
            " (prepare put no photo in this split: re-run it with a larger --val-fraction)" if split == "val" else ""
        )
        raise UserError(f"no {split} shards: {shards}/{split} holds no .parquet files{extra}; {how}")
    return files


def open_shard(path: str) -> pq.ParquetFile:
    """A shard file, local or in a bucket (fsutil.fs_and_path), for pyarrow's readers."""
    fs, p = fs_and_path(path)
    return pq.ParquetFile(fs.open(p, "rb") if fs is not None else p)
