"""Sweep files for `ce-ray tune`: schema, the resolved Sweep, trial sizing, ledgers and ranking.

The strict schema, the resolved `Sweep`, how many trials fit a cluster, and the per-trial
ledgers -> ranking table / CSV. No Ray here: tune.py runs the sweep; this module is what it runs
from and what it leaves behind.

The paper fixed λrec = 0.999, λadv = 0.001 and G lr = 10x D lr by hand (docs/paper.md, Loss /
Optimisation); a sweep file makes them a search space over a base training config:

    name: smoke                          # optional; default: the file name without "sweep_"
    base: tune_configs/smoke.yaml        # training config, relative to the sweep file or the cwd
    overrides: [train.steps=6]           # section.key=value applied to the base
    search_space:                        # dotted config keys -> one distribution each
      loss.lambda_rec: {uniform: [0.9, 1.0]}
      loss.lambda_adv: {tie: "1 - loss.lambda_rec"}     # or a distribution of its own
      optim.lr_g: {loguniform: [1.0e-4, 1.0e-2]}
      data.batch_size: {choice: [4, 8]}                 # also grid: [...], randint: [lo, hi)
    metric: val_l2                       # val_l1 | val_l2 (min) | val_psnr (max), over the hole
    mode: min                            # optional; must agree with the metric
    num_samples: 8                       # random: configurations drawn; grid: repeats of the grid
    max_concurrent_trials: 2             # optional; default: as many as the cluster's CPUs fit
    search: random                       # random | grid | optuna (needs `pip install optuna`)
    seed: 0                              # the search's random state
    scheduler: {type: asha, grace_period: 3, reduction_factor: 2, max_t: 6}

Scheduler times (grace_period, max_t) are optimiser steps, the `step` of each report: a rung at
step t judges a trial at its first evaluation at or after t (val metrics come at eval_every and
checkpoint steps). Steps, unlike Tune's report count, survive a --resume: a restarted trial
continues its Train run from its last checkpoint, so reports made after that checkpoint are
made again. Unknown keys, unknown distributions, empty or inverted ranges, log ranges
touching 0, values the config rejects and keys that are not config keys are UserErrors naming
the key.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.fsutil import write_atomic

METRIC_MODES = {"val_l1": "min", "val_l2": "min", "val_psnr": "max"}  # loop.validate's hole metrics
RANGES = ("loguniform", "uniform", "randint")
LISTS = ("choice", "grid")
DISTRIBUTIONS = RANGES + LISTS + ("tie",)
SEARCHES = ("random", "grid", "optuna")
# Which keys each scheduler takes. "hyperband" is Ray's asynchronous HyperBand (ASHA with several
# brackets): the synchronous HyperBandScheduler pauses trials and resumes them from Tune
# checkpoints, which the Train-in-Tune pattern (a trial function fitting a TorchTrainer) does not produce.
SCHEDULER_KEYS = {
    "asha": {"grace_period", "reduction_factor", "max_t"},
    "hyperband": {"grace_period", "reduction_factor", "max_t", "brackets"},
    "median": {"grace_period", "min_samples_required"},
    "fifo": set(),
}
SWEEP_KEYS = {
    "name",
    "base",
    "overrides",
    "search_space",
    "metric",
    "mode",
    "num_samples",
    "max_concurrent_trials",
    "search",
    "seed",
    "scheduler",
}
# Trial resources are sized before the first trial starts, and MLflow is the sweep's job.
UNSEARCHABLE_SECTIONS = ("scale", "mlflow")
TIE_RE = re.compile(r"^\s*1\s*-\s*([a-z_]+\.[a-z_0-9]+)\s*$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The trial driver only builds the trainer and waits: a sliver of a CPU, so that it does not
# starve the Train workers ({"cpu": 0} is refused by Tune: docs/ray-notes.md, "Tune and placement groups").
TRIAL_DRIVER_CPU = 0.01
STATE_FILE, RANKING_FILE, TRIALS_DIR, RUNS_DIR = "sweep.json", "ranking.csv", "trials", "runs"
# Ledger statuses: running | interrupted | completed | stopped_early | error
ENDED = ("completed", "stopped_early", "error")

# --- The sweep file --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """One search_space entry: kind in DISTRIBUTIONS; args = (lo, hi), the values, or (source key,)."""

    kind: str
    args: tuple[Any, ...]

    def describe(self) -> str:
        if self.kind == "tie":
            return f"1 - {self.args[0]}"
        return f"{self.kind}({', '.join(repr(a) for a in self.args)})"


@dataclass(frozen=True)
class SchedulerSpec:
    type: Literal["asha", "hyperband", "median", "fifo"] = "asha"
    grace_period: int = 1  # steps before a trial can be stopped
    reduction_factor: float = 2.0
    max_t: int = 0  # steps; 0 = train.steps
    brackets: int = 3  # hyperband only
    min_samples_required: int = 3  # median only


@dataclass(frozen=True)
class Sweep:
    name: str
    file: str  # the sweep file, as given
    base_file: str  # the resolved base training config
    overrides: tuple[str, ...]  # the file's `overrides:` then the command line's section.key=value
    base: dict[str, Any]  # the base config after overrides, as C.to_dict (trials start from it)
    space: dict[str, Dist]
    metric: str
    mode: str
    num_samples: int
    max_concurrent_trials: int | None
    search: str
    seed: int
    scheduler: SchedulerSpec
    cli: tuple[str, ...] = ()  # command-line key=value, kept to check a --resume

    @property
    def config(self) -> C.Config:
        return C.from_dict(self.base)

    @property
    def directory(self) -> Path:
        return Path(self.config.scale.storage_path).resolve() / "sweeps" / self.name

    @property
    def ties(self) -> dict[str, str]:
        return {k: d.args[0] for k, d in self.space.items() if d.kind == "tie"}

    @property
    def total_trials(self) -> int:
        grids = [
            len(d.args)
            for d in self.space.values()
            if d.kind == "grid" or (self.search == "grid" and d.kind == "choice")
        ]
        return self.num_samples * math.prod(grids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "base_file": self.base_file,
            "overrides": list(self.overrides),
            "base": self.base,
            "space": {k: {"kind": d.kind, "args": list(d.args)} for k, d in self.space.items()},
            "metric": self.metric,
            "mode": self.mode,
            "num_samples": self.num_samples,
            "max_concurrent_trials": self.max_concurrent_trials,
            "search": self.search,
            "seed": self.seed,
            "scheduler": vars(self.scheduler).copy(),
            "cli": list(self.cli),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sweep:
        return cls(
            name=d["name"],
            file=d["file"],
            base_file=d["base_file"],
            overrides=tuple(d["overrides"]),
            base=d["base"],
            space={k: Dist(v["kind"], tuple(v["args"])) for k, v in d["space"].items()},
            metric=d["metric"],
            mode=d["mode"],
            num_samples=d["num_samples"],
            max_concurrent_trials=d["max_concurrent_trials"],
            search=d["search"],
            seed=d["seed"],
            scheduler=SchedulerSpec(**d["scheduler"]),
            cli=tuple(d["cli"]),
        )


def _number(value: Any, what: str) -> float:
    """PyYAML (YAML 1.1) reads `1e-4` as a string: accept what Python reads as a number."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{what}: expected a finite number, got {value!r}")
    return value


