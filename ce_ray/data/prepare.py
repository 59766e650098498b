"""`ce-ray prepare`: photos (folder / glob / list / URI / bundled / corpus) -> Parquet shards + manifest.

The offline ingest step (nanoGPT's prepare.py): every photo is decoded once, converted to 8-bit
RGB, EXIF-rotated, resized so its shorter side is train.lua's loadSize (350) and re-encoded, so
training never decodes a full-resolution photo. Output layout:

    OUT/train/part-00000.parquet ...   columns: key, image_bytes, source, width, height
    OUT/val/part-00000.parquet ...     (rows sorted by key; the split is shards.split_of(key))
    OUT/manifest.json                  counts, every skipped file with its reason, options

(the format itself, and its readers' helpers, are shards.py)

Every input file is either ingested or listed in `skipped` with a reason; nothing a file contains
can crash the run. The per-file work is one pure function (`ingest_file`) that runs either on Ray
Data (engine="ray": parallel tasks, on a cluster too) or in-process (engine="local": no Ray
import at all). Output is written beside OUT under a hidden temporary name and renamed into place,
so a killed run never leaves a half-written OUT.
"""

from __future__ import annotations

import argparse
import glob as globlib
import io
import logging
import os
import posixpath
import shutil
import socket
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from ce_ray.config import FINE_SIZE, LOAD_SIZE
from ce_ray.data import shards
from ce_ray.data.crops import resize_shorter
from ce_ray.data.images import pixel_limit, to_rgb8
from ce_ray.data.shards import IMAGE_COLUMN, KEY_COLUMN, SHARD_SCHEMA
from ce_ray.errors import UserError
from ce_ray.fsutil import is_uri, local_path, read_bytes, replace_dir

if TYPE_CHECKING:
    from tqdm import tqdm

# Pillow's own default limit (~89.5 MP, e.g. 9459x9459). Larger photos are rejected as possible
# decompression bombs unless the user raises --max-pixels.
DEFAULT_MAX_PIXELS = 89_478_485
# JPEG at quality 95 with 4:4:4 chroma (no subsampling). Measured on the bundled photos resized to
# loadSize: 93 KB and 1.0 ms to decode per photo, mean abs error 1.4/255, versus PNG's 279 KB and
# 4.0 ms. Decoding runs for every crop of every epoch, so 4x faster decoding and 3x smaller shards
# matter more than the JPEG error, which is below what the 8-bit camera JPEGs already carry.
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = 0  # 4:4:4
FILES_PER_TASK = 8  # ray engine: files per map_batches call (a task decodes a few MB at a time)
# What a map task returns per input file: a shard row, or a skip (image_bytes null, reason set).
_RESULT_SCHEMA = SHARD_SCHEMA.append(pa.field("reason", pa.string()))
_GLOB_CHARS = set("*?[")
MAX_LISTED_VAL_KEYS = 10_000  # manifest.json names the val photos up to this many


@dataclass(frozen=True)
class Options:
    """Per-file ingest options; recorded in manifest.json as `options`."""

    load_size: int = LOAD_SIZE
    min_size: int = FINE_SIZE
    keep_original: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class SourceFile:
    key: str  # stable id: path relative to the SRC root (or "skimage/astronaut" for bundled)
    path: str  # what to open: a local path or an fsspec URL


class Skip(Exception):
    """A file that cannot be ingested; the message is the reason written to the manifest."""


# --- One file ------------------------------------------------------------------------------------


