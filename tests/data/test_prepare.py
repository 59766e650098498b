"""ce_ray/data/prepare.py: schema and counts, split stability, hostile input, atomic output, sources, CLI."""

import argparse
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ce_ray.data import prepare as prep
from ce_ray.data.images import decode_rgb as decode
from ce_ray.data.shards import IMAGE_COLUMN, KEY_COLUMN, split_of
from ce_ray.errors import UserError

MAX_PIXELS = 600_000  # the hostile folder's bombs are 1 MP (Pillow warns) and 2 MP (Pillow errors)


def _rgb(w: int, h: int, left=(200, 30, 30), right=(30, 30, 200)) -> np.ndarray:
    """Left half one colour, right half another: orientation and colour are easy to check."""
    a = np.empty((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :] = left, right
    return a


def _save(path, im: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **kw)


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_hostile(root) -> tuple[set[str], dict[str, str]]:
    """A folder with every kind of file prepare must handle: grey, palette, RGBA, CMYK, 16-bit,
    EXIF-rotated, empty, truncated, not an image, decompression bombs, too small, nested.
    Returns (keys that must be ingested, {key: reason substring})."""
    good = Image.fromarray(_rgb(200, 160))
    _save(root / "ok.jpg", good, "JPEG", quality=95)
    _save(root / "nested" / "deep" / "ok.png", good, "PNG")  # recursion
    _save(root / "gray.png", good.convert("L"), "PNG")
    _save(root / "palette.png", good.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG")
    rgba = np.zeros((160, 200, 4), np.uint8)
    rgba[:, :100] = (0, 0, 0, 0)  # fully transparent black: must come out white
    rgba[:, 100:] = (30, 30, 200, 255)
    _save(root / "rgba.png", Image.fromarray(rgba, "RGBA"), "PNG")
    _save(root / "cmyk.jpg", good.convert("CMYK"), "JPEG", quality=95)
    _save(root / "sixteen.png", Image.fromarray(np.full((160, 200), 30000, np.uint16)), "PNG")  # I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": phones store portrait photos like this
    _save(root / "rotated.jpg", Image.fromarray(_rgb(300, 200)), "JPEG", quality=95, exif=exif)

    (root / "empty.jpg").write_bytes(b"")
    png = _encoded(good, "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    jpg = _encoded(good, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "notes.jpg").write_text("not a photo, just text with a .jpg name\n")
    _save(root / "bomb_warn.png", Image.new("RGB", (1000, 1000)), "PNG")  # 1 MP > limit: Pillow warns
    _save(root / "bomb_error.png", Image.new("RGB", (2000, 1000)), "PNG")  # 2 MP > 2x limit: Pillow raises
    _save(root / "tiny.png", Image.new("RGB", (100, 100)), "PNG")
    ok = {
        "ok.jpg",
        "nested/deep/ok.png",
        "gray.png",
        "palette.png",
        "rgba.png",
        "cmyk.jpg",
        "sixteen.png",
        "rotated.jpg",
    }
    bad = {
        "empty.jpg": "empty file",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "notes.jpg": "not an image",
        "bomb_warn.png": "decompression bomb",
        "bomb_error.png": "decompression bomb",
        "tiny.png": "too small",
    }
    return ok, bad


def _rows(out) -> dict[str, dict]:
    """All shard rows of OUT by key, with the split they were found in."""
    rows = {}
    for split in ("train", "val"):
        d = os.path.join(out, split)
        for name in sorted(os.listdir(d)):
            for r in pq.read_table(os.path.join(d, name)).to_pylist():
                rows[r[KEY_COLUMN]] = {**r, "split": split}
    return rows


def test_bundled_schema_and_counts(tmp_path):
    out = tmp_path / "shards"
    m = prep.prepare("bundled", str(out), rows_per_shard=4, engine="local", progress=False)
    assert (m["ingested"], m["train"], m["val"], m["skipped"]) == (12, 9, 3, [])
    assert json.loads((out / "manifest.json").read_text()) == m
    assert (
        m["split"]["val_fraction"] == 0.1 and m["options"]["load_size"] == 350 and m["options"]["rows_per_shard"] == 4
    )
    # 9 train rows at 4 per shard -> 4 + 4 + 1; the manifest lists exactly the files on disk.
    assert m["shards"]["train"] == ["train/part-00000.parquet", "train/part-00001.parquet", "train/part-00002.parquet"]
    assert [pq.ParquetFile(out / f).metadata.num_rows for f in m["shards"]["train"]] == [4, 4, 1]
    assert sorted(os.listdir(out / "val")) == ["part-00000.parquet"]
    schema = pq.read_schema(out / "train" / "part-00000.parquet")
    assert [(f.name, str(f.type)) for f in schema] == [
        ("key", "string"),
        ("image_bytes", "binary"),
        ("source", "string"),
        ("width", "int32"),
        ("height", "int32"),
    ]
    rows = _rows(out)
    assert len(rows) == 12 and "skimage/astronaut" in rows
    for key, r in rows.items():
        assert r["split"] == split_of(key)
        rgb = decode(r[IMAGE_COLUMN])
        assert rgb.shape == (r["height"], r["width"], 3) and rgb.dtype == np.uint8
        assert min(r["width"], r["height"]) == 350  # shorter side = loadSize
        assert os.path.isfile(r["source"])
    # Rows are written sorted by key, so shard contents do not depend on listing order.
    train_keys = [k for k in pq.read_table(out / "train").column(KEY_COLUMN).to_pylist()]
    assert train_keys == sorted(train_keys)


def test_manifest_helpers_read_what_prepare_wrote(tmp_path):
    from ce_ray.data import shards

    out = tmp_path / "shards"
    m = prep.prepare("bundled", str(out), rows_per_shard=4, engine="local", progress=False)
    assert shards.has_manifest(str(out)) and shards.read_manifest(str(out)) == m == shards.read_manifest(
        "file://" + str(out)
    )
    assert m["format"] == shards.MANIFEST_FORMAT and m["columns"] == shards.SHARD_SCHEMA.names
    assert m["split"]["function"] == "ce_ray.data.shards.split_of" and m["split"]["rule"] == shards.SPLIT_RULE
    assert not shards.has_manifest(str(tmp_path))
    with pytest.raises(UserError, match="ce-ray prepare"):
        shards.read_manifest(str(tmp_path))


def test_keep_original_stores_full_size(tmp_path):
    m = prep.prepare("bundled", str(tmp_path / "o"), keep_original=True, engine="local", progress=False)
    r = _rows(tmp_path / "o")["skimage/astronaut"]
    assert (r["width"], r["height"]) == (512, 512) and m["options"]["keep_original"] is True
    # An RGB PNG without rotation is stored byte for byte: no second lossy encode.
    assert r[IMAGE_COLUMN] == open(r["source"], "rb").read()


def _photo_folder(root, n: int) -> list[str]:
    names = [f"d{i % 3}/p{i:02d}.png" for i in range(n)]
    for i, name in enumerate(names):
        _save(root / name, Image.fromarray(_rgb(160, 140, left=(i * 9 % 256, 50, 90))), "PNG")
    return names


def test_split_is_stable_and_independent_of_order(tmp_path):
    src = tmp_path / "photos"
    names = _photo_folder(src, 30)
    a = prep.prepare(str(src), str(tmp_path / "a"), engine="local", progress=False, val_fraction=0.3)
    # The same photos listed in another order, through a .txt list, must give the same split
    # and byte-identical shards.
    listing = src / "list.txt"
    listing.write_text("# reversed\n" + "\n".join(reversed(names)) + "\n")
    b = prep.prepare(str(listing), str(tmp_path / "b"), engine="local", progress=False, val_fraction=0.3)
    ra, rb = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert set(ra) == set(names) and a["skipped"] == [] and b["skipped"] == []
    assert {k: r["split"] for k, r in ra.items()} == {k: r["split"] for k, r in rb.items()}
    assert {k: r["split"] for k, r in ra.items()} == {k: split_of(k, 0.3) for k in names}
    assert 0 < a["val"] < 30 and (a["train"], a["val"]) == (b["train"], b["val"])
    for split in ("train", "val"):
        ta, tb = pq.read_table(tmp_path / "a" / split), pq.read_table(tmp_path / "b" / split)
        assert ta.column(KEY_COLUMN).equals(tb.column(KEY_COLUMN)) and ta.column(IMAGE_COLUMN).equals(
            tb.column(IMAGE_COLUMN)
        )


def test_hostile_folder_ingests_good_files_and_lists_every_bad_one(tmp_path):
    src = tmp_path / "hostile"
    ok, bad = make_hostile(src)
    m = prep.prepare(str(src), str(tmp_path / "out"), engine="local", progress=False, max_pixels=MAX_PIXELS)
    rows = _rows(tmp_path / "out")
    assert set(rows) == ok and m["ingested"] == len(ok)
    reasons = {os.path.relpath(s["path"], src): s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(bad)  # every bad file is listed once, and only those
    for name, why in bad.items():
        assert why in reasons[name], (name, reasons[name])
    assert m["inputs"] == len(ok) + len(bad)

    px = {k: decode(r[IMAGE_COLUMN]) for k, r in rows.items()}
    for k, r in rows.items():
        assert px[k].shape == (r["height"], r["width"], 3) and min(px[k].shape[:2]) == 350
    g = px["gray.png"].astype(int)
    assert np.abs(g[..., 0] - g[..., 1]).max() <= 2 and np.abs(g[..., 1] - g[..., 2]).max() <= 2
    assert abs(px["sixteen.png"].mean() - 30000 / 257) < 2  # scaled to 8 bits, not clipped to white
    rgba = px["rgba.png"]
    assert rgba[:, :150].min() >= 245  # transparent half composited on white
    assert rgba[:, -150:, 2].mean() > 180 and rgba[:, -150:, 0].mean() < 60
    for k in ("cmyk.jpg", "palette.png", "ok.jpg"):
        left = px[k][:, :150].reshape(-1, 3).mean(0)
        assert left[0] > 170 and left[1] < 70 and left[2] < 70, (k, left)  # the red half stays red
    # EXIF orientation 6 applied: 300x200 stored -> 200x300 upright -> 350x525; the stored left
    # (red) half is now on top.
    r = rows["rotated.jpg"]
    assert (r["width"], r["height"]) == (350, 525)
    top, bottom = px["rotated.jpg"][:200].reshape(-1, 3).mean(0), px["rotated.jpg"][-200:].reshape(-1, 3).mean(0)
    assert top[0] > 170 and top[2] < 70 and bottom[2] > 170 and bottom[0] < 70


def test_nothing_ingested_is_a_user_error_and_writes_nothing(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"")
    (src / "b.txt").write_text("hello")
    with pytest.raises(UserError, match="no images ingested"):
        prep.prepare(str(src), str(tmp_path / "out"), engine="local", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad"]
    with pytest.raises(UserError, match="not found"):
        prep.prepare(str(tmp_path / "missing"), str(tmp_path / "out2"), engine="local", progress=False)


def test_existing_out_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    prep.prepare("bundled", str(out), engine="local", progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        prep.prepare("bundled", str(out), engine="local", progress=False)
    m = prep.prepare("bundled", str(out), engine="local", progress=False, rows_per_shard=5, overwrite=True)
    assert (
        json.loads((out / "manifest.json").read_text())["options"]["rows_per_shard"]
        == 5
        == m["options"]["rows_per_shard"]
    )
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or trash folders left beside it
    # --overwrite never deletes a folder that prepare did not write.
    mine = tmp_path / "my_photos"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not a ce-ray shard folder"):
        prep.prepare("bundled", str(mine), engine="local", progress=False, overwrite=True)
    assert (mine / "keep.txt").read_text() == "precious"


def test_failure_midway_leaves_no_partial_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_flush = prep._ShardWriter.flush
    calls = []

    def flaky_flush(self):
        calls.append(1)
        if len(calls) == 2:  # one shard is on disk in the temp folder when this "crash" happens
            raise RuntimeError("disk full")
        real_flush(self)

    monkeypatch.setattr(prep._ShardWriter, "flush", flaky_flush)
    with pytest.raises(RuntimeError, match="disk full"):
        prep.prepare("bundled", str(out), rows_per_shard=2, engine="local", progress=False)
    assert os.listdir(tmp_path) == []
    # Same with an existing OUT and --overwrite: the old dataset survives untouched.
    monkeypatch.setattr(prep._ShardWriter, "flush", real_flush)
    prep.prepare("bundled", str(out), engine="local", progress=False)
    before = (out / "manifest.json").read_text()
    calls.clear()
    monkeypatch.setattr(prep._ShardWriter, "flush", flaky_flush)
    with pytest.raises(RuntimeError):
        prep.prepare("bundled", str(out), rows_per_shard=2, engine="local", progress=False, overwrite=True)
    assert (out / "manifest.json").read_text() == before and os.listdir(tmp_path) == ["out"]


def test_killed_run_temp_folder_is_swept(tmp_path):
    """A SIGKILLed run leaves only a hidden temp folder; the next run removes it (its pid is dead)."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f".out.partial-{os.uname().nodename}-{dead}-deadbeef"
    (stale / "train").mkdir(parents=True)
    prep.prepare("bundled", str(tmp_path / "out"), engine="local", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_sources_glob_list_uri_single_file_and_out_inside_src(tmp_path):
    src = tmp_path / "photos"
    names = _photo_folder(src, 6)
    (src / "notes.md").write_text("# not a photo")
    # Glob: keys relative to the part before the first wildcard.
    m = prep.prepare(str(src) + "/**/*.png", str(tmp_path / "g"), engine="local", progress=False)
    assert set(_rows(tmp_path / "g")) == set(names) and m["skipped"] == []
    # file:// URI of the folder: same keys as the plain path (and the .md file is reported).
    m = prep.prepare("file://" + str(src), str(tmp_path / "u"), engine="local", progress=False)
    assert set(_rows(tmp_path / "u")) == set(names)
    assert [os.path.basename(s["path"]) for s in m["skipped"]] == ["notes.md"] and "not an image" in m["skipped"][0][
        "reason"
    ]
    # A .txt list: relative entries resolve against its folder; absolute ones are kept as keys;
    # duplicates and missing files are reported, not fatal.
    absolute = str(src / names[1])
    (tmp_path / "list.txt").write_text(
        f"photos/{names[0]}\n\n# comment\n./photos/{names[0]}\n{absolute}\nphotos/nope.png\n"
    )
    m = prep.prepare(str(tmp_path / "list.txt"), str(tmp_path / "l"), engine="local", progress=False)
    assert set(_rows(tmp_path / "l")) == {f"photos/{names[0]}", absolute}
    why = sorted(s["reason"].split(":")[0] for s in m["skipped"])
    assert len(why) == 2 and why[0] == "cannot read" and why[1].startswith("duplicate entry")
    # One file.
    prep.prepare(str(src / names[2]), str(tmp_path / "one"), engine="local", progress=False)
    assert set(_rows(tmp_path / "one")) == {os.path.basename(names[2])}
    # OUT inside SRC: a re-run with --overwrite must not ingest its own shards.
    prep.prepare(str(src), str(src / "shards"), engine="local", progress=False)
    m = prep.prepare(str(src), str(src / "shards"), engine="local", progress=False, overwrite=True)
    assert m["ingested"] == 6 and [os.path.basename(s["path"]) for s in m["skipped"]] == ["notes.md"]
    with pytest.raises(UserError, match="outside the photo folder"):
        prep.prepare(str(src), str(src), engine="local", progress=False, overwrite=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"rows_per_shard": 0}, "--rows-per-shard"),
        ({"engine": "spark"}, "--engine"),
        ({"load_size": 100}, "--load-size"),
        ({"max_pixels": 10}, "--max-pixels"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        prep.prepare("bundled", str(tmp_path / "o"), progress=False, **{"engine": "local", **kwargs})


def test_cli_arguments_and_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    args = parser.parse_args(
        [
            "bundled",
            "--out",
            str(tmp_path / "o"),
            "--engine",
            "local",
            "--rows-per-shard",
            "3",
            "--val-fraction",
            "0.25",
            "--max-pixels",
            "50000000",
            "--keep-original",
        ]
    )
    assert prep.run_from_args(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("prepared 12 photos") and "manifest.json" in line and "\n" not in line
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["options"] == {
        "load_size": 350,
        "min_size": 128,
        "keep_original": True,
        "max_pixels": 50_000_000,
        "val_fraction": 0.25,
        "rows_per_shard": 3,
        "engine": "local",
        "train_licences": "all",
    }
    assert parser.parse_args(["--out", "x"]).src == "bundled" and parser.parse_args(["--out", "x"]).overwrite is False
    with pytest.raises(SystemExit):
        parser.parse_args(["bundled"])  # --out is required


# Every module that must work where Ray is absent (and that the Ray-facing ones import): importing
# them never imports Ray. export is a later addition: checked when it is there.
NO_RAY_MODULES = [
    "config",
    "errors",
    "fsutil",
    "tracking",
    "cluster",
    "core.masks",
    "core.strokes",
    "core.harmonic",
    "core.model",
    "core.losses",
    "core.step",
    "core.metrics",
    "core.baselines",
    "core.pixels",
    "data.crops",
    "data.grids",
    "data.shards",
    "data.containers",
    "data.corpus",
    "data.bundled",
    "data.prepare",
    "data.stream",
    "data.local_stream",
    "train.checkpoint",
    "train.loop",
    "train.local",
    "tune.sweep",
    "evaluate.tiles",
    "evaluate.photos",
    "infer.planner",
    "infer.export",
    "infer.resolve",
    "infer.shipped",
]


def test_local_paths_never_import_ray(tmp_path):
    """engine='local', the no-Ray loader and every pure-torch module must work on hosts without Ray."""
    import importlib.util

    modules = [m for m in NO_RAY_MODULES if importlib.util.find_spec(f"ce_ray.{m}") is not None]
    assert modules == NO_RAY_MODULES
    code = f"""
import importlib, sys
for m in {modules!r}:
    importlib.import_module("ce_ray." + m)
assert "ray" not in sys.modules, "ray was imported by importing ce_ray's no-Ray modules"
from ce_ray import config
from ce_ray.data import stream as data
from ce_ray.data import local_stream as local_data
from ce_ray.data import prepare
prepare.prepare("bundled", {str(tmp_path / "o")!r}, engine="local", progress=False, rows_per_shard=4)
cfg = config.replace(config.Config(), data={{"shards": {str(tmp_path / "o")!r}, "batch_size": 4}})
next(iter(local_data.LocalTrainStream(cfg)))
local_data.load_val(cfg)
assert "ray" not in sys.modules, "ray was imported"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.ray
def test_ray_engine_matches_local_engine(ray_session, tmp_path):
    """The same per-file function on Ray Data: same rows, same skips, byte-identical shards."""
    src = tmp_path / "hostile"
    make_hostile(src)
    a = prep.prepare(
        str(src), str(tmp_path / "local"), engine="local", progress=False, max_pixels=MAX_PIXELS, rows_per_shard=3
    )
    b = prep.prepare(
        str(src), str(tmp_path / "ray"), engine="ray", progress=False, max_pixels=MAX_PIXELS, rows_per_shard=3
    )
    assert {k: v for k, v in a.items() if k != "options"} == {k: v for k, v in b.items() if k != "options"}
    for f in a["shards"]["train"] + a["shards"]["val"]:
        assert pq.read_table(tmp_path / "local" / f).equals(pq.read_table(tmp_path / "ray" / f))
