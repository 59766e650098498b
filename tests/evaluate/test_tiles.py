"""ce_ray/evaluate/tiles.py: the folder and shards protocols (deterministic, equal to each other and to the
trainer's validation), SSIM over the hole, the report files, model evaluation, MLflow, the CLI glue.

Most tests use a folder of two small synthetic photos (12 tiles) so a full evaluation with every
baseline takes about a second."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ce_ray import config as C
from ce_ray.core.baselines import BASELINES, LABELS
from ce_ray.core.model import build_discriminator, build_generator
from ce_ray.data.local_stream import load_val
from ce_ray.errors import UserError
from ce_ray.evaluate import tiles as E
from ce_ray.infer import resolve
from ce_ray.train import checkpoint
from ce_ray.train.loop import validate

TINY_MODEL = {"bottleneck": 64, "ngf": 8, "ndf": 8}


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour ramps plus a few stripes: structure every method can partly recover."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    chans = [np.sin(2 * np.pi * (a * x + b * y) + c) for a, b, c in rng.uniform(0.5, 3, (3, 3))]
    return (127.5 * (np.stack(chans, -1) + 1)).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Two photos (350 x 466 after resizing: 2 x 3 tiles each), a non-image and a too-small image."""
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(_photo(300, 400, 0)).save(d / "a.png")
    (d / "sub").mkdir()
    Image.fromarray(_photo(420, 560, 1)).save(d / "sub" / "b.jpg", quality=95)
    (d / "notes.txt.bak").write_text("not a photo")
    Image.fromarray(_photo(100, 100, 2)).save(d / "small.png")
    return str(d)


def _save_tiny(path, **sections) -> str:
    cfg = C.from_dict({"model": dict(TINY_MODEL), **sections})
    torch.manual_seed(0)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model, cfg.data.fine_size)
    return str(checkpoint.save(path, G=G, D=D, step=7, config=cfg))


@pytest.fixture(scope="module")
def eval_tiny_checkpoint(tmp_path_factory):
    """An untrained tiny centre model (conftest has no shared tiny checkpoint fixture yet)."""
    return _save_tiny(tmp_path_factory.mktemp("ckpt") / "center")


# --- SSIM ------------------------------------------------------------------------------------------


def test_hole_ssim_covers_the_hole_box_only():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    truth = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    holes = np.zeros((1, 1, 32, 32), np.float32)
    holes[..., 8:24, 10:20] = 1
    assert E.hole_ssim(truth, truth, holes)[0] == pytest.approx(1.0)
    pred = truth + 0.3 * rng.standard_normal(truth.shape).astype(np.float32) * holes
    pred_far = pred.copy()
    pred_far[..., :4, :4] = -1  # changes outside the box leave the score alone
    got = E.hole_ssim(pred, truth, holes)[0]
    assert E.hole_ssim(pred_far, truth, holes)[0] == got
    box = lambda a: (a[0, :, 8:24, 10:20].transpose(1, 2, 0).astype(np.float64) + 1) / 2  # noqa: E731
    assert got == pytest.approx(structural_similarity(box(truth), box(pred), channel_axis=-1, data_range=1.0))
    assert 0 < got < 1


def test_ssim_box_grows_small_holes_to_the_window_and_stays_inside():
    hole = np.zeros((32, 32), bool)
    hole[0:2, 30:32] = True  # 2x2 in a corner
    r, c = E._ssim_box(hole)
    assert (r.start, r.stop, c.start, c.stop) == (0, E.SSIM_WIN, 32 - E.SSIM_WIN, 32)
    empty = E.hole_ssim(np.zeros((1, 3, 32, 32)), np.ones((1, 3, 32, 32)), np.zeros((1, 1, 32, 32)))
    assert empty[0] == 1.0  # no hole, nothing to get wrong


# --- Protocol and report ----------------------------------------------------------------------------


