"""`ce-ray evaluate`: a model beside classical inpainting on the same tiles and holes, as in Table 1.

Scored as the paper's Table 1 (docs/paper.md, "Results to compare against"), written as
report.json, report.md and picture grids, and optionally logged to an MLflow run. No Ray.

Protocol (deterministic: the same input gives a byte-identical report.json):
- Shards from `ce-ray prepare`: the val split, tile for tile the crops and holes the trainer
  validates on (local_data.val_arrays).
- Anything else `ce-ray prepare` accepts (a folder, glob, .txt list, bucket URI, "bundled"): each
  photo goes through prepare's own ingest (EXIF rotation, RGB, shorter side -> 350, the shards'
  JPEG encoding), so a folder scores exactly as its prepared shards would; files that are not
  usable photos are listed under "skipped", never fatal.
- Every photo: non-overlapping 128x128 tiles, row-major (crops.tiles); hole per tile: the
  centre hole with the model's overlap (as in training), or a random block / region seeded by
  (photo key, tile index). The first `max_tiles` tiles in key order are scored.
- Metrics over the hole in [0, 1]: mean L1, mean L2 and PSNR per tile, averaged over tiles
  (metrics.hole_errors), and SSIM (scikit-image) over the hole's bounding box (see `hole_ssim`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch

from ce_ray.config import FINE_SIZE, LOAD_SIZE, Config, DataConfig, MaskConfig
from ce_ray.core import baselines as B
from ce_ray.core.masks import fill_hole
from ce_ray.core.metrics import hole_errors
from ce_ray.data import crops
from ce_ray.data.grids import grid, save_png
from ce_ray.data.shards import IMAGE_COLUMN, is_shards
from ce_ray.errors import UserError
from ce_ray.fsutil import write_atomic

if TYPE_CHECKING:
    from ce_ray.infer.resolve import LoadedGenerator

REPORT_FORMAT = "ce-ray-eval/1"
MODEL = "model"  # method name of the evaluated checkpoint
MASK_KINDS = ("center", "random_block", "random_region", "thin", "medium", "thick")  # the last three: strokes.FAMILIES
STROKE_FAMILIES = ("thin", "medium", "thick")
METRICS = ("l1", "l2", "psnr", "ssim")
DEFAULT_MAX_TILES = (
    512  # every method costs ~50 ms of CPU per tile: ~25 s at the cap; the 12 bundled photos give 90 tiles
)
DEFAULT_SAMPLE_TILES = 8  # rows in each picture grid
DEFAULT_OUT = "outputs/eval"
CHUNK = 64  # tiles scored at a time: bounds memory to one chunk of outputs per method
SSIM_WIN = 7  # skimage's default (uniform) window; a bounding box is grown to at least this side

# Pathak et al. 2016, Table 1 (docs/paper.md), centre 64x64 hole on Paris StreetView (L1 / L2 as
# fractions, PSNR in dB). A different dataset from ours: context for the scale of the numbers,
# not a row to rank against.
PAPER_REFERENCE: tuple[dict[str, Any], ...] = (
    {
        "method": "Context Encoder (paper)",
        "dataset": "Paris StreetView",
        "l1": 0.0937,
        "l2": 0.0196,
        "psnr": 18.58,
        "ssim": None,
    },
    {
        "method": "NN-inpainting, HOG features (paper)",
        "dataset": "Paris StreetView",
        "l1": 0.1992,
        "l2": 0.0692,
        "psnr": 12.79,
        "ssim": None,
    },
)
SSIM_NOTE = (
    "skimage.metrics.structural_similarity (7x7 uniform window, data_range=1, channel_axis=-1) over the "
    "hole's bounding box, grown to >= 7 px a side: for the centre hole that box is exactly the filled "
    "56x56 square, so SSIM covers the same pixels as L1/L2/PSNR; over the full tile the pasted-back "
    "context (>80% of it, identical for every method) pushes all SSIMs towards 1 and hides the "
    "differences. For irregular holes the box also holds some context pixels, equally for every method."
)


@dataclass
class Tiles:
    """The evaluation set: tiles, holes and where each tile came from."""

    images: np.ndarray  # (N, 3, S, S) float32 in [-1, 1]
    holes: np.ndarray  # (N, 1, S, S) float32 in {0, 1}
    keys: list[str]  # photo key of each tile
    index: list[int]  # tile index within its photo (row-major)
    source: str  # "shards" or "photos"
    skipped: list[dict[str, str]] = field(default_factory=list)  # photos mode: unusable files + reason

    @property
    def photos(self) -> int:
        return len(set(self.keys))


# --- Tiles ---------------------------------------------------------------------------------------


def _tile_index(keys: list[str]) -> list[int]:
    """Row-major tile number within its photo, from consecutive equal keys."""
    out, prev, i = [], None, 0
    for k in keys:
        i = i + 1 if k == prev else 0
        out.append(i)
        prev = k
    return out


def load_tiles(
    data: str,
    mask: MaskConfig,
    *,
    max_tiles: int = DEFAULT_MAX_TILES,
    load_size: int = LOAD_SIZE,
    fine_size: int = FINE_SIZE,
) -> Tiles:
    """The first `max_tiles` tiles (and their holes) of a shards folder's val split, or of every
    photo in anything `ce-ray prepare` reads (module docstring)."""
    from ce_ray.data import local_stream as local_data
    from ce_ray.data import prepare

    # Only data.* and mask.* are read below; no model is built from this config.
    cfg = Config(
        data=DataConfig(shards=data, load_size=load_size, fine_size=fine_size, val_images=max_tiles), mask=mask
    )
    if is_shards(data):
        val_images, val_holes, val_keys = local_data.val_arrays(cfg)
        return Tiles(val_images, val_holes, val_keys, _tile_index(val_keys), "shards")

    files, skipped = prepare.discover(data)
    opts = prepare.Options(load_size=load_size, min_size=fine_size)
    images: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    keys: list[str] = []
    n = 0
    for f in files:
        if n >= max_tiles:
            break
        row = prepare.ingest_file(f, opts)  # never raises for what a file contains
        if row["reason"] is not None:
            skipped.append({"path": row["source"], "reason": row["reason"]})
            continue
        v = crops.val_samples(row[IMAGE_COLUMN], f.key, cfg)  # tiles + holes seeded by (key, tile)
        take = min(len(v["image"]), max_tiles - n)
        images.append(v["image"][:take])
        holes.append(v["hole"][:take])
        keys += [f.key] * take
        n += take
    if not images:
        why = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]) or "no files"
        raise UserError(f"no {fine_size}x{fine_size} tiles in {data!r}: {why}")
    return Tiles(np.concatenate(images), np.concatenate(holes), keys, _tile_index(keys), "photos", skipped)


# --- Metrics -------------------------------------------------------------------------------------


def _ssim_box(hole: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of a (H, W) hole, grown symmetrically (then shifted inside the tile) to at least
    SSIM_WIN px a side, the smallest region skimage's default window fits in."""
    box = []
    for axis in (1, 0):  # rows: any over columns; columns: any over rows
        idx = np.flatnonzero(hole.any(axis=axis))
        size = hole.shape[1 - axis]
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo < SSIM_WIN:
            grow = SSIM_WIN - (hi - lo)
            lo, hi = lo - grow // 2, hi + grow - grow // 2
            shift = max(0, -lo) - max(0, hi - size)
            lo, hi = lo + shift, hi + shift
        box.append(slice(lo, hi))
    return box[0], box[1]


