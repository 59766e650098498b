"""`ce-ray evaluate --protocol photos`: whole photos with painted holes, as users inpaint them.

Not in the paper (its Table 1 scores the centre square of crops; evaluate.py keeps that protocol).
Here every val photo is inpainted whole, through the same window planner `ce-ray inpaint` and the
web page use (infer/planner.py: plan), beside the classical fills of the same hole. No Ray.

Protocol (deterministic: the same input gives a byte-identical report.json):
- Photos: the val split of prepared shards (or every photo `ce-ray prepare` reads from a folder,
  glob, list, bucket, "bundled"), resized so the shorter side is `photo_size` (512 by default;
  prepare them with `--load-size 512` so nothing is upscaled from a smaller copy).
- Holes: one per photo and family (strokes.py: LaMa's thin / medium / thick, scaled with the
  photo's shorter side), seeded by (photo key, family).
- Metrics over the hole's pixels in [0, 1]: mean L1, mean L2, PSNR (per photo, averaged), and
  a weight-free sharpness figure: the hole's gradient energy (squared forward differences,
  averaged over hole pixels and channels) divided by the truth's. 1.0 = as much detail as the
  photo, 0 = flat; reported, never a goal (noise scores high too).
- Reported per family, per hole-area bin (0-10 %, 10-20 %, ... 40-50 % of the photo), and per
  photo; grids of whole photos: masked | model | Telea | harmonic | truth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ce_ray.core import baselines as B
from ce_ray.core.strokes import FAMILIES, stroke_hole
from ce_ray.errors import UserError
from ce_ray.fsutil import write_atomic

if TYPE_CHECKING:
    from ce_ray.infer.resolve import LoadedGenerator

REPORT_FORMAT = "ce-ray-eval-photos/1"
MODEL = "model"
DEFAULT_PHOTO_SIZE = 512  # shorter side (LaMa's 512-px evaluation sets)
AREA_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # hole area as a fraction of the photo; strokes.MAX_COVERAGE caps it at 0.5
GRID_PHOTOS = 4  # rows in each family's grid
GRID_HEIGHT = 192  # px per row in the grids
GRID_METHODS = ("telea", "harmonic")  # beside the model in the grids
MASK_COLOUR = (255, 0, 255)  # the hole in the grids' "masked" column: impossible to mistake for a fill


@dataclass
class Photo:
    key: str
    rgb: np.ndarray  # (H, W, 3) uint8, shorter side = photo_size


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    from ce_ray.data.crops import resize_shorter

    return resize_shorter(rgb, size)


def load_photos(
    data: str, photo_size: int = DEFAULT_PHOTO_SIZE, max_photos: int | None = None
) -> tuple[list[Photo], list[dict[str, str]]]:
    """The photos of `data` (a shards folder's val split, or anything prepare reads), shorter side
    `photo_size`, in key order. Returns (photos, skipped files with reasons)."""
    from ce_ray.data import images, prepare
    from ce_ray.data.shards import IMAGE_COLUMN, KEY_COLUMN, is_shards, open_shard, shard_files

    photos: list[Photo] = []
    skipped: list[dict[str, str]] = []
    if is_shards(data):
        for path in shard_files(data, "val"):
            table = open_shard(path).read(columns=[KEY_COLUMN, IMAGE_COLUMN])
            for key, blob in zip(table.column(0).to_pylist(), table.column(1).to_pylist()):
                photos.append(Photo(key, _resize(images.decode_rgb(blob), photo_size)))
    else:
        files, skipped = prepare.discover(data)
        opts = prepare.Options(load_size=photo_size, min_size=16)
        for f in files:
            row = prepare.ingest_file(f, opts)
            if row["reason"] is not None:
                skipped.append({"path": row["source"], "reason": row["reason"]})
                continue
            photos.append(Photo(f.key, _resize(images.decode_rgb(row[IMAGE_COLUMN]), photo_size)))
    photos.sort(key=lambda p: p.key)
    if max_photos is not None:
        photos = photos[:max_photos]
    if not photos:
        raise UserError(
            f"no photos in {data!r}"
            + (": " + "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3]) if skipped else "")
        )
    return photos, skipped


def photo_hole(key: str, family: str, h: int, w: int) -> np.ndarray:
    """The evaluation hole of one photo and family: the same on every run and machine."""
    from ce_ray.data.crops import stable_seed

    return stroke_hole(family, h, w, np.random.default_rng(stable_seed("ce-ray photo eval", key, family)))


def scores(pred: np.ndarray, truth: np.ndarray, hole: np.ndarray) -> dict[str, float]:
    """l1, l2, psnr over the hole's pixels in [0, 1], and the sharpness ratio. (H, W, 3) uint8."""
    p = pred.astype(np.float64) / 255.0
    t = truth.astype(np.float64) / 255.0
    m = hole[..., None]
    n = max(1, int(hole.sum())) * 3
    d = (p - t) * m
    l1 = float(np.abs(d).sum() / n)
    l2 = float(np.square(d).sum() / n)
    return {
        "l1": l1,
        "l2": l2,
        "psnr": float(10 * np.log10(1.0 / max(l2, 1e-10))),
        "sharpness": gradient_energy(p, hole) / max(gradient_energy(t, hole), 1e-12),
    }


def gradient_energy(img: np.ndarray, hole: np.ndarray) -> float:
    """Mean over hole pixels and channels of dx^2 + dy^2 (forward differences; the last row /
    column counts no difference beyond the edge). img (H, W, 3) float; hole (H, W) bool."""
    dx = np.zeros_like(img)
    dy = np.zeros_like(img)
    dx[:, :-1] = img[:, 1:] - img[:, :-1]
    dy[:-1] = img[1:] - img[:-1]
    e = (dx**2 + dy**2).sum(axis=-1)
    return float(e[hole].mean() / 3) if hole.any() else 0.0


def _bin_of(fraction: float) -> str:
    for lo, hi in zip(AREA_BINS[:-1], AREA_BINS[1:]):
        if fraction <= hi or hi == AREA_BINS[-1]:
            return f"{int(100 * lo)}-{int(100 * hi)}%"
    return f"{int(100 * AREA_BINS[-2])}-{int(100 * AREA_BINS[-1])}%"


def evaluate_photos(
    model_uri: str | None,
    data: str,
    *,
    families: Sequence[str] = tuple(FAMILIES),
    photo_size: int = DEFAULT_PHOTO_SIZE,
    out_dir: str | os.PathLike[str] = "outputs/eval_photos",
    methods: Sequence[str] = B.CLASSICAL,
    max_photos: int | None = None,
    grid_photos: int = GRID_PHOTOS,
    device: str = "cpu",
    mlflow_tracking_uri: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score the model (if any) and the classical methods on whole photos with painted holes;
    write OUT/report.json, OUT/report.md and OUT/grid_<family>.png. Returns the report."""
    log = log or (lambda _msg: None)
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise UserError(
            f"unknown mask family {', '.join(bad) or '(none)'}; the photo protocol takes {', '.join(FAMILIES)}"
        )
    unknown = [m for m in methods if m not in B.CLASSICAL]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; classical methods are {', '.join(B.CLASSICAL)}")
    if photo_size < 64:
        raise UserError(f"--photo-size must be >= 64, got {photo_size}")
    loaded = _load_model(model_uri, device, mlflow_tracking_uri) if model_uri and model_uri.lower() != "none" else None
    if loaded is not None and loaded.config.model.variant == "center":
        raise UserError(
            f"the model at {model_uri!r} is a centre model (model.variant=center): it hides its whole window and "
            "is not meant for painted holes; evaluate a model trained with model.variant=full "
            "(e.g. tune_configs/quality_freeform.yaml)"
        )
    photos, skipped = load_photos(data, photo_size, max_photos)
    names = ([MODEL] if loaded else []) + list(methods)
    log(
        f"evaluating {len(photos)} photos at a {photo_size}-px shorter side, {', '.join(families)} holes: "
        f"{', '.join(names)}"
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_families: dict[str, Any] = {}
    pictures: dict[str, str] = {}
    for fam in families:
        holes = [photo_hole(p.key, fam, *p.rgb.shape[:2]) for p in photos]
        results: dict[str, list[np.ndarray]] = {}
        if loaded is not None:
            results[MODEL] = _run_model(loaded, photos, holes)
        for m in methods:
            results[m] = [B.inpaint_image(m, p.rgb, h) for p, h in zip(photos, holes)]
        per_photo = {
            p.key: {"hole_fraction": float(h.mean()), **{m: scores(results[m][i], p.rgb, h) for m in names}}
            for i, (p, h) in enumerate(zip(photos, holes))
        }
        report_families[fam] = _summarise(per_photo, names)
        pictures[fam] = _write_grid(out / f"grid_{fam}.png", photos, holes, results, names, grid_photos).name
        log(f"  {fam}: " + ", ".join(f"{m} {report_families[fam]['methods'][m]['psnr']:.2f} dB" for m in names))
    report = {
        "format": REPORT_FORMAT,
        "data": data,
        "model": None
        if loaded is None
        else {"uri": loaded.source, "step": loaded.step, "variant": loaded.config.model.variant},
        "protocol": {
            "photo_size": photo_size,
            "photos": len(photos),
            "holes": "strokes.stroke_hole(family, H, W), seeded by crops.stable_seed('ce-ray photo eval', key, family)",
            "metrics": "over hole pixels in [0, 1]: mean L1 and L2 (fractions), PSNR per photo (peak 1) averaged "
            "over photos; sharpness = gradient energy in the hole / the truth's (1 = as detailed as the photo, "
            "0 = flat), averaged over photos",
            "model_path": "infer.planner.plan + inpaint_many, as ce-ray inpaint and the web page",
            "baselines": {
                m: B.SETTINGS[m] + f" (per connected hole region with {B.IMAGE_MARGIN} px of context)" for m in methods
            },
            "area_bins": [f"{int(100 * a)}-{int(100 * b)}%" for a, b in zip(AREA_BINS[:-1], AREA_BINS[1:])],
        },
        "skipped": skipped,
        "families": report_families,
        "pictures": pictures,
    }
    write_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "report.md", to_markdown(report))
    log(f"wrote {out / 'report.md'}")
    return report


def _load_model(uri: str, device: str, tracking_uri: str | None) -> LoadedGenerator:
    from ce_ray.core.step import resolve_device
    from ce_ray.infer.resolve import load_generator

    return load_generator(uri, resolve_device(device), tracking_uri=tracking_uri)


def _run_model(loaded: LoadedGenerator, photos: list[Photo], holes: list[np.ndarray]) -> list[np.ndarray]:
    from ce_ray.infer import planner as inpaint

    out = []
    for p, h in zip(photos, holes):  # one photo at a time: a photo's windows already make a batch
        out += inpaint.inpaint_many(loaded, [inpaint.plan(loaded, p.rgb, h)])
    return out


def _summarise(per_photo: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    keys = list(per_photo)
    fr = np.asarray([per_photo[k]["hole_fraction"] for k in keys])

    def mean_of(idx: list[int]) -> dict[str, dict[str, float]]:
        return {
            m: {k: float(np.mean([per_photo[keys[i]][m][k] for i in idx])) for k in ("l1", "l2", "psnr", "sharpness")}
            for m in names
        }

    bins: dict[str, Any] = {}
    for i in range(len(keys)):
        bins.setdefault(_bin_of(float(fr[i])), []).append(i)
    order = [f"{int(100 * a)}-{int(100 * b)}%" for a, b in zip(AREA_BINS[:-1], AREA_BINS[1:])]
    return {
        "photos": len(keys),
        "hole_fraction": float(fr.mean()),
        "methods": mean_of(list(range(len(keys)))),
        "bins": {b: {"photos": len(bins[b]), "methods": mean_of(bins[b])} for b in order if b in bins},
        "per_photo": per_photo,
    }


def _fit(rgb: np.ndarray, height: int) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * height / h)), height), Image.Resampling.BILINEAR))


def _write_grid(
    path: Path,
    photos: list[Photo],
    holes: list[np.ndarray],
    results: dict[str, list[np.ndarray]],
    names: list[str],
    rows: int,
) -> Path:
    """Whole photos, one per row: masked | model | Telea | harmonic | truth (the columns present)."""
    from ce_ray.data.grids import GAP, save_png

    cols = [m for m in (MODEL, *GRID_METHODS) if m in names]
    picks = sorted({int(round(i)) for i in np.linspace(0, len(photos) - 1, min(rows, len(photos)))})
    lines = []
    for i in picks:
        masked = photos[i].rgb.copy()
        masked[holes[i]] = MASK_COLOUR
        cells = (
            [_fit(masked, GRID_HEIGHT)]
            + [_fit(results[m][i], GRID_HEIGHT) for m in cols]
            + [_fit(photos[i].rgb, GRID_HEIGHT)]
        )
        line = np.full((GRID_HEIGHT, sum(c.shape[1] for c in cells) + GAP * (len(cells) - 1), 3), 255, np.uint8)
        x = 0
        for c in cells:
            line[:, x : x + c.shape[1]] = c
            x += c.shape[1] + GAP
        lines.append(line)
    width = max(line.shape[1] for line in lines)
    out = np.full((len(lines) * (GRID_HEIGHT + GAP) - GAP, width, 3), 255, np.uint8)
    for r, line in enumerate(lines):
        out[r * (GRID_HEIGHT + GAP) : r * (GRID_HEIGHT + GAP) + GRID_HEIGHT, : line.shape[1]] = line
    return save_png(out, path)


def write_strip(path: Path, photo: Photo, hole: np.ndarray, results: dict[str, np.ndarray]) -> Path:
    """One photo as a row: masked | each result (in the given order) | truth."""
    from ce_ray.data.grids import GAP, save_png

    masked = photo.rgb.copy()
    masked[hole] = MASK_COLOUR
    cells = [masked, *results.values(), photo.rgb]
    h, w = photo.rgb.shape[:2]
    out = np.full((h, len(cells) * (w + GAP) - GAP, 3), 255, np.uint8)
    for j, c in enumerate(cells):
        out[:, j * (w + GAP) : j * (w + GAP) + w] = c
    return save_png(out, path)


def label(m: str) -> str:
    return "Context Encoder (this model)" if m == MODEL else B.LABELS[m]


def to_markdown(report: dict[str, Any]) -> str:
    p = report["protocol"]
    md = ["# Inpainting evaluation: whole photos, painted holes", ""]
    model = report["model"]
    md += [
        f"- Data: `{report['data']}`: {p['photos']} photos at a {p['photo_size']}-px shorter side.",
        f"- Model: `{model['uri']}`, step {model['step']}." if model else "- Model: none (baselines only).",
        f"- Holes: {p['holes']}.",
        f"- Metrics {p['metrics']}.",
        f"- Model path: {p['model_path']}.",
    ]
    for fam, r in report["families"].items():
        md += [
            "",
            f"## {fam} (mean hole {100 * r['hole_fraction']:.1f}% of the photo, {r['photos']} photos)",
            "",
            "| method | L1 (%) | L2 (%) | PSNR (dB) | sharpness |",
            "|---|---|---|---|---|",
        ]
        md += [
            f"| {label(m)} | {100 * v['l1']:.2f} | {100 * v['l2']:.2f} | {v['psnr']:.2f} | {v['sharpness']:.2f} |"
            for m, v in r["methods"].items()
        ]
        methods = list(r["methods"])
        md += [
            "",
            "PSNR (dB) by hole area:",
            "",
            "| area | photos | " + " | ".join(methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        md += [
            f"| {b} | {v['photos']} | " + " | ".join(f"{v['methods'][m]['psnr']:.2f}" for m in methods) + " |"
            for b, v in r["bins"].items()
        ]
        if fam in report["pictures"]:
            md += [
                "",
                f"![{fam}]({report['pictures'][fam]})",
                "",
                "Columns: masked (magenta = hole) | "
                + " | ".join(label(m) for m in (MODEL, *GRID_METHODS) if m in methods)
                + " | truth.",
            ]
        md += [
            "",
            "<details><summary>per photo: PSNR (dB)</summary>",
            "",
            "| photo | hole | " + " | ".join(methods) + " |",
            "|---|---|" + "---|" * len(methods),
        ]
        md += [
            f"| `{k}` | {100 * v['hole_fraction']:.0f}% | " + " | ".join(f"{v[m]['psnr']:.2f}" for m in methods) + " |"
            for k, v in r["per_photo"].items()
        ]
        md += ["", "</details>"]
    return "\n".join(md) + "\n"