def test_folder_protocol_is_deterministic_and_reports_every_method(photo_dir, tmp_path):
    a = E.evaluate(None, photo_dir, out_dir=tmp_path / "a", sample_tiles=4)
    b = E.evaluate(None, photo_dir, out_dir=tmp_path / "b", sample_tiles=4)
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()
    assert a == b == json.loads((tmp_path / "a" / "report.json").read_text())

    assert a["tiles"] == 12 and a["photos"] == 2 and not a["capped"]
    assert list(a["methods"]) == list(BASELINES)
    assert {s["path"].rsplit("/", 1)[-1] for s in a["skipped"]} == {"notes.txt.bak", "small.png"}
    for m in a["methods"].values():
        assert set(E.METRICS) <= set(m)
    s = a["methods"]
    for m in ("telea", "navier_stokes", "biharmonic", "harmonic"):  # smooth photos: diffusion wins clearly
        assert s[m]["l1"] < s["mean_fill"]["l1"] and s[m]["psnr"] > s["mean_fill"]["psnr"]
    assert a["protocol"]["mask"]["kind"] == "center" and a["protocol"]["mask"]["overlap"] == C.OVERLAP_PRED
    assert a["protocol"]["hole_fraction"] == pytest.approx((64 - 2 * C.OVERLAP_PRED) ** 2 / 128**2)
    assert [r["dataset"] for r in a["reference"]["rows"]] == ["Paris StreetView"] * 2
    assert a["reference"]["rows"][0]["psnr"] == 18.58

    md = (tmp_path / "a" / "report.md").read_text()
    for m in BASELINES:
        assert LABELS[m] in md
        assert (tmp_path / "a" / f"grid_{m}.png").is_file()
    assert "Paris StreetView" in md and "different dataset" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"grid_{m}.png" for m in [*BASELINES, "all"])  # relative links
    with Image.open(tmp_path / "a" / "grid_all.png") as im:  # masked | every method | truth, 4 rows
        cols = len(BASELINES) + 2
        assert im.size == (cols * 128 + (cols - 1) * 2, 4 * 128 + 3 * 2)
    # Photos grouped by the first part of their key: top-level files form the "." group, sub/b.jpg "sub".
    pk = a["per_package"]
    assert (
        list(pk) == [".", "sub"] and [pk[g]["tiles"] for g in pk] == [6, 6] and [pk[g]["photos"] for g in pk] == [1, 1]
    )
    assert (pk["."]["telea"]["psnr"] + pk["sub"]["telea"]["psnr"]) / 2 == pytest.approx(s["telea"]["psnr"])
    assert "per package" in md
    with Image.open(tmp_path / "a" / "grid_telea.png") as im:
        assert im.size == (3 * 128 + 2 * 2, 4 * 128 + 3 * 2)
    assert not list((tmp_path / "a").glob(".*"))  # no temp files left behind


def test_random_holes_are_seeded_per_tile(photo_dir, tmp_path):
    mask = C.MaskConfig(kind="random_block")
    t1 = E.load_tiles(photo_dir, mask, max_tiles=5)
    t2 = E.load_tiles(photo_dir, mask, max_tiles=5)
    np.testing.assert_array_equal(t1.holes, t2.holes)
    assert len({h.tobytes() for h in t1.holes}) == 5  # a different block per tile
    assert t1.keys == ["a.png"] * 5 and t1.index == [0, 1, 2, 3, 4]
    r = E.evaluate(
        None, photo_dir, out_dir=tmp_path, mask_kind="random_region", max_tiles=5, methods=["telea"], sample_tiles=0
    )
    assert r["capped"] and r["tiles"] == 5 and r["pictures"] == {}
    assert 0.2 <= r["protocol"]["hole_fraction"] <= 0.3  # train_random.lua's 20-30 % coverage


def test_shards_use_the_val_split_and_match_the_folder_protocol(bundled_shards, tmp_path):
    """The val split of prepared shards scores exactly as the same photos read directly."""
    shards = E.evaluate(None, bundled_shards, out_dir=tmp_path / "s", methods=["mean_fill"], sample_tiles=0)
    assert shards["source"].startswith("the val split")
    val_keys = list(shards["per_photo"])
    folder = E.evaluate(None, "bundled", out_dir=tmp_path / "f", methods=["mean_fill"], sample_tiles=0)
    assert set(val_keys) < set(folder["per_photo"])
    for k in val_keys:
        assert shards["per_photo"][k] == folder["per_photo"][k]


def test_model_evaluation_matches_the_trainers_validation(eval_tiny_checkpoint, bundled_shards, tmp_path):
    r = E.evaluate(
        eval_tiny_checkpoint, bundled_shards, out_dir=tmp_path, methods=["mean_fill", "telea"], sample_tiles=3
    )
    assert list(r["methods"]) == [E.MODEL, "mean_fill", "telea"]
    assert r["model"]["step"] == 7 and r["model"]["uri"] == eval_tiny_checkpoint
    assert "Context Encoder (this model, step 7)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "grid_model.png").is_file()

    # Same crops, holes and numbers as loop.validate on the trainer's val set.
    loaded = resolve.load_generator(eval_tiny_checkpoint)
    cfg = C.replace(loaded.config, data={"shards": bundled_shards, "val_images": E.DEFAULT_MAX_TILES})
    metrics, _ = validate(loaded.model, load_val(cfg), cfg, torch.device("cpu"))
    for k in ("l1", "l2", "psnr"):
        assert r["methods"][E.MODEL][k] == pytest.approx(metrics[f"val_{k}"], rel=1e-9)

    again = E.evaluate(
        eval_tiny_checkpoint, bundled_shards, out_dir=tmp_path / "again", methods=["mean_fill", "telea"], sample_tiles=3
    )
    assert again == r  # deterministic with a model too


