"""The registered generator as an MLflow pyfunc model, logged as code ("models from code").

MLflow stores this file's source and the checkpoint directory, never a pickle.

tracking.register_generator logs it with artifacts={"checkpoint": <exported checkpoint dir>}.
Two ways to load a registered version:
    checkpoint.load_generator("models:/ce-ray-generator/3")   ce-ray's own path (Serve, evaluate)
    mlflow.pyfunc.load_model("models:/ce-ray-generator/3")    generic MLflow tooling; needs ce-ray importable
pyfunc `predict` takes images (B, 3, 128, 128) float32 in [-1, 1] (a centre-hole model fills the
centre; a full-image model also needs the holes) and returns the inpainted images, same shape.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class ContextEncoderModel(PythonModel):
    """Loads the generator from the logged checkpoint directory (weights_only torch.load)."""

    # MLflow inspects predict()'s type hints when the class is defined and warns on every load
    # that there are none; its type-hint schemas have no tensor type, and the logged signature
    # (tracking._signature) already describes the (B, 3, 128, 128) float32 input.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from ce_ray.checkpoint import load_generator

        self.loaded = load_generator(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import torch

        from ce_ray.masks import center_hole
        from ce_ray.step import predict

        cfg = self.loaded.config
        if isinstance(model_input, dict):  # {"image": (B,3,S,S), "hole": (B,1,S,S)}
            images = torch.as_tensor(np.asarray(model_input["image"], dtype=np.float32))
            holes = torch.as_tensor(np.asarray(model_input["hole"], dtype=np.float32))
        else:
            images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            if cfg.model.variant != "center":
                raise ValueError("this generator fills arbitrary holes: pass {'image': (B,3,S,S), 'hole': (B,1,S,S)}")
            hole = torch.from_numpy(center_hole(cfg.data.fine_size, cfg.mask.overlap)).float()  # (S, S) bool -> {0, 1}
            holes = hole.expand(images.shape[0], 1, -1, -1)  # (B, 1, S, S)
        out = predict(self.loaded.model, images, holes, cfg.model.variant, cfg.data.fine_size, cfg.mask.fill)
        return out.numpy()


mlflow.models.set_model(ContextEncoderModel())
