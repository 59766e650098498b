"""The bundled photos: 12 real RGB photographs inside installed PyPI wheels, the default dataset.

They ship with scikit-image, scikit-learn and sporco, under those packages' licences.

Nothing is downloaded: the files are read from the installed packages' folders, located without
importing the (heavy) packages themselves.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ce_ray.errors import UserError

# (package, folder inside it, file names). Only natural RGB photographs: the stereo pair's right
# view, microscopy, retina and astronomy images in the same folders are left out on purpose.
BUNDLED_SOURCES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "skimage",
        "data",
        ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"),
    ),  # public domain / CC0
    ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),  # CC-BY-2.0
    (
        "sporco",
        "data",
        ("barbara.png", "kodim23.png", "monarch.png", "sail.png", "tulips.png"),
    ),  # "freely redistributable"
)


@dataclass(frozen=True)
class BundledPhoto:
    name: str  # e.g. "skimage/astronaut"
    path: Path


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_photos() -> list[BundledPhoto]:
    """The bundled photo files that are installed here, in a fixed order."""
    found = []
    for package, folder, names in BUNDLED_SOURCES:
        root = _package_dir(package)
        if root is None:
            continue
        for name in names:
            p = root / folder / name
            if p.is_file():
                found.append(BundledPhoto(f"{package}/{Path(name).stem}", p))
    if not found:
        raise UserError(
            "no bundled photos found: install scikit-image, scikit-learn or sporco (`make install` does), "
            "or pass your own folder of photos"
        )
    return found


def load_bundled() -> list[tuple[str, np.ndarray]]:
    """[(name, (H, W, 3) uint8 RGB array)] for every bundled photo."""
    out = []
    for photo in bundled_photos():
        with Image.open(photo.path) as im:
            out.append((photo.name, np.asarray(im.convert("RGB"))))
    return out
