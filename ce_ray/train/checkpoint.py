"""The checkpoint format, and the run folder that holds a run's checkpoints (Ray Train and --local).

A self-describing directory read by train, tune, evaluate, inpaint and serve, in one run layout
for Ray Train and --local. Pure torch (models:/ and runs:/ URIs are downloaded through
tracking.py).

    <dir>/meta.json   format, step, resolved config, metrics (human-readable)
    <dir>/model.pt    {"G": state_dict, "D": state_dict}
    <dir>/optim.pt    optimiser + grad-scaler states (absent in exported models)
    <dir>/rng.pt      torch / numpy / python RNG states of the writing process

Every load uses `torch.load(weights_only=True)`: a checkpoint can never execute code. A directory
is written beside its destination and renamed into place (fsutil.write_dir), so a crash never
leaves half of one.

A run (Ray Train and --local alike, under scale.storage_path: train/runs.py):

    <root>/<run name>/checkpoint_step0000200/   checkpoint directories (checkpoint_dir_name)
    <root>/<run name>/metrics.jsonl             one line per report; "checkpoint" names a saved one
    <root>/<run name>/samples/                  eval picture grids (--local; Ray runs log them to MLflow)

Runs of --local from before this layout kept their checkpoints in <run>/checkpoints/step_0000200/;
a run folder of either layout loads (its latest checkpoint) and resumes.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.fsutil import exists, write_dir

FORMAT_VERSION = 1
META_FILE, MODEL_FILE, OPTIM_FILE, RNG_FILE = "meta.json", "model.pt", "optim.pt", "rng.pt"
CHECKPOINT_PREFIX = "checkpoint_step"  # <run>/checkpoint_step0000200/ (Ray Train and --local)
LEGACY_DIR, LEGACY_PREFIX = "checkpoints", "step_"  # <run>/checkpoints/step_0000200/ (older --local runs)
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


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
    """Write a checkpoint directory at `path` (replacing any previous one). G/D may be wrapped."""
    from ce_ray.core.step import unwrap  # late: step imports nothing from here, keep the graph acyclic

    def fill(tmp: Path) -> None:
        torch.save({"G": unwrap(G).state_dict(), "D": unwrap(D).state_dict()}, tmp / MODEL_FILE)
        if optim is not None:
            torch.save(optim, tmp / OPTIM_FILE)
        if rng:
            torch.save(capture_rng(), tmp / RNG_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "config": C.to_dict(config),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    return write_dir(Path(path), fill)


def _torch_load(p: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt / truncated / not ours
        raise UserError(f"cannot read checkpoint file {str(p)!r}: {e}") from None


def is_checkpoint(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / MODEL_FILE).is_file()


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not is_checkpoint(p):
        raise UserError(f"{str(p)!r} is not a ce-ray checkpoint directory (needs {META_FILE} and {MODEL_FILE})")
    meta: dict[str, Any] = json.loads((p / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {str(p)!r} has format {meta.get('format')!r}; this ce-ray reads format {FORMAT_VERSION}"
        )
    return meta


def load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu", with_optim: bool = True) -> Checkpoint:
    p = Path(path)
    meta = read_meta(p)
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


def checkpoint_dir_name(step: int) -> str:
    """The folder name of a run's checkpoint at `step`: checkpoint_step0000200."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


_STEP_RE = re.compile(rf"^(?:{CHECKPOINT_PREFIX}|{LEGACY_PREFIX})(\d+)$")


def run_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The checkpoints of a run folder, oldest step first: <run>/checkpoint_step*/ and, from runs
    written before that layout, <run>/checkpoints/step_*/. Empty when there are none."""
    run_dir = Path(run_dir)
    found: list[tuple[int, int, Path]] = []
    for rank, folder, prefix in ((0, run_dir / LEGACY_DIR, LEGACY_PREFIX), (1, run_dir, CHECKPOINT_PREFIX)):
        if not folder.is_dir():
            continue
        for p in folder.glob(f"{prefix}*"):
            m = _STEP_RE.match(p.name)
            if m and p.name.startswith(prefix) and is_checkpoint(p):
                found.append((int(m.group(1)), rank, p))  # the same step in both layouts: the current one last
    return [p for _, _, p in sorted(found)]


def fresh_run_name(root: str) -> str:
    """A run name no folder under `root` (a local path or a URI) has yet: a fresh run never picks
    up an old one's checkpoints."""
    while True:
        name = f"run-{secrets.token_hex(4)}"
        if not exists(f"{root.rstrip('/')}/{name}"):
            return name


def find_checkpoint_dir(root: Path) -> Path | None:
    """The checkpoint directory `root` names: itself, the latest checkpoint of a run folder (either
    layout), else the first one below it (MLflow model artifacts nest it)."""
    if is_checkpoint(root):
        return root
    in_run = run_checkpoints(root)
    if in_run:
        return in_run[-1]
    for meta in sorted(root.rglob(META_FILE)):
        if is_checkpoint(meta.parent):
            return meta.parent
    return None
