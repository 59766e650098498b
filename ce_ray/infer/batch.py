"""`ce-ray inpaint`: one image, or many through Serve's window planner on Ray Data.

One file is read, inpainted and written here. Many go through a Ray Data pipeline (or, with
engine="local", one process) around the same any-size window planner as Serve (planner.py).

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

import argparse
import json
import os
import posixpath
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ce_ray.data import images
from ce_ray.errors import UserError
from ce_ray.fsutil import exists as _exists
from ce_ray.fsutil import is_uri, read_bytes, write_bytes

if TYPE_CHECKING:
    from PIL import Image

    from ce_ray.config import Config
    from ce_ray.infer.planner import Geometry
    from ce_ray.infer.resolve import LoadedGenerator

MANIFEST = "inpaint_manifest.json"
MASK_KINDS = ("center", "random_block", "random_region", "thin", "medium", "thick")  # the last three: strokes.FAMILIES
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


def list_items(
    src: str, dst: str, *, masks_dir: str | None = None, mask: str | None = None, exclude: tuple[str, ...] = ()
) -> tuple[list[Item], list[dict[str, str]]]:
    """(items to do, bad inputs found while listing). Items are in key order."""
    from ce_ray.data.prepare import discover

    files, dupes = discover(src, exclude=exclude)
    bad = [{"key": d["path"], "src": d["path"], "reason": d["reason"]} for d in dupes]
    items: list[Item] = []
    taken: dict[str, str] = {}
    for f in files:
        if f.key == MANIFEST:
            continue
        name = output_name(f.key)
        if name in taken:
            bad.append(
                {
                    "key": f.key,
                    "src": f.path,
                    "reason": f"its output {name} would overwrite {taken[name]}'s; rename one of them",
                }
            )
            continue
        taken[name] = f.key
        m = mask
        if masks_dir is not None:
            m = _mask_for(masks_dir, f.key)
            if m is None:
                bad.append(
                    {
                        "key": f.key,
                        "src": f.path,
                        "reason": f"no mask for it in {masks_dir} "
                        f"(expected {f.key} or {os.path.splitext(f.key)[0]}.png)",
                    }
                )
                continue
        items.append(Item(f.key, f.path, _join(dst, name), m))
    return items, bad


def generated_hole(kind: str, key: str, h: int, w: int, geo: Geometry) -> np.ndarray:
    """A hole for one image, the same on every run, seeded by the image's relative path: the
    centre region (Serve's default); a random block / region at the model's training scale,
    placed in the window at the image centre; or painted strokes of a LaMa family, drawn for the
    whole image at its own size (strokes.py)."""
    from PIL import Image

    from ce_ray.core.masks import make_hole
    from ce_ray.core.strokes import FAMILIES, stroke_hole
    from ce_ray.data.crops import stable_seed
    from ce_ray.infer import planner as inpaint

    if kind == "center":
        return inpaint.default_hole(h, w, geo)
    rng = np.random.default_rng(stable_seed("ce-ray inpaint", key))
    if kind in FAMILIES:
        return stroke_hole(kind, h, w, rng)
    small = make_hole(kind, geo.size, rng)  # (S, S) at the model's scale
    side = int(round(geo.base_side(h, w)))
    big = np.asarray(Image.fromarray(small.astype(np.uint8) * 255).resize((side, side), Image.Resampling.NEAREST)) > 127
    hole = np.zeros((h, w), dtype=bool)
    y0, x0 = (h - side) // 2, (w - side) // 2
    ys, xs = slice(max(0, y0), min(h, y0 + side)), slice(max(0, x0), min(w, x0 + side))
    hole[ys, xs] = big[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return hole


# --- The three stages (plain functions: the Ray pipeline and the local loop share them) --------


def load_stage(item: Item, geo: Geometry, mask_kind: str | None, max_pixels: int) -> dict[str, Any]:
    """Read and validate one image and its hole -> a row {key, dst, rgb (bytes), h, w, hole
    (packed bits), error}."""
    from ce_ray.core.masks import hole_from_image
    from ce_ray.infer import planner as inpaint

    row: dict[str, Any] = {
        "key": item.key,
        "src": item.src,
        "dst": item.dst,
        "rgb": b"",
        "h": 0,
        "w": 0,
        "hole": b"",
        "error": "",
    }
    try:
        rgb = images.to_rgb8(images.open_image(read_bytes(item.src), max_pixels))
        h, w = rgb.shape[:2]
        if item.mask is not None:
            hole = hole_from_image(images.open_image(read_bytes(item.mask), what="mask"), (h, w))
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


def inpaint_rows(loaded: LoadedGenerator, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generator stage: every valid row's image inpainted; all of them batched together."""
    from ce_ray.infer import planner as inpaint

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

    out = {"key": row["key"], "src": row["src"], "dst": row["dst"], "error": row["error"]}
    if not row["error"]:
        try:
            rgb, _ = _unpack(row)
            write_bytes(row["dst"], images.encode_png(rgb))
        except Exception as e:
            out["error"] = f"cannot write {row['dst']}: {type(e).__name__}: {e}"
    return out


# --- Engines -----------------------------------------------------------------------------------


def _run_local(
    items: list[Item], model: str, device: str, mask_kind: str | None, max_pixels: int, store: str | None = None
) -> Iterator[dict[str, Any]]:
    from ce_ray.core.step import resolve_device
    from ce_ray.infer.planner import Geometry
    from ce_ray.infer.resolve import load_generator

    loaded = load_generator(model, resolve_device(device), tracking_uri=store)
    geo = Geometry.of(loaded.config)
    for start in range(0, len(items), IMAGES_PER_FORWARD):
        rows = [load_stage(it, geo, mask_kind, max_pixels) for it in items[start : start + IMAGES_PER_FORWARD]]
        for r in inpaint_rows(loaded, rows):
            yield write_stage(r)


class _GeneratorActor:
    """One replica: the generator loaded once, then a batch of images per call."""

    def __init__(self, model: str, device: str, threads: int = 1):
        import torch

        from ce_ray.core.step import resolve_device
        from ce_ray.infer.resolve import load_generator

        if device == "cpu":
            torch.set_num_threads(threads)
        self.loaded = load_generator(model, resolve_device(device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = _rows(batch)
        return _columns(inpaint_rows(self.loaded, rows))


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    keys = list(batch)
    n = len(batch[keys[0]])
    return [{k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i]) for k in keys} for i in range(n)]


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _run_ray(
    items: list[Item],
    model: str,
    device: str,
    mask_kind: str | None,
    max_pixels: int,
    replicas: int,
    config: Config,
    store: str | None = None,
) -> Iterator[dict[str, Any]]:
    import ray

    from ce_ray.cluster import connect_ray
    from ce_ray.infer.planner import Geometry

    connect_ray()
    geo = Geometry.of(config)
    gpus = ray.cluster_resources().get("GPU", 0)  # type: ignore[no-untyped-call]  # ray: untyped
    use_gpu = device == "cuda" or (device == "auto" and gpus >= 1)
    if device == "cuda" and gpus < 1:
        raise UserError("--device cuda but the Ray cluster has no GPUs; use --device auto or cpu")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts images
    ctx.print_on_execution_start = False
    env = {"MLFLOW_TRACKING_URI": store} if store else {}  # the replicas resolve models:/ in the driver's store

    def load(batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = [
            load_stage(Item(k, s, d, (m or None)), geo, mask_kind, max_pixels)
            for k, s, d, m in zip(batch["key"], batch["src"], batch["dst"], batch["mask"])
        ]
        return _columns(rows)

    def write(batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        return _columns([write_stage(r) for r in _rows(batch)])

    records = [{"key": it.key, "src": it.src, "dst": it.dst, "mask": it.mask or ""} for it in items]
    cpus = int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]  # ray: untyped
    ds: ray.data.Dataset = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 4 * max(1, cpus))))
    ds = ds.map_batches(load, batch_size=IMAGES_PER_FORWARD, batch_format="numpy", num_cpus=1)
    actor_args: dict[str, Any] = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    # CPU replicas get the node's cores between them, not one thread each: the decode and encode
    # tasks wait on the forward most of the time, and on 2 cores one thread per replica made the
    # pipeline 0.72x the one-process loop, two threads 1.00x (bench/batch_inpaint.py).
    nodes = ray.nodes()  # type: ignore[no-untyped-call]  # ray: untyped
    node_cpus = max((int(n["Resources"].get("CPU", 1)) for n in nodes if n.get("Alive")), default=1)
    threads = max(1, node_cpus // max(1, replicas))
    ds = ds.map_batches(
        _GeneratorActor,
        fn_constructor_kwargs={"model": model, "device": "cuda" if use_gpu else "cpu", "threads": threads},
        batch_size=IMAGES_PER_FORWARD,
        batch_format="numpy",
        concurrency=replicas,
        runtime_env={"env_vars": env} if env else None,
        **actor_args,
    )
    ds = ds.map_batches(write, batch_size=IMAGES_PER_FORWARD, batch_format="numpy", num_cpus=1)
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        yield from _rows(batch)


def run(
    src: str,
    model: str,
    dst: str,
    *,
    mask: str | None = None,
    masks_dir: str | None = None,
    mask_kind: str | None = None,
    replicas: int = 1,
    device: str = "auto",
    engine: str = "ray",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    log: Callable[[str], None] = print,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Inpaint every image of SRC into DST; returns (and writes to DST/inpaint_manifest.json) the
    manifest {done, skipped_existing, failed: [{key, src, reason}], ...}. `tracking_uri`: the
    MLflow store a models:/ `model` is read from (resolve.py's rule)."""
    from ce_ray import tracking
    from ce_ray.infer.resolve import load_generator, store_for

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
            raise UserError(
                f"--out {dst} exists and is not a folder: for many inputs DST is a folder (or a bucket prefix)"
            )
        dst = str(Path(dst).absolute())
    t0 = time.perf_counter()
    store = store_for(tracking_uri) if tracking.is_mlflow_uri(model) else None
    loaded = load_generator(model, "cpu", tracking_uri=store)  # a bad model URI fails here, before any work
    exclude = (dst.rstrip("/") + "/",) if not is_uri(dst) else ()
    items, bad = list_items(src, dst, masks_dir=masks_dir, mask=mask, exclude=exclude)
    todo = [it for it in items if not _exists(it.dst)]
    skipped = len(items) - len(todo)
    log(
        f"inpaint: {len(items)} images in {src}: {skipped} already done in {dst} (skipped), {len(todo)} to do"
        + (f", {len(bad)} unusable" if bad else "")
    )
    done: list[str] = []
    failed = list(bad)
    if todo:
        results = (
            _run_local(todo, model, device, mask_kind, max_pixels, store)
            if engine == "local"
            else _run_ray(todo, model, device, mask_kind, max_pixels, replicas, loaded.config, store)
        )
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
    manifest = {
        "format": "ce-ray-inpaint/1",
        "src": src,
        "dst": dst,
        "model": model,
        "step": loaded.step,
        "mask": mask,
        "masks": masks_dir,
        "mask_kind": mask_kind or ("center" if not (mask or masks_dir) else None),
        "engine": engine,
        "replicas": replicas,
        "done": sorted(done),
        "skipped_existing": skipped,
        "failed": sorted(failed, key=lambda f: f["key"]),
        "seconds": round(seconds, 2),
    }
    write_bytes(_join(dst, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    log(
        f"inpaint: {len(done)} written, {skipped} skipped (already there), {len(failed)} failed "
        f"in {seconds:.1f} s; details in {_join(dst, MANIFEST)}"
    )
    if not done and not skipped:
        why = "; ".join(f"{f['key']}: {f['reason']}" for f in failed[:3]) or "no images found"
        raise UserError(f"nothing was inpainted from {src!r}: {why}")
    return manifest


# --- ce-ray inpaint (cli.py owns the parser and calls these) -----------------------------------


def inpaint_file(
    model_uri: str,
    image_path: str | Path,
    mask_path: str | Path | None,
    out_path: str | Path,
    device: str = "cpu",
    tracking_uri: str | None = None,
) -> Path:
    """`ce-ray inpaint FILE`: read an image (and a mask, white = hole), inpaint, write a PNG."""
    from ce_ray.core.masks import hole_from_image
    from ce_ray.core.step import resolve_device
    from ce_ray.data.grids import save_png
    from ce_ray.data.images import open_image, to_rgb8
    from ce_ray.infer.planner import inpaint_image
    from ce_ray.infer.resolve import load_generator

    def read(path: str | Path, what: str) -> Image.Image:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{what} file {str(p)!r} not found")
        return open_image(p.read_bytes(), what=what)

    rgb = to_rgb8(read(image_path, "image"))
    hole = hole_from_image(read(mask_path, "mask"), rgb.shape[:2]) if mask_path else None
    loaded = load_generator(model_uri, resolve_device(device), tracking_uri=tracking_uri)
    return save_png(inpaint_image(loaded, rgb, hole), out_path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        metavar="SRC",
        help="one image file (PNG/JPEG, any size), or many: a folder (recursive), a glob, "
        "a .txt list of paths, or an s3:// / gs:// prefix",
    )
    from ce_ray.infer.resolve import add_model_arguments

    add_model_arguments(parser, "the generator")
    parser.add_argument(
        "-o",
        "--out",
        "--output",
        dest="out",
        required=True,
        help="for one input file: the PNG to write; for many: a folder or bucket prefix that mirrors SRC's "
        "relative paths",
    )
    holes = parser.add_mutually_exclusive_group()
    holes.add_argument(
        "--mask",
        help="mask image of the same size, white = hole (default: the centre region); for many inputs, "
        "one mask for all",
    )
    holes.add_argument(
        "--masks", metavar="DIR", help="many inputs: a mask per image at the same relative path in DIR (white = hole)"
    )
    holes.add_argument(
        "--mask-kind",
        choices=MASK_KINDS,
        help="a generated hole per image, seeded by its path (reruns agree): the centre region, the paper's "
        "random block / region, or LaMa's thin / medium / thick painted strokes at the image's size",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="many inputs: generator replicas (Ray actors; on GPUs when the cluster has them)",
    )
    parser.add_argument(
        "--device",
        default=None,
        choices=["auto", "cpu", "cuda"],
        help="where the generator runs (default: cpu for one file, auto for many)",
    )
    parser.add_argument("--local", action="store_true", help="many inputs: one process, no Ray")


def _single_file(args: argparse.Namespace) -> bool:
    p = Path(args.src)
    return p.is_file() and p.suffix.lower() != ".txt" and not args.masks and not Path(args.out).is_dir()


def run_from_args(args: argparse.Namespace) -> int:
    if _single_file(args):
        hole_kind = args.mask_kind
        if hole_kind and hole_kind != "center":
            from ce_ray.core.step import resolve_device
            from ce_ray.data.grids import save_png
            from ce_ray.data.images import decode_rgb
            from ce_ray.infer.planner import Geometry, inpaint_image
            from ce_ray.infer.resolve import load_generator

            loaded = load_generator(
                args.model, resolve_device(args.device or "cpu"), tracking_uri=args.mlflow_tracking_uri
            )
            rgb = decode_rgb(Path(args.src).read_bytes())
            h, w = rgb.shape[:2]
            hole = generated_hole(hole_kind, Path(args.src).name, h, w, Geometry.of(loaded.config))
            out = save_png(inpaint_image(loaded, rgb, hole), args.out)
        else:
            out = inpaint_file(
                args.model,
                args.src,
                args.mask,
                args.out,
                device=args.device or "cpu",
                tracking_uri=args.mlflow_tracking_uri,
            )
        print(f"wrote {out}")
        return 0
    run(
        args.src,
        args.model,
        args.out,
        mask=args.mask,
        masks_dir=args.masks,
        mask_kind=args.mask_kind,
        replicas=args.replicas,
        device=args.device or "auto",
        engine="local" if args.local else "ray",
        tracking_uri=args.mlflow_tracking_uri,
    )
    return 0
