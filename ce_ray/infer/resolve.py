"""Every way a model is named -> a generator ready for inference: the one resolver every command uses.

Forms (`ce-ray inpaint / serve / evaluate / export --model`, batch inpainting, the pyfunc):
    default                     the free-form model ce-ray ships (shipped.py); every --model's default
    a checkpoint folder         or a run folder (its latest checkpoint), either run layout
    models:/NAME/VERSION        models:/NAME@ALIAS, runs:/RUN_ID/PATH: downloaded from MLflow
    FILE.onnx / FILE.pt         an exported generator with its FILE.json description

Which MLflow store a models:/ or runs:/ URI means, one rule everywhere: the command's
--mlflow-tracking-uri flag, then $MLFLOW_TRACKING_URI, then the project's default store
(outputs/mlflow.db, where `ce-ray train` registers models). Resolving is read-only: a store that
does not exist is an error naming it, never created.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn

from ce_ray import config as C
from ce_ray import tracking
from ce_ray.core.model import build_generator
from ce_ray.errors import UserError
from ce_ray.train.checkpoint import find_checkpoint_dir, load, verify

EXPORT_FORMAT = "ce-ray-export/1"  # the sidecar JSON that makes an exported file describe itself
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}
INPUT_NAME, OUTPUT_NAME = "context", "prediction"  # the exported graph's input and output
STORE_RULE = (
    "models:/ and runs:/ URIs are read from the MLflow store given by --mlflow-tracking-uri, else "
    "$MLFLOW_TRACKING_URI, else outputs/mlflow.db (where ce-ray train registers models)"
)


@dataclass
class LoadedGenerator:
    model: nn.Module  # eval mode, on the requested device
    config: C.Config
    step: int
    metrics: dict[str, Any]
    source: str  # the URI or path it came from


# --- Exported files (ce-ray export) -------------------------------------------------------------


class ExportedRunner(nn.Module):
    """An exported file behind the nn.Module interface `step.predict` and the window planner use:
    eval()/train() are no-ops, forward takes and returns tensors on the CPU device."""

    def __init__(self, path: Path, fmt: str):
        super().__init__()
        self.register_buffer(
            "_device_anchor", torch.zeros(0), persistent=False
        )  # parameters()/buffers() give the device
        self.fmt = fmt
        if fmt == "onnx":
            try:
                import onnxruntime as ort
            except ImportError:
                raise UserError("running an .onnx model needs onnxruntime: pip install 'ce-ray[onnx]'") from None
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        else:
            jit_load = cast(Callable[..., torch.jit.ScriptModule], torch.jit.load)  # untyped in torch
            self.module = jit_load(str(path), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "onnx":
            out = self.session.run(
                None, {INPUT_NAME: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)}
            )[0]
            return torch.from_numpy(out)
        with torch.no_grad():
            y: torch.Tensor = self.module(x.detach().cpu().float())
            return y

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        # inpaint_many reads the device from the first parameter; the anchor is a buffer, typed as the
        # base class's Parameter (only its .device is read)
        yield cast(nn.Parameter, self._device_anchor)


def is_exported(uri: str) -> bool:
    p = Path(uri)
    return p.suffix.lower() in SUFFIXES and p.is_file()


def load_exported(uri: str) -> LoadedGenerator:
    """A LoadedGenerator for an exported file and its sidecar JSON."""
    p = Path(uri)
    side = sidecar_path(p)
    if not side.is_file():
        raise UserError(
            f"{p} has no {side.name} beside it: an exported model needs its description "
            "(ce-ray export writes both; copy them together)"
        )
    try:
        meta = json.loads(side.read_text())
    except ValueError as e:
        raise UserError(f"{side} is not valid JSON: {e}") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{side} has format {meta.get('format')!r}; this ce-ray reads {EXPORT_FORMAT}")
    runner = ExportedRunner(p, meta["model_format"])
    return LoadedGenerator(
        model=runner,
        config=C.from_dict(meta["config"]),
        step=int(meta["step"]),
        metrics=meta.get("metrics", {}),
        source=str(uri),
    )


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    return Path(f"{path}.json")


def store_for(explicit: str | None = None) -> str:
    """The MLflow store a models:/ URI is read from (module docstring), checked to exist when it is
    a local SQLite file: reading must not create an empty store."""
    uri = tracking.resolve_uri(explicit)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise UserError(
                f"no MLflow store at {path}: train a model first (ce-ray train registers it there), or name the "
                "store with --mlflow-tracking-uri or MLFLOW_TRACKING_URI"
            )
    return uri


def checkpoint_dir(uri: str, tracking_uri: str | None = None) -> Path:
    """The local checkpoint folder a checkpoint / run folder or MLflow URI names."""
    if tracking.is_mlflow_uri(uri):
        with tracking.using(store_for(tracking_uri)):
            local = tracking.download(uri)
    else:
        local = Path(uri).expanduser()
        if not local.exists():
            raise UserError(
                f"model {uri!r} not found: pass a checkpoint folder, models:/name/version, runs:/id/path, "
                "an exported .onnx / .pt file, or 'default' (the model ce-ray ships)"
            )
    found = find_checkpoint_dir(local)
    if found is None:
        raise UserError(f"no ce-ray checkpoint (meta.json + model.pt) found in {uri!r}")
    return found


def check_model(uri: str) -> None:
    """Fail now, with the message load_generator would give later, when `uri` names a local
    checkpoint or run folder that is missing or damaged (checkpoint.verify): for commands that load
    the model elsewhere (Serve's replicas) and must not start anything for a model they cannot
    load. The shipped model, exported files and MLflow URIs are checked where they load."""
    from ce_ray.infer import shipped

    if shipped.is_default(uri) or is_exported(uri) or tracking.is_mlflow_uri(uri):
        return
    verify(checkpoint_dir(uri))


def load_generator(
    uri: str | None, device: str | torch.device = "cpu", *, tracking_uri: str | None = None
) -> LoadedGenerator:
    """The generator `uri` names (module docstring), in eval mode on `device`. None is "default"."""
    from ce_ray.infer import shipped

    if shipped.is_default(uri):
        G, cfg, meta = shipped.load(device)
        return LoadedGenerator(
            model=G, config=cfg, step=int(meta["step"]), metrics=meta.get("metrics", {}), source=shipped.DEFAULT_MODEL
        )
    uri = str(uri)
    if is_exported(uri):
        return load_exported(uri)
    ckpt = load(checkpoint_dir(uri, tracking_uri), map_location="cpu", with_optim=False)
    G = build_generator(ckpt.config.model)
    G.load_state_dict(ckpt.G)
    G.to(device).eval()
    return LoadedGenerator(model=G, config=ckpt.config, step=ckpt.step, metrics=ckpt.metrics, source=uri)


MODEL_HELP = (
    "'default' (the free-form model ce-ray ships; the default), a checkpoint or run folder, models:/name/version, "
    "models:/name@alias, runs:/id/path, or an exported .onnx / .pt file"
)


def add_model_arguments(parser: argparse.ArgumentParser, what: str = "the model") -> None:
    """--model and --mlflow-tracking-uri, the same on every command that takes one model."""
    parser.add_argument("--model", default="default", metavar="URI", help=f"{what}: {MODEL_HELP}")
    parser.add_argument("--mlflow-tracking-uri", default=None, metavar="URI", help=STORE_RULE)
