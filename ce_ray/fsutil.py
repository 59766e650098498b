"""Paths and atomic writes: local path or URI, and files and folders no reader sees half-written.

The one way to write a file or a folder that users (or another process) read: shards,
checkpoints, reports, ledgers, the photo corpus.

Paths: a *URI* is anything with a scheme other than file:// (s3://, gs://, ...); file:// URIs and
plain paths are local. Writes: a file or folder is written beside its destination under a hidden
temporary name and renamed into place, so a reader (or a killed run) never sees half of one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

FILE_SCHEME = "file://"


# --- Local path or URI ---------------------------------------------------------------------------


def is_uri(path: str) -> bool:
    """A remote location (s3://, gs://, ...): not a plain path and not a file:// URI."""
    return "://" in path and not path.startswith(FILE_SCHEME)


def local_path(path: str) -> str:
    """A local path without its file:// scheme (other strings unchanged)."""
    return path[len(FILE_SCHEME) :] if path.startswith(FILE_SCHEME) else path


def absolute(path: str) -> str:
    """An absolute local path (Ray workers and data tasks run in another working directory);
    URIs as they are."""
    if is_uri(path):
        return path
    return str(Path(local_path(path)).expanduser().resolve())


def fs_and_path(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URI; (None, local path) otherwise."""
    if is_uri(path):
        import fsspec  # lazy: only remote paths need it

        return cast(tuple[Any, str], fsspec.core.url_to_fs(path))
    return None, local_path(path)


def exists(path: str) -> bool:
    """Whether a local path or a URI (through pyarrow's filesystems) exists."""
    if not is_uri(path):
        return os.path.exists(local_path(path))
    import pyarrow.fs

    fs, p = pyarrow.fs.FileSystem.from_uri(path)
    return cast(bool, fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound)


def read_bytes(path: str) -> bytes:
    """A whole file, local path or URI (fsspec)."""
    if is_uri(path):
        import fsspec  # lazy: only remote paths need it

        with fsspec.open(path, "rb") as f:
            return cast(bytes, f.read())
    with open(local_path(path), "rb") as f:
        return f.read()


# --- Atomic writes -------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of a local file, read in 1 MiB blocks (checkpoints, shipped weights and
    package files are too big to read whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` to a temp file beside `path`, then rename it into place: a reader (or a
    killed run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str, data: bytes) -> None:
    """A whole file, local path or URI, never seen half-written: write_atomic locally; on an object
    store one PUT, which stores the object whole or not at all."""
    if is_uri(path):
        import fsspec

        with fsspec.open(path, "wb") as f:
            f.write(data)
        return
    write_atomic(local_path(path), data)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder `tmp` to `dest` (same filesystem), replacing any folder there:
    the old one is renamed aside to `.<name>.old-<id>` first and removed after, so `dest` is
    never half-written and never missing for longer than one rename."""
    if dest.exists():
        trash = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dest, trash)
        os.rename(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, dest)


def write_dir(dest: str | os.PathLike[str], fill: Callable[[Path], Any]) -> Path:
    """Build the folder `dest` atomically: `fill(tmp)` writes into a fresh temp folder beside it,
    which then replaces `dest` (replace_dir); on any error the temp folder is removed and `dest`
    is left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def copy_dir(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy the folder `src` to `dest` atomically (write_dir), replacing any folder there."""
    return write_dir(dest, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
