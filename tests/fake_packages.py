"""Builders for the small containers the corpus tests read: Qt .rcc resource files, Debian .deb
packages, wheels, jigzo puzzles, and photo-like images. Written from the format descriptions in
docs/corpus.md, independently of ce_ray/data/containers.py, so a reader bug cannot hide in a writer
that shares its code."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
import zlib

import numpy as np
from PIL import Image


def photo(seed: int, size: tuple[int, int] = (320, 288), grey: bool = False) -> Image.Image:
    """A colourful, textured image (smooth gradients + blobs) unique per seed."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = []
    for _ in range(3):
        f = rng.uniform(1, 6, size=2)
        p = rng.uniform(0, 6.28, size=2)
        chans.append(0.5 + 0.25 * np.sin(f[0] * 6.28 * xx + p[0]) + 0.25 * np.cos(f[1] * 6.28 * yy + p[1]))
    a = np.stack(chans, -1)
    for _ in range(6):  # blobs, so photos differ in structure, not just colour
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        a[((yy - cy) ** 2 + (xx - cx) ** 2) < r * r] = rng.uniform(0, 1, 3)
    a = (np.clip(a, 0, 1) * 255).astype(np.uint8)
    if grey:
        a = np.repeat(a.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    return Image.fromarray(a)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}) | kw)
    return buf.getvalue()


def rcc(files: dict[str, bytes], version: int = 3, compress: tuple[str, ...] = ()) -> bytes:
    """A Qt binary resource file holding `files` ({'/a/b.webp': bytes}); paths in `compress` are
    stored zlib-compressed (qCompress: u32 size + zlib stream)."""
    # Build the directory tree: node = {name: child-node or bytes}.
    root: dict = {}
    for path, data in files.items():
        node = root
        parts = path.strip("/").split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = (path, data)
    names = bytearray()
    name_off: dict[str, int] = {}

    def name(n: str) -> int:
        if n not in name_off:
            name_off[n] = len(names)
            enc = n.encode("utf-16-be")
            names.extend(struct.pack(">HI", len(n), 0) + enc)
        return name_off[n]

    payload = bytearray()
    entries: list[bytes] = []
    entry_size = 22 if version >= 2 else 14
    # Breadth-first numbering, as rcc does: a directory's children are consecutive entries.
    queue = [("", root)]
    entries.append(b"")  # placeholder for the root
    pending = []  # (entry index, name, node)
    index_of_children = {}
    while queue:
        dname, node = queue.pop(0)
        first = len(entries)
        index_of_children[id(node)] = first
        for child_name in sorted(node):
            entries.append(b"")
            pending.append((len(entries) - 1, child_name, node[child_name]))
            if isinstance(node[child_name], dict):
                queue.append((child_name, node[child_name]))
    tail = b"\0" * 8 if version >= 2 else b""

    def dir_entry(name_offset: int, node: dict) -> bytes:
        return struct.pack(">IHII", name_offset, 2, len(node), index_of_children[id(node)]) + tail

    entries[0] = dir_entry(0, root)
    for idx, cname, node in pending:
        if isinstance(node, dict):
            entries[idx] = dir_entry(name(cname), node)
        else:
            path, data = node
            flags = 0
            blob = data
            if path in compress:
                flags = 1
                blob = struct.pack(">I", len(data)) + zlib.compress(data)
            offset = len(payload)
            payload.extend(struct.pack(">I", len(blob)) + blob)
            entries[idx] = struct.pack(">IHHHI", name(cname), flags, 0, 0, offset) + tail
    assert all(len(e) == entry_size for e in entries)
    header = 20 + (4 if version >= 3 else 0)
    tree = b"".join(entries)
    tree_off = header
    data_off = tree_off + len(tree)
    names_off = data_off + len(payload)
    out = b"qres" + struct.pack(">4I", version, tree_off, data_off, names_off)
    if version >= 3:
        out += struct.pack(">I", 0)  # overall flags
    return out + tree + bytes(payload) + bytes(names)


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deb(files: dict[str, bytes]) -> bytes:
    """A .deb: an ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", _tar_xz({"control": b"Package: fake\n"})),
        ("data.tar.xz", _tar_xz(files)),
    ]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        out += data
        if len(data) % 2:
            out += b"\n"
    return bytes(out)


def wheel(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return buf.getvalue()


def pzl(picture: Image.Image, box: tuple[int, int, int, int], texture: int = 64) -> bytes:
    """A jigzo puzzle: text header with the `image x y w h` line, a piece-texture JPEG, then the
    picture pasted at (0, 0) of a larger power-of-two JPEG canvas."""
    x, y, w, h = box
    canvas = Image.new("RGB", (texture * 4, texture * 4), (0, 0, 0))
    canvas.paste(picture.crop((0, 0, w, h)), (x, y))
    pieces = encode(picture.resize((texture // 2, texture // 2)))
    header = (
        "PzlF\n0.1\nfake\nhttp://example.invalid/\nfake.map\n12\n#texture map data\ncrop000 0 0 8 8\n"
        f"image {x} {y} {w} {h} 1 1    \nfake-t.jpg\n{len(pieces)}\n"
    ).encode()
    return header + pieces + b"\n" + encode(canvas)


def pypi_wheel(name: str, version: str, files: dict[str, bytes]) -> tuple[str, bytes]:
    """(file name, bytes) of a wheel pip accepts: `files` plus the .dist-info METADATA, WHEEL and
    RECORD that `pip download` reads."""
    stem = f"{name.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fake\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in [*files, *meta]) + f"{info}/RECORD,,\n"
    return f"{stem}-py3-none-any.whl", wheel({**files, **meta, f"{info}/RECORD": record.encode()})


class FakePyPI:
    """A PEP 503 "simple" index on 127.0.0.1 serving wheels, for `pip download` (PIP_INDEX_URL).
    `refuse`: file names answered with an HTTP error status; `serve`: file name -> the bytes sent
    instead of the wheel (e.g. a truncated copy; the index's #sha256= stays that of the wheel, as
    PyPI's does when a transfer or a mirror's copy is cut short). Every requested path is recorded in `requests`."""

    def __init__(self, wheels: dict[str, bytes]):
        import http.server
        import threading

        self.wheels = dict(wheels)
        self.refuse: dict[str, int] = {}
        self.serve: dict[str, bytes] = {}
        self.requests: list[str] = []
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes, kind: str = "text/html") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                import hashlib

                index.requests.append(self.path)
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if len(parts) == 2 and parts[0] == "simple":
                    project = parts[1]
                    links = [
                        f'<a href="/files/{f}#sha256={hashlib.sha256(b).hexdigest()}">{f}</a>'
                        for f, b in index.wheels.items()
                        if f.split("-")[0].lower().replace("_", "-") == project
                    ]
                    if not links:
                        return self._send(404, b"not found")
                    return self._send(200, f"<html><body>{''.join(links)}</body></html>".encode())
                if len(parts) == 2 and parts[0] == "files" and parts[1] in index.wheels:
                    f = parts[1]
                    if f in index.refuse:
                        return self._send(index.refuse[f], b"refused")
                    return self._send(200, index.serve.get(f, index.wheels[f]), "application/octet-stream")
                self._send(404, b"not found")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
