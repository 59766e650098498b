"""Filesystem steps shared by everything that writes a file or folder users read (shards,
checkpoints, reports, the photo corpus)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


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


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
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