def hole_ssim(pred: np.ndarray, truth: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Per-image SSIM over each hole's bounding box (SSIM_NOTE says why). pred/truth: (B, 3, H, W)
    in [-1, 1]; holes (B, 1, H, W). An image without a hole scores 1. Returns shape (B,)."""
    from skimage.metrics import structural_similarity  # lazy: heavy import

    ssim = cast(Callable[..., float], structural_similarity)  # untyped in skimage

    out = np.ones(len(pred), dtype=np.float64)
    for i in range(len(pred)):
        hole = np.asarray(holes[i, 0]).astype(bool)
        if not hole.any():
            continue
        r, c = _ssim_box(hole)
        p = (np.asarray(pred[i], np.float64)[:, r, c].transpose(1, 2, 0) + 1) / 2  # (h, w, 3) in [0, 1]
        t = (np.asarray(truth[i], np.float64)[:, r, c].transpose(1, 2, 0) + 1) / 2
        out[i] = ssim(t, p, channel_axis=-1, data_range=1.0, win_size=SSIM_WIN)
    return out


def tile_scores(pred: np.ndarray, truth: np.ndarray, holes: np.ndarray) -> dict[str, np.ndarray]:
    """Per-tile l1, l2, psnr (metrics.hole_errors) and ssim, each of shape (B,)."""
    return {**hole_errors(pred, truth, holes), "ssim": hole_ssim(pred, truth, holes)}


# --- Running the methods -------------------------------------------------------------------------


def _model_fn(loaded: LoadedGenerator, device: torch.device) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    from ce_ray.core.step import predict

    cfg = loaded.config
    G = loaded.model.to(device)

    def run(images: np.ndarray, holes: np.ndarray) -> np.ndarray:
        out = predict(G, torch.from_numpy(images).to(device), torch.from_numpy(holes).to(device), cfg)
        return out.cpu().numpy()

    return run


def _baseline_fn(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def run(images: np.ndarray, holes: np.ndarray) -> np.ndarray:
        return cast(np.ndarray, B.run_baseline(name, images, holes))  # numpy in, numpy out

    return run


def _sample_rows(n: int, k: int) -> list[int]:
    """k tile indices spread evenly over all n (first and last included): a fixed picture sample
    that shows several photos, not just the first one."""
    if k <= 0 or n == 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(k, n))})


def _check_args(mask_kind: str, max_tiles: int, sample_tiles: int, methods: Sequence[str]) -> None:
    if mask_kind not in MASK_KINDS:
        raise UserError(f"unknown mask {mask_kind!r}; use {', '.join(MASK_KINDS)}")
    if max_tiles < 1:
        raise UserError(f"--max-tiles must be >= 1, got {max_tiles}")
    if sample_tiles < 0:
        raise UserError(f"--sample-tiles must be >= 0, got {sample_tiles}")
    unknown = [m for m in methods if m not in B.BASELINES]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; baselines are {', '.join(B.BASELINES)}")


def evaluate(
    model_uri: str | None,
    data: str,
    *,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    mask_kind: str = "center",
    max_tiles: int = DEFAULT_MAX_TILES,
    sample_tiles: int = DEFAULT_SAMPLE_TILES,
    methods: Sequence[str] = B.BASELINES,
    mlflow_run_id: str | None = None,
    mlflow_tracking_uri: str | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score the model (if `model_uri` is not None / "none") and the chosen baselines on the same
    tiles of `data`; write OUT/report.json, OUT/report.md and grid_<method>.png / grid_all.png;
    log them to MLflow run `mlflow_run_id` if given. Returns the report (report.json's content)."""
    log = log or (lambda _msg: None)
    methods = list(dict.fromkeys(methods))  # de-duplicated, order kept
    _check_args(mask_kind, max_tiles, sample_tiles, methods)
    loaded = None
    if model_uri is not None and model_uri.lower() != "none":
        from ce_ray.core.step import resolve_device
        from ce_ray.infer.resolve import load_generator

        dev = resolve_device(device)
        loaded = load_generator(model_uri, dev, tracking_uri=mlflow_tracking_uri)
        if loaded.config.model.variant == "center" and mask_kind != "center":
            raise UserError(
                f"the model at {model_uri!r} is a centre model (model.variant=center) and only fills the centre hole; "
                f"use --mask center, or a model trained with model.variant=full for --mask {mask_kind}"
            )
    if not methods and loaded is None:
        raise UserError("nothing to evaluate: give --model or at least one baseline in --methods")

    # The model's own hole settings (centre overlap, region coverage...) when there is a model.
    base = loaded.config if loaded else Config()
    if mask_kind in STROKE_FAMILIES:  # one LaMa family, scaled to the tile (strokes.py)
        mask = dataclasses.replace(base.mask, kind="strokes", families=mask_kind)
    else:
        # _check_args allowed only MASK_KINDS, and the stroke families are handled above
        kind = cast(Literal["center", "random_block", "random_region"], mask_kind)
        mask = dataclasses.replace(base.mask, kind=kind)
    tiles = load_tiles(data, mask, max_tiles=max_tiles, load_size=base.data.load_size, fine_size=base.data.fine_size)
    n = len(tiles.images)
    log(
        f"evaluating {n} tiles from {tiles.photos} photos ({tiles.source}) with {mask_kind} holes: "
        f"{', '.join(([MODEL] if loaded else []) + methods)}"
    )

    runners: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}
    if loaded:
        runners[MODEL] = _model_fn(loaded, dev)
    for m in methods:
        runners[m] = _baseline_fn(m)
    sample = _sample_rows(n, sample_tiles)
    scores: dict[str, dict[str, list[np.ndarray]]] = {m: defaultdict(list) for m in runners}
    shown: dict[str, list[np.ndarray]] = {m: [] for m in runners}  # outputs of the sampled tiles
    for a in range(0, n, CHUNK):
        x, h = tiles.images[a : a + CHUNK], tiles.holes[a : a + CHUNK]
        rows = [i - a for i in sample if a <= i < a + CHUNK]
        for m, run in runners.items():
            pred = run(x, h)
            for k, v in tile_scores(pred, x, h).items():
                scores[m][k].append(v)
            shown[m].append(pred[rows])
    per_tile = {m: {k: np.concatenate(v) for k, v in s.items()} for m, s in scores.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = _write_grids(out, tiles, sample, {m: np.concatenate(v) for m, v in shown.items()})
    report = _report(data, tiles, mask, max_tiles, loaded, per_tile, pictures, sample)
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "report.md", to_markdown(report))
    log(f"wrote {out / 'report.md'}")
    if mlflow_run_id:
        files = ["report.json", "report.md", *pictures.values()]
        log_to_mlflow(mlflow_run_id, report, [out / f for f in files], mlflow_tracking_uri)
        log(f"logged eval_* metrics and evaluation/ artifacts to MLflow run {mlflow_run_id}")
    return report


