"""Readers for the archive and resource formats the offline photo corpus arrives in.

Debian `.deb` packages, Python wheels, Qt binary resource files (`.rcc`, GCompris), jigzo puzzles
(`.pzl`), KPhotoAlbum's `index.xml` rotations, and DEP-5 `copyright` files. Pure Python + Pillow;
no Ray.

Each reader takes bytes (or text) and returns plain values, so the tests feed it small containers
they build themselves. The formats are documented in `docs/corpus.md`.
"""

from __future__ import annotations

import fnmatch
import io
import re
import struct
import tarfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image


class ContainerError(Exception):
    """A container that does not have the structure its format promises."""


# --- Debian packages (ar archive holding control.tar.* and data.tar.*) ------------------------

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60  # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2


def ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of a Unix `ar` archive (the outer layer of a .deb)."""
    if not data.startswith(AR_MAGIC):
        raise ContainerError("not an ar archive (a .deb starts with '!<arch>')")
    pos = len(AR_MAGIC)
    while pos + AR_HEADER <= len(data):
        header = data[pos : pos + AR_HEADER]
        if header[58:60] != b"`\n":
            raise ContainerError(f"corrupt ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise ContainerError(f"corrupt ar member size at byte {pos}") from None
        start = pos + AR_HEADER
        if start + size > len(data):
            raise ContainerError(f"ar member {name!r} is truncated")
        yield name, data[start : start + size]
        pos = start + size + (size & 1)  # members are 2-byte aligned


def deb_files(data: bytes, want: Callable[[str], bool] = lambda _path: True) -> dict[str, bytes]:
    """The regular files of a .deb's data archive for which `want(path)` is true, keyed by path
    without the leading './' ('usr/share/...'). data.tar.{xz,gz,bz2} and uncompressed tar are
    read by the standard library; data.tar.zst needs the `zstandard` package."""
    for name, payload in ar_members(data):
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise ContainerError("this .deb's data is zstd-compressed; pip install zstandard to read it") from None
            payload = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)).read()
        try:
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
                out = {}
                for m in tar:  # streaming: a 300 MB package never sits in memory whole
                    name = m.name.removeprefix("./")
                    if m.isfile() and want(name):
                        member = tar.extractfile(m)
                        if member is None:  # never for a regular file; tarfile's signature allows it
                            raise ContainerError(f"cannot read {name} from the .deb's data")
                        out[name] = member.read()
                return out
        except tarfile.TarError as e:
            raise ContainerError(f"cannot read {name}: {e}") from None
    raise ContainerError("no data.tar.* member in this .deb")


def wheel_files(data: bytes, want: Callable[[str], bool] = lambda _path: True) -> dict[str, bytes]:
    """The files of a wheel (a zip) for which `want(path)` is true, keyed by their path inside."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return {i.filename: z.read(i) for i in z.infolist() if not i.is_dir() and want(i.filename)}
    except zipfile.BadZipFile as e:
        raise ContainerError(f"not a wheel (zip): {e}") from None


# --- Qt binary resources (.rcc) ---------------------------------------------------------------

RCC_MAGIC = b"qres"
RCC_DIRECTORY, RCC_ZLIB, RCC_ZSTD = 2, 1, 4  # entry flags


def read_rcc(data: bytes) -> dict[str, bytes]:
    """Files of a Qt binary resource file: {'/path/inside': bytes}, decompressed.

    Layout (Qt's rcc, format versions 1-3): 'qres', then big-endian u32 version, tree offset,
    data offset, names offset. Tree entries are 14 bytes (22 from version 2, which appends a
    u64 modification time): u32 name offset, u16 flags, then u32 child count + u32 first child
    index for a directory, or u16 country + u16 language + u32 data offset for a file. A name is
    u16 length, u32 hash, UTF-16BE characters. File data is a u32 size then the bytes; a zlib
    entry's bytes start with its u32 uncompressed size (qCompress)."""
    if not data.startswith(RCC_MAGIC) or len(data) < 20:
        raise ContainerError("not a Qt resource file (no 'qres' header)")
    version, tree, payloads, names = struct.unpack(">4I", data[4:20])
    if version > 3:
        raise ContainerError(f"Qt resource format version {version} is newer than this reader knows (1-3)")
    entry = 22 if version >= 2 else 14

    def unpack(fmt: str, at: int) -> tuple[Any, ...]:
        end = at + struct.calcsize(fmt)
        if at < 0 or end > len(data):
            raise ContainerError(f"offset {at} outside the {len(data)}-byte file")
        return struct.unpack(fmt, data[at:end])

    def name_at(offset: int) -> str:
        (n,) = unpack(">H", names + offset)
        start = names + offset + 6  # skip the u16 length and the u32 hash
        return data[start : start + 2 * n].decode("utf-16-be", "replace")

    out: dict[str, bytes] = {}
    seen: set[int] = set()
    stack = [(0, "")]
    while stack:
        index, path = stack.pop()
        if index in seen:
            raise ContainerError("the resource tree has a cycle")
        seen.add(index)
        at = tree + index * entry
        name_off, flags = unpack(">IH", at)
        here = path if index == 0 else f"{path}/{name_at(name_off)}"
        if flags & RCC_DIRECTORY:
            count, first = unpack(">II", at + 6)
            stack += [(c, here) for c in range(first + count - 1, first - 1, -1)]
            continue
        (offset,) = unpack(">I", at + 10)
        (size,) = unpack(">I", payloads + offset)
        start = payloads + offset + 4
        blob = data[start : start + size]
        if len(blob) != size:
            raise ContainerError(f"resource {here!r} is truncated")
        if flags & RCC_ZLIB:
            try:
                blob = zlib.decompress(blob[4:])
            except zlib.error as e:
                raise ContainerError(f"resource {here!r}: bad zlib data: {e}") from None
        elif flags & RCC_ZSTD:
            try:
                import zstandard
            except ImportError:
                raise ContainerError(
                    f"resource {here!r} is zstd-compressed; pip install zstandard to read it"
                ) from None
            blob = zstandard.ZstdDecompressor().decompress(blob)
        out[here] = blob
    return out


