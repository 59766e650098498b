"""The shipped model: present in the package, intact (checksum), self-describing (metadata), small,
safe to load, and what every command uses when no --model is given."""

import numpy as np
import pytest
import torch

from ce_ray import cli
from ce_ray import config as C
from ce_ray.fsutil import file_sha256
from ce_ray.infer import resolve, shipped


def test_weights_match_their_checksum_size_and_metadata():
    meta = shipped.read_meta()
    weights = shipped.SHIPPED_DIR / shipped.WEIGHTS_FILE
    assert file_sha256(weights) == meta["sha256"]
    assert weights.stat().st_size == meta["bytes"] <= shipped.MAX_BYTES  # <= 25 MiB
    assert meta["format"] == shipped.SHIPPED_FORMAT and meta["dtype"] == "float16"
    cfg = C.from_dict(meta["config"])  # a valid, complete training config
    assert (
        cfg.model.variant == "full"
        and cfg.mask.kind == "strokes"
        and cfg.model.residual
        and cfg.mask.fill == "diffusion"
    )
    assert meta["step"] == cfg.train.steps  # the recipe's final generator
    assert (
        len(meta["commit"]) == 40 and "ce-ray train" in meta["command"] and "quality_freeform.yaml" in meta["command"]
    )
    assert meta["training_data"]["options"]["train_licences"] == "permissive"
    for split in ("corpus", "bundled"):  # measured scores, recorded by the evaluation that produced them
        fams = meta["metrics"][split]["families"]
        assert set(fams) == {"thin", "medium", "thick"}
        assert all({"model", "telea", "navier_stokes", "biharmonic", "harmonic"} <= set(v) for v in fams.values())
    assert (shipped.SHIPPED_DIR / shipped.CARD_FILE).is_file()


def test_loads_with_weights_only_and_fills_a_hole():
    state = torch.load(shipped.SHIPPED_DIR / shipped.WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert all(v.dtype in (torch.float16, torch.int64) for v in state.values())
    loaded = resolve.load_generator("default")
    assert loaded.source == "default" and loaded.step == shipped.read_meta()["step"]
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (96, 120, 3), dtype=np.uint8)
    hole = np.zeros((96, 120), bool)
    hole[30:50, 40:90] = True
    from ce_ray.infer.planner import inpaint_image

    out = inpaint_image(loaded, rgb, hole)
    assert np.array_equal(out[~hole], rgb[~hole]) and not np.array_equal(out[hole], rgb[hole])


def test_a_corrupted_install_fails_clearly(tmp_path):
    import shutil

    from ce_ray.errors import UserError

    copy = tmp_path / "freeform"
    shutil.copytree(shipped.SHIPPED_DIR, copy)
    with open(copy / shipped.WEIGHTS_FILE, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 16)
    with pytest.raises(UserError, match="corrupted"):
        shipped.load(folder=copy)
    (copy / shipped.META_FILE).unlink()
    with pytest.raises(UserError, match="missing"):
        shipped.load(folder=copy)


def test_inpaint_without_model_uses_the_shipped_one(tmp_path, capsys):
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    mask = np.zeros((80, 100), np.uint8)
    mask[20:40, 30:70] = 255
    Image.fromarray(rgb).save(tmp_path / "p.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert (
        cli.main(["inpaint", str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png"), "-o", str(tmp_path / "o.png")])
        == 0
    )
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert np.array_equal(out[mask == 0], rgb[mask == 0])
    from ce_ray.infer.planner import inpaint_image

    # the model it used is the shipped one: the same pixels as loading "default" explicitly
    expected = inpaint_image(resolve.load_generator(shipped.DEFAULT_MODEL), rgb, mask > 0)
    assert np.array_equal(out, expected)
