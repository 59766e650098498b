"""A training run's MLflow side: rank 0's tracker, and the generator logged and registered as a model.

Builds on tracking.py (stores, runs, downloads). The registered model is a pyfunc *from code*
(mlflow_model.py plus the checkpoint folder as an artifact): loading it never unpickles code.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ce_ray import config as C
from ce_ray.tracking import RateLimitedWarning, RunHandle, _client, _metrics, using
from ce_ray.train import checkpoint as ckpt_io
from ce_ray.train.loop import NullTracker, Tracker

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

MODEL_NAME = "generator"  # artifact name of the logged pyfunc model
MODEL_CODE = Path(__file__).resolve().parent.parent / "infer" / "pyfunc.py"  # logged as source ("models from code")


def _requirements() -> list[str]:
    """Pinned to what trained the model; explicit so that logging never asks pip (offline hosts)."""
    import mlflow
    import numpy
    import torch
    import yaml

    import ce_ray

    return [
        f"ce-ray=={ce_ray.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={numpy.__version__}",
        f"pyyaml=={yaml.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


# What the registered pyfunc accepts (mlflow_model.py). An MLflow signature holds one input layout
# and enforces it, so the signature declares the output and these forms live in the model's metadata.
PYFUNC_INPUTS = {
    "image": "(H, W, 3) uint8 RGB photo of any size -> (H, W, 3) uint8 with the centre region filled",
    "image+mask": "{'image': (H, W, 3) uint8, 'mask': (H, W) white = hole} -> (H, W, 3) uint8",
    "list": "a list of photos (arrays or encoded bytes) -> a list of (H, W, 3) uint8",
    "dataframe": (
        "columns 'image' (PNG/JPEG bytes, or base64 text in JSON) and optional 'mask' -> column 'image' of PNG bytes"
    ),
    "crops": (
        "(B, 3, S, S) float32 in [-1, 1] with the hole anywhere (filled by the model's own fill) -> the same shape, "
        "inpainted"
    ),
}


def _signature(cfg: C.Config) -> ModelSignature:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    # Inputs: every form of PYFUNC_INPUTS (no single schema holds them; a declared one would be
    # enforced and refuse the others). Output: an RGB image per input photo.
    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3), name="image")]))


def export_generator_checkpoint(ckpt_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """meta.json + model.pt of a checkpoint (no optimiser or RNG state): what inference needs."""
    return ckpt_io.copy_weights(ckpt_dir, dest)


def register_generator(handle: RunHandle, ckpt_dir: str | os.PathLike[str], cfg: C.Config) -> str:
    """Log the generator as a pyfunc model *from code* (ce_ray/infer/pyfunc.py + the checkpoint
    directory as an artifact, no pickle) and register it as a new version of
    cfg.mlflow.registered_model. Returns "models:/<name>/<version>"."""
    import mlflow

    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")  # offline: never run pip
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with (
        using(handle.tracking_uri),
        tempfile.TemporaryDirectory(prefix="ce_ray_export_") as tmp,
        warnings.catch_warnings(),
    ):
        # The explicit signature already says what goes in and out; an input example would
        # store a 200 KB tensor with every version.
        warnings.filterwarnings("ignore", message=r".*An input example was not provided")
        export = export_generator_checkpoint(ckpt_dir, Path(tmp) / "checkpoint")
        with mlflow.start_run(run_id=handle.run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(export)},
                registered_model_name=cfg.mlflow.registered_model,
                signature=_signature(cfg),
                metadata={"inputs": PYFUNC_INPUTS, "fine_size": cfg.data.fine_size, "variant": cfg.model.variant},
                pip_requirements=_requirements(),
            )
    version = info.registered_model_version
    if version is None:  # cannot happen with registered_model_name set; say so rather than guess
        raise RuntimeError("MLflow did not return a registered model version")
    return f"models:/{cfg.mlflow.registered_model}/{version}"


class MlflowTracker:
    """loop.py's Tracker on rank 0: metrics per step and picture grids into the driver's run.
    A tracking-store hiccup prints a warning and training goes on: losing a metric point is
    better than losing the run (the checkpoints and metrics.jsonl still have everything)."""

    def __init__(self, handle: RunHandle):
        self.handle = handle
        self.client = _client(handle.tracking_uri)
        self._warn = RateLimitedWarning()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.client.log_batch(self.handle.run_id, metrics=_metrics(metrics, step))
        except Exception as e:
            self._warn("log_metrics", self.handle.tracking_uri, e)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        try:
            self.client.log_artifact(self.handle.run_id, str(path), artifact_path)
        except Exception as e:
            self._warn("log_artifact", self.handle.tracking_uri, e)


def worker_tracker(handle: RunHandle | None, rank: int) -> Tracker:
    """The tracker a worker hands to loop.run: MLflow on rank 0, a no-op elsewhere or when off."""
    return MlflowTracker(handle) if (handle is not None and rank == 0) else NullTracker()