# --- Outputs -------------------------------------------------------------------------------------


def label(method: str, report: dict[str, Any] | None = None) -> str:
    if method == MODEL:
        step = (report or {}).get("model", {}) or {}
        return (
            f"Context Encoder (this model, step {step['step']})" if "step" in step else "Context Encoder (this model)"
        )
    return B.LABELS[method]


def _write_grids(out: Path, tiles: Tiles, sample: list[int], shown: dict[str, np.ndarray]) -> dict[str, str]:
    """grid_<method>.png (masked | method | truth) and grid_all.png (masked | every method |
    truth) for the sampled tiles. Returns {method or "all": file name}."""
    if not sample:
        return {}
    truth = torch.from_numpy(tiles.images[sample])
    masked = fill_hole(truth, torch.from_numpy(tiles.holes[sample]))
    files = {}
    for m, o in shown.items():
        files[m] = save_png(grid([masked, torch.from_numpy(o), truth]), out / f"grid_{m}.png").name
    files["all"] = save_png(
        grid([masked, *(torch.from_numpy(o) for o in shown.values()), truth]), out / "grid_all.png"
    ).name
    return files


def package_of(key: str) -> str:
    """The group a photo key belongs to in per-package tables: its first path component."""
    return key.split("/", 1)[0] if "/" in key else "."