def test_centre_model_refuses_random_holes_and_full_model_accepts_them(eval_tiny_checkpoint, photo_dir, tmp_path):
    with pytest.raises(UserError, match="centre model"):
        E.evaluate(eval_tiny_checkpoint, photo_dir, out_dir=tmp_path, mask_kind="random_block")
    full = _save_tiny(tmp_path / "full", model={**TINY_MODEL, "variant": "full"}, mask={"kind": "random_region"})
    r = E.evaluate(
        full, photo_dir, out_dir=tmp_path / "r", mask_kind="random_region", methods=[], max_tiles=4, sample_tiles=2
    )
    assert list(r["methods"]) == [E.MODEL] and r["model"]["variant"] == "full"


def test_bad_arguments_are_user_errors(photo_dir, tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        E.evaluate(None, photo_dir, out_dir=tmp_path, methods=["photoshop"])
    with pytest.raises(UserError, match="max-tiles"):
        E.evaluate(None, photo_dir, out_dir=tmp_path, max_tiles=0)
    with pytest.raises(UserError, match="nothing to evaluate"):
        E.evaluate("none", photo_dir, out_dir=tmp_path, methods=[])
    with pytest.raises(UserError, match="not found"):
        E.evaluate(None, str(tmp_path / "missing"), out_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt.bak").write_text("no photos here")
    with pytest.raises(UserError, match="no 128x128 tiles"):
        E.evaluate(None, str(empty), out_dir=tmp_path)


# --- MLflow and CLI ---------------------------------------------------------------------------------


def test_logs_metrics_and_artifacts_to_an_mlflow_run(photo_dir, eval_tiny_checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri()))
    r = E.evaluate(
        None,
        photo_dir,
        out_dir=tmp_path / "out",
        methods=["mean_fill", "telea"],
        sample_tiles=2,
        mlflow_run_id=run.info.run_id,
        mlflow_tracking_uri=uri,
    )
    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["eval_telea_psnr"] == pytest.approx(r["methods"]["telea"]["psnr"])
    assert {f"eval_{m}_{k}" for m in ("mean_fill", "telea") for k in E.METRICS} <= set(logged)
    files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert files == {
        f"evaluation/{f}" for f in ("report.json", "report.md", "grid_mean_fill.png", "grid_telea.png", "grid_all.png")
    }
    with pytest.raises(UserError, match="cannot log to MLflow run"):
        E.log_to_mlflow("0" * 32, r, [], uri)

    # A runs:/ model URI is fetched from the same store (--mlflow-tracking-uri), not MLflow's default.
    client.log_artifacts(run.info.run_id, eval_tiny_checkpoint, "ckpt")
    r = E.evaluate(
        f"runs:/{run.info.run_id}/ckpt",
        photo_dir,
        out_dir=tmp_path / "m",
        methods=[],
        max_tiles=2,
        sample_tiles=0,
        mlflow_tracking_uri=uri,
    )
    assert r["model"]["step"] == 7


def test_a_run_folder_of_either_layout_is_a_model(photo_dir, eval_tiny_checkpoint, tmp_path):
    import shutil

    shutil.copytree(eval_tiny_checkpoint, tmp_path / "run" / "checkpoint_step0000007")
    shutil.copytree(eval_tiny_checkpoint, tmp_path / "old" / "checkpoints" / "step_0000007")
    for run in ("run", "old"):
        r = E.evaluate(
            str(tmp_path / run), photo_dir, out_dir=tmp_path / f"out-{run}", methods=[], max_tiles=2, sample_tiles=0
        )
        assert r["model"]["step"] == 7 and r["tiles"] == 2


def test_cli_glue_prints_the_table(photo_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    args = parser.parse_args(
        [
            "--data",
            photo_dir,
            "--out",
            str(tmp_path),
            "--model",
            "none",
            "--methods",
            "mean_fill,biharmonic",
            "--max-tiles",
            "3",
        ]
    )
    assert E.run_from_args(args) == 0
    out = capsys.readouterr().out
    assert LABELS["mean_fill"] in out and LABELS["biharmonic"] in out and LABELS["telea"] not in out
    assert "Paris StreetView" in out and str(tmp_path / "report.md") in out
    assert parser.parse_args(["--data", "x"]).model == "default"  # --model omitted: the model ce-ray ships
