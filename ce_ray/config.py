"""Typed, frozen run configuration: the paper's defaults, strict YAML loading, `a.b=c` overrides.

Every default is the paper's or the authors' `train.lua`'s (docs/paper.md has the numbers, and
where train.lua differs from the paper's text). Unknown keys, wrong types and invalid values raise
`UserError` naming the key before anything starts. The resolved config is saved in every
checkpoint and flattened into MLflow params.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin, get_type_hints

import yaml

from ce_ray.errors import UserError

# --- The paper's numbers (docs/paper.md) --------------------------------------------------------
LOAD_SIZE = 350  # `loadSize`: shorter side after resizing, before the random crop
FINE_SIZE = 128  # `fineSize`: the crop the network sees
OVERLAP_PRED = 4  # `overlapPred` in train.lua (the paper's text says 7)
BOTTLENECK = 4000  # `nBottleneck`: channels of the 1x1 code between encoder and decoder
LAMBDA_REC = 0.999  # `wtl2`
LAMBDA_ADV = 0.001  # 1 - wtl2
OVERLAP_WEIGHT_MULT = 10.0  # `overlapL2Weight`: the visible 4-px ring counts 10x in the L2 loss
LR_D = 2e-4  # discriminator learning rate
LR_G = 2e-3  # generator lr is 10x D's whenever 0 < lambda_rec < 1 (train.lua)
BETA1 = 0.5  # Adam beta1
BATCH_SIZE = 64


DATA_CACHE_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how crops are cut from them (train.lua's data options)."""

    shards: str = "outputs/shards"  # output of `ce-ray prepare`: DIR/train, DIR/val
    load_size: int = LOAD_SIZE
    fine_size: int = FINE_SIZE
    flip: bool = True  # horizontal flip p=0.5
    batch_size: int = BATCH_SIZE  # per worker
    shuffle_buffer: int = 256  # rows in Ray Data's local shuffle buffer
    val_images: int = 256  # cap on val crops scored per evaluation (deterministic crops)
    repeat: int = 1  # crops cut per photo per pass; >1 helps tiny datasets amortise decoding
    # Training only, not in train.lua: each decoded photo is resized to load_size * U[1-j, 1+j]
    # before cropping, so a few photos give crops at many scales. 0 = the paper's fixed size.
    scale_jitter: float = 0.0
    # Training only, not in train.lua: each crop's RGB channels in a random order, so a model
    # trained on a few photos copies colours from the context instead of memorising their palette.
    channel_shuffle: bool = False
    loader_workers: int = 0  # DataLoader processes in the no-Ray local trainer
    # Ray Data only: decode the train photos once into the object store and cut each epoch's random
    # crops from those pixels, so decoding stops after the first pass. "auto": when the decoded
    # split takes at most a quarter of the cluster's object store; "on" / "off" force it. Crops
    # stay random per epoch either way (data/stream.py).
    cache: str = "auto"
    # Beyond the paper, for GPUs: photos decoded once onto the training device, which cuts the crops,
    # flips and holes itself (data/device_crops.py: roi_align resampling, holes from a bank drawn
    # once), so a GPU worker needs almost no CPU per crop. Off: the host pipelines cut them.
    device_crops: bool = False


# mask.kind=strokes draws each hole from a mixture of these: LaMa's three painted-stroke families
# (strokes.FAMILIES) and the paper's own free-form holes.
MASK_FAMILIES = ("thin", "medium", "thick", "random_region", "random_block")