def _means(s: dict[str, np.ndarray], idx: np.ndarray | slice = slice(None)) -> dict[str, float]:
    return {k: float(np.mean(s[k][idx])) for k in METRICS}


def _report(
    data: str,
    tiles: Tiles,
    mask: MaskConfig,
    max_tiles: int,
    loaded: LoadedGenerator | None,
    per_tile: dict[str, dict[str, np.ndarray]],
    pictures: dict[str, str],
    sample: list[int],
) -> dict[str, Any]:
    keys = np.asarray(tiles.keys)
    per_photo = {}
    for k in dict.fromkeys(tiles.keys):  # photos in evaluation order
        idx = np.flatnonzero(keys == k)
        per_photo[k] = {"tiles": int(len(idx)), **{m: _means(s, idx) for m, s in per_tile.items()}}
    # The source package (or folder) of each photo: the first part of its key, e.g.
    # "gcompris-qt-data/erase/..." -> "gcompris-qt-data", "skimage/rocket" -> "skimage".
    groups = np.asarray([package_of(k) for k in tiles.keys])
    per_package = {}
    for g in dict.fromkeys(groups.tolist()):
        idx = np.flatnonzero(groups == g)
        per_package[g] = {
            "photos": len({tiles.keys[i] for i in idx}),
            "tiles": int(len(idx)),
            **{m: _means(s, idx) for m, s in per_tile.items()},
        }
    model = None
    if loaded:
        c = loaded.config
        model = {
            "uri": loaded.source,
            "step": loaded.step,
            "variant": c.model.variant,
            "bottleneck": c.model.bottleneck,
            "ngf": c.model.ngf,
            "ndf": c.model.ndf,
            "trained_mask": c.mask.kind,
        }
    n = len(tiles.images)
    return {
        "format": REPORT_FORMAT,
        "data": data,
        "source": "the val split of prepared shards"
        if tiles.source == "shards"
        else "every photo, through prepare's ingest",
        "model": model,
        "protocol": {
            "load_size": LOAD_SIZE if loaded is None else loaded.config.data.load_size,
            "tile": tiles.images.shape[-1],
            "tiling": "non-overlapping, row-major from the top-left of each photo (crops.tiles)",
            "mask": dataclasses.asdict(mask),
            "hole_seed": "crops.stable_seed(photo key, tile index)" if mask.kind != "center" else None,
            "hole_fraction": float(tiles.holes.mean()),
            "metrics": "over hole pixels in [0, 1]: mean L1, mean L2 (fractions; x100 for %), PSNR in dB "
            "(peak 1, per tile, averaged over tiles; a perfect fill caps at 100 dB)",
            "ssim": SSIM_NOTE,
            "baselines": {m: B.SETTINGS[m] for m in per_tile if m in B.SETTINGS},
        },
        "tiles": n,
        "photos": tiles.photos,
        "max_tiles": max_tiles,
        "capped": n >= max_tiles,
        "skipped": tiles.skipped,
        "methods": {m: {**_means(s), "label": label(m, {"model": model})} for m, s in per_tile.items()},
        "reference": {
            "note": "Pathak et al. 2016, Table 1, centre hole on Paris StreetView: a different dataset, for scale only",
            "rows": list(PAPER_REFERENCE),
        },
        "per_package": per_package,
        "per_photo": per_photo,
        "pictures": pictures,
        "sample_tiles": [{"key": tiles.keys[i], "tile": tiles.index[i]} for i in sample],
    }


