"""The model ce-ray ships: the free-form recipe's generator, what every command uses by default.

`ce_ray/infer/weights/freeform/` holds it, installed with the package (no download, ever):

    generator.pt   the generator's state_dict in float16 (loaded with weights_only=True)
    meta.json      format, the resolved training config, step, commit, the training command, the
                   sha256 of generator.pt, and the scores measured on the val splits
    MODEL_CARD.md  what it was trained on (packages, versions, licences), how it scores, its
                   limits and the licence of the weights

`DEFAULT_MODEL` ("default") names it wherever a model URI is taken; `package(...)` writes such a
folder from a training checkpoint (atomically). Pure torch; no Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.fsutil import file_sha256

DEFAULT_MODEL = "default"  # the name every --model flag defaults to
SHIPPED_DIR = Path(__file__).parent / "weights" / "freeform"
WEIGHTS_FILE, META_FILE, CARD_FILE = "generator.pt", "meta.json", "MODEL_CARD.md"
SHIPPED_FORMAT = "ce-ray-shipped/1"
MAX_BYTES = 25 * 2**20  # the package's budget for the weights


def is_default(uri: str | None) -> bool:
    return uri is None or uri == DEFAULT_MODEL


def read_meta(folder: Path = SHIPPED_DIR) -> dict[str, Any]:
    p = folder / META_FILE
    if not p.is_file():
        raise UserError(
            f"the shipped model is missing from this installation ({p} not found); reinstall ce-ray, "
            "or pass --model with a checkpoint of your own"
        )
    meta: dict[str, Any] = json.loads(p.read_text())
    if meta.get("format") != SHIPPED_FORMAT:
        raise UserError(f"{p} has format {meta.get('format')!r}; this ce-ray reads {SHIPPED_FORMAT}")
    return meta


def load(
    device: str | torch.device = "cpu", folder: Path = SHIPPED_DIR, verify: bool = True
) -> tuple[torch.nn.Module, C.Config, dict[str, Any]]:
    """(generator in float32 and eval mode on `device`, its training config, meta.json). `verify`:
    check the weights' sha256 against meta.json first (a corrupted install fails with a clear
    message). resolve.load_generator("default") wraps this."""
    from ce_ray.core.model import build_generator

    meta = read_meta(folder)
    weights = folder / WEIGHTS_FILE
    if verify and (not weights.is_file() or file_sha256(weights) != meta["sha256"]):
        raise UserError(
            f"the shipped weights {weights} are missing or corrupted (sha256 differs from {META_FILE}); "
            "reinstall ce-ray"
        )
    cfg = C.from_dict(meta["config"])
    G = build_generator(cfg.model)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    G.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    G.to(device).eval()
    return G, cfg, meta


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str] = SHIPPED_DIR,
    *,
    command: str,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    commit: str | None = None,
) -> dict[str, Any]:
    """Write a shipped-model folder from a training checkpoint: float16 weights and meta.json
    (the model card is written by hand beside them). `metrics`: the measured scores to record,
    read from evaluation reports, never typed in. `commit`: the commit whose code trained the
    checkpoint (default: this checkout's HEAD)."""
    from ce_ray.fsutil import write_dir
    from ce_ray.train import checkpoint as ckpt_mod

    found = ckpt_mod.find_checkpoint_dir(Path(checkpoint))
    if found is None:
        raise UserError(f"no ce-ray checkpoint (meta.json + model.pt) in {str(checkpoint)!r}")
    ckpt = ckpt_mod.load(found, with_optim=False)
    if ckpt.config.model.variant != "full":
        raise UserError("the shipped model is a full-image (free-form) generator; this checkpoint is a centre model")
    half = {k: v.half() if v.is_floating_point() else v for k, v in ckpt.G.items()}
    out = Path(out)
    card = (out / CARD_FILE).read_text() if (out / CARD_FILE).is_file() else None

    def fill(tmp: Path) -> None:
        torch.save(half, tmp / WEIGHTS_FILE)
        size = (tmp / WEIGHTS_FILE).stat().st_size
        if size > MAX_BYTES:
            raise UserError(
                f"the generator is {size / 2**20:.1f} MiB in float16, over the {MAX_BYTES / 2**20:.0f} MiB budget"
            )
        meta = {
            "format": SHIPPED_FORMAT,
            "step": ckpt.step,
            "config": C.to_dict(ckpt.config),
            "commit": commit or _commit(),
            "command": command,
            "source_checkpoint": str(ckpt.path),
            "sha256": file_sha256(tmp / WEIGHTS_FILE),
            "bytes": size,
            "dtype": "float16",
            "metrics": metrics,
            **(extra or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if card is not None:
            (tmp / CARD_FILE).write_text(card)

    write_dir(out, fill)
    return read_meta(out)


def metrics_from_reports(reports: dict[str, str | os.PathLike[str]]) -> dict[str, Any]:
    """{split: {family: {method: {l1, l2, psnr, sharpness}}}} read from photo-protocol evaluation
    reports (evaluate/photos.py's report.json), keyed by the name of the split they scored."""
    out: dict[str, Any] = {}
    for split, path in reports.items():
        r = json.loads(Path(path).read_text())
        out[split] = {
            "data": r["data"],
            "photos": r["protocol"]["photos"],
            "photo_size": r["protocol"]["photo_size"],
            "families": {f: v["methods"] for f, v in r["families"].items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m ce_ray.infer.shipped CHECKPOINT --report corpus=R1.json --report bundled=R2.json --command '...'
    (maintainers: how the shipped folder is written)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ce_ray.infer.shipped", description=main.__doc__)
    p.add_argument("checkpoint")
    p.add_argument(
        "--report",
        action="append",
        default=[],
        metavar="SPLIT=REPORT_JSON",
        help="a photo-protocol report.json per val split",
    )
    p.add_argument("--command", required=True, help="the exact training command, recorded in meta.json")
    p.add_argument("--out", default=str(SHIPPED_DIR))
    p.add_argument("--commit", default=None, help="the commit whose code trained the checkpoint (default: HEAD)")
    p.add_argument(
        "--train-shards", default=None, help="the shards it was trained on (their manifest's options are recorded)"
    )
    args = p.parse_args(argv)
    reports = dict(r.split("=", 1) for r in args.report)
    extra = {}
    if args.train_shards:
        from ce_ray.data.shards import read_manifest

        m = read_manifest(args.train_shards)
        extra["training_data"] = {"shards": args.train_shards, "train_photos": m["train"], "options": m["options"]}
    meta = package(
        args.checkpoint,
        args.out,
        command=args.command,
        metrics=metrics_from_reports(reports),
        extra=extra,
        commit=args.commit,
    )
    print(f"wrote {args.out}: step {meta['step']}, {meta['bytes'] / 2**20:.1f} MiB, sha256 {meta['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