def parse_families(text: str) -> dict[str, float]:
    """`mask.families`: "thin,medium,thick" (equal shares) or "thin:2,thick:1,random_region:0.5"
    -> {family: probability} summing to 1. Raises ValueError naming what is wrong."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in MASK_FAMILIES:
            raise ValueError(f"unknown mask family {name!r}; use {', '.join(MASK_FAMILIES)} (optionally name:weight)")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"mask family {name!r}: weight {weight!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"mask family {name!r}: the weight must be a number > 0, got {weight}")
        out[name] = out.get(name, 0.0) + value
    if not out:
        raise ValueError("no mask family given; e.g. thin,medium,thick")
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


@dataclass(frozen=True)
class MaskConfig:
    """Which hole the model learns to fill: centre (train.lua), random block (paper §3.3), random
    region (train_random.lua), or painted strokes (LaMa's families; not in the paper)."""

    kind: Literal["center", "random_block", "random_region", "strokes"] = "center"
    overlap: int = OVERLAP_PRED  # visible ring that is still predicted (centre only)
    overlap_weight: float = OVERLAP_WEIGHT_MULT
    max_coverage: float = 0.25  # random block: blocks cover at most this fraction (paper §3.3)
    num_blocks: int = 5  # random block: up to this many, possibly overlapping
    region_min: float = 0.20  # random region: resample until coverage is in [min, max]
    region_max: float = 0.30  # (train_random.lua)
    # kind=strokes (not in the paper): the mixture each hole is drawn from, "family[:weight],...":
    # LaMa's thin / medium / thick stroke families (strokes.py, docs/masks.md), scaled with the
    # crop, and the paper's random_region / random_block.
    families: str = "thin,medium,thick"
    # What the generator sees in the hole. "mean": train.lua's mean pixel. "diffusion" (not in the
    # paper): the exact harmonic fill (masks.diffusion_fill), so the network starts from a smooth
    # classical fill and learns what diffusion cannot do.
    fill: Literal["mean", "diffusion"] = "mean"
    # Training only, fill=diffusion with a different hole per crop: V-cycles of the batched
    # multigrid solver (harmonic.py) after its full-multigrid start, a fixed count so the step
    # never waits on the host. 0 (the start alone) is within 0.3/255 of the exact fill on average
    # over hole pixels; each cycle divides the error by ~3 (README "The fill", measured).
    # Inference and evaluation always solve to within 1/255 of the exact fill.
    fill_cycles: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Generator / discriminator shape (the paper's layer table: docs/paper.md)."""

    variant: Literal["center", "full"] = "center"  # center: 128 -> 64 patch; full: 128 -> 128
    bottleneck: int = BOTTLENECK
    ngf: int = 64
    ndf: int = 64
    channel_wise_fc: bool = False  # paper §3.1 bottleneck instead of the 4000-d conv code
    sync_bn: bool = False  # DDP: BatchNorm statistics over all workers
    # Not in the paper, off by default. "resize": each decoder up-step is a nearest-neighbour 2x
    # resize then a 3x3 conv (Odena et al. 2016) instead of a 4x4 stride-2 transposed conv, whose
    # uneven overlaps paint checkerboard lattices; ~1.4x the generator's FLOPs.
    upsample: Literal["transposed", "resize"] = "transposed"
    # Not in the paper, off by default: the output is the input's predicted region (the hole's
    # fill plus the visible ring) plus a learned correction, with the last layer zero-initialised,
    # so an untrained generator returns its input's fill exactly (pair with mask.fill=diffusion).
    residual: bool = False
    # Not in the paper, off by default: the hole as a 4th input channel (+1 hole, -1 known), so a
    # free-form hole that the fill made smooth is still visible to the network.
    mask_input: bool = False
    # Not in the paper, off by default: U-Net skip connections from each encoder level to the
    # decoder level of the same size (detail around thin holes bypasses the 4x4 bottleneck).
    skips: bool = False


@dataclass(frozen=True)
class LossConfig:
    lambda_rec: float = LAMBDA_REC
    lambda_adv: float = LAMBDA_ADV
    # "l2" (the paper, which found L1 ~ L2), "l1", or "log_l2" (not in the paper): the mean over
    # images of log(per-image L2), the quantity per-image-averaged PSNR scores (losses.py).
    rec: Literal["l2", "l1", "log_l2"] = "l2"


@dataclass(frozen=True)
class OptimConfig:
    lr_g: float = LR_G
    lr_d: float = LR_D
    beta1: float = BETA1
    beta2: float = 0.999
    # "linear": both learning rates held, then taken linearly to 0 over the last decay_fraction
    # of train.steps (pix2pix's niter_decay). "none": constant, as in train.lua.
    lr_decay: Literal["none", "linear"] = "none"
    decay_fraction: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimiser steps per worker
    log_every: int = 10
    eval_every: int = 200
    ckpt_every: int = 200
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs a GPU (grad scaler)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    threads: int = 0  # torch intra-op threads per worker; 0 = leave torch's default
    channels_last: bool = False  # NHWC activations: helps cuDNN on GPU; measured slower on this CPU
    compile: bool = False  # torch.compile the step's models (GPU benchmarks)
    samples: int = 8  # images in each eval picture grid
    output_dir: str = "outputs"  # local trainer: checkpoints and grids go under output_dir/run_name


@dataclass(frozen=True)
class ScaleConfig:
    """Ray Train resources and fault tolerance."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    storage_path: str = "outputs/ray_results"
    run_name: str = ""  # empty: a fresh unique name; reuse a name to resume that run


@dataclass(frozen=True)
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite under outputs/
    experiment: str = "ce-ray"
    registered_model: str = "ce-ray-generator"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


# --- Building from dicts, strictly ---------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise UserError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads `1e-3` as a string; accept what Python reads as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(cast(type, tp), value, key)
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")  # a bug, not user input


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    where = prefix or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section '{where}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise UserError(f"unknown config key(s): {dotted}; valid keys in {where}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Value checks that types cannot express; each names the key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise UserError(f"config key '{key}': {msg}")

    d, m, mo, lo, o, t, s = cfg.data, cfg.mask, cfg.model, cfg.loss, cfg.optim, cfg.train, cfg.scale
    # Five stride-2 convolutions then a 4x4 valid conv: the encoder needs 128 = 4 * 2**5.
    need(
        d.fine_size == FINE_SIZE,
        "data.fine_size",
        f"the network is built for {FINE_SIZE}x{FINE_SIZE} crops (5 stride-2 convs + a 4x4 bottleneck), "
        f"got {d.fine_size}",
    )
    need(d.load_size >= d.fine_size, "data.load_size", f"must be >= data.fine_size ({d.fine_size})")
    need(d.batch_size >= 2, "data.batch_size", "must be >= 2 (BatchNorm needs more than one sample)")
    need(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    need(d.val_images >= 1, "data.val_images", "must be >= 1")
    need(d.repeat >= 1, "data.repeat", "must be >= 1")
    need(d.loader_workers >= 0, "data.loader_workers", "must be >= 0")
    need(d.cache in DATA_CACHE_MODES, "data.cache", f"must be one of {', '.join(DATA_CACHE_MODES)}, got {d.cache!r}")
    need(0 <= d.scale_jitter < 1, "data.scale_jitter", f"must be in [0, 1), got {d.scale_jitter}")
    need(
        d.load_size * (1 - d.scale_jitter) >= d.fine_size,
        "data.scale_jitter",
        f"load_size * (1 - scale_jitter) must stay >= fine_size ({d.fine_size}); lower it",
    )
    need(0 <= m.overlap < d.fine_size // 4, "mask.overlap", f"must be in [0, {d.fine_size // 4})")
    need(
        m.overlap_weight > 0 or (m.overlap_weight == 0 and mo.variant == "full"),
        "mask.overlap_weight",
        "must be > 0 (0, the loss on the hole alone, is for model.variant=full)",
    )
    need(m.fill_cycles >= 0, "mask.fill_cycles", "must be >= 0")
    need(0 < m.max_coverage <= 0.5, "mask.max_coverage", "must be in (0, 0.5]")
    need(m.num_blocks >= 1, "mask.num_blocks", "must be >= 1")
    need(0 < m.region_min < m.region_max < 1, "mask.region_min", "need 0 < region_min < region_max < 1")
    if m.kind == "strokes":
        try:
            parse_families(m.families)
        except ValueError as e:
            need(False, "mask.families", str(e))
    if mo.variant == "center":
        need(
            m.kind == "center",
            "mask.kind",
            "model.variant 'center' only fills the centre hole; use model.variant=full for random masks",
        )
    need(mo.bottleneck >= 1, "model.bottleneck", "must be >= 1")
    need(mo.ngf >= 1, "model.ngf", "must be >= 1")
    need(mo.ndf >= 1, "model.ndf", "must be >= 1")
    need(0 <= lo.lambda_rec <= 1, "loss.lambda_rec", f"must be in [0, 1], got {lo.lambda_rec}")
    need(0 <= lo.lambda_adv <= 1, "loss.lambda_adv", f"must be in [0, 1], got {lo.lambda_adv}")
    need(lo.lambda_rec + lo.lambda_adv > 0, "loss.lambda_rec", "lambda_rec and lambda_adv cannot both be 0")
    need(o.lr_g > 0, "optim.lr_g", f"must be > 0, got {o.lr_g}")
    need(o.lr_d > 0, "optim.lr_d", f"must be > 0, got {o.lr_d}")
    need(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    need(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    need(0 < o.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}")
    need(t.steps >= 1, "train.steps", "must be >= 1")
    for k in ("log_every", "eval_every", "ckpt_every"):
        need(getattr(t, k) >= 1, f"train.{k}", "must be >= 1")
    need(t.threads >= 0, "train.threads", "must be >= 0")
    need(t.samples >= 1, "train.samples", "must be >= 1")
    need(s.num_workers >= 1, "scale.num_workers", "must be >= 1")
    need(s.cpus_per_worker > 0, "scale.cpus_per_worker", "must be > 0")
    need(s.gpus_per_worker > 0, "scale.gpus_per_worker", "must be > 0")
    need(s.max_failures >= -1, "scale.max_failures", "must be >= -1 (-1 = retry forever)")
    need(s.checkpoints_to_keep >= 1, "scale.checkpoints_to_keep", "must be >= 1")
    # PyTorch DDP rejects SyncBatchNorm on CPU modules ("SyncBatchNorm layers only work with GPU modules").
    need(
        not (mo.sync_bn and s.num_workers > 1 and not s.use_gpu),
        "model.sync_bn",
        "needs GPU workers (scale.use_gpu=true); set model.sync_bn=false for CPU training",
    )


def from_dict(data: dict[str, Any]) -> Config:
    cfg: Config = _build(Config, data)
    _check(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Config) -> dict[str, Any]:
    """`{"train.steps": 1000, ...}`: one MLflow param per leaf."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out


def _parse_scalar(text: str) -> Any:
    """`a.b=c` values are YAML scalars: `1e-3`, `true`, `fp32`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a nested dict (a copy)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"override {item!r}: the key must be section.key (e.g. optim.lr_g=1e-3)")
        section, key = parts
        node = out.setdefault(section, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: '{section}' is not a config section")
        node[key] = _parse_scalar(text)
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"config file {str(p)!r} not found; pass a YAML from tune_configs/ (e.g. tune_configs/smoke.yaml)"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of sections (data:, train:, ...)")
    return data


def load(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the paper's defaults when `path` is None) and apply overrides."""
    data = read_yaml(path) if path else {}
    return from_dict(apply_overrides(data, overrides or []))


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy with some keys changed, re-validated: `replace(cfg, train={"steps": 5})`."""
    data = to_dict(cfg)
    for name, changes in sections.items():
        data[name].update(changes)
    return from_dict(data)