def ingest_pixels(data: bytes, opts: Options) -> np.ndarray | None:
    """An encoded file's pixels as ingest stores them: (H, W, 3) uint8 RGB by data/images.py's
    rules, resized to the load size (unless keep_original); None when --keep-original can store
    the file's own bytes unchanged (8-bit RGB JPEG / PNG, upright). Raises Skip(reason)."""
    if not data:
        raise Skip("empty file (0 bytes)")
    with pixel_limit(opts.max_pixels):
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Skip("not an image: Pillow does not recognise the file format") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Skip(f"decompression bomb: {e} (raise --max-pixels to accept it)") from None
        except Exception as e:  # a malformed header can raise almost anything
            raise Skip(f"unreadable image header: {type(e).__name__}: {e}") from None
        w, h = im.size
        if w * h > opts.max_pixels:  # belt and braces: formats that skip Pillow's own check
            raise Skip(
                f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {opts.max_pixels} "
                "(raise --max-pixels to accept it)"
            )
        if min(w, h) < opts.min_size:
            raise Skip(f"too small: {w}x{h}; both sides must be >= {opts.min_size} for a {FINE_SIZE}x{FINE_SIZE} crop")
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block: never pass such a file through unchanged
            orientation = None
        passthrough = opts.keep_original and im.format in ("JPEG", "PNG") and im.mode == "RGB" and orientation == 1
        if not opts.keep_original and im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the photo is much larger than
            # loadSize: the shorter side stays >= load_size, so the final resize is unchanged.
            s = opts.load_size / min(w, h)
            if s < 1:
                im.draft(None, (int(np.ceil(w * s)), int(np.ceil(h * s))))
        try:
            im.load()  # truncated or corrupt pixel data fails here, not at open()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Skip(f"decompression bomb: {e} (raise --max-pixels to accept it)") from None
        except Exception as e:
            raise Skip(f"truncated or corrupt image data: {type(e).__name__}: {e}") from None
        if passthrough:  # --keep-original: the file's own bytes are already 8-bit RGB, upright
            return None
        try:
            rgb = to_rgb8(ImageOps.exif_transpose(im))  # EXIF orientation: phones store photos sideways
        except Exception as e:
            raise Skip(f"cannot convert to RGB: {type(e).__name__}: {e}") from None
    return rgb if opts.keep_original else resize_shorter(rgb, opts.load_size)


def ingest_bytes(data: bytes, opts: Options) -> tuple[bytes, int, int]:
    """Encoded file -> (stored image: JPEG of ingest_pixels, or the file itself with
    --keep-original when it can stay as it is; width, height), or raise Skip(reason)."""
    rgb = ingest_pixels(data, opts)
    if rgb is None:
        with Image.open(io.BytesIO(data)) as im:
            return data, im.width, im.height
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    return buf.getvalue(), rgb.shape[1], rgb.shape[0]


def ingest_file(src: SourceFile, opts: Options) -> dict[str, Any]:
    """One input file -> a result row (schema _RESULT_SCHEMA): a shard row, or image_bytes None
    and the reason it was skipped. Never raises for anything the file contains."""
    row: dict[str, Any] = {
        KEY_COLUMN: src.key,
        IMAGE_COLUMN: None,
        "source": src.path,
        "width": None,
        "height": None,
        "reason": None,
    }
    try:
        data = read_bytes(src.path)
    except OSError as e:
        row["reason"] = f"cannot read: {e.strerror or e}"
        return row
    try:
        row[IMAGE_COLUMN], row["width"], row["height"] = ingest_bytes(data, opts)
    except Skip as e:
        row["reason"] = str(e)
    except MemoryError:
        row["reason"] = "out of memory while decoding (lower --max-pixels)"
    except Exception as e:  # the promise is that no file crashes the run; the reason names it
        row["reason"] = f"failed: {type(e).__name__}: {e}"
    return row


def _ingest_batch(batch: pa.Table, opts: Options) -> pa.Table:
    """Ray Data map_batches body: a table of (key, path) -> a table of result rows."""
    rows = [
        ingest_file(SourceFile(k, p), opts)
        for k, p in zip(batch.column("key").to_pylist(), batch.column("path").to_pylist())
    ]
    return pa.Table.from_pylist(rows, schema=_RESULT_SCHEMA)


# --- Finding the input files ---------------------------------------------------------------------


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: keys are relative to it."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return "/".join(parts[:i]) or "/"
    return posixpath.dirname(pattern)


def _rel_key(path: str, root: str) -> str:
    rel = posixpath.relpath(path, root) if root not in ("", "/") else path.lstrip("/")
    return rel


