"""The checkpoint format, and the run folder that holds a run's checkpoints (Ray Train and --local).

A self-describing directory read by train, tune, evaluate, inpaint and serve, in one run layout
for Ray Train and --local. Pure torch (models:/ and runs:/ URIs are downloaded through
tracking.py).

    <dir>/meta.json   format, step, resolved config, metrics (human-readable), and "files": the
                      size and sha256 of every other file; written last
    <dir>/model.pt    {"G": state_dict, "D": state_dict}
    <dir>/optim.pt    optimiser + grad-scaler states (absent in exported models)
    <dir>/rng.pt      torch / numpy / python RNG states of the writing process

Every load uses `torch.load(weights_only=True)`: a checkpoint can never execute code. A directory
is written beside its destination and renamed into place (fsutil.write_dir), so a crash never
leaves half of one there. Ray Train's upload into storage copies file by file with no rename, so
a rank killed mid-upload does leave a partial folder: meta.json's "files" make any folder whose
files are missing, short or altered detectable before torch.load (verify), and such a folder is
never taken for a run's checkpoint (latest_intact). Checkpoints written before "files" existed
still load; for them only torch.load can tell a damaged file.

A run (Ray Train and --local alike, under scale.storage_path: train/runs.py):

    <root>/<run name>/checkpoint_step0000200/   checkpoint directories (checkpoint_dir_name)
    <root>/<run name>/metrics.jsonl             one line per report; "checkpoint" names a saved one
    <root>/<run name>/samples/                  eval picture grids (--local; Ray runs log them to MLflow)

Runs of --local from before this layout kept their checkpoints in <run>/checkpoints/step_0000200/;
a run folder of either layout loads (its latest checkpoint) and resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.fsutil import exists, file_sha256, write_dir

FORMAT_VERSION = 1
META_FILE, MODEL_FILE, OPTIM_FILE, RNG_FILE = "meta.json", "model.pt", "optim.pt", "rng.pt"
CHECKPOINT_PREFIX = "checkpoint_step"  # <run>/checkpoint_step0000200/ (Ray Train and --local)
LEGACY_DIR, LEGACY_PREFIX = "checkpoints", "step_"  # <run>/checkpoints/step_0000200/ (older --local runs)
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
# Fault injection only (the checkpoint fault tests): when this variable names a step, the process
# copying that step's checkpoint into its run folder (copy: --local's report, Ray Train's upload)
# SIGKILLs itself after the first file, as an OOM kill or a power cut would. Unset (always,
# outside those tests) it does nothing.
FAULT_INJECTION_KILL_ENV = "CE_RAY_FAULT_INJECTION_KILL_IN_CHECKPOINT_WRITE_AT_STEP"


class DamagedCheckpointError(UserError):
    """A checkpoint folder that cannot be loaded: one of its files is missing, short, altered or
    unreadable. The message names the folder, the file and what is wrong with it; `summary` is
    that without the advice (the warning line when a run skips it)."""

    def __init__(self, path: Path, file: str, problem: str):
        self.path, self.file = path, file
        self.summary = f"checkpoint {str(path)!r} is damaged: {file} {problem}"
        super().__init__(
            f"{self.summary}. Use an earlier checkpoint of its run (given the run folder, evaluate / serve / "
            "export / inpaint take its newest intact checkpoint, and train --resume continues from it)"
        )


@dataclass
class Checkpoint:
    step: int
    config: C.Config
    G: dict[str, torch.Tensor]
    D: dict[str, torch.Tensor]
    optim: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path | None = None


def capture_rng() -> dict[str, Any]:
    """All global RNG states as tensors / plain Python values (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)  # MT19937: {"state": {"key": uint32 array, "pos"}, ...}
    np_state = {
        **np_state,
        "state": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
        },
    }
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np_state,
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np_state["state"]["key"].numpy().astype(np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _serialised(obj: Any) -> bytes:
    buf = BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(
    path: str | os.PathLike[str],
    *,
    G: nn.Module,
    D: nn.Module,
    step: int,
    config: C.Config,
    optim: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    rng: bool = True,
) -> Path:
    """Write a checkpoint directory at `path` (replacing any previous one). G/D may be wrapped.
    A full disk is a UserError naming the folder and the space needed; nothing is left behind."""
    from ce_ray.core.step import unwrap  # late: step imports nothing from here, keep the graph acyclic

    # Serialised in memory first: the manifest needs each file's size and digest, and a full disk
    # is then reported with the exact space the checkpoint needs.
    files = {MODEL_FILE: _serialised({"G": unwrap(G).state_dict(), "D": unwrap(D).state_dict()})}
    if optim is not None:
        files[OPTIM_FILE] = _serialised(optim)
    if rng:
        files[RNG_FILE] = _serialised(capture_rng())
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "config": C.to_dict(config),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "files": {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
        },
    }
    files[META_FILE] = json.dumps(meta, indent=2, sort_keys=True).encode()  # last: it marks the folder complete
    return _write_files(Path(path), list(files.items()))


def copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy the checkpoint folder `src` to `dest` (replacing any folder there) as save writes one:
    into a temp folder beside `dest`, meta.json last, renamed into place; a full disk is a
    UserError naming `dest` and the space needed."""
    src = Path(src)
    meta = read_meta(src)
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.name != META_FILE) + [META_FILE]
    return _write_files(Path(dest), [(n, src / n) for n in names], fault_step=int(meta["step"]))


def copy_weights(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """meta.json + model.pt of the intact checkpoint `src` at `dest`, meta.json listing only
    model.pt: what inference needs (no optimiser or RNG state), still verifiable."""
    src = Path(src)
    meta = verify(src)
    if "files" in meta:
        meta["files"] = {MODEL_FILE: meta["files"][MODEL_FILE]}
    files: list[tuple[str, bytes | Path]] = [(MODEL_FILE, src / MODEL_FILE)]
    files.append((META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode()))
    return _write_files(Path(dest), files)


def _write_files(dest: Path, files: list[tuple[str, bytes | Path]], fault_step: int | None = None) -> Path:
    def fill(tmp: Path) -> None:
        for i, (name, data) in enumerate(files):
            if isinstance(data, Path):
                shutil.copyfile(data, tmp / name)
            else:
                (tmp / name).write_bytes(data)
            if i == 0 and fault_step is not None:
                _fault_injection_kill_point(fault_step)

    try:
        return write_dir(dest, fill)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        need = sum(len(d) if isinstance(d, bytes) else d.stat().st_size for _, d in files)
        free = shutil.disk_usage(dest.parent).free
        raise UserError(
            f"no space left on the device of {str(dest.parent)!r} to write checkpoint {dest.name}: it needs "
            f"{need:,} bytes, {free:,} are free. The partial copy was removed and the run's earlier checkpoints "
            "are intact: free space there (or move scale.storage_path), then continue with --resume"
        ) from None


def _fault_injection_kill_point(step: int) -> None:
    """Fault injection only (FAULT_INJECTION_KILL_ENV): inert unless that variable names `step`."""
    want = os.environ.get(FAULT_INJECTION_KILL_ENV)
    if want and int(want) == step:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _torch_load(p: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt / truncated / not ours (only reached where verify had no manifest)
        raise DamagedCheckpointError(
            p.parent, p.name, f"cannot be read by torch.load ({type(e).__name__}: {e})"
        ) from None


def is_checkpoint(path: Path) -> bool:
    """Whether `path` looks like a checkpoint folder (meta.json and model.pt present); verify says
    whether it is intact."""
    return (path / META_FILE).is_file() and (path / MODEL_FILE).is_file()


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_dir() or not any((p / n).is_file() for n in (META_FILE, MODEL_FILE)):
        raise UserError(f"{str(p)!r} is not a ce-ray checkpoint directory (needs {META_FILE} and {MODEL_FILE})")
    if not (p / META_FILE).is_file():
        raise DamagedCheckpointError(p, META_FILE, "is missing (it is written last: the write was interrupted)")
    try:
        meta: dict[str, Any] = json.loads((p / META_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(p, META_FILE, f"is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {str(p)!r} has format {meta.get('format')!r}; this ce-ray reads format {FORMAT_VERSION}"
        )
    if not (p / MODEL_FILE).is_file():
        raise DamagedCheckpointError(p, MODEL_FILE, "is missing")
    return meta


def verify(path: str | os.PathLike[str], *, hashes: bool = True) -> dict[str, Any]:
    """meta.json of the intact checkpoint folder `path`; DamagedCheckpointError naming the file and
    what is wrong otherwise: every file meta.json lists must be there with its recorded size and,
    with `hashes`, sha256 (so a truncated or altered file is caught before torch.load)."""
    p = Path(path)
    meta = read_meta(p)
    for name, rec in sorted((meta.get("files") or {}).items()):
        f = p / name
        if not f.is_file():
            raise DamagedCheckpointError(p, name, f"is missing (meta.json records {rec['bytes']:,} bytes)")
        size = f.stat().st_size
        if size != rec["bytes"]:
            raise DamagedCheckpointError(
                p,
                name,
                f"is {size:,} bytes but meta.json records {rec['bytes']:,} (truncated: cut off while written or since)",
            )
        if hashes and file_sha256(f) != rec["sha256"]:
            raise DamagedCheckpointError(p, name, "does not match the sha256 meta.json records (the file was altered)")
    return meta


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", with_optim: bool = True) -> Checkpoint:
    p = Path(path)
    meta = verify(p)
    weights = _torch_load(p / MODEL_FILE, map_location)
    optim = _torch_load(p / OPTIM_FILE, map_location) if with_optim and (p / OPTIM_FILE).is_file() else None
    rng = _torch_load(p / RNG_FILE, "cpu") if (p / RNG_FILE).is_file() else None
    return Checkpoint(
        step=meta["step"],
        config=C.from_dict(meta["config"]),
        G=weights["G"],
        D=weights["D"],
        optim=optim,
        rng=rng,
        metrics=meta.get("metrics", {}),
        path=p,
    )


# --- Where a run keeps its checkpoints (module docstring) ----------------------------------------


def checkpoint_dir_name(step: int, attempt: int = 1) -> str:
    """The folder name of a run's checkpoint at `step`: checkpoint_step0000200; a later `attempt`
    at the same step (a run resumed from before a damaged or partial folder of that name, which is
    left as it was) is checkpoint_step0000200-2."""
    return f"{CHECKPOINT_PREFIX}{step:07d}" + (f"-{attempt}" if attempt > 1 else "")


_STEP_RE = re.compile(rf"^(?:{CHECKPOINT_PREFIX}|{LEGACY_PREFIX})(\d+)(?:-(\d+))?$")


def run_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint folders of a run folder, oldest step first: <run>/checkpoint_step*/ and, from
    runs written before that layout, <run>/checkpoints/step_*/. Empty when there are none. Folders
    without meta.json (a write cut off before its end) are not listed; latest_intact checks the rest."""
    run_dir = Path(run_dir)
    found: list[tuple[int, int, int, Path]] = []
    for rank, folder, prefix in ((0, run_dir / LEGACY_DIR, LEGACY_PREFIX), (1, run_dir, CHECKPOINT_PREFIX)):
        if not folder.is_dir():
            continue
        for p in folder.glob(f"{prefix}*"):
            m = _STEP_RE.match(p.name)
            if m and p.name.startswith(prefix) and is_checkpoint(p):
                # the same step in both layouts: the current one last; a later attempt after an earlier
                found.append((int(m.group(1)), rank, int(m.group(2) or 1), p))
    return [p for *_, p in sorted(found)]


