"""`ce-ray inpaint SRC --out DST`: many images through Serve's window planner, on Ray Data.

A Ray Data pipeline (or, with engine="local", one process) around the same any-size window
planner as Serve (inpaint.py).

    list SRC (folder, glob, .txt list, s3:// / gs:// prefix; prepare.discover)
    -> read + decode + hole (CPU tasks)          a mask per image (--masks DIR), one mask for all
                                                 (--mask M), or a generated hole (--mask-kind,
                                                 seeded by the image's path)
    -> generator (an actor pool, --replicas;     every round of windows of a batch of images is one
       GPUs when the cluster has them)           forward, as in Serve
    -> PNG encode + atomic write (CPU tasks)     DST/<relative path of the input>.png

Pixels outside the hole are bit-identical to the input. Outputs that exist are skipped (a rerun
continues); bad inputs are listed with their reasons in DST/inpaint_manifest.json and never stop
the others; the command fails only when nothing succeeded.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ce_ray.errors import UserError
from ce_ray.fsutil import exists as _exists
from ce_ray.fsutil import is_uri, read_bytes, write_bytes

MANIFEST = "inpaint_manifest.json"
MASK_KINDS = ("center", "random_block", "random_region")
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
IMAGES_PER_FORWARD = 8  # images per actor call: their windows share each generator forward
DEFAULT_MAX_PIXELS = 50_000_000  # an input larger than this is listed as bad, not decoded


@dataclass(frozen=True)
class Item:
    key: str  # path relative to SRC (what DST mirrors)
    src: str  # local path or URL
    dst: str  # output path or URL
    mask: str | None  # mask file for this image, or None (generated / default hole)


def _join(root: str, rel: str) -> str:
    return posixpath.join(root.rstrip("/"), rel) if is_uri(root) else os.path.join(root, rel)


def output_name(key: str) -> str:
    """DST-relative output path: the input's relative path with a .png suffix (lossless, so the
    untouched pixels stay bit-identical)."""
    stem, _ = os.path.splitext(key)
    return stem + ".png"


def _mask_for(masks_dir: str, key: str) -> str | None:
    """The mask with the image's relative path in masks_dir: same name, or same stem with an
    image suffix."""
    stem, _ = os.path.splitext(key)
    for cand in [key, *(stem + s for s in MASK_SUFFIXES)]:
        p = _join(masks_dir, cand)
        if _exists(p):
            return p
    return None


def list_items(src: str, dst: str, *, masks_dir: str | None = None, mask: str | None = None,
               exclude: tuple[str, ...] = ()) -> tuple[list[Item], list[dict[str, str]]]:
    """(items to do, bad inputs found while listing). Items are in key order."""
    from ce_ray.prepare import discover

    files, dupes = discover(src, exclude=exclude)
    bad = [{"key": d["path"], "src": d["path"], "reason": d["reason"]} for d in dupes]
    items, taken = [], {}
    for f in files:
        if f.key == MANIFEST:
            continue
        name = output_name(f.key)
        if name in taken:
            bad.append({"key": f.key, "src": f.path, "reason": f"its output {name} would overwrite {taken[name]}'s; rename one of them"})
            continue
        taken[name] = f.key
        m = mask
        if masks_dir is not None:
            m = _mask_for(masks_dir, f.key)
            if m is None:
                bad.append({"key": f.key, "src": f.path, "reason": f"no mask for it in {masks_dir} (expected {f.key} or {os.path.splitext(f.key)[0]}.png)"})
                continue
        items.append(Item(f.key, f.path, _join(dst, name), m))
    return items, bad


def generated_hole(kind: str, key: str, h: int, w: int, geo) -> np.ndarray:
    """A hole for one image, the same on every run: the centre region (Serve's default), or a
    random block / region at the model's training scale, placed in the window at the image
    centre and seeded by the image's relative path."""
    from PIL import Image

    from ce_ray import inpaint
    from ce_ray.masks import make_hole
    from ce_ray.crops import stable_seed

    if kind == "center":
        return inpaint.default_hole(h, w, geo)
    rng = np.random.default_rng(stable_seed("ce-ray inpaint", key))
    small = make_hole(kind, geo.size, rng)  # (S, S) at the model's scale
    side = int(round(geo.base_side(h, w)))
    big = np.asarray(Image.fromarray(small.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 127
    hole = np.zeros((h, w), dtype=bool)
    y0, x0 = (h - side) // 2, (w - side) // 2
    ys, xs = slice(max(0, y0), min(h, y0 + side)), slice(max(0, x0), min(w, x0 + side))
    hole[ys, xs] = big[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return hole


# --- The three stages (plain functions: the Ray pipeline and the local loop share them) --------


def load_stage(item: Item, geo, mask_kind: str | None, max_pixels: int) -> dict[str, Any]:
    """Read and validate one image and its hole -> a row {key, dst, rgb (bytes), h, w, hole
    (packed bits), error}."""
    from ce_ray import inpaint
    from ce_ray.masks import hole_from_image

    row: dict[str, Any] = {"key": item.key, "src": item.src, "dst": item.dst, "rgb": b"", "h": 0, "w": 0, "hole": b"", "error": ""}
    try:
        rgb = inpaint.image_rgb(inpaint.read_image(read_bytes(item.src), max_pixels=max_pixels))
        h, w = rgb.shape[:2]
        if item.mask is not None:
            hole = hole_from_image(inpaint.read_image(read_bytes(item.mask), what="mask"), (h, w))
        elif mask_kind is not None:
            hole = generated_hole(mask_kind, item.key, h, w, geo)
        else:
            hole = None
        hole = inpaint.check_inputs(rgb, hole, geo)
        row.update(rgb=rgb.tobytes(), h=h, w=w, hole=np.packbits(hole).tobytes())
    except UserError as e:
        row["error"] = str(e)
    except OSError as e:
        row["error"] = f"cannot read: {e}"
    except Exception as e:  # whatever a file contains, it is this item's failure only
        row["error"] = f"failed: {type(e).__name__}: {e}"
    return row


def _unpack(row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    h, w = int(row["h"]), int(row["w"])
    rgb = np.frombuffer(row["rgb"], dtype=np.uint8).reshape(h, w, 3)
    hole = np.unpackbits(np.frombuffer(row["hole"], dtype=np.uint8), count=h * w).reshape(h, w).astype(bool)
    return rgb, hole


def inpaint_rows(loaded, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generator stage: every valid row's image inpainted; all of them batched together."""
    from ce_ray import inpaint

    ok = [r for r in rows if not r["error"]]
    plans = []
    for r in ok:
        rgb, hole = _unpack(r)
        plans.append(inpaint.make_plan(rgb, hole, loaded.config))
    if plans:
        try:
            results = inpaint.inpaint_many(loaded, plans)
        except Exception as e:  # one bad batch should not stop the rest
            for r in ok:
                r["error"] = f"inpainting failed: {type(e).__name__}: {e}"
            results = []
        for r, out in zip(ok, results):
            r["rgb"] = out.tobytes()
    return rows


def write_stage(row: dict[str, Any]) -> dict[str, Any]:
    """PNG-encode and write one result -> {key, src, dst, error}."""
    from ce_ray import inpaint

    out = {"key": row["key"], "src": row["src"], "dst": row["dst"], "error": row["error"]}
    if not row["error"]:
        try:
            rgb, _ = _unpack(row)
            write_bytes(row["dst"], inpaint.encode_png(rgb))
        except Exception as e:
            out["error"] = f"cannot write {row['dst']}: {type(e).__name__}: {e}"
    return out


# --- Engines -----------------------------------------------------------------------------------


def _run_local(items: list[Item], model: str, device: str, mask_kind: str | None, max_pixels: int) -> Iterator[dict[str, Any]]:
    from ce_ray.checkpoint import load_generator
    from ce_ray.inpaint import Geometry
    from ce_ray.step import resolve_device

    loaded = load_generator(model, resolve_device(device))
    geo = Geometry.of(loaded.config)
    for start in range(0, len(items), IMAGES_PER_FORWARD):
        rows = [load_stage(it, geo, mask_kind, max_pixels) for it in items[start : start + IMAGES_PER_FORWARD]]
        for r in inpaint_rows(loaded, rows):
            yield write_stage(r)


class _GeneratorActor:
    """One replica: the generator loaded once, then a batch of images per call."""

    def __init__(self, model: str, device: str, threads: int = 1):
        import torch

        from ce_ray.checkpoint import load_generator
        from ce_ray.step import resolve_device

        if device == "cpu":
            torch.set_num_threads(threads)
        self.loaded = load_generator(model, resolve_device(device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = _rows(batch)
        return _columns(inpaint_rows(self.loaded, rows))


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]])
    return [{k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys} for i in range(n)]


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _run_ray(items: list[Item], model: str, device: str, mask_kind: str | None, max_pixels: int, replicas: int,
             config) -> Iterator[dict[str, Any]]:
    import ray

    from ce_ray.cluster import connect_ray
    from ce_ray.inpaint import Geometry

    connect_ray()
    geo = Geometry.of(config)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = device == "cuda" or (device == "auto" and gpus >= 1)
    if device == "cuda" and gpus < 1:
        raise UserError("--device cuda but the Ray cluster has no GPUs; use --device auto or cpu")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts images
    ctx.print_on_execution_start = False
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}

    def load(batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [load_stage(Item(k, s, d, (m or None)), geo, mask_kind, max_pixels)
                for k, s, d, m in zip(batch["key"], batch["src"], batch["dst"], batch["mask"])]
        return _columns(rows)

    def write(batch: dict[str, np.ndarray]) -> dict[str, list]:
        return _columns([write_stage(r) for r in _rows(batch)])

    records = [{"key": it.key, "src": it.src, "dst": it.dst, "mask": it.mask or ""} for it in items]
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 4 * max(1, int(ray.cluster_resources().get("CPU", 1))))))
    ds = ds.map_batches(load, batch_size=IMAGES_PER_FORWARD, batch_format="numpy", num_cpus=1)
    actor_args = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    # CPU replicas get the node's cores between them, not one thread each: the decode and encode
    # tasks wait on the forward most of the time, and on 2 cores one thread per replica made the
    # pipeline 0.72x the one-process loop, two threads 1.00x (bench/batch_inpaint.py).
    node_cpus = max((int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1)
    threads = max(1, node_cpus // max(1, replicas))
    ds = ds.map_batches(_GeneratorActor, fn_constructor_kwargs={"model": model, "device": "cuda" if use_gpu else "cpu",
                                                                "threads": threads},
                        batch_size=IMAGES_PER_FORWARD, batch_format="numpy", concurrency=replicas,
                        runtime_env={"env_vars": env} if env else None, **actor_args)
    ds = ds.map_batches(write, batch_size=IMAGES_PER_FORWARD, batch_format="numpy", num_cpus=1)
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        yield from _rows(batch)


def run(src: str, model: str, dst: str, *, mask: str | None = None, masks_dir: str | None = None, mask_kind: str | None = None,
        replicas: int = 1, device: str = "auto", engine: str = "ray", max_pixels: int = DEFAULT_MAX_PIXELS,
        progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Inpaint every image of SRC into DST; returns (and writes to DST/inpaint_manifest.json) the
    manifest {done, skipped_existing, failed: [{key, src, reason}], ...}."""
    from ce_ray.checkpoint import load_generator

    if sum(x is not None for x in (mask, masks_dir, mask_kind)) > 1:
        raise UserError("give at most one of --mask, --masks and --mask-kind")
    if mask_kind is not None and mask_kind not in MASK_KINDS:
        raise UserError(f"--mask-kind must be one of {', '.join(MASK_KINDS)}, got {mask_kind!r}")
    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    if engine not in ("ray", "local"):
        raise UserError(f"engine must be 'ray' or 'local', got {engine!r}")
    if mask is not None and not _exists(mask):
        raise UserError(f"mask {mask!r} not found")
    if masks_dir is not None and not is_uri(masks_dir) and not Path(masks_dir).is_dir():
        raise UserError(f"--masks {masks_dir!r} is not a folder")
    if not is_uri(dst):
        if Path(dst).exists() and not Path(dst).is_dir():
            raise UserError(f"--out {dst} exists and is not a folder: for many inputs DST is a folder (or a bucket prefix)")
        dst = str(Path(dst).absolute())
    t0 = time.perf_counter()
    loaded = load_generator(model, "cpu")  # a bad model URI fails here, before any work
    exclude = (dst.rstrip("/") + "/",) if not is_uri(dst) else ()
    items, bad = list_items(src, dst, masks_dir=masks_dir, mask=mask, exclude=exclude)
    todo = [it for it in items if not _exists(it.dst)]
    skipped = len(items) - len(todo)
    log(f"inpaint: {len(items)} images in {src}: {skipped} already done in {dst} (skipped), {len(todo)} to do"
        + (f", {len(bad)} unusable" if bad else ""))
    done: list[str] = []
    failed = list(bad)
    if todo:
        results = _run_local(todo, model, device, mask_kind, max_pixels) if engine == "local" else \
            _run_ray(todo, model, device, mask_kind, max_pixels, replicas, loaded.config)
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="inpaint", disable=not progress, file=sys.stderr)
        for r in results:
            bar.update(1)
            if r["error"]:
                failed.append({"key": r["key"], "src": r["src"], "reason": r["error"]})
            else:
                done.append(r["key"])
        bar.close()
    seconds = time.perf_counter() - t0
    manifest = {"format": "ce-ray-inpaint/1", "src": src, "dst": dst, "model": model, "step": loaded.step,
                "mask": mask, "masks": masks_dir, "mask_kind": mask_kind or ("center" if not (mask or masks_dir) else None),
                "engine": engine, "replicas": replicas, "done": sorted(done), "skipped_existing": skipped,
                "failed": sorted(failed, key=lambda f: f["key"]), "seconds": round(seconds, 2)}
    write_bytes(_join(dst, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    log(f"inpaint: {len(done)} written, {skipped} skipped (already there), {len(failed)} failed "
        f"in {seconds:.1f} s; details in {_join(dst, MANIFEST)}")
    if not done and not skipped:
        why = "; ".join(f"{f['key']}: {f['reason']}" for f in failed[:3]) or "no images found"
        raise UserError(f"nothing was inpainted from {src!r}: {why}")
    return manifest