def _int(value: Any, what: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise UserError(f"{what}: expected an integer >= {lo}, got {value!r}")
    return value


def _field_type(key: str) -> Any:
    """The annotation of a dotted config key; UserError naming the key when it is not one."""
    hints = get_type_hints(C.Config)
    parts = key.split(".")
    sections = ", ".join(hints)
    if len(parts) != 2 or parts[0] not in hints:
        raise UserError(
            f"search_space key {key!r} is not a config key: use section.key with a section among {sections} "
            "(e.g. optim.lr_g)"
        )
    section, name = parts
    fields_ = get_type_hints(hints[section])
    if name not in fields_:
        raise UserError(
            f"search_space key {key!r} is not a config key: valid keys in '{section}' are {', '.join(fields_)}"
        )
    if section in UNSEARCHABLE_SECTIONS:
        raise UserError(
            f"search_space key {key!r} cannot be searched: trial resources (scale.*) are sized before the sweep starts "
            "and MLflow (mlflow.*) is set by the sweep; set it in overrides instead"
        )
    return fields_[name]


def trial_config(base: dict[str, Any], sampled: dict[str, Any], ties: dict[str, str], run_name: str = "") -> C.Config:
    """The training config of one trial: base + sampled values + ties (λadv = 1 − λrec). Inside a
    sweep the trial does not track itself in MLflow: the sweep's driver-side callback does."""
    data = copy.deepcopy(base)
    for key, value in sampled.items():
        section, name = key.split(".")
        data[section][name] = value
    for key, source in ties.items():
        section, name = key.split(".")
        s_section, s_name = source.split(".")
        # round: 1 - 0.999 is 0.0010000000000000009 in binary floating point
        data[section][name] = round(1.0 - float(data[s_section][s_name]), 12)
    if run_name:
        data["mlflow"]["enabled"] = False
        data["scale"]["run_name"] = run_name
    return C.from_dict(data)


def _probe(base: dict[str, Any], key: str, value: Any, ties: dict[str, str]) -> Any:
    """Check one value of `key` against the config (types, ranges) and return it as the config
    types it (e.g. "1e-3" -> 0.001); UserError names the key and the offending value."""
    try:
        cfg = trial_config(base, {key: value}, ties)
    except UserError as e:
        raise UserError(f"search_space {key}: the value {value!r} is not valid here: {e}") from None
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _parse_dist(key: str, spec: Any, base: dict[str, Any]) -> Dist:
    tp = _field_type(key)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(
            f"search_space {key}: expected one distribution like {{loguniform: [1.0e-4, 1.0e-2]}}, got {spec!r}; "
            f"distributions: {', '.join(DISTRIBUTIONS)} (fixed values belong in overrides)"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"search_space {key}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if kind == "tie":
        m = TIE_RE.match(str(args))
        if not m:
            raise UserError(
                f'search_space {key}: tie {args!r} must read "1 - section.key" (e.g. "1 - loss.lambda_rec")'
            )
        if tp is not float:
            raise UserError(f"search_space {key}: a tie needs a number-valued key")
        return Dist("tie", (m.group(1),))
    if kind in LISTS:
        if not isinstance(args, list) or not args:
            raise UserError(f"search_space {key}: {kind} needs a non-empty list of values, got {args!r}")
        return Dist(kind, tuple(args))
    if not isinstance(args, list) or len(args) != 2:
        raise UserError(f"search_space {key}: {kind} needs [low, high], got {args!r}")
    lo: float  # ints for randint
    hi: float
    if kind == "randint":
        if tp is not int:
            raise UserError(f"search_space {key}: randint needs an integer key; use choice: [...] for {key}")
        lo, hi = (_int(a, f"search_space {key}: randint bound", lo=-(2**62)) for a in args)
    else:
        if tp is not float:
            raise UserError(
                f"search_space {key}: {kind} needs a number-valued key; use "
                f"{'randint: [lo, hi)' if tp is int else 'choice: [...]'} for {key}"
            )
        lo, hi = (float(_number(a, f"search_space {key}: {kind} bound")) for a in args)
    if lo >= hi:
        raise UserError(
            f"search_space {key}: empty range [{lo}, {hi}]: the low bound must be below the high bound"
            + (" (randint's high bound is exclusive)" if kind == "randint" else "")
        )
    if kind == "loguniform" and lo <= 0:
        raise UserError(
            f"search_space {key}: loguniform needs 0 < low < high, got [{lo}, {hi}]; "
            "use uniform for ranges that include 0"
        )
    return Dist(kind, (lo, hi))


def _check_values(space: dict[str, Dist], base: dict[str, Any]) -> dict[str, Dist]:
    """Probe each distribution's extremes / values against the config (with the ties applied)."""
    ties = {k: d.args[0] for k, d in space.items() if d.kind == "tie"}
    for key, source in ties.items():
        if source == key or source not in space or space[source].kind == "tie":
            raise UserError(
                f"search_space {key}: tie {space[key].describe()!r} must refer to another searched key "
                f"(searched: {', '.join(k for k, d in space.items() if d.kind != 'tie') or 'none'})"
            )
        if space[source].kind not in ("uniform", "loguniform", "choice", "grid"):
            raise UserError(
                f"search_space {key}: ties are defined for number-valued distributions; "
                f"{source} is {space[source].kind}"
            )
    out = {}
    for key, d in space.items():
        if d.kind == "tie":
            out[key] = d
        elif d.kind in LISTS:
            values = tuple(_probe(base, key, v, ties) for v in d.args)
            if len(set(map(repr, values))) != len(values):
                raise UserError(f"search_space {key}: {d.kind} lists a value twice: {list(d.args)}")
            out[key] = Dist(d.kind, values)
        else:
            lo, hi = d.args
            _probe(base, key, lo, ties)
            _probe(base, key, hi - 1 if d.kind == "randint" else hi, ties)
            out[key] = d
    return out


def _parse_scheduler(raw: Any, steps: int) -> SchedulerSpec:
    raw = {"type": "asha"} if raw is None else raw
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise UserError(f"scheduler: expected a mapping like {{type: asha, grace_period: 2}}, got {raw!r}")
    kind = raw.get("type", "asha")
    if kind not in SCHEDULER_KEYS:
        raise UserError(f"scheduler.type {kind!r} is not one of {', '.join(SCHEDULER_KEYS)}")
    unknown = sorted(set(raw) - SCHEDULER_KEYS[kind] - {"type"})
    if unknown:
        raise UserError(
            f"unknown key(s) scheduler.{', scheduler.'.join(unknown)} for a {kind} scheduler; "
            f"it takes: {', '.join(sorted(SCHEDULER_KEYS[kind])) or 'nothing'}"
        )
    d = SchedulerSpec()
    grace = _int(raw.get("grace_period", d.grace_period), "scheduler.grace_period")
    rf = float(_number(raw.get("reduction_factor", d.reduction_factor), "scheduler.reduction_factor"))
    if rf <= 1:
        raise UserError(f"scheduler.reduction_factor must be > 1, got {rf}")
    max_t = _int(raw.get("max_t", steps), "scheduler.max_t")
    if max_t > steps:
        raise UserError(
            f"scheduler.max_t={max_t} is more steps than a trial trains (train.steps={steps}); "
            f"leave it out to use {steps}"
        )
    if grace > max_t:
        raise UserError(f"scheduler.grace_period={grace} must be <= scheduler.max_t={max_t} (optimiser steps)")
    return SchedulerSpec(
        type=kind,
        grace_period=grace,
        reduction_factor=rf,
        max_t=max_t,
        brackets=_int(raw.get("brackets", d.brackets), "scheduler.brackets"),
        min_samples_required=_int(
            raw.get("min_samples_required", d.min_samples_required), "scheduler.min_samples_required"
        ),
    )


def _resolve_base(base: Any, sweep_file: Path) -> Path:
    if not isinstance(base, str) or not base:
        raise UserError(
            f"sweep file {str(sweep_file)!r}: 'base' must name a training config YAML "
            "(e.g. base: tune_configs/smoke.yaml)"
        )
    p = Path(base).expanduser()
    candidates = [p] if p.is_absolute() else [sweep_file.parent / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise UserError(
        f"sweep file {str(sweep_file)!r}: base config {base!r} not found "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Command-line key=value: a config section's keys (data.shards=...) go to the base config,
    the others (num_samples=2, scheduler.grace_period=1) to the sweep file."""
    sections = set(get_type_hints(C.Config))
    cfg_items: list[str] = []
    sweep_items: list[str] = []
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value (e.g. train.steps=100 or num_samples=4)")
        (cfg_items if item.split("=", 1)[0].split(".")[0].strip() in sections else sweep_items).append(item)
    return cfg_items, sweep_items


def _apply_sweep_overrides(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    out = dict(raw)
    for item in items:
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        try:  # values are YAML scalars, as in config.apply_overrides: 4, 1e-3, asha
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if (
            parts[0] not in SWEEP_KEYS
            or parts[0] in ("search_space", "overrides", "base")
            or len(parts) > 2
            or (len(parts) == 2 and parts[0] != "scheduler")
        ):
            raise UserError(
                f"override {item!r}: {dotted!r} is neither a config key (section.key) nor a sweep setting "
                "(num_samples, max_concurrent_trials, metric, mode, search, seed, name, scheduler.<key>)"
            )
        if len(parts) == 2:
            sched = out.get("scheduler") or {}
            sched = {"type": sched} if isinstance(sched, str) else dict(sched)
            sched[parts[1]] = value
            out["scheduler"] = sched
        else:
            out[parts[0]] = value
    return out


def load_sweep(
    path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = (), name: str | None = None
) -> Sweep:
    """Read and validate a sweep file (+ command-line key=value); every problem is a UserError
    naming the key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"sweep file {str(p)!r} not found; pass one of tune_configs/sweep_*.yaml "
            "(e.g. tune_configs/sweep_smoke.yaml)"
        )
    raw = C.read_yaml(p)  # UserError for bad YAML or not a mapping
    if "search_space" not in raw and set(raw) & set(get_type_hints(C.Config)):
        raise UserError(
            f"{str(p)!r} is a training config (ce-ray train --config ...); a sweep file names one as base: "
            "and adds search_space: (see tune_configs/sweep_smoke.yaml)"
        )
    cfg_items, sweep_items = split_overrides(list(overrides))
    raw = _apply_sweep_overrides(raw, sweep_items)
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise UserError(
            f"sweep file {str(p)!r}: unknown key(s) {', '.join(map(str, unknown))}; "
            f"valid keys: {', '.join(sorted(SWEEP_KEYS))}"
        )
    base_file = _resolve_base(raw.get("base"), p)
    if base_file.name.startswith("sweep_"):
        raise UserError(f"sweep file {str(p)!r}: base {str(base_file)!r} is a sweep file; name a training config")
    file_overrides = raw.get("overrides") or []
    if not isinstance(file_overrides, list) or not all(isinstance(o, str) for o in file_overrides):
        raise UserError(f"sweep file {str(p)!r}: 'overrides' must be a list of section.key=value strings")
    all_overrides = [*file_overrides, *cfg_items]
    from ce_ray.train.runs import resolve_paths

    # Absolute paths: trials run in other working directories, and --resume may start elsewhere.
    base_cfg = resolve_paths(C.load(base_file, all_overrides))
    base = C.to_dict(base_cfg)

    space_raw = raw.get("search_space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise UserError(
            f"sweep file {str(p)!r}: 'search_space' must map config keys to distributions, "
            "e.g. optim.lr_g: {loguniform: [1.0e-4, 1.0e-2]}"
        )
    pinned = {o.split("=", 1)[0].strip() for o in all_overrides}
    for key in space_raw:
        if key in pinned:
            raise UserError(f"{key} is both searched (search_space) and fixed by an override; drop one of them")
    space = _check_values({str(k): _parse_dist(str(k), v, base) for k, v in space_raw.items()}, base)

    metric = raw.get("metric", "val_l2")
    if metric not in METRIC_MODES:
        raise UserError(
            f"metric {metric!r} is not one of {', '.join(METRIC_MODES)} (hole metrics of the validation set)"
        )
    mode = raw.get("mode", METRIC_MODES[metric])
    if mode != METRIC_MODES[metric]:
        raise UserError(
            f"mode {mode!r} does not fit metric {metric}: lower is better for val_l1/val_l2, higher for val_psnr; "
            f"use mode: {METRIC_MODES[metric]} or leave mode out"
        )
    search = raw.get("search", "random")
    if search not in SEARCHES:
        raise UserError(f"search {search!r} is not one of {', '.join(SEARCHES)}")
    if search == "grid":
        bad = [k for k, d in space.items() if d.kind in RANGES]
        if bad:
            raise UserError(
                f"search: grid needs finite values, but {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
                f"{space[bad[0]].kind}; use grid: [...] / choice: [...] or search: random"
            )
    if search == "optuna" and any(d.kind == "grid" for d in space.values()):
        raise UserError("search: optuna cannot take grid: [...] entries; use choice: [...] instead")
    if "num_samples" not in raw and search != "grid":
        raise UserError(
            f"sweep file {str(p)!r}: 'num_samples' (how many configurations to try) is required for search: {search}"
        )
    num_samples = _int(raw.get("num_samples", 1), "num_samples")
    conc = raw.get("max_concurrent_trials")
    conc = None if conc in (None, "auto") else _int(conc, "max_concurrent_trials")
    seed = _int(raw.get("seed", 0), "seed", lo=0)
    scheduler = _parse_scheduler(raw.get("scheduler"), base_cfg.train.steps)

    sweep_name = name or raw.get("name") or re.sub(r"^sweep_", "", p.stem)
    if not isinstance(sweep_name, str) or not NAME_RE.match(sweep_name):
        raise UserError(
            f"sweep name {sweep_name!r} must be letters, digits, '_', '.' or '-' (it names folders and runs)"
        )
    return Sweep(
        name=sweep_name,
        file=str(p),
        base_file=str(base_file),
        overrides=tuple(all_overrides),
        base=base,
        space=space,
        metric=metric,
        mode=mode,
        num_samples=num_samples,
        max_concurrent_trials=conc,
        search=search,
        seed=seed,
        scheduler=scheduler,
        cli=tuple(overrides),
    )


# --- Resources ---------------------------------------------------------------------------------------


def per_trial_cpus(cfg: C.Config) -> float:
    """Logical CPUs one trial holds for its whole run: its driver and its Train workers."""
    s = cfg.scale
    return TRIAL_DRIVER_CPU + s.num_workers * s.cpus_per_worker


def plan_concurrency(sweep: Sweep, cluster_cpus: float, cluster_gpus: float = 0.0) -> int:
    """How many trials run at once: max_concurrent_trials if it fits the cluster (UserError saying
    what to change if not), else as many as fit, never more than there are trials.

    Fits = the trials' drivers and workers, which hold their CPUs for the whole run, leave
    data.DATA_TASK_CPUS free: Ray Data's decode tasks are short, so concurrent trials take turns
    on that free share, but with none free every trial hangs waiting for data (docs/ray-notes.md,
    "Ray Data on few CPUs"; data.check_cpu_budget for a single run)."""
    from ce_ray.data.stream import DATA_TASK_CPUS

    s = sweep.config.scale
    need = per_trial_cpus(sweep.config)
    fit = int(math.floor((cluster_cpus - DATA_TASK_CPUS) / need + 1e-9))
    if s.use_gpu:
        fit = min(fit, int(math.floor(cluster_gpus / (s.num_workers * s.gpus_per_worker) + 1e-9)))
    what = (
        f"each trial holds {need:.2f} CPUs ({s.num_workers} workers x scale.cpus_per_worker={s.cpus_per_worker:g} + "
        f"{TRIAL_DRIVER_CPU} for its driver)"
        + (f" and {s.num_workers * s.gpus_per_worker:g} GPUs" if s.use_gpu else "")
        + f", and Ray Data needs {DATA_TASK_CPUS:g} CPU left free"
    )

    def cpw_for(n: int) -> float:  # the largest cpus_per_worker that fits n trials
        return math.floor(100 * ((cluster_cpus - DATA_TASK_CPUS) / n - TRIAL_DRIVER_CPU) / s.num_workers) / 100

    if fit < 1:
        hint = (
            f"set scale.cpus_per_worker={cpw_for(1):.2f} or fewer scale.num_workers"
            if cpw_for(1) >= 0.01
            else "use a larger cluster"
        )
        raise UserError(
            f"not even one trial fits this cluster ({cluster_cpus:g} CPUs, {cluster_gpus:g} GPUs): {what}; {hint}"
        )
    want = sweep.max_concurrent_trials
    if want is not None and want > fit:
        hint = f" or scale.cpus_per_worker={cpw_for(want):.2f}" if cpw_for(want) >= 0.01 and not s.use_gpu else ""
        raise UserError(
            f"max_concurrent_trials={want} does not fit this {cluster_cpus:g}-CPU cluster: {what}; "
            f"set max_concurrent_trials={fit}{hint}"
        )
    return min(want or fit, sweep.total_trials)


# --- Trial ledgers, ranking, CSV ----------------------------------------------------------------------


def run_name_for(sweep_name: str, trial_id: str) -> str:
    """The Train run name of a trial: stable across a --resume, so Train continues its run."""
    return f"{sweep_name}-{trial_id}"


def ledger_path(sweep_dir: Path, trial_id: str) -> Path:
    return Path(sweep_dir) / TRIALS_DIR / f"{trial_id}.json"


@dataclass
class Evaluation:
    """One validated, checkpointed result of a trial."""

    step: int
    value: float  # the sweep's metric
    checkpoint: str  # the checkpoint folder Train wrote at that step


@dataclass
class TrialLedger:
    """What the sweep knows about one trial, on disk as trials/<trial id>.json (write_ledger /
    read_ledger: the only writer and reader), so a resumed sweep, ASHA's restored rungs and the
    ranking all read the same record."""

    trial_id: str
    run_name: str  # its Ray Train run (the trial driver's)
    params: dict[str, Any]  # the searched keys' values
    steps: int  # train.steps
    starts: int = 0  # how often it started (>1 after a resume or a retry)
    status: str = "pending"  # pending | running | completed | stopped_early | error | interrupted
    last_step: int = 0
    reports: int = 0
    best: Evaluation | None = None
    checkpoints: list[Evaluation] = field(default_factory=list)  # every validated result, in order
    mlflow_run_id: str | None = None  # its MLflow child run
    error: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialLedger:
        d = dict(d)
        d["best"] = Evaluation(**d["best"]) if d.get("best") else None
        d["checkpoints"] = [Evaluation(**e) for e in d.get("checkpoints") or []]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


def write_ledger(sweep_dir: Path, ledger: TrialLedger) -> None:
    write_atomic(ledger_path(sweep_dir, ledger.trial_id), ledger.to_json())


def read_ledger(sweep_dir: Path, trial_id: str) -> TrialLedger | None:
    """One trial's ledger, or None if the trial has none yet (a new trial)."""
    p = ledger_path(sweep_dir, trial_id)
    return TrialLedger.from_dict(json.loads(p.read_text())) if p.is_file() else None


def read_ledgers(sweep_dir: Path) -> list[TrialLedger]:
    d = Path(sweep_dir) / TRIALS_DIR
    return [TrialLedger.from_dict(json.loads(p.read_text())) for p in sorted(d.glob("*.json"))] if d.is_dir() else []


def rank(ledgers: list[TrialLedger], metric: str, mode: str) -> list[TrialLedger]:
    """Best first by the metric at the trial's best checkpointed evaluation (what can be
    registered); trials without one (errored early) last."""
    sign = 1.0 if mode == "min" else -1.0

    def key(t: TrialLedger) -> tuple[int, float, str]:
        v = t.best.value if t.best else None
        ok = v is not None and math.isfinite(v)
        return (0 if ok else 1, sign * v if ok and v is not None else 0.0, t.trial_id)

    return sorted(ledgers, key=key)


def ranking_rows(ranked: list[TrialLedger], metric: str, keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for i, t in enumerate(ranked, 1):
        best = t.best
        row: dict[str, Any] = {
            "rank": i,
            "trial_id": t.trial_id,
            "status": t.status,
            metric: best.value if best else "",
            "step": best.step if best else "",
            "last_step": t.last_step,
            "starts": t.starts,
        }
        row.update({k: t.params.get(k, "") for k in keys})
        row.update(run_name=t.run_name, checkpoint=best.checkpoint if best else "", mlflow_run_id=t.mlflow_run_id or "")
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cols = [c for c in columns if c not in ("checkpoint", "mlflow_run_id")]  # long paths: in the CSV only
    cells = [[cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def columns_for(metric: str, keys: list[str]) -> list[str]:
    return [
        "rank",
        "trial_id",
        "status",
        metric,
        "step",
        "last_step",
        "starts",
        *keys,
        "run_name",
        "checkpoint",
        "mlflow_run_id",
    ]


def write_ranking(sweep_dir: Path, metric: str, mode: str, keys: list[str]) -> list[dict[str, Any]]:
    """ranking.csv from the ledgers (rewritten as trials end, and at the end of the sweep)."""
    rows = ranking_rows(rank(read_ledgers(sweep_dir), metric, mode), metric, keys)
    write_csv(Path(sweep_dir) / RANKING_FILE, rows, columns_for(metric, keys))
    return rows