def warn_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def latest_intact(
    run_dir: str | os.PathLike[str],
    *,
    skip: Callable[[Path], bool] = lambda p: False,
    warn: Callable[[str], None] = warn_on_stderr,
) -> Path | None:
    """The newest checkpoint of a run folder that verifies (sizes and sha256), or None. Each newer
    damaged one is skipped with a warning line naming the file and what is wrong with it; folders
    for which `skip` is true are passed over silently."""
    for p in reversed(run_checkpoints(run_dir)):
        if skip(p):
            continue
        try:
            verify(p)
        except DamagedCheckpointError as e:
            warn(f"warning: {e.summary}; skipping it")
            continue
        return p
    return None


def free_checkpoint_name(run_dir: str, step: int) -> str:
    """checkpoint_dir_name(step) for the first attempt whose folder does not exist yet under
    `run_dir` (a local path or a URI): a folder a run left behind (damaged, or from a write cut off)
    is never written into, so whatever already refers to it (Ray Train's record) never refers to
    the new checkpoint by mistake."""
    attempt = 1
    while exists(f"{run_dir.rstrip('/')}/{checkpoint_dir_name(step, attempt)}"):
        attempt += 1
    return checkpoint_dir_name(step, attempt)


def remove_partial_writes(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp folders of checkpoint writes that were cut off (.checkpoint_step*.tmp-*) in a
    local run folder; call only when nothing writes into it. Returns what was removed."""
    gone = sorted(Path(run_dir).glob(f".{CHECKPOINT_PREFIX}*.tmp-*"))
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def fresh_run_name(root: str) -> str:
    """A run name no folder under `root` (a local path or a URI) has yet: a fresh run never picks
    up an old one's checkpoints."""
    while True:
        name = f"run-{secrets.token_hex(4)}"
        if not exists(f"{root.rstrip('/')}/{name}"):
            return name


def find_checkpoint_dir(root: Path, warn: Callable[[str], None] = warn_on_stderr) -> Path | None:
    """The checkpoint directory `root` names: itself (when it holds meta.json or model.pt: load
    then says what is wrong with a damaged one), the newest intact checkpoint of a run folder
    (either layout; newer damaged ones skipped with a warning), else the first one below it
    (MLflow model artifacts nest it)."""
    if (root / META_FILE).is_file() or (root / MODEL_FILE).is_file():
        return root
    if run_checkpoints(root):
        return latest_intact(root, warn=warn)
    for meta in sorted(root.rglob(META_FILE)):
        if is_checkpoint(meta.parent):
            return meta.parent
    return None
