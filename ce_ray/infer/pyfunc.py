"""The registered generator as an MLflow pyfunc model for generic MLflow tools, logged as code.

"Models from code": MLflow stores this file's source and the checkpoint directory, never a pickle.

mlflow_run.register_generator logs it with artifacts={"checkpoint": <exported checkpoint dir>}.
Two ways to load a registered version:
    resolve.load_generator("models:/ce-ray-generator/3")   ce-ray's own path (Serve, evaluate)
    mlflow.pyfunc.load_model("models:/ce-ray-generator/3")    generic MLflow tooling; needs ce-ray importable

pyfunc `predict` takes what Serve takes and runs the same any-size window planner (planner.py):
    an (H, W, 3) uint8 RGB photo                    -> (H, W, 3) uint8, the centre region filled
    {"image": (H, W, 3), "mask": (H, W)}            -> (H, W, 3) uint8, the mask's white filled
    a list of photos (arrays or encoded bytes)       -> a list of (H, W, 3) uint8
    a DataFrame: "image" = PNG/JPEG bytes (or their
      base64 text, as JSON carries them), optional
      "mask" = bytes of a mask image                 -> a DataFrame: "image" = PNG bytes
and, as before, (B, 3, 128, 128) float32 crops in [-1, 1] (or {"image": ..., "hole": ...} for a
full-image model) -> the inpainted crops, same shape. Pixels outside the hole come back
unchanged. MLflow signatures hold one input layout and enforce it, so the logged signature
declares no inputs (every form above passes) and is described in the model's metadata
(mlflow_run.PYFUNC_INPUTS).
"""

from __future__ import annotations

import base64
from typing import Any, overload

import mlflow
import numpy as np
from mlflow.pyfunc.model import PythonModel, PythonModelContext


@overload
def _bytes(value: bytes | bytearray | memoryview | str) -> bytes: ...
@overload
def _bytes(value: Any) -> bytes | None: ...
def _bytes(value: Any) -> bytes | None:
    """Encoded image bytes from bytes, or from base64 text (JSON has no bytes type)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value)
    raise TypeError(f"expected encoded image bytes or base64 text, got {type(value).__name__}")


class ContextEncoderModel(PythonModel):
    """Loads the generator from the logged checkpoint directory (weights_only torch.load)."""

    # MLflow inspects predict()'s type hints when the class is defined and warns on every load
    # that there are none; the inputs it accepts are several (module docstring), which no
    # type-hint schema expresses.
    _skip_type_hint_validation = True

    def load_context(self, context: PythonModelContext) -> None:
        from ce_ray.infer.resolve import load_generator

        self.loaded = load_generator(context.artifacts["checkpoint"])

    # --- the forms ------------------------------------------------------------------------------

    def _photo(self, image: Any, mask: Any = None) -> np.ndarray:
        """One photo (array or encoded bytes) and optional mask (array or bytes) -> uint8 result."""
        from ce_ray.core.masks import hole_from_image
        from ce_ray.data import images
        from ce_ray.infer import planner as inpaint

        if isinstance(image, (bytes, bytearray, memoryview, str)):
            rgb = images.to_rgb8(images.open_image(_bytes(image)))
        else:
            rgb = np.asarray(image)
            if rgb.ndim != 3 or rgb.shape[-1] != 3:
                raise ValueError(f"an image must be (H, W, 3) RGB, got shape {rgb.shape}")
            if rgb.dtype != np.uint8:
                if rgb.min() < 0 or rgb.max() > 255:
                    raise ValueError("an integer image must hold values in 0..255")
                rgb = rgb.astype(np.uint8)
        hole = None
        if mask is not None:
            m = mask
            if isinstance(m, (bytes, bytearray, memoryview, str)):
                m = images.open_image(_bytes(m), what="mask")
            hole = hole_from_image(m, rgb.shape[:2])
        return inpaint.inpaint_image(self.loaded, np.ascontiguousarray(rgb), hole)

    def _crops(self, images: np.ndarray, holes: np.ndarray | None) -> np.ndarray:
        """The tensor form: (B, 3, S, S) float32 crops in [-1, 1] -> the same, inpainted."""
        import torch

        from ce_ray.core.masks import center_hole
        from ce_ray.core.step import predict

        cfg = self.loaded.config
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if holes is None:
            if cfg.model.variant != "center":
                raise ValueError("this generator fills arbitrary holes: pass {'image': (B,3,S,S), 'hole': (B,1,S,S)}")
            h = torch.from_numpy(center_hole(cfg.data.fine_size, cfg.mask.overlap)).float()  # (S, S)
            hole_t = h.expand(x.shape[0], 1, -1, -1)  # (B, 1, S, S)
        else:
            hole_t = torch.as_tensor(np.asarray(holes, dtype=np.float32))
        return predict(self.loaded.model, x, hole_t, cfg).numpy()

    # No annotations: MLflow would infer the logged signature from predict()'s type hints (the
    # class comment above).
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError(
                    "a DataFrame input needs an 'image' column of encoded PNG/JPEG bytes (and optionally 'mask')"
                )
            from ce_ray.data.images import encode_png

            masks = model_input["mask"] if "mask" in model_input.columns else [None] * len(model_input)
            return pd.DataFrame(
                {
                    "image": [
                        encode_png(self._photo(_bytes(img), _bytes(m) if m is not None else None))
                        for img, m in zip(model_input["image"], masks)
                    ]
                }
            )
        if isinstance(model_input, dict):
            if "hole" in model_input:  # the tensor form with explicit holes
                return self._crops(model_input["image"], model_input["hole"])
            image = model_input.get("image")
            if image is None:
                raise ValueError("a dict input needs 'image' (and optionally 'mask', or 'hole' for crops)")
            arr = image if isinstance(image, (bytes, str)) else np.asarray(image)
            if isinstance(arr, np.ndarray) and arr.ndim == 4:
                return self._crops(arr, None)
            return self._photo(arr, model_input.get("mask"))
        if isinstance(model_input, (list, tuple)):
            return [self._photo(im) for im in model_input]
        arr = np.asarray(model_input)
        if arr.ndim == 4 and arr.dtype.kind == "f" and arr.shape[1] == 3:
            return self._crops(arr, None)
        if arr.ndim == 4 and arr.shape[-1] == 3:  # a batch of same-size photos (JSON "inputs")
            return np.stack([self._photo(im) for im in arr])
        return self._photo(arr)


mlflow.models.set_model(ContextEncoderModel())
