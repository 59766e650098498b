"""Filesystem steps shared by everything that writes a folder users read (shards, checkpoints)."""

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
