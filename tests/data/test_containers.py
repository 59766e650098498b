"""The corpus container readers on small containers the tests build (tests/fake_packages.py)."""

import io

import fake_packages as F
import numpy as np
import pytest
from PIL import Image

from ce_ray.data import containers as K


@pytest.mark.parametrize("version", [1, 2, 3])
def test_rcc_reads_tree_plain_and_zlib_entries(version):
    files = {
        "/gcompris/src/activities/erase/resource/a.webp": b"A" * 100,
        "/gcompris/src/activities/erase/resource/README": b"hello " * 50,
        "/gcompris/src/activities/other/b.png": b"\x89PNG" + bytes(range(200)),
    }
    blob = F.rcc(files, version=version, compress=("/gcompris/src/activities/erase/resource/README",))
    assert K.read_rcc(blob) == files


def test_rcc_rejects_bad_magic_truncation_and_unknown_versions():
    with pytest.raises(K.ContainerError, match="qres"):
        K.read_rcc(b"nope" + b"\0" * 40)
    good = F.rcc({"/a/b.bin": b"x" * 64})
    with pytest.raises(K.ContainerError):
        K.read_rcc(good[:40])
    with pytest.raises(K.ContainerError, match="version 9"):
        K.read_rcc(b"qres" + (9).to_bytes(4, "big") + good[8:])


def test_deb_files_streams_the_data_archive_and_filters():
    files = {
        "usr/share/x/a.jpg": b"jpeg",
        "usr/share/doc/fake/copyright": b"Files: *\nLicense: MIT\n",
        "usr/bin/tool": b"\x7fELF",
    }
    blob = F.deb(files)
    assert K.deb_files(blob) == files
    assert K.deb_files(blob, lambda p: p.endswith(".jpg")) == {"usr/share/x/a.jpg": b"jpeg"}
    with pytest.raises(K.ContainerError, match="ar archive"):
        K.deb_files(b"PK\x03\x04 a zip")
    with pytest.raises(K.ContainerError, match="truncated"):
        K.deb_files(blob[:-30])


def test_wheel_files():
    blob = F.wheel({"pkg/a.jpg": b"1", "pkg-1.0.dist-info/LICENSE": b"MIT"})
    assert K.wheel_files(blob, lambda p: "LICENSE" in p) == {"pkg-1.0.dist-info/LICENSE": b"MIT"}
    with pytest.raises(K.ContainerError):
        K.wheel_files(b"not a zip")


def test_jigzo_photo_is_the_last_jpeg_cropped_to_the_image_line():
    pic = F.photo(1, (150, 110))
    blob = F.pzl(pic, (0, 0, 150, 110))
    out = K.jigzo_photo(blob)
    assert out.size == (150, 110)
    # JPEG twice (canvas + ours) moves pixels a little; a wrong crop or the texture would be far off.
    err = np.abs(np.asarray(out, np.float32) - np.asarray(pic, np.float32)).mean()
    assert err < 6
    with pytest.raises(K.ContainerError, match="PzlF"):
        K.jigzo_photo(b"JFIF...")
    with pytest.raises(K.ContainerError, match="image x y w h"):
        K.jigzo_photo(b"PzlF\n0.1\nno image line\n" + F.encode(pic))


def test_kphotoalbum_angles_and_lossless_rotation():
    xml = (
        '<?xml version="1.0"?><KPhotoAlbum><images>'
        '<image file="a.jpg" angle="90"/><image file="b.jpg" angle="0"/><image file="c.jpg"/>'
        '<image file="d.jpg" angle="270"/></images></KPhotoAlbum>'
    )
    assert K.kphotoalbum_angles(xml) == {"a.jpg": 90, "d.jpg": 270}
    with pytest.raises(K.ContainerError):
        K.kphotoalbum_angles("<not xml")
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)  # [[0 1 2] [3 4 5]]
    cw = np.asarray(K.rotate_clockwise(Image.fromarray(a), 90))
    assert cw.tolist() == [[3, 0], [4, 1], [5, 2]]  # clockwise: the left column becomes the top row
    assert np.asarray(K.rotate_clockwise(Image.fromarray(a), 180)).tolist() == [[5, 4, 3], [2, 1, 0]]
    assert np.asarray(K.rotate_clockwise(Image.fromarray(a), 270)).tolist() == [[2, 5], [1, 4], [0, 3]]


def test_dep5_last_matching_stanza_wins_and_matches_converted_images():
    text = (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: someone\nLicense: GPL-3+\n\n"
        "Files: src/activities/erase/resource/*\n       src/activities/x/y.jpg\nCopyright: c\nLicense: CC-BY-SA-4.0\n\n"
        "Files: src/activities/erase/resource/penguin.png\nCopyright: p\nLicense: CC-BY-NC-SA-1.0\n text of it\n"
    )
    st = K.parse_dep5(text)
    assert [s.licence for s in st] == ["GPL-3+", "CC-BY-SA-4.0", "CC-BY-NC-SA-1.0"]
    assert K.dep5_licence(st, "src/activities/erase/resource/gorilla.webp") == "CC-BY-SA-4.0"
    assert K.dep5_licence(st, "src/activities/erase/resource/penguin.webp") == "CC-BY-NC-SA-1.0"  # .png in the file
    assert K.dep5_licence(st, "src/activities/x/y.webp") == "CC-BY-SA-4.0"
    assert K.dep5_licence(st, "elsewhere/z.png") == "GPL-3+"
    assert K.parse_dep5("free-form copyright text\nwith no fields") == []


def test_deb_of_real_layout_round_trips_an_image():
    pic = F.encode(F.photo(3))
    blob = F.deb({"usr/share/a/p.jpg": pic})
    got = K.deb_files(blob)["usr/share/a/p.jpg"]
    assert Image.open(io.BytesIO(got)).size == (320, 288)
