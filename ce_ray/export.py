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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.fsutil import write_atomic

EXPORT_FORMAT = "ce-ray-export/1"
FORMATS = ("onnx", "torchscript")
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "context", "prediction"
EXAMPLE_BATCH = 2  # the traced example: any batch size works afterwards (dynamic axis)


class InferenceGraph(nn.Module):
    """G followed by the clamp `step.predict` applies (a residual generator's sum is unbounded)."""

    def __init__(self, G: nn.Module):
        super().__init__()
        self.G = G

    def forward(self, context: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 3, S/2 | S, ...)
        return self.G(context).float().clamp(-1.0, 1.0)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.json")


def export(model_uri: str, fmt: str, out: str | os.PathLike) -> dict[str, Any]:
    """Write the generator of `model_uri` to `out` in `fmt` ("onnx" / "torchscript") and its
    description to `out`.json (both atomically). Returns the description."""
    from ce_ray.checkpoint import load_generator

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"-o {out} is a folder; give the file to write, e.g. {out / ('generator.onnx' if fmt == 'onnx' else 'generator.pt')}")
    loaded = load_generator(model_uri, "cpu")
    cfg = loaded.config
    S = cfg.data.fine_size
    graph = InferenceGraph(loaded.model).eval()
    example = torch.zeros(EXAMPLE_BATCH, 3, S, S)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The shape checks in model.DenseConv are constant for a fixed crop size; tracing
            # says so in a warning per layer.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if fmt == "torchscript":
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.trace is deprecated": it still is the format LaMa users load
                torch.jit.trace(graph, example).save(str(tmp))
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
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, S, S], "dtype": "float32", "range": [-1, 1],
                  "hole_fill": cfg.mask.fill, "hole": _hole_text(cfg)},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", 3, pred, pred], "dtype": "float32", "range": [-1, 1],
                   "region": f"img[:, :, {S // 4}:{S - S // 4}, {S // 4}:{S - S // 4}]" if cfg.model.variant == "center" else "the whole image"},
    }
    write_atomic(side, json.dumps(meta, indent=2) + "\n")
    return meta


def _hole_text(cfg: C.Config) -> str:
    if cfg.model.variant == "center":
        lo, hi = cfg.data.fine_size // 4 + cfg.mask.overlap, cfg.data.fine_size - cfg.data.fine_size // 4 - cfg.mask.overlap
        return f"img[:, :, {lo}:{hi}, {lo}:{hi}] (the centre model's hole)"
    return "any (B, 1, S, S) hole given at fill time"


def _export_onnx(graph: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it; say so clearly)
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install 'ce-ray[onnx]'") from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(graph, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True, verbose=False)
    program.save(str(path))


# --- Loading an exported model back ----------------------------------------------------------


class ExportedRunner(nn.Module):
    """An exported file behind the nn.Module interface `step.predict` and the window planner use:
    eval()/train() are no-ops, forward takes and returns tensors on the CPU device."""

    def __init__(self, path: Path, fmt: str):
        super().__init__()
        self.register_buffer("_device_anchor", torch.zeros(0), persistent=False)  # parameters()/buffers() give the device
        self.fmt = fmt
        if fmt == "onnx":
            try:
                import onnxruntime as ort
            except ImportError:
                raise UserError("running an .onnx model needs onnxruntime: pip install 'ce-ray[onnx]'") from None
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        else:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "onnx":
            out = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
            return torch.from_numpy(out)
        with torch.no_grad():
            return self.module(x.detach().cpu().float())

    def parameters(self, recurse: bool = True):
        yield self._device_anchor  # inpaint_many reads the device from the first parameter


def is_exported(uri: str) -> bool:
    p = Path(uri)
    return p.suffix.lower() in SUFFIXES and p.is_file()


def load_exported(uri: str):
    """A LoadedGenerator for an exported file and its sidecar JSON."""
    from ce_ray.checkpoint import LoadedGenerator

    p = Path(uri)
    side = sidecar_path(p)
    if not side.is_file():
        raise UserError(f"{p} has no {side.name} beside it: an exported model needs its description "
                        "(ce-ray export writes both; copy them together)")
    try:
        meta = json.loads(side.read_text())
    except ValueError as e:
        raise UserError(f"{side} is not valid JSON: {e}") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{side} has format {meta.get('format')!r}; this ce-ray reads {EXPORT_FORMAT}")
    runner = ExportedRunner(p, meta["model_format"])
    return LoadedGenerator(model=runner, config=C.from_dict(meta["config"]), step=int(meta["step"]),
                           metrics=meta.get("metrics", {}), source=str(uri))


# --- CLI glue (cli.py owns the parser and calls these) -------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="checkpoint directory, models:/name/version, models:/name@alias, runs:/id/path, or 'default': the model "
                             "ce-ray ships (the default)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (onnxruntime, TensorRT, ...) or torchscript (torch.jit.load)")
    parser.add_argument("-o", "--output", required=True, help="file to write (its description goes to FILE.json)")


def run_from_args(args: argparse.Namespace) -> int:
    meta = export(args.model, args.format, args.output)
    i, o = meta["input"], meta["output"]
    print(f"wrote {args.output} ({args.format}, step {meta['step']}) and {sidecar_path(args.output)}")
    print(f"  input  {i['name']} {i['shape']} float32 in [-1, 1], hole filled with the {i['hole_fill']} fill: {i['hole']}")
    print(f"  output {o['name']} {o['shape']} float32 in [-1, 1]: {o['region']}")
    return 0