# --- jigzo puzzles (.pzl) ---------------------------------------------------------------------

_JPEG_SOI = b"\xff\xd8\xff"
_PZL_IMAGE = re.compile(rb"^image\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", re.MULTILINE)


def jigzo_photo(data: bytes) -> Image.Image:
    """The photo inside a jigzo puzzle: a text header (whose `image x y w h` line places the
    picture), piece-texture JPEGs, and last the full picture as a JPEG padded to a power-of-two
    texture. Returns that JPEG cropped to x, y, w, h (a loaded RGB image)."""
    if not data.startswith(b"PzlF"):
        raise ContainerError("not a jigzo puzzle (no 'PzlF' header)")
    first = data.find(_JPEG_SOI)
    m = _PZL_IMAGE.search(data[: first if first >= 0 else len(data)])
    if m is None:
        raise ContainerError("puzzle header has no 'image x y w h' line")
    x, y, w, h = (int(v) for v in m.groups())
    starts = [s.start() for s in re.finditer(re.escape(_JPEG_SOI), data)]
    # From the end: the last JPEG that holds the whole box (a thumbnail embedded in its EXIF
    # would start later but is too small, so it is passed over).
    for s in reversed(starts):
        try:
            im = Image.open(io.BytesIO(data[s:]))
            if im.width >= x + w and im.height >= y + h:
                im.load()
                return im.convert("RGB").crop((x, y, x + w, y + h))
        except Exception:  # not a decodable JPEG at this marker: try the one before
            continue
    raise ContainerError(f"no embedded JPEG holds the {w}x{h} picture at ({x}, {y})")


# --- KPhotoAlbum --------------------------------------------------------------------------------


def kphotoalbum_angles(xml_text: str) -> dict[str, int]:
    """{file name: clockwise rotation in degrees} from a KPhotoAlbum `index.xml`, for the images
    whose `angle` attribute is not 0. The photos themselves are stored unrotated."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise ContainerError(f"index.xml is not valid XML: {e}") from None
    out = {}
    for im in root.iter("image"):
        angle = int(im.get("angle", "0") or 0) % 360
        if angle:
            if angle % 90:
                raise ContainerError(f"{im.get('file')}: rotation {angle} is not a multiple of 90")
            out[im.get("file", "")] = angle
    return out


def rotate_clockwise(im: Image.Image, angle: int) -> Image.Image:
    """Rotate by a multiple of 90 degrees clockwise, losslessly (a pixel transpose)."""
    ops = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
    return im.transpose(ops[angle % 360]) if angle % 360 else im


# --- DEP-5 copyright files ----------------------------------------------------------------------


@dataclass(frozen=True)
class CopyrightStanza:
    patterns: tuple[str, ...]
    licence: str


def parse_dep5(text: str) -> list[CopyrightStanza]:
    """The `Files:` stanzas of a machine-readable Debian copyright file, in file order. Free-form
    copyright files (no `Files:` fields) give an empty list."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, list[str]] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key].append(line.strip())
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = [value.strip()]
        if "files" in fields and "license" in fields:
            patterns = tuple(p for part in fields["files"] for p in part.split())
            stanzas.append(CopyrightStanza(patterns, fields["license"][0]))
    return stanzas


def dep5_licence(stanzas: list[CopyrightStanza], path: str) -> str | None:
    """The licence DEP-5 assigns to `path` (relative to the source tree): the last stanza whose
    pattern matches wins (the DEP-5 rule; `*` also matches '/'). Resource compilers sometimes
    convert images (GCompris ships .webp built from .jpg / .png / .svg), so a pattern naming the
    same file with another extension also matches."""
    stem = path.rsplit(".", 1)[0]
    found = None
    for s in stanzas:
        for p in s.patterns:
            if fnmatch.fnmatchcase(path, p) or (p.rsplit(".", 1)[0] == stem and "*" not in p):
                found = s.licence
                break
    return found