def _fmt(v: float | None, pct: bool = False, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.{digits}f}" if pct else f"{v:.{digits}f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """[method, L1 %, L2 %, PSNR dB, SSIM] per evaluated method."""
    return [
        [r["label"], _fmt(r["l1"], True), _fmt(r["l2"], True), _fmt(r["psnr"]), _fmt(r["ssim"], digits=3)]
        for r in report["methods"].values()
    ]


HEADER = ["method", "L1 (%)", "L2 (%)", "PSNR (dB)", "SSIM"]


def to_text(report: dict[str, Any]) -> str:
    """The results as an aligned plain-text table (the CLI prints this)."""
    rows = [HEADER, *table_rows(report)]
    ref = [
        [f"{r['method']} [{r['dataset']}]", _fmt(r["l1"], True), _fmt(r["l2"], True), _fmt(r["psnr"]), _fmt(r["ssim"])]
        for r in report["reference"]["rows"]
    ]
    widths = [max(len(r[j]) for r in rows + ref) for j in range(len(HEADER))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))

    mask = report["protocol"]["mask"]["kind"]
    tile = report["protocol"]["tile"]
    out = [
        f"{report['tiles']} tiles of {tile}x{tile} px from {report['photos']} photos, {mask} holes, "
        "metrics over the hole"
    ]
    out += [line(rows[0]), line(["-" * w for w in widths]), *map(line, rows[1:])]
    out += ["reference, a different dataset (paper Table 1):", *map(line, ref)]
    return "\n".join(out)


