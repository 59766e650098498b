"""inpaint.py: any-size images and any holes through 128x128 windows. Pixels outside the hole come
back bit-identical; a 128x128 crop with the centre hole is exactly the training path; bad inputs
raise InpaintError with a stable code. No Ray."""

import io

import numpy as np
import pytest
import torch
from helpers import TINY_FREEFORM
from PIL import Image

from ce_ray import cli
from ce_ray import config as C
from ce_ray.core.masks import center_hole, fill_hole, hole_from_image
from ce_ray.core.model import build_generator
from ce_ray.core.pixels import to_uint8, to_unit
from ce_ray.core.step import predict
from ce_ray.data import images
from ce_ray.data.bundled import load_bundled
from ce_ray.data.crops import resize_shorter
from ce_ray.infer import planner as I
from ce_ray.infer.resolve import LoadedGenerator, load_generator


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_generator(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def full_loaded():
    """An untrained full-image (random-region) generator: the other variant's windows and paste."""
    torch.manual_seed(1)
    cfg = C.from_dict(
        {"model": {"bottleneck": 32, "ngf": 8, "ndf": 8, "variant": "full"}, "mask": {"kind": "random_region"}}
    )
    return LoadedGenerator(model=build_generator(cfg.model).eval(), config=cfg, step=0, metrics={}, source="untrained")


@pytest.fixture(scope="module")
def photos():
    return {name: rgb for name, rgb in load_bundled()}


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def holes_for_test(h: int, w: int) -> dict[str, np.ndarray | None]:
    """Hole shapes that exercise every path: default, near the borders, several, one needing a
    coarser window, one needing tiles, a thin line, a ragged blob."""
    out: dict[str, np.ndarray | None] = {"default": None}
    m = np.zeros((h, w), bool)
    m[0:20, 0:30] = True  # touches two edges: the window is mirrored there
    m[h - 25 : h, w - 40 : w - 3] = True
    m[h // 2 : h // 2 + 10, w // 3 : w // 3 + 12] = True
    out["borders_and_several"] = m
    m = np.zeros((h, w), bool)
    m[h // 3 : h // 3 + h // 4, w // 3 : w // 3 + w // 4] = True  # wider than a training-scale cell
    out["coarser"] = m
    m = np.zeros((h, w), bool)
    m[h // 6 : h // 6 + int(h * 0.55), w // 8 : w // 8 + int(w * 0.6)] = True  # too big for one window: tiles
    out["tiled"] = m
    m = np.zeros((h, w), bool)
    m[h // 2 : h // 2 + 6, :] = True  # a scratch across the whole photo
    out["line"] = m
    yy, xx = np.mgrid[:h, :w]
    out["blob"] = (
        (yy - h * 0.4) ** 2 / (h * 0.12) ** 2 + (xx - w * 0.6) ** 2 / (w * 0.08) ** 2 + 0.3 * np.sin(xx / 5.0)
    ) < 1
    return out


# --- The guarantee: outside the hole, nothing changes --------------------------------------------


@pytest.mark.parametrize("size", [(300, 451), (128, 128), (90, 70), (700, 1000)])
def test_pixels_outside_the_hole_are_unchanged(loaded, photos, size):
    h, w = size
    rgb = np.asarray(Image.fromarray(photos["skimage/chelsea"]).resize((w, h), Image.BICUBIC))
    for name, hole in holes_for_test(h, w).items():
        p = I.plan(loaded, rgb, hole)
        out = I.inpaint_many(loaded, [p])[0]
        assert out.shape == rgb.shape and out.dtype == np.uint8
        outside = ~p.hole
        assert np.array_equal(out[outside], rgb[outside]), name
        assert not p.unfilled.any() and p.done, f"{name}: every hole pixel is written by some window"
        # The hole really is filled by the model: not left as it was, not the mean-pixel fill.
        changed = (out[p.hole] != rgb[p.hole]).any(-1).mean()
        assert changed > 0.5, f"{name}: only {changed:.0%} of the hole changed"


def test_full_image_variant_keeps_the_outside_too(full_loaded, photos):
    rgb = photos["skimage/coffee"]
    for name, hole in holes_for_test(*rgb.shape[:2]).items():
        p = I.plan(full_loaded, rgb, hole)
        out = I.inpaint_many(full_loaded, [p])[0]
        assert np.array_equal(out[~p.hole], rgb[~p.hole]), name
        assert p.done, name


# --- Windows: the training geometry --------------------------------------------------------------


def test_a_128_crop_with_the_default_hole_is_exactly_the_training_path(loaded, photos):
    """No resampling, the centre hole [36:92], the model's output pasted in: what step.predict does."""
    cfg = loaded.config
    crop = resize_shorter(photos["skimage/astronaut"], cfg.data.load_size)[100:228, 120:248]
    out = I.inpaint_image(loaded, crop)
    hole = torch.from_numpy(center_hole(128, cfg.mask.overlap))
    expect = to_uint8(
        predict(loaded.model, torch.from_numpy(to_unit(crop))[None], hole[None, None].float(), cfg)[0].numpy()
    )
    assert np.array_equal(out, expect)
    assert np.array_equal(I.default_hole(128, 128, I.Geometry.of(cfg)), center_hole(128, cfg.mask.overlap))


def test_default_hole_is_one_training_scale_window_interior(loaded):
    geo = I.Geometry.of(loaded.config)
    hole = I.default_hole(700, 1050, geo)  # shorter side 2x the training scale: a 112 px square
    ys, xs = np.nonzero(hole)
    assert ys.max() - ys.min() + 1 == 112 and xs.max() - xs.min() + 1 == 112
    assert abs((ys.min() + ys.max()) / 2 - 350) <= 1 and abs((xs.min() + xs.max()) / 2 - 525) <= 1
    p = I.plan(loaded, np.zeros((700, 1050, 3), np.uint8), None)
    assert len(p.windows) == 1 and p.windows[0].side == 256  # 128 model px = 256 image px at that scale


def test_windows_hold_their_cells_in_the_interior(loaded, photos):
    """Each window's cell lies inside its interior (the part the model fills), so every pixel a
    window writes was predicted, not copied from context; sizes respect the downscale limit."""
    geo = I.Geometry.of(loaded.config)
    rgb = photos["skimage/rocket"]
    h, w = rgb.shape[:2]
    base = geo.base_side(h, w)
    for name, hole in holes_for_test(h, w).items():
        p = I.plan(loaded, rgb, hole)
        for win in p.windows:
            a, b = (v * win.side / geo.size for v in geo.interior)
            y0, y1, x0, x1 = win.cell
            assert win.top + a <= y0 and y1 <= win.top + b and win.left + a <= x0 and x1 <= win.left + b, (name, win)
            assert base - 1 <= win.side <= base * I.MAX_DOWNSCALE + 1, (name, win.side, base)
        assert sum(win.count for win in p.windows) == p.hole.sum(), f"{name}: each hole pixel belongs to one window"


def test_large_holes_are_filled_from_the_border_inward(loaded, photos):
    rgb = photos["skimage/astronaut"]
    hole = np.zeros(rgb.shape[:2], bool)
    hole[60:460, 80:330] = True  # 400x250: a 3x2 grid of tiles at the 2x scale limit
    p = I.plan(loaded, rgb, hole)
    assert len(p.windows) > 1
    rounds = []
    while not p.done:
        chosen = p.next_round()
        rounds.append(chosen)
        for i in chosen:  # paste something: the schedule only depends on which pixels are filled
            p.paste(i, np.zeros((3, 128, 128), np.float32))
    assert len(rounds) > 1 and sorted(i for r in rounds for i in r) == list(range(len(p.windows)))
    for r in rounds:  # windows of one round never see each other's cells
        assert all(not I._touches(p.windows[i], p.windows[j]) for i in r for j in r if i < j)


def test_batching_several_images_matches_one_at_a_time(loaded, photos):
    imgs = [photos["skimage/chelsea"], photos["skimage/coffee"], photos["sklearn/flower"]]
    holes = [
        None,
        holes_for_test(*imgs[1].shape[:2])["borders_and_several"],
        holes_for_test(*imgs[2].shape[:2])["tiled"],
    ]
    together = I.inpaint_many(loaded, [I.plan(loaded, x, m) for x, m in zip(imgs, holes)])
    for x, m, t in zip(imgs, holes, together):
        alone = I.inpaint_image(loaded, x, m)
        # BatchNorm is in eval mode, so batch composition cannot matter beyond float summation order.
        assert np.abs(alone.astype(int) - t.astype(int)).max() <= 1


def test_the_trained_model_beats_the_mean_fill_on_held_out_photos(loaded, photos):
    """The tiny checkpoint trained for 60 steps (conftest) already fills the centre better than the
    mean pixel the hole starts as: the windows feed it what it was trained on."""
    cfg = loaded.config
    errs_model, errs_fill = [], []
    for name in ("sporco/sail", "sporco/tulips"):  # the fixture trains on the other photos only
        rgb = resize_shorter(photos[name], cfg.data.load_size)
        hole = I.default_hole(*rgb.shape[:2], I.Geometry.of(cfg))
        out = I.inpaint_image(loaded, rgb, hole).astype(float)
        fill = to_uint8(fill_hole(torch.from_numpy(to_unit(rgb))[None], torch.from_numpy(hole))[0].numpy()).astype(
            float
        )
        errs_model.append(np.mean((out[hole] - rgb[hole]) ** 2))
        errs_fill.append(np.mean((fill[hole] - rgb[hole]) ** 2))
    assert np.mean(errs_model) < np.mean(errs_fill)


# --- Bad input --------------------------------------------------------------------------------


def test_bad_masks_name_the_problem(loaded, photos):
    rgb = photos["skimage/chelsea"]
    h, w = rgb.shape[:2]
    cases = {
        "mask_size_mismatch": np.ones((h, w + 1), bool),
        "empty_mask": np.zeros((h, w), bool),
        "all_white_mask": np.ones((h, w), bool),
        "hole_too_large": np.arange(h * w).reshape(h, w) < 0.6 * h * w,
    }
    for code, hole in cases.items():
        with pytest.raises(I.InpaintError) as e:
            I.plan(loaded, rgb, hole)
        assert e.value.code == code
    with pytest.raises(I.InpaintError, match="at least 16 pixels") as e:
        I.plan(loaded, np.zeros((12, 200, 3), np.uint8), None)
    assert e.value.code == "image_too_small"


def test_too_many_scattered_holes_are_refused(loaded):
    rgb = np.full((2000, 2000, 3), 128, np.uint8)
    hole = np.zeros((2000, 2000), bool)
    hole[50::100, 50::100] = True  # 400 specks, farther apart than the merge gap
    with pytest.raises(I.InpaintError) as e:
        I.plan(loaded, rgb, hole)
    assert e.value.code == "mask_too_complex" and str(I.MAX_WINDOWS) in str(e.value)


def test_read_image_rejects_bad_files(photos):
    png = png_bytes(photos["skimage/chelsea"])
    buf = io.BytesIO()
    Image.fromarray(photos["skimage/chelsea"]).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    assert images.to_rgb8(images.open_image(jpeg)).shape == (300, 451, 3)
    for data, code in [
        (b"", "empty_image"),
        (b"GIF89a no", "not_an_image"),
        (b"hello world", "not_an_image"),
        (png[: len(png) // 2], "truncated_image"),
        (jpeg[: len(jpeg) // 2], "truncated_image"),
    ]:
        with pytest.raises(I.InpaintError) as e:
            images.open_image(data)
        assert e.value.code == code, (data[:10], e.value.code)
    with pytest.raises(I.InpaintError, match="135300 pixels; the limit is 100000") as e:
        images.open_image(png, max_pixels=100_000)
    assert e.value.code == "too_many_pixels"


def test_read_image_applies_exif_orientation():
    """Browsers show a JPEG rotated by its EXIF tag; the mask painted over it must line up."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = 255
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    assert images.to_rgb8(images.open_image(buf.getvalue())).shape == (60, 40, 3)


def test_mask_images_white_is_hole():
    m = np.zeros((10, 12, 4), np.uint8)
    m[2:5, 3:7] = (255, 255, 255, 255)  # white, opaque: hole
    m[6:8, 1:3] = (255, 255, 255, 0)  # white but transparent: not hole
    m[8, 8] = (100, 100, 100, 255)  # dark grey: not hole
    hole = hole_from_image(Image.fromarray(m, "RGBA"))
    expect = np.zeros((10, 12), bool)
    expect[2:5, 3:7] = True
    assert np.array_equal(hole, expect)
    with pytest.raises(I.InpaintError, match="the mask is 12x10 but the image is 13x10"):
        hole_from_image(Image.fromarray(m, "RGBA"), (10, 13))


# --- ce-ray inpaint ------------------------------------------------------------------------------


def test_cli_takes_a_run_folder_of_either_layout(tiny_checkpoint, tmp_path):
    """--model may name a run folder: Ray Train's / --local's <run>/checkpoint_stepN/, or an older
    --local run's <run>/checkpoints/step_N/ (its checkpoint folder works too)."""
    import shutil

    rgb = np.asarray(Image.new("RGB", (160, 128), (90, 120, 150)))
    (tmp_path / "in.png").write_bytes(png_bytes(rgb))
    shutil.copytree(tiny_checkpoint, tmp_path / "run" / "checkpoint_step0000060")
    shutil.copytree(tiny_checkpoint, tmp_path / "old" / "checkpoints" / "step_0000060")
    for model in ("run", "old", "old/checkpoints/step_0000060"):
        out = tmp_path / f"{model.replace('/', '_')}.png"
        assert cli.main(["inpaint", str(tmp_path / "in.png"), "--model", str(tmp_path / model), "-o", str(out)]) == 0
        assert np.asarray(Image.open(out)).shape == rgb.shape


def test_cli_inpaints_a_file(tiny_checkpoint, photos, tmp_path, capsys):
    rgb = photos["skimage/coffee"]
    (tmp_path / "in.png").write_bytes(png_bytes(rgb))
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[100:180, 200:300] = 255
    (tmp_path / "mask.png").write_bytes(png_bytes(mask))
    assert (
        cli.main(
            [
                "inpaint",
                str(tmp_path / "in.png"),
                "--mask",
                str(tmp_path / "mask.png"),
                "--model",
                str(tiny_checkpoint),
                "-o",
                str(tmp_path / "out.png"),
            ]
        )
        == 0
    )
    out = np.asarray(Image.open(tmp_path / "out.png"))
    hole = mask > 127
    assert np.array_equal(out[~hole], rgb[~hole]) and (out[hole] != rgb[hole]).any()
    # Default hole (no --mask) works too.
    assert (
        cli.main(["inpaint", str(tmp_path / "in.png"), "--model", str(tiny_checkpoint), "-o", str(tmp_path / "c.png")])
        == 0
    )
    # A user error is one line and exit code 2, no traceback.
    (tmp_path / "small.png").write_bytes(png_bytes(mask[:50, :50]))
    assert (
        cli.main(
            [
                "inpaint",
                str(tmp_path / "in.png"),
                "--mask",
                str(tmp_path / "small.png"),
                "--model",
                str(tiny_checkpoint),
                "-o",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "the mask is 50x50 but the image is 600x400" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# --- Full-image models: the whole photo, every known pixel kept, a correction of the fill -------


@pytest.fixture(scope="module")
def freeform_loaded():
    """An untrained free-form generator as the recipe builds it (residual over the harmonic fill,
    zero-initialised last layer, mask input, skips): its correction is exactly 0."""
    torch.manual_seed(2)
    cfg = C.from_dict({**TINY_FREEFORM, "data": {"load_size": 320, "scale_jitter": 0.6}})
    return LoadedGenerator(model=build_generator(cfg.model).eval(), config=cfg, step=0, metrics={}, source="untrained")


def test_untrained_residual_model_returns_the_exact_harmonic_fill_at_the_photo_resolution(freeform_loaded, photos):
    """The starting point of a free-form model is the harmonic fill at the photo's own pixels, at
    every scale the planner picks: a thin stroke is never filled worse than the classical fill."""
    from ce_ray.core import baselines
    from ce_ray.core.strokes import stroke_hole

    rgb = resize_shorter(photos["skimage/astronaut"], 512)[:, :600]
    for family in ("thin", "thick"):
        hole = stroke_hole(family, *rgb.shape[:2], np.random.default_rng(4))
        p = I.plan(freeform_loaded, rgb, hole)
        out = I.inpaint_many(freeform_loaded, [p])[0]
        exact = baselines.inpaint_image("harmonic", rgb, hole)
        assert np.array_equal(out[~hole], rgb[~hole])
        assert np.abs(out.astype(int) - exact.astype(int)).max() <= 1, family  # within one grey level
        assert (p.scale == 1.0) == (family == "thin"), (family, p.scale)


def test_full_scale_follows_the_hole_width(freeform_loaded):
    cfg = freeform_loaded.config
    thin = np.zeros((512, 768), bool)
    thin[100:104, 50:700] = True
    blob = np.zeros((512, 768), bool)
    blob[100:400, 200:500] = True
    assert I.full_scale(512, 768, thin, cfg) == 1.0  # as wide as what it trained on: the photo's own pixels
    s = I.full_scale(512, 768, blob, cfg)
    assert 128 / 512 <= s < 0.5  # a 300-px box: coarser, never below one window across the shorter side
    big = np.zeros((2000, 3000), bool)
    big[10:14, 10:2000] = True
    assert I.full_scale(2000, 3000, big, cfg) == pytest.approx(512 / 2000)  # never above the largest training size
    small = np.zeros((100, 150), bool)
    small[40:60, 40:60] = True
    assert I.full_scale(100, 150, small, cfg) == 1.0  # never upscaled


class _Shift(torch.nn.Module):
    """A stand-in generator whose correction is a constant: blending must return it exactly."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[:, :3] + self.value


@pytest.mark.parametrize("family", ["thin", "medium", "thick"])
def test_window_blending_has_no_seams(freeform_loaded, photos, family):
    """Overlapping windows blend their corrections with weights that sum to the same everywhere:
    a constant correction comes back constant over the whole hole, at any scale."""
    from ce_ray.core.strokes import stroke_hole

    loaded = LoadedGenerator(model=_Shift(-0.2), config=freeform_loaded.config, step=0, metrics={}, source="shift")
    # Mid-grey texture (64-192): the generator's output clamp to [-1, 1] never bites.
    rgb = (64 + (photos["skimage/coffee"][:400, :600].astype(int) // 2)).astype(np.uint8)
    rgb = resize_shorter(rgb, 512)
    hole = stroke_hole(family, *rgb.shape[:2], np.random.default_rng(5))
    p = I.plan(loaded, rgb, hole)
    out = I.inpaint_many(loaded, [p])[0].astype(int)
    expect = to_uint8((p.filled - 0.2).transpose(2, 0, 1)).astype(int)
    assert np.abs(out - expect)[hole].max() <= 1
    assert len(p.windows) >= 1 and p.done


def test_full_plan_small_image_and_mask_from_the_cli(freeform_loaded, photos, tmp_path, monkeypatch):
    """A photo smaller than a window (mirror-padded), through `ce-ray inpaint --mask` as a user runs it."""
    rgb = photos["skimage/chelsea"][:90, :100]
    hole = np.zeros(rgb.shape[:2], bool)
    hole[30:50, 20:80] = True
    out = I.inpaint_image(freeform_loaded, rgb, hole)
    assert out.shape == rgb.shape and np.array_equal(out[~hole], rgb[~hole])
