"""`ce-ray export`: a trained generator as ONNX or TorchScript, with a JSON description beside it.

The graph has a dynamic batch axis; the sidecar says what it is (training config, step,
metrics, the input/output contract). No Ray.

Contract of the exported graph (README "Export" shows the pre/post-processing in numpy):
    input  "context"     (B, 3, 128, 128) float32 in [-1, 1]: an RGB crop with its hole already
                         filled as in training (mask.fill: the mean pixel, or the harmonic fill)
    output "prediction"  (B, 3, 64, 64) float32 in [-1, 1] for a centre model: the centre region
                         img[:, :, 32:96, 32:96] (only its 56x56 interior is the hole); (B, 3, 128,
                         128) for a full-image model. Paste it into the hole pixels only.

An exported file loads back wherever a model URI is accepted (`ce-ray inpaint --model model.onnx`,
`ce-ray evaluate`, `ce-ray serve`): `load_exported` wraps it so the window planner runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from torch.jit._trace import TracerWarning  # torch.jit re-exports it without listing it in __all__

from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.fsutil import write_atomic
from ce_ray.infer.resolve import EXPORT_FORMAT, INPUT_NAME, OUTPUT_NAME, load_generator, sidecar_path

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18
EXAMPLE_BATCH = 2  # the traced example: any batch size works afterwards (dynamic axis)


class InferenceGraph(nn.Module):
    """G followed by the clamp `step.predict` applies (a residual generator's sum is unbounded)."""

    def __init__(self, G: nn.Module):
        super().__init__()
        self.G = G

    def forward(self, context: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 3, S/2 | S, ...)
        y: torch.Tensor = self.G(context)
        return y.float().clamp(-1.0, 1.0)


def export(model_uri: str, fmt: str, out: str | os.PathLike[str], tracking_uri: str | None = None) -> dict[str, Any]:
    """Write the generator of `model_uri` to `out` in `fmt` ("onnx" / "torchscript") and its
    description to `out`.json (both atomically). Returns the description."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.is_dir():
        raise UserError(
            f"-o {out} is a folder; give the file to write, "
            f"e.g. {out / ('generator.onnx' if fmt == 'onnx' else 'generator.pt')}"
        )
    loaded = load_generator(model_uri, "cpu", tracking_uri=tracking_uri)
    cfg = loaded.config
    S = cfg.data.fine_size
    graph = InferenceGraph(loaded.model).eval()
    channels = 4 if cfg.model.mask_input else 3
    example = torch.zeros(EXAMPLE_BATCH, channels, S, S)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The shape checks in model.DenseConv are constant for a fixed crop size; tracing
            # says so in a warning per layer.
            warnings.simplefilter("ignore", TracerWarning)
            if fmt == "torchscript":
                warnings.simplefilter(
                    "ignore", FutureWarning
                )  # "torch.jit.trace is deprecated": it still is the format LaMa users load
                jit_trace = cast(Callable[..., torch.jit.ScriptModule], torch.jit.trace)  # untyped in torch
                jit_trace(graph, example).save(str(tmp))
            else:
                _export_onnx(graph, example, tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    side = sidecar_path(out)
    pred = S // 2 if cfg.model.variant == "center" else S
    meta = {
        "format": EXPORT_FORMAT,
        "model_format": fmt,
        "file": out.name,
        "source": str(model_uri),
        "step": loaded.step,
        "metrics": loaded.metrics,
        "config": C.to_dict(cfg),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", channels, S, S],
            "dtype": "float32",
            "range": [-1, 1],
            "hole_fill": cfg.mask.fill,
            "hole": _hole_text(cfg),
            **({"channel_3": "the hole: +1 hole, -1 known (model.mask_input)"} if cfg.model.mask_input else {}),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", 3, pred, pred],
            "dtype": "float32",
            "range": [-1, 1],
            "region": f"img[:, :, {S // 4}:{S - S // 4}, {S // 4}:{S - S // 4}]"
            if cfg.model.variant == "center"
            else "the whole image",
        },
    }
    write_atomic(side, json.dumps(meta, indent=2) + "\n")
    return meta


def _hole_text(cfg: C.Config) -> str:
    if cfg.model.variant == "center":
        lo, hi = (
            cfg.data.fine_size // 4 + cfg.mask.overlap,
            cfg.data.fine_size - cfg.data.fine_size // 4 - cfg.mask.overlap,
        )
        return f"img[:, :, {lo}:{hi}, {lo}:{hi}] (the centre model's hole)"
    return "any (B, 1, S, S) hole given at fill time"


def _export_onnx(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it; say so clearly)
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install 'ce-ray[onnx]'") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        graph,
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True always returns an ONNXProgram
    program.save(str(path))


# --- CLI glue (cli.py owns the parser and calls these) -------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ce_ray.infer.resolve import add_model_arguments

    add_model_arguments(parser, "the generator to export")
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="onnx (onnxruntime, TensorRT, ...) or torchscript (torch.jit.load)",
    )
    parser.add_argument("-o", "--output", required=True, help="file to write (its description goes to FILE.json)")


def run_from_args(args: argparse.Namespace) -> int:
    meta = export(args.model, args.format, args.output, args.mlflow_tracking_uri)
    i, o = meta["input"], meta["output"]
    print(f"wrote {args.output} ({args.format}, step {meta['step']}) and {sidecar_path(args.output)}")
    print(
        f"  input  {i['name']} {i['shape']} float32 in [-1, 1], hole filled with the {i['hole_fill']} fill: {i['hole']}"
    )
    print(f"  output {o['name']} {o['shape']} float32 in [-1, 1]: {o['region']}")
    return 0
