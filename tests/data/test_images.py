"""One image module: every entry point (ingest, training / validation crops, Serve / `ce-ray
inpaint`, batch inpainting, the pyfunc) turns the same file into the same RGB array."""

import io

import numpy as np
import pytest
from PIL import Image

from ce_ray.config import Config, DataConfig
from ce_ray.core.pixels import to_uint8
from ce_ray.data import crops, images, prepare
from ce_ray.errors import InpaintError

SIZE = 128  # = the load size below: no entry point resizes


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(h=SIZE, w=SIZE + 32):
    rng = np.random.default_rng(0)
    base = np.stack([*np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), np.full((h, w), 128.0)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def files() -> dict[str, bytes]:
    rgb = Image.fromarray(_photo())
    rgba = np.dstack([_photo(), np.where(np.arange(SIZE + 32) < 60, 0, 255)[None, :].repeat(SIZE, 0).astype(np.uint8)])
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    sixteen = Image.fromarray(_photo()[..., 0].astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    return {
        "rgba": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "16-bit": _encode(sixteen, "PNG"),
        "palette+transparency": _encode(palette, "PNG", transparency=3),
        "cmyk": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "greyscale": _encode(rgb.convert("L"), "PNG"),
        "exif-rotated": _encode(Image.fromarray(_photo(SIZE + 32, SIZE)), "JPEG", quality=95, exif=exif),
    }


@pytest.mark.parametrize("name", list(files()))
def test_every_entry_point_yields_the_same_rgb(name, tmp_path):
    data = files()[name]
    expect = images.decode_rgb(data)
    assert expect.dtype == np.uint8 and expect.shape == (SIZE, SIZE + 32, 3)  # EXIF applied: landscape
    # ingest (before its JPEG storage encoding)
    assert np.array_equal(prepare.ingest_pixels(data, prepare.Options(load_size=SIZE)), expect)
    # validation tiles / training crops (crops.val_samples decodes a stored photo the same way)
    cfg = Config(data=DataConfig(load_size=SIZE))
    tile = crops.val_samples(data, "k", cfg)["image"][0]
    assert np.array_equal(to_uint8(tile), expect[:, :SIZE])
    # Serve, `ce-ray inpaint FILE`, the pyfunc: open_image then to_rgb8 (the mask keeps its alpha)
    assert np.array_equal(images.to_rgb8(images.open_image(data, max_pixels=10**6)), expect)
    # batch inpainting's read stage
    from ce_ray.infer import batch

    src = tmp_path / "in.bin"
    src.write_bytes(data)
    geo = __import__("ce_ray.infer.planner", fromlist=["Geometry"]).Geometry.of(Config())
    row = batch.load_stage(batch.Item("in.bin", str(src), str(tmp_path / "o.png"), None), geo, "center", 10**7)
    assert not row["error"]
    assert np.array_equal(batch._unpack(row)[0], expect)


def test_the_colour_rules():
    f = files()
    rgba = images.decode_rgb(f["rgba"])
    assert (rgba[:, :60] == 255).all()  # transparent composites on white
    sixteen = images.decode_rgb(f["16-bit"])
    assert np.abs(sixteen[..., 0].astype(int) - _photo()[..., 0]).max() <= 1  # scaled, not clipped to white
    assert (images.decode_rgb(f["greyscale"]) == images.decode_rgb(f["greyscale"])[..., :1]).all()


def test_errors_are_coded_and_the_pixel_limit_is_checked_before_decoding():
    png = files()["greyscale"]
    for data, code in [(b"", "empty_image"), (b"hello", "not_an_image"), (png[: len(png) // 2], "truncated_image")]:
        with pytest.raises(InpaintError) as e:
            images.decode_rgb(data)
        assert e.value.code == code
    with pytest.raises(InpaintError) as e:
        images.decode_rgb(png, max_pixels=1000)
    assert e.value.code == "too_many_pixels"


def test_png_round_trip():
    rgb = _photo()
    assert np.array_equal(images.decode_rgb(images.encode_png(rgb)), rgb)
