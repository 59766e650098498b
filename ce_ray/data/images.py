"""Image files in and out, one set of colour rules for every entry point: decode to RGB, encode PNG.

prepare (ingest), crops (training and validation), evaluation, `ce-ray inpaint`, Serve and batch
inpainting all decode through `open_image` + `to_rgb8` here, so one photo is the same RGB array
wherever it enters:
- the pixel count is checked from the header, before decoding (a decompression bomb is refused);
- EXIF orientation is applied (phones store photos sideways; browsers show them upright, and a
  mask painted over the displayed photo must line up);
- alpha is composited on white (transparent pixels would otherwise show whatever colour the
  encoder left there); 16-bit and 32-bit greyscale are scaled, not clipped (Pillow's own
  convert() clips them to 255, i.e. nearly all white); palette, CMYK, greyscale, YCbCr, LAB, HSV
  become RGB through Pillow.
Errors are InpaintError with a stable code (serve answers them as 4xx JSON; prepare lists them as
skipped files with the message).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ce_ray.errors import InpaintError


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow's bomb check at our limit (None: Pillow's own): it raises DecompressionBombError
    above 2x the limit and warns above 1x; the warning becomes an error here."""
    if max_pixels is None:
        yield
        return
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def open_image(
    data: bytes, max_pixels: int | None = None, what: str = "image", *, draft_shorter: int | None = None
) -> Image.Image:
    """Encoded bytes -> a fully decoded PIL image, EXIF orientation applied (any mode: a mask keeps
    its alpha). `draft_shorter`: the shorter side the caller will resize to; a JPEG stored at 2x
    that or more is then decoded by libjpeg at 1/2, 1/4 or 1/8 scale, never below that side."""
    if not data:
        raise InpaintError(f"empty_{what}", f"the {what} file is empty (0 bytes)")
    # The pixel limit is checked from the header, right after open() (which reads no pixels), so the
    # message names the size and the limit; Pillow's own bomb check still guards larger files.
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InpaintError(
            "not_an_image", f"the {what} is not an image Pillow recognises (PNG, JPEG, WebP, ...)"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InpaintError("too_many_pixels", f"the {what} is too large to decode: {e}") from None
    except Exception as e:  # a malformed header can raise almost anything
        raise InpaintError(f"truncated_{what}", f"the {what}'s header is unreadable: {type(e).__name__}: {e}") from None
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:  # formats that skip Pillow's own check
        raise InpaintError("too_many_pixels", f"the {what} is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if draft_shorter and im.format == "JPEG":
        s = draft_shorter / min(w, h)
        if s <= 0.5:
            im.draft("RGB", (int(np.ceil(w * s)), int(np.ceil(h * s))))
    try:
        im.load()
        return ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InpaintError("too_many_pixels", f"the {what} is too large to decode: {e}") from None
    except Exception as e:  # PIL's ways of saying "truncated / corrupt"
        raise InpaintError(
            f"truncated_{what}",
            f"the {what} could not be decoded (truncated or corrupt file): {type(e).__name__}: {e}",
        ) from None


def to_rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB, by the rules in the module docstring."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return np.asarray(im)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        g = np.clip(np.nan_to_num(a * scale), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))  # L, 1, P, CMYK (Adobe inversion handled by Pillow), YCbCr, LAB, HSV


def decode_rgb(
    data: bytes, max_pixels: int | None = None, what: str = "image", *, draft_shorter: int | None = None
) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB (open_image, then to_rgb8)."""
    return to_rgb8(open_image(data, max_pixels, what, draft_shorter=draft_shorter))


def encode_png(rgb: np.ndarray, fast: bool = True) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes. `fast`: zlib level 1 (~5x faster than Pillow's 6, a little
    bigger): what every response and output file uses."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1 if fast else 6)
    return buf.getvalue()
