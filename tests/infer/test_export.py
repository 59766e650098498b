"""`ce-ray export`: ONNX (onnxruntime) and TorchScript (torch.jit.load) outputs equal the PyTorch
generator's on real crops, for any batch size; the exported file runs through the window planner
(`ce-ray inpaint --model model.onnx`) and describes itself."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ce_ray import config as C
from ce_ray.core.masks import center_hole, fill_hole
from ce_ray.errors import UserError
from ce_ray.infer import export as X
from ce_ray.infer import resolve
from ce_ray.train import checkpoint as ck

PARITY = 2e-3  # max abs difference allowed, in [-1, 1] units


def real_crops(n: int, seed: int = 0) -> torch.Tensor:
    from helpers import random_crops

    from ce_ray.data.bundled import load_bundled
    from ce_ray.data.crops import resize_shorter

    rng = np.random.default_rng(seed)
    photos = [resize_shorter(rgb, 350) for _, rgb in load_bundled()]
    crops = [random_crops(photos[i % len(photos)], 128, 1, rng, False)[0] for i in range(n)]
    return torch.from_numpy(np.stack(crops))


def filled(cfg, images):
    hole = torch.from_numpy(center_hole(128, cfg.mask.overlap))
    return fill_hole(images, hole, cfg.mask.fill)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    metas = {
        fmt: X.export(str(tiny_checkpoint), fmt, out / f"g.{'onnx' if fmt == 'onnx' else 'pt'}") for fmt in X.FORMATS
    }
    return out, metas


@pytest.mark.parametrize("fmt", X.FORMATS)
def test_exported_outputs_equal_pytorch_on_real_crops_for_any_batch(exported, tiny_checkpoint, fmt):
    out, _ = exported
    loaded = resolve.load_generator(str(tiny_checkpoint))
    path = out / ("g.onnx" if fmt == "onnx" else "g.pt")
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(sess.run(None, {"context": x.numpy()})[0])  # noqa: E731
    else:
        m = torch.jit.load(str(path))
        run = lambda x: m(x)  # noqa: E731
    for b in (1, 3, 7):  # the traced example had batch 2: the batch axis is dynamic
        x = filled(loaded.config, real_crops(b, seed=b))
        with torch.no_grad():
            ref = loaded.model(x).clamp(-1, 1)
            got = run(x)
        assert got.shape == ref.shape == (b, 3, 64, 64)
        assert (got - ref).abs().max().item() < PARITY
        assert ref.std() > 0.05  # a real, non-trivial output (not a constant)


def test_sidecar_describes_the_model(exported, tiny_checkpoint):
    out, metas = exported
    meta = json.loads((out / "g.onnx.json").read_text())
    assert meta == metas["onnx"]
    src = ck.load(tiny_checkpoint)
    assert meta["step"] == src.step and meta["config"] == json.loads(json.dumps(C.to_dict(src.config)))
    assert meta["input"]["shape"] == ["batch", 3, 128, 128] and meta["output"]["shape"] == ["batch", 3, 64, 64]
    assert meta["input"]["hole_fill"] == src.config.mask.fill and meta["model_format"] == "onnx"


@pytest.mark.parametrize("name", ["g.onnx", "g.pt"])
def test_inpaint_with_the_exported_model_matches_the_checkpoint(exported, tiny_checkpoint, tmp_path, name):
    from ce_ray.cli import main

    out, _ = exported
    rgb = (real_crops(1, seed=5)[0].numpy().transpose(1, 2, 0) * 127.5 + 127.5).astype(np.uint8)
    big = np.asarray(Image.fromarray(rgb).resize((300, 220)))
    Image.fromarray(big).save(tmp_path / "in.png")
    assert (
        main(["inpaint", str(tmp_path / "in.png"), "--model", str(tiny_checkpoint), "-o", str(tmp_path / "a.png")]) == 0
    )
    assert main(["inpaint", str(tmp_path / "in.png"), "--model", str(out / name), "-o", str(tmp_path / "b.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "a.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b.png")).astype(int)
    assert np.abs(a - b).max() <= 1  # within one grey level
    assert (a != big).any()  # the hole really was filled


def test_export_errors_are_clear(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="--format"):
        X.export(str(tiny_checkpoint), "tflite", tmp_path / "x")
    with pytest.raises(UserError, match="is a folder"):
        X.export(str(tiny_checkpoint), "onnx", tmp_path)
    (tmp_path / "lonely.onnx").write_bytes(b"not really")
    with pytest.raises(UserError, match="lonely.onnx.json"):
        resolve.load_generator(str(tmp_path / "lonely.onnx"))
    assert not list(tmp_path.glob(".*tmp*"))
