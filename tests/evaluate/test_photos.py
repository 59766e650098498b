"""The photo protocol: whole photos, painted holes, through the planner, beside classical fills."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY_FREEFORM

from ce_ray import cli
from ce_ray import config as C
from ce_ray.core.model import build_discriminator, build_generator
from ce_ray.errors import UserError
from ce_ray.evaluate import photos as P
from ce_ray.train import checkpoint

FREEFORM = {**TINY_FREEFORM, "data": {"load_size": 128}}


@pytest.fixture(scope="module")
def freeform_ckpt(tmp_path_factory):
    """An untrained free-form generator: its correction is 0, so it returns the harmonic fill."""
    torch.manual_seed(0)
    cfg = C.from_dict(FREEFORM)
    return checkpoint.save(
        tmp_path_factory.mktemp("ff") / "ff",
        G=build_generator(cfg.model),
        D=build_discriminator(cfg.model),
        step=0,
        config=cfg,
    )


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from PIL import Image

    from ce_ray.data.bundled import load_bundled

    d = tmp_path_factory.mktemp("photos")
    for name, rgb in list(load_bundled())[:2]:
        Image.fromarray(rgb).save(d / f"{name.replace('/', '_')}.png")
    return d


def test_report_scores_families_bins_and_the_untrained_model_equals_the_harmonic_fill(
    freeform_ckpt, photo_dir, tmp_path
):
    report = P.evaluate_photos(
        str(freeform_ckpt),
        str(photo_dir),
        families=["thin", "thick"],
        photo_size=96,
        out_dir=tmp_path,
        methods=["telea", "harmonic"],
    )
    assert set(report["families"]) == {"thin", "thick"}
    for fam, r in report["families"].items():
        m = r["methods"]
        assert r["photos"] == 2 and 0 < r["hole_fraction"] <= 0.5
        # The untrained residual model starts exactly at the harmonic fill (to one grey level).
        assert m["model"]["psnr"] == pytest.approx(m["harmonic"]["psnr"], abs=0.3)
        assert m["model"]["l1"] == pytest.approx(m["harmonic"]["l1"], abs=0.003)
        assert 0 <= m["harmonic"]["sharpness"] < 1  # a membrane fill is smoother than the photo
        assert sum(b["photos"] for b in r["bins"].values()) == 2
        assert (tmp_path / report["pictures"][fam]).is_file()
    again = P.evaluate_photos(
        str(freeform_ckpt),
        str(photo_dir),
        families=["thin", "thick"],
        photo_size=96,
        out_dir=tmp_path / "b",
        methods=["telea", "harmonic"],
    )
    assert json.dumps(again["families"]) == json.dumps(report["families"])  # deterministic
    assert "## thin" in (tmp_path / "report.md").read_text()


def test_sharpness_figure():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    hole = np.zeros((32, 32), bool)
    hole[8:24, 8:24] = True
    flat = truth.copy()
    flat[hole] = 128
    assert P.scores(truth, truth, hole)["sharpness"] == pytest.approx(1.0)
    assert P.scores(flat, truth, hole)["sharpness"] < 0.3  # flat inside: only the hole's edge differs
    assert P.scores(truth, truth, hole)["psnr"] == pytest.approx(100.0)


def test_holes_are_seeded_by_photo_and_family():
    a = P.photo_hole("x/y.jpg", "medium", 100, 120)
    assert np.array_equal(a, P.photo_hole("x/y.jpg", "medium", 100, 120))
    assert not np.array_equal(a, P.photo_hole("x/z.jpg", "medium", 100, 120))


def test_bad_arguments_and_a_centre_model_are_clear_errors(tiny_checkpoint, photo_dir, tmp_path):
    with pytest.raises(UserError, match="unknown mask family"):
        P.evaluate_photos(None, str(photo_dir), families=["wide"], out_dir=tmp_path)
    with pytest.raises(UserError, match="centre model"):
        P.evaluate_photos(str(tiny_checkpoint), str(photo_dir), families=["thin"], photo_size=96, out_dir=tmp_path)


def test_cli_photo_protocol_baselines_only(photo_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        cli.main(
            [
                "evaluate",
                "--protocol",
                "photos",
                "--model",
                "none",
                "--data",
                str(photo_dir),
                "--mask",
                "thin",
                "--photo-size",
                "80",
                "--methods",
                "telea,harmonic",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert list(report["families"]) == ["thin"] and report["model"] is None
    assert set(report["families"]["thin"]["methods"]) == {"telea", "harmonic"}