def _read_list(list_path: str, remote: bool) -> Iterator[str]:
    """Entries of a .txt list: one path or URL per line; blank lines and '#' comments ignored."""
    text = (
        read_bytes(list_path).decode("utf-8", errors="replace")
        if remote
        else Path(list_path).read_text(errors="replace")
    )
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def corpus_files(corpus_dir: str | os.PathLike[str] | None = None, *, fetch_missing: bool = True) -> list[SourceFile]:
    """The photos of the offline corpus (corpus.py), keyed '<package>/<path>' as its sources.json
    lists them; fetched first when the folder has no sources.json yet."""
    from ce_ray.data import corpus

    root = Path(corpus_dir or corpus.DEFAULT_DIR).absolute()
    if not (root / "sources.json").is_file():
        if not fetch_missing:
            raise UserError(f"no corpus in {root}: run `ce-ray corpus fetch --out {root}` first")
        print(
            f"no corpus in {root} yet: fetching it first (ce-ray corpus fetch --out {root})",
            file=sys.stderr,
            flush=True,
        )
        corpus.fetch(root, log=lambda m: print(m, file=sys.stderr, flush=True))
    sources = corpus.load_sources(root)
    files = [SourceFile(p["key"], str(root / p["path"])) for p in sources["photos"]]
    return sorted(files, key=lambda f: f.key)


def discover(
    src: str, exclude: Iterable[str] = (), corpus_dir: str | os.PathLike[str] | None = None
) -> tuple[list[SourceFile], list[dict[str, str]]]:
    """SRC -> (files sorted by key, [{path, reason}] for duplicate list entries). `exclude`:
    absolute path prefixes never to list (OUT and its temporary siblings when OUT is under SRC).
    SRC "bundled": the photos inside installed wheels; "corpus": the offline corpus in
    `corpus_dir` (fetched first if missing)."""
    if src == "bundled":
        from ce_ray.data.bundled import bundled_photos

        return [SourceFile(p.name, str(p.path)) for p in bundled_photos()], []
    if src == "corpus":
        return corpus_files(corpus_dir), []
    src = local_path(src)
    if is_uri(src):
        return _discover_remote(src)
    excluded = list(exclude)

    def keep(p: str) -> bool:
        a = os.path.abspath(p) + os.sep  # "/x/out/" matches the folder and what is under it
        return not any(a.startswith(e) for e in excluded)

    p = Path(src)
    if p.is_dir():
        root = p.resolve()
        files = []
        for dirpath, dirnames, names in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if keep(os.path.join(dirpath, d)))
            files += [os.path.join(dirpath, n) for n in names]
        found = [SourceFile(Path(f).relative_to(root).as_posix(), f) for f in files if keep(f)]
        return sorted(found, key=lambda s: s.key), []
    if _GLOB_CHARS & set(src):
        glob_root = os.path.abspath(_glob_root(src))
        files = [f for f in globlib.glob(src, recursive=True) if os.path.isfile(f) and keep(f)]
        found = [
            SourceFile(Path(os.path.abspath(f)).relative_to(glob_root).as_posix(), os.path.abspath(f)) for f in files
        ]
        return sorted(found, key=lambda s: s.key), []
    if p.is_file() and p.suffix.lower() == ".txt":
        return _from_list(str(p.resolve()), remote=False)
    if p.is_file():
        return [SourceFile(p.name, str(p.resolve()))], []
    raise UserError(
        f"SRC {src!r} not found: pass a folder of photos, a glob ('photos/**/*.jpg'), a .txt file listing paths, "
        "a URI (s3://bucket/prefix) or 'bundled'"
    )


def _from_list(list_path: str, remote: bool) -> tuple[list[SourceFile], list[dict[str, str]]]:
    """Keys of list entries: relative entries as written (normalised), resolved against the list
    file's folder; absolute paths and URLs are their own key."""
    base = posixpath.dirname(list_path) if remote else os.path.dirname(list_path)
    found: dict[str, SourceFile] = {}
    dupes = []
    for entry in _read_list(list_path, remote):
        entry = local_path(entry)
        if is_uri(entry) or entry.startswith("/"):
            key, path = entry, entry
        else:
            key = posixpath.normpath(entry)
            path = posixpath.join(base, key) if remote else os.path.join(base, key)
        if key in found:
            dupes.append({"path": path, "reason": f"duplicate entry in {list_path} (key {key!r} already listed)"})
            continue
        found[key] = SourceFile(key, path)
    return sorted(found.values(), key=lambda s: s.key), dupes