def to_markdown(report: dict[str, Any]) -> str:
    p = report["protocol"]
    model = report["model"]
    md = ["# Inpainting evaluation", ""]
    md += [
        f"- Data: `{report['data']}` ({report['source']}): {report['tiles']} tiles of {p['tile']}x{p['tile']} px from "
        f"{report['photos']} photos"
        + (f" (capped at --max-tiles {report['max_tiles']})" if report["capped"] else "")
        + "."
    ]
    md += [
        f"- Model: `{model['uri']}`, step {model['step']}, variant {model['variant']}, "
        f"bottleneck {model['bottleneck']}, ngf {model['ngf']}, ndf {model['ndf']}."
        if model
        else "- Model: none (baselines only)."
    ]
    hole = f"{p['mask']['kind']} hole" + (
        f" (overlap {p['mask']['overlap']} px)" if p["mask"]["kind"] == "center" else ""
    )
    md += [
        f"- Protocol: shorter side resized to {p['load_size']}, {p['tiling']}; {hole}, "
        f"{100 * p['hole_fraction']:.1f}% of each tile on average."
    ]
    md += [f"- Metrics {p['metrics']}.", f"- SSIM: {p['ssim']}"]
    if report["skipped"]:
        md += [
            f"- Skipped {len(report['skipped'])} file(s): "
            + "; ".join(f"`{s['path']}`: {s['reason']}" for s in report["skipped"][:5])
            + (" ..." if len(report["skipped"]) > 5 else "")
        ]
    md += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    md += [
        "",
        f"Not comparable, **a different dataset** ({report['reference']['note']}):",
        "",
        "| method | dataset | L1 (%) | L2 (%) | PSNR (dB) |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['method']} | {r['dataset']} | {_fmt(r['l1'], True)} | {_fmt(r['l2'], True)} | {_fmt(r['psnr'])} |"
        for r in report["reference"]["rows"]
    ]
    methods = list(report["methods"])
    md += [
        "",
        "## L1 (%) / PSNR (dB) per package",
        "",
        "| package | photos | tiles | " + " | ".join(methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    md += [
        f"| `{k}` | {v['photos']} | {v['tiles']} | "
        + " | ".join(f"{_fmt(v[m]['l1'], True)} / {_fmt(v[m]['psnr'])}" for m in methods)
        + " |"
        for k, v in report.get("per_package", {}).items()
    ]
    md += [
        "",
        "## PSNR (dB) per photo",
        "",
        "| photo | tiles | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    md += [
        f"| `{k}` | {v['tiles']} | " + " | ".join(_fmt(v[m]["psnr"]) for m in methods) + " |"
        for k, v in report["per_photo"].items()
    ]
    pics = report["pictures"]
    if pics:
        cols = " | ".join(["masked input", *(label(m, report) for m in methods), "truth"])
        shown = ", ".join(f"`{s['key']}` #{s['tile']}" for s in report["sample_tiles"])
        md += [
            "",
            "## Pictures",
            "",
            f"Sample tiles (photo, tile index): {shown}.",
            "",
            f"All methods, columns: {cols}.",
            "",
            f"![all methods]({pics['all']})",
        ]
        for m in methods:
            md += [
                "",
                f"### {label(m, report)}",
                "",
                "Columns: masked input | output | truth.",
                "",
                f"![{m}]({pics[m]})",
            ]
    return "\n".join(md) + "\n"


def log_to_mlflow(run_id: str, report: dict[str, Any], files: Sequence[Path], tracking_uri: str | None = None) -> None:
    """eval_<method>_<metric> metrics (at the model's training step, 0 without a model) and the
    report files under the run's "evaluation/" artifacts, in the store `tracking_uri` (default:
    the trainer's, tracking.resolve_uri), without reopening a finished run (tracking.log_to_run)."""
    from ce_ray import tracking

    step = (report["model"] or {}).get("step", 0)
    metrics = {f"eval_{m}_{k}": float(v) for m, r in report["methods"].items() for k, v in r.items() if k in METRICS}
    tracking.log_to_run(
        run_id,
        metrics,
        step=step,
        files=files,
        artifact_path="evaluation",
        tracking_uri=tracking_uri,
        hint="Check --mlflow-run-id and --mlflow-tracking-uri / MLFLOW_TRACKING_URI",
    )


# --- CLI glue (cli.py owns the parser and calls these) -------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ce_ray.infer.resolve import MODEL_HELP

    parser.add_argument(
        "--model",
        default="default",
        metavar="URI",
        help=f"the model to score: {MODEL_HELP}; or 'none' for the baselines only",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="SRC",
        help="shards from `ce-ray prepare` (its val split is scored), or any photos prepare reads: folder, glob, "
        ".txt list, URI, 'bundled'",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--protocol",
        default="tiles",
        choices=("tiles", "photos"),
        help="tiles: 128x128 tiles of the val photos, one hole each (the paper's Table 1; default); "
        "photos: whole val photos at --photo-size with painted holes, through the inpainting planner",
    )
    parser.add_argument(
        "--mask",
        default=None,
        help=f"tiles: the hole per tile, one of {', '.join(MASK_KINDS)} (default center); "
        "photos: stroke families, comma-separated (default thin,medium,thick)",
    )
    parser.add_argument(
        "--photo-size", type=int, default=512, help="photos: shorter side the photos are scored at (default 512)"
    )
    parser.add_argument("--max-photos", type=int, default=None, help="photos: score at most this many (default all)")
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=DEFAULT_MAX_TILES,
        help=f"score at most this many tiles (default {DEFAULT_MAX_TILES})",
    )
    parser.add_argument(
        "--sample-tiles",
        type=int,
        default=DEFAULT_SAMPLE_TILES,
        help=f"rows in each picture grid (default {DEFAULT_SAMPLE_TILES})",
    )
    parser.add_argument(
        "--methods",
        default=",".join(B.BASELINES),
        help=f"comma-separated baselines beside the model (default all: {','.join(B.BASELINES)}); '' for none",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("auto", "cpu", "cuda"), help="where the model runs (default cpu)"
    )
    parser.add_argument(
        "--mlflow-run-id",
        default=None,
        metavar="ID",
        help="also log eval_* metrics and the files under evaluation/ to this run",
    )
    parser.add_argument(
        "--mlflow-tracking-uri",
        default=None,
        metavar="URI",
        help="the MLflow store for --mlflow-run-id and models:/ runs:/ URIs: this flag, else $MLFLOW_TRACKING_URI, "
        "else outputs/mlflow.db (where ce-ray train registers models)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    import sys

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.protocol == "photos":
        from ce_ray.evaluate import photos as P

        families = [f.strip() for f in (args.mask or ",".join(STROKE_FAMILIES)).split(",") if f.strip()]
        methods = [m for m in methods if m != "mean_fill"]  # the photo protocol compares the classical fills
        out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT + "_photos"
        P.evaluate_photos(
            args.model,
            args.data,
            families=families,
            photo_size=args.photo_size,
            out_dir=out,
            methods=methods,
            max_photos=args.max_photos,
            device=args.device,
            mlflow_tracking_uri=args.mlflow_tracking_uri,
            log=lambda msg: print(msg, file=sys.stderr),
        )
        print(f"report: {Path(out) / 'report.md'} (numbers in report.json, pictures grid_<family>.png)")
        return 0
    if args.mask and args.mask not in MASK_KINDS:
        raise UserError(f"--mask {args.mask!r}: the tiles protocol takes one of {', '.join(MASK_KINDS)}")
    report = evaluate(
        args.model,
        args.data,
        out_dir=args.out,
        mask_kind=args.mask or "center",
        max_tiles=args.max_tiles,
        sample_tiles=args.sample_tiles,
        methods=methods,
        mlflow_run_id=args.mlflow_run_id,
        mlflow_tracking_uri=args.mlflow_tracking_uri,
        device=args.device,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    print(to_text(report))
    print(f"report: {Path(args.out) / 'report.md'} (numbers in report.json, pictures grid_*.png)")
    return 0
