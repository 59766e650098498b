"""fsutil's whole-file helpers, which prepare (reading photos and lists) and batch inpainting
(reading photos and masks, writing results and the manifest) share."""

from ce_ray.fsutil import read_bytes, write_bytes


def test_write_bytes_then_read_bytes_plain_and_file_uri(tmp_path):
    p = tmp_path / "sub" / "a.bin"
    p.parent.mkdir()
    write_bytes(str(p), b"one")
    assert read_bytes(str(p)) == b"one" and read_bytes(f"file://{p}") == b"one"
    write_bytes(f"file://{p}", b"two")  # replaces the file whole, through its temp name
    assert p.read_bytes() == b"two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.bin"]  # no temp file left beside it
