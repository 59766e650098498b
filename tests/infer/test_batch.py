"""`ce-ray inpaint SRC --out DST` over folders: mixed sizes and bad files, masks per image, one
mask for all, generated holes, resume, the manifest; the local loop and the Ray Data pipeline
give the same PNGs."""

import json

import numpy as np
import pytest
from PIL import Image

from ce_ray.errors import UserError
from ce_ray.infer import batch as BI


def _photo(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), np.sin(3 * (xx + yy))], -1) * 0.4 + 0.5
    return (np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_photo(1, 200, 300)).save(src / "a.png")
    Image.fromarray(_photo(2, 420, 380)).save(src / "sub" / "b.jpg", quality=95)
    Image.fromarray(_photo(3, 128, 128)).save(src / "c.png")
    (src / "notes.txt.bak").write_text("not an image")
    Image.fromarray(_photo(4, 300, 300)).save(src / "trunc.png")
    data = (src / "trunc.png").read_bytes()
    (src / "trunc.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(_photo(5, 10, 10)).save(src / "tiny.png")
    return src


def _read(p):
    return np.asarray(Image.open(p).convert("RGB"))


def test_folder_local_engine_writes_mirrored_pngs_and_lists_bad_files(folder, tmp_path, tiny_checkpoint):
    dst = tmp_path / "out"
    m = BI.run(str(folder), str(tiny_checkpoint), str(dst), engine="local", progress=False, log=lambda _: None)
    assert m["done"] == ["a.png", "c.png", "sub/b.jpg"]
    reasons = {f["key"]: f["reason"] for f in m["failed"]}
    assert set(reasons) == {"notes.txt.bak", "trunc.png", "tiny.png"}
    assert "not an image" in reasons["notes.txt.bak"] and "truncated" in reasons["trunc.png"]
    assert "16 pixels" in reasons["tiny.png"]
    assert json.loads((dst / BI.MANIFEST).read_text()) == m
    for key, out in (("a.png", "a.png"), ("sub/b.jpg", "sub/b.png"), ("c.png", "c.png")):
        src, res = _read(folder / key), _read(dst / out)
        assert src.shape == res.shape
        changed = (src != res).any(-1)
        assert changed.any()  # the default centre hole was filled...
        ys, xs = np.nonzero(changed)
        h, w = src.shape[:2]
        # ...and nothing else moved: every changed pixel lies in the centre region
        assert abs((ys.min() + ys.max()) / 2 - h / 2) < 3 and abs((xs.min() + xs.max()) / 2 - w / 2) < 3
        if key != "sub/b.jpg":  # PNG inputs: bit-identical outside the hole
            assert changed.sum() <= (h * w) * 0.25


def test_resume_skips_outputs_that_exist(folder, tmp_path, tiny_checkpoint):
    dst = tmp_path / "out"
    BI.run(str(folder), str(tiny_checkpoint), str(dst), engine="local", progress=False, log=lambda _: None)
    (dst / "a.png").unlink()
    before = (dst / "c.png").stat().st_mtime_ns
    lines = []
    m = BI.run(str(folder), str(tiny_checkpoint), str(dst), engine="local", progress=False, log=lines.append)
    assert m["done"] == ["a.png"] and m["skipped_existing"] == 2
    assert (dst / "c.png").stat().st_mtime_ns == before
    assert "2 already done" in lines[0]


def test_masks_dir_single_mask_and_generated_holes(folder, tmp_path, tiny_checkpoint):
    masks = tmp_path / "masks"
    (masks / "sub").mkdir(parents=True)
    m = np.zeros((200, 300), np.uint8)
    m[10:40, 20:90] = 255
    Image.fromarray(m).save(masks / "a.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "sub" / "b.png")  # wrong size
    out = BI.run(
        str(folder),
        str(tiny_checkpoint),
        str(tmp_path / "o1"),
        masks_dir=str(masks),
        engine="local",
        progress=False,
        log=lambda _: None,
    )
    assert out["done"] == ["a.png"]
    reasons = {f["key"]: f["reason"] for f in out["failed"]}
    assert "no mask" in reasons["c.png"] and "mask is 10x10" in reasons["sub/b.jpg"]
    res, src = _read(tmp_path / "o1" / "a.png"), _read(folder / "a.png")
    changed = (res != src).any(-1)
    assert changed[10:40, 20:90].any() and not changed[~(m > 0)].any()  # only the mask's hole moved
    # One mask for every image: only images of its size succeed.
    one = BI.run(
        str(folder),
        str(tiny_checkpoint),
        str(tmp_path / "o2"),
        mask=str(masks / "a.png"),
        engine="local",
        progress=False,
        log=lambda _: None,
    )
    assert one["done"] == ["a.png"]
    # Generated holes are seeded by the path: two runs agree, two images differ.
    g1 = BI.run(
        str(folder),
        str(tiny_checkpoint),
        str(tmp_path / "g1"),
        mask_kind="random_block",
        engine="local",
        progress=False,
        log=lambda _: None,
    )
    g2 = BI.run(
        str(folder),
        str(tiny_checkpoint),
        str(tmp_path / "g2"),
        mask_kind="random_block",
        engine="local",
        progress=False,
        log=lambda _: None,
    )
    assert g1["done"] == g2["done"] == ["a.png", "c.png", "sub/b.jpg"]
    for k in g1["done"]:
        assert np.array_equal(_read(tmp_path / "g1" / BI.output_name(k)), _read(tmp_path / "g2" / BI.output_name(k)))


def test_bad_arguments_and_nothing_done(folder, tmp_path, tiny_checkpoint):
    with pytest.raises(UserError, match="at most one"):
        BI.run(str(folder), str(tiny_checkpoint), str(tmp_path / "x"), mask="m.png", mask_kind="center")
    with pytest.raises(UserError, match="--mask-kind"):
        BI.run(str(folder), str(tiny_checkpoint), str(tmp_path / "x"), mask_kind="stars")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="nothing was inpainted.*x.png"):
        BI.run(str(bad), str(tiny_checkpoint), str(tmp_path / "y"), engine="local", progress=False, log=lambda _: None)
    assert json.loads((tmp_path / "y" / BI.MANIFEST).read_text())["failed"][0]["key"] == "x.png"


@pytest.mark.ray
def test_ray_pipeline_matches_the_local_loop(ray_session, folder, tmp_path, tiny_checkpoint):
    local = BI.run(
        str(folder), str(tiny_checkpoint), str(tmp_path / "l"), engine="local", progress=False, log=lambda _: None
    )
    ray_ = BI.run(
        str(folder),
        str(tiny_checkpoint),
        str(tmp_path / "r"),
        engine="ray",
        replicas=1,
        device="cpu",
        progress=False,
        log=lambda _: None,
    )
    assert ray_["done"] == local["done"]
    assert [f["key"] for f in ray_["failed"]] == [f["key"] for f in local["failed"]]
    for k in local["done"]:  # one torch thread per replica vs the local default: rounding may differ
        a = _read(tmp_path / "l" / BI.output_name(k)).astype(int)
        assert np.abs(a - _read(tmp_path / "r" / BI.output_name(k))).max() <= 1


def test_cli_dispatches_one_file_and_many(folder, tmp_path, tiny_checkpoint, capsys):
    from ce_ray.cli import main

    assert (
        main(["inpaint", str(folder / "a.png"), "--model", str(tiny_checkpoint), "-o", str(tmp_path / "one.png")]) == 0
    )
    assert (tmp_path / "one.png").is_file()
    assert (
        main(
            [
                "inpaint",
                str(folder / "a.png"),
                "--model",
                str(tiny_checkpoint),
                "-o",
                str(tmp_path / "rb.png"),
                "--mask-kind",
                "random_block",
            ]
        )
        == 0
    )
    assert not np.array_equal(_read(tmp_path / "one.png"), _read(tmp_path / "rb.png"))
    assert (
        main(["inpaint", str(folder), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "many"), "--local"]) == 0
    )
    assert json.loads((tmp_path / "many" / BI.MANIFEST).read_text())["done"] == ["a.png", "c.png", "sub/b.jpg"]
    import argparse

    with pytest.raises((SystemExit, argparse.ArgumentError), match="not allowed with|2"):
        main(
            [
                "inpaint",
                str(folder),
                "--model",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "m2"),
                "--mask",
                "x.png",
                "--masks",
                "d",
            ]
        )