def _discover_remote(src: str) -> tuple[list[SourceFile], list[dict[str, str]]]:
    """s3://, gs://, ... through fsspec (pip install s3fs / gcsfs for those schemes)."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(src)
    except (ImportError, ValueError) as e:
        raise UserError(
            f"cannot open {src!r}: {e} (install the filesystem: pip install 'ce-ray[s3]' or 'ce-ray[gcs]')"
        ) from None
    url = fs.unstrip_protocol
    if _GLOB_CHARS & set(root):
        base = _glob_root(root)
        files = [f for f in fs.glob(root) if fs.isfile(f)]
    elif fs.isdir(root):
        base = root.rstrip("/")
        files = fs.find(root)
    elif fs.isfile(root) and root.lower().endswith(".txt"):
        return _from_list(url(root), remote=True)
    elif fs.isfile(root):
        base, files = posixpath.dirname(root), [root]
    else:
        raise UserError(f"SRC {src!r} not found (no such object or prefix)")
    return sorted((SourceFile(_rel_key(f, base), url(f)) for f in files), key=lambda s: s.key), []


# --- Writing shards ------------------------------------------------------------------------------


class _ShardWriter:
    """Buffers rows of one split and writes a Parquet file every `rows_per_shard` rows, so memory
    holds at most one shard per split no matter how large the input is."""

    def __init__(self, folder: Path, rows_per_shard: int):
        self.folder, self.rows_per_shard = folder, rows_per_shard
        folder.mkdir(parents=True)
        self.rows: list[dict[str, Any]] = []
        self.files: list[str] = []
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"part-{len(self.files):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=SHARD_SCHEMA)
        # The image bytes are already JPEG: a second compression layer or a dictionary (no two
        # photos share bytes) costs CPU and saves nothing.
        pq.write_table(table, self.folder / name, compression="none", use_dictionary=[KEY_COLUMN, "source"])
        self.files.append(name)
        self.rows = []


def _results_local(files: list[SourceFile], opts: Options) -> Iterator[dict[str, Any]]:
    for f in files:
        yield ingest_file(f, opts)


def _results_ray(files: list[SourceFile], opts: Options) -> Iterator[dict[str, Any]]:
    """The same per-file function as tasks on Ray Data: parallel over a cluster's CPUs; the driver
    only receives small encoded images and writes them, streaming (never all in memory)."""
    import ray

    from ce_ray import cluster

    # The cluster named by RAY_ADDRESS (`ray job submit`), else a private local one.
    cluster.connect_ray()
    items = [{"key": f.key, "path": f.path} for f in files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // FILES_PER_TASK)))
    # Deterministic shards: rows arrive in input (key) order, exactly as with engine="local".
    ds.context.execution_options.preserve_order = True
    cluster.quiet_data_context(ds.context)  # our tqdm bar counts files
    results = ds.map_batches(
        _ingest_batch,  # type: ignore[arg-type]  # ray types fn as one-argument; fn_kwargs supplies opts
        fn_kwargs={"opts": opts},
        batch_size=FILES_PER_TASK,
        batch_format="pyarrow",
        num_cpus=1,
    )
    # Ray Data warns once that its bars are off; ours is on, so that warning would only confuse.
    with cluster.logger_level("ray.data._internal.progress", logging.ERROR):
        for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
            yield from cast(pa.Table, batch).to_pylist()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_partials(out: Path) -> None:
    """Remove temp folders of earlier runs on this host that were killed (their pid is gone)."""
    prefix = f".{out.name}.partial-{socket.gethostname()}-"
    if not out.parent.is_dir():
        return
    for d in out.parent.iterdir():
        if d.name.startswith(prefix):
            try:
                pid = int(d.name[len(prefix) :].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(d, ignore_errors=True)


def _check_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if not out.is_dir() or (any(out.iterdir()) and not shards.has_manifest(str(out))):
        raise UserError(
            f"{out} exists and is not a ce-ray shard folder (no manifest.json); "
            "refusing to delete it even with --overwrite"
        )


TRAIN_LICENCES = ("all", "permissive")


def _binding(licence: str) -> bool:
    from ce_ray.data.corpus import binds_weights

    return binds_weights(licence)


def prepare(
    src: str,
    out: str,
    *,
    val_fraction: float = shards.VAL_FRACTION,
    rows_per_shard: int = 64,
    load_size: int = LOAD_SIZE,
    min_size: int = FINE_SIZE,
    keep_original: bool = False,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    engine: str = "ray",
    progress: bool = True,
    corpus_dir: str | os.PathLike[str] | None = None,
    train_licences: str = "all",
) -> dict[str, Any]:
    """Ingest SRC into Parquet shards under OUT; returns the manifest (also OUT/manifest.json).

    OUT must be a local path (on a multi-node cluster: the driver's disk; workers send it the
    encoded images). Raises UserError for bad options, a missing SRC, an existing OUT without
    `overwrite`, or when no file could be ingested; OUT is then left untouched."""
    if engine not in ("ray", "local"):
        raise UserError(f"--engine must be 'ray' or 'local', got {engine!r}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if rows_per_shard < 1:
        raise UserError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    if min_size < FINE_SIZE:
        raise UserError(f"min_size must be >= {FINE_SIZE} (the crop size), got {min_size}")
    if load_size < min_size:
        raise UserError(f"--load-size must be >= {min_size} (the smallest photo kept), got {load_size}")
    if max_pixels < min_size * min_size:
        raise UserError(f"--max-pixels must be >= {min_size * min_size}, got {max_pixels}")
    if train_licences not in TRAIN_LICENCES:
        raise UserError(f"--train-licences must be one of {', '.join(TRAIN_LICENCES)}, got {train_licences!r}")
    if train_licences != "all" and src != "corpus":
        raise UserError("--train-licences permissive needs SRC 'corpus' (only the corpus records each photo's licence)")
    if is_uri(out):
        raise UserError(f"--out must be a local folder (got {out!r}); copy the shards to a bucket afterwards if needed")
    out_p = Path(local_path(out)).absolute()
    if src not in ("bundled", "corpus") and not is_uri(src):
        s = Path(local_path(src)).absolute()
        if s == out_p or out_p in s.parents:
            raise UserError(f"--out {out_p} is SRC or contains it; choose an --out outside the photo folder")
    _check_out(out_p, overwrite)
    _sweep_stale_partials(out_p)

    opts = Options(load_size=load_size, min_size=min_size, keep_original=keep_original, max_pixels=max_pixels)
    # When OUT lies inside SRC, never ingest OUT itself or our temp siblings (.OUT.partial-*, .OUT.old-*).
    files, skipped = discover(
        src, exclude=[str(out_p) + os.sep, str(out_p.parent / f".{out_p.name}.")], corpus_dir=corpus_dir
    )
    inputs = len(files) + len(skipped)  # skipped holds only duplicate list entries so far
    licence_of: dict[str, str] = {}
    if train_licences == "permissive":
        from ce_ray.data import corpus

        licence_of = {
            p["key"]: p["licence"] for p in corpus.load_sources(Path(corpus_dir or corpus.DEFAULT_DIR))["photos"]
        }
    if not files:
        raise UserError(f"no files found in SRC {src!r}")

    out_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_p.parent / f".{out_p.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writers = {s: _ShardWriter(tmp / s, rows_per_shard) for s in ("train", "val")}
        val_keys: list[str] = []
        results = _results_ray(files, opts) if engine == "ray" else _results_local(files, opts)
        bar = _progress(len(files), progress)
        for row in results:
            bar.update(1)
            if row["reason"] is not None:
                skipped.append({"path": row["source"], "reason": row["reason"]})
                continue
            row.pop("reason")
            split = shards.split_of(row[KEY_COLUMN], val_fraction)
            if split == "train" and licence_of and _binding(licence_of.get(row[KEY_COLUMN], "")):
                skipped.append(
                    {
                        "path": row["source"],
                        "reason": f"licence {licence_of.get(row[KEY_COLUMN])!r} kept out of training "
                        "(--train-licences permissive)",
                    }
                )
                continue
            if split == "val":
                val_keys.append(row[KEY_COLUMN])
            writers[split].add(row)
        bar.close()
        for w in writers.values():
            w.flush()
        ingested = sum(w.count for w in writers.values())
        if ingested == 0:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
            raise UserError(
                f"no images ingested from {src!r}: all {len(files)} files were skipped "
                f"({reasons}{' ...' if len(skipped) > 3 else ''})"
            )
        manifest = {
            "format": shards.MANIFEST_FORMAT,
            "source": src,
            "ingested": ingested,
            "train": writers["train"].count,
            "val": writers["val"].count,
            "inputs": inputs,  # == ingested + len(skipped)
            "skipped": skipped,
            "split": {
                "rule": shards.SPLIT_RULE,
                "function": "ce_ray.data.shards.split_of",
                "val_fraction": val_fraction,
            },
            # The photos scored by validation and `ce-ray evaluate`, named, so a val split can be
            # checked against another run's (and never overlaps what was trained on).
            "val_keys": val_keys if len(val_keys) <= MAX_LISTED_VAL_KEYS else None,
            "shards": {s: [f"{s}/{n}" for n in w.files] for s, w in writers.items()},
            "columns": SHARD_SCHEMA.names,
            "encoding": "stored" if keep_original else f"JPEG quality {JPEG_QUALITY}, 4:4:4",
            "options": {
                **asdict(opts),
                "val_fraction": val_fraction,
                "rows_per_shard": rows_per_shard,
                "engine": engine,
                "train_licences": train_licences,
            },
        }
        shards.write_manifest(tmp, manifest)
        _check_out(out_p, overwrite)  # it may have appeared while we worked
        replace_dir(tmp, out_p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _progress(total: int, enabled: bool) -> tqdm:
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="prepare", disable=not enabled, file=sys.stderr)


# --- CLI glue (cli.py owns the parser and calls these) -------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        metavar="SRC",
        nargs="?",
        default="bundled",
        help="folder (recursive), glob, .txt list of paths, URI (s3://, gs://), 'bundled' (default: the 12 "
        "photos inside installed wheels) or 'corpus' (the ~280-photo offline corpus; fetched if missing)",
    )
    parser.add_argument(
        "--corpus-dir", default=None, help="where the corpus lives for SRC 'corpus' (default outputs/corpus)"
    )
    parser.add_argument("--out", required=True, help="output folder for train/, val/ and manifest.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--keep-original", action="store_true", help="store photos at full size (default: shorter side = --load-size)"
    )
    parser.add_argument(
        "--load-size",
        type=int,
        default=LOAD_SIZE,
        help=f"shorter side after resizing (paper's loadSize, default {LOAD_SIZE})",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=shards.VAL_FRACTION,
        help=f"share of photos held out by key hash (default {shards.VAL_FRACTION})",
    )
    parser.add_argument("--rows-per-shard", type=int, default=64, help="photos per Parquet file (default 64)")
    parser.add_argument(
        "--engine",
        choices=("ray", "local"),
        default="ray",
        help="ray: parallel on Ray Data (default); local: in this process",
    )
    parser.add_argument(
        "--train-licences",
        choices=TRAIN_LICENCES,
        default="all",
        help="SRC corpus: 'permissive' keeps photos under copyleft, share-alike or non-commercial licences out of the "
        "train split (the val split is unchanged); default all",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"reject larger images as decompression bombs (default {DEFAULT_MAX_PIXELS})",
    )


def run_from_args(args: argparse.Namespace) -> int:
    m = prepare(
        args.src,
        args.out,
        val_fraction=args.val_fraction,
        rows_per_shard=args.rows_per_shard,
        load_size=args.load_size,
        keep_original=args.keep_original,
        overwrite=args.overwrite,
        max_pixels=args.max_pixels,
        engine=args.engine,
        corpus_dir=args.corpus_dir,
        train_licences=args.train_licences,
    )
    print(
        f"prepared {m['ingested']} photos ({m['train']} train, {m['val']} val) in {args.out}; "
        f"skipped {len(m['skipped'])} (reasons in {os.path.join(args.out, 'manifest.json')})"
    )
    return 0
