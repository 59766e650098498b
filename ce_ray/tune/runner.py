"""`ce-ray tune`: hyper-parameter sweeps with Ray Tune over train.py, tracked in MLflow (tracking.py).

    ce-ray tune tune_configs/sweep_smoke.yaml [key=value ...] [--resume] [--name NAME]

The sweep file (schema and validation: sweep.py) names a base training config and a search
space. Each trial is a full TorchTrainer run built by train.build_trainer inside a Tune trial
driver (`Tuner(TorchTrainer)` fails under Train V2: docs/ray-notes.md, "Train V2 reports");
TuneReportCallback turns every rank-0 report into one Tune result, judged by the scheduler at its
`step`. A trial's Train run is named
<sweep>-<trial id>, so a resumed trial continues its own run from its latest checkpoint.

On disk, <scale.storage_path>/sweeps/<name>/ holds Tune's experiment state (what --resume
restores), sweep.json (the resolved sweep and its MLflow parent run), trials/<id>.json (one ledger
per trial, written by SweepCallback on the driver as results arrive), runs/<sweep>-<trial id>/ (each
trial's Train run and checkpoints) and ranking.csv. MLflow: one parent run per sweep, one child
run per trial (tag mlflow.parentRunId), all written by the driver (trials run with
mlflow.enabled=false: one writer for a SQLite store); the best trial's best checkpoint is
registered as a model version through mlflow_run.register_generator.

Resources: sweep.plan_concurrency checks that max_concurrent_trials fit the cluster before any
trial starts. A trial the scheduler stops is killed by Tune; its Train placement group is then
freed by Train's PlacementGroupCleaner through the dashboard's State API, which
cluster.connect_ray points at this cluster's own dashboard (docs/ray-notes.md, "Tune and placement
groups").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

# Tune warns about any callback slower than 0.5 s, and writing a result to a SQLite MLflow store on
# a busy 2-core machine can take that long; the threshold is read when ray.tune is imported.
os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")

from ray.tune import Callback  # noqa: E402  (a Ray-facing module: cli.py imports it only for `ce-ray tune`)
from ray.tune.schedulers import ASHAScheduler, TrialScheduler  # noqa: E402

from ce_ray import config as C  # noqa: E402
from ce_ray import tracking  # noqa: E402
from ce_ray.errors import UserError  # noqa: E402
from ce_ray.fsutil import is_uri, write_atomic  # noqa: E402
from ce_ray.train import mlflow_run
from ce_ray.tune.sweep import (
    ENDED,
    RANKING_FILE,
    RUNS_DIR,
    STATE_FILE,
    TRIAL_DRIVER_CPU,
    Evaluation,
    Sweep,  # noqa: E402
    TrialLedger,
    columns_for,
    format_table,
    load_sweep,
    plan_concurrency,
    read_ledger,
    read_ledgers,
    run_name_for,
    trial_config,
    write_ledger,
    write_ranking,
)

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

# The schedulers' clock: the optimiser step every report carries (sweep.py says why not Tune's
# training_iteration).
TIME_ATTR = "step"
TAG_SWEEP, TAG_TRIAL, TAG_STATUS = "ce_ray.sweep", "ce_ray.trial_id", "ce_ray.trial_status"
# Tune bookkeeping that is not a training metric (MLflow gets the loop's metrics).
NOT_METRICS = {"timestamp", "pid", "time_since_restore", "iterations_since_restore", "time_this_iter_s", "done", "step"}

# --- The driver-side callback: ledgers + MLflow parent/child runs -------------------------------------


def _short_error(err: Any) -> str:
    text = str(err or "").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


class SweepCallback(Callback):
    """Tune callback on the sweep's driver: trial ledgers and MLflow child runs.

    Per trial it keeps a ledger, trials/<id>.json: params, how often it started, last step, every
    checkpointed evaluation and the best one, status (running | interrupted | completed |
    stopped_early | error), its MLflow child run. Ledgers live on disk, so a resumed sweep
    continues them, and ranking.csv is rebuilt from them whenever a trial ends. MLflow (when
    `parent`, the sweep's parent run, is given): the child run gets the flattened trial config as params, every
    result's metrics at its training step, and the status as tag ce_ray.trial_status. "Stopped
    early" = ended without error before train.steps (the scheduler stopped it). MLflow writes are
    best effort (a warning): losing a metric point is better than losing the sweep; the ledgers
    must be written (tracking.RateLimitedWarning)."""

    def __init__(
        self,
        *,
        sweep_dir: str,
        sweep_name: str,
        base: dict[str, Any],
        ties: dict[str, str],
        metric: str,
        mode: str,
        keys: list[str],
        parent: tracking.RunHandle | None = None,
    ):
        self.sweep_dir, self.sweep_name, self.base, self.ties = Path(sweep_dir), sweep_name, base, ties
        self.metric, self.mode, self.keys = metric, mode, keys
        self.parent = parent
        self._store: tracking.Store | None = None
        self._warn = tracking.RateLimitedWarning()

    @classmethod
    def for_sweep(cls, sweep: Sweep, parent: tracking.RunHandle | None = None) -> SweepCallback:
        """The callback of `sweep`: its folder, name, base config, ties, metric and searched keys."""
        return cls(
            sweep_dir=str(sweep.directory),
            sweep_name=sweep.name,
            base=sweep.base,
            ties=sweep.ties,
            metric=sweep.metric,
            mode=sweep.mode,
            keys=list(sweep.space),
            parent=parent,
        )

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks into tuner.pkl (what --resume restores)
        return {**self.__dict__, "_store": None, "_warn": tracking.RateLimitedWarning()}

    # ledgers
    def _load(self, trial: Trial) -> TrialLedger:
        ledger = read_ledger(Path(self.sweep_dir), trial.trial_id)
        if ledger is not None:
            return ledger
        cfg = trial_config(self.base, dict(trial.config), self.ties)
        return TrialLedger(
            trial_id=trial.trial_id,
            run_name=run_name_for(self.sweep_name, trial.trial_id),
            params={k: _get(cfg, k) for k in self.keys},
            steps=cfg.train.steps,
        )

    def _save(self, ledger: TrialLedger) -> None:
        write_ledger(Path(self.sweep_dir), ledger)

    # MLflow
    def _mlflow(self, what: str, fn: Callable[[tracking.Store], None]) -> None:
        if self.parent is None:
            return
        try:
            if self._store is None:
                self._store = tracking.Store(self.parent.tracking_uri)
            fn(self._store)
        except Exception as e:
            self._warn(what, self.parent.tracking_uri, e)

    def _open_child(self, trial: Trial, ledger: TrialLedger) -> None:
        def go(store: tracking.Store) -> None:
            if ledger.mlflow_run_id:  # a resumed trial keeps writing into its run
                store.reopen(ledger.mlflow_run_id)
                store.set_tags(ledger.mlflow_run_id, {TAG_STATUS: "running"})
                return
            assert self.parent is not None
            ledger.mlflow_run_id = store.create_run(
                self.parent.experiment_id,
                ledger.run_name,
                tags={
                    "mlflow.parentRunId": self.parent.run_id,
                    TAG_SWEEP: self.sweep_name,
                    TAG_TRIAL: trial.trial_id,
                    TAG_STATUS: "running",
                },
            )
            cfg = trial_config(self.base, dict(trial.config), self.ties, run_name=ledger.run_name)
            store.log_params(ledger.mlflow_run_id, C.flatten(cfg))

        self._mlflow("creating the trial's run", go)

    def _close_child(self, ledger: TrialLedger) -> None:
        run_id = ledger.mlflow_run_id
        if run_id:

            def go(store: tracking.Store) -> None:
                store.set_tags(run_id, {TAG_STATUS: ledger.status})
                store.end(run_id, "FAILED" if ledger.status == "error" else "FINISHED")

            self._mlflow("ending the trial's run", go)

    # Tune hooks
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        ledger = self._load(trial)
        ledger.starts += 1
        ledger.status = "running"
        self._open_child(trial, ledger)
        self._save(ledger)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        ledger = self._load(trial)
        step = int(result.get(TIME_ATTR, 0))
        ledger.last_step = max(ledger.last_step, step)
        ledger.reports += 1
        value, ckpt = result.get(self.metric), result.get("checkpoint_path")
        if value is not None and ckpt:  # loop.run validates at every checkpoint
            entry = Evaluation(step=step, value=float(value), checkpoint=str(ckpt))
            ledger.checkpoints.append(entry)
            if _better(entry.value, ledger.best.value if ledger.best else None, self.mode):
                ledger.best = entry
        run_id = ledger.mlflow_run_id
        if run_id:
            ms = {
                k: float(v)
                for k, v in result.items()
                if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            self._mlflow("logging metrics", lambda store: store.log_metrics(run_id, ms, step))
        self._save(ledger)

    def _end(self, trial: Trial, status: str) -> None:
        ledger = self._load(trial)
        ledger.status = status or ("completed" if ledger.last_step >= ledger.steps else "stopped_early")
        if status == "error":
            try:
                ledger.error = _short_error(trial.get_error())
            except Exception:  # the error file may be missing; the status says enough
                pass
        self._close_child(ledger)
        self._save(ledger)
        write_ranking(self.sweep_dir, self.metric, self.mode, self.keys)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, "")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, "error")


def _better(value: float, best: float | None, mode: str) -> bool:
    """Is `value` a better metric than `best` (None: no best yet; NaN/inf never beat a number)?"""
    if best is None:
        return True
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value < best if mode == "min" else value > best


def _get(cfg: C.Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


# --- Trials ------------------------------------------------------------------------------------------


def make_trial_driver(
    base: dict[str, Any], ties: dict[str, str], sweep_name: str, runs_dir: str
) -> Callable[[dict[str, Any]], None]:
    """The Tune trainable: a function that builds and fits one TorchTrainer per trial (Tune cannot
    wrap a TorchTrainer itself under Train V2). Its Train run name comes
    from the trial id, so a resumed trial continues its own Train run from its latest checkpoint."""

    def ce_ray_trial(config: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from ce_ray import cluster
        from ce_ray.train.driver import build_trainer

        run_name = run_name_for(sweep_name, tune.get_context().get_trial_id())
        cfg = trial_config(base, config, ties, run_name=run_name)
        # This actor has its own DataContext, copied into the trainer when it is built
        # (docs/ray-notes.md, "Ray Data on few CPUs"): quiet it first.
        cluster.quiet_data_context()
        report = TuneReportCallback()  # type: ignore[no-untyped-call]  # ray: untyped
        build_trainer(cfg, run_name=run_name, storage_path=runs_dir, callbacks=[report]).fit()

    return ce_ray_trial


def _trial_dirname(trial: Trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default adds the whole config and a timestamp


def param_space(sweep: Sweep) -> dict[str, Any]:
    """Flat {dotted key: Tune domain}; ties are computed by trial_config, so every searcher works."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in sweep.space.items():
        if d.kind == "loguniform":
            out[key] = tune.loguniform(*d.args)
        elif d.kind == "uniform":
            out[key] = tune.uniform(*d.args)
        elif d.kind == "randint":
            out[key] = tune.randint(*d.args)
        elif d.kind == "grid" or (d.kind == "choice" and sweep.search == "grid"):
            out[key] = tune.grid_search(list(d.args))
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.args))
    return out


# ASHA keeps its rungs in private fields (Ray 2.60: ASHAScheduler._trial_info[trial_id]._rungs, a
# list of (milestone, {trial_id: signed value}), and ASHAScheduler._metric_op, +1 or -1). These two
# functions are the only place ce-ray touches them; tests/tune/test_runner.py fails naming the
# field if a Ray upgrade moves one.


def asha_rungs(scheduler: ASHAScheduler, trial_id: str) -> list[tuple[float, dict[str, float]]]:
    """The rungs of the bracket `trial_id` is in: [(milestone step, {trial id: signed value})]."""
    try:
        rungs: list[tuple[float, dict[str, float]]] = scheduler._trial_info[trial_id]._rungs
        return rungs
    except (AttributeError, KeyError, TypeError) as e:
        raise RuntimeError(
            f"Ray's ASHAScheduler no longer has _trial_info[trial_id]._rungs ({type(e).__name__}: {e}); "
            "LedgerASHA (ce_ray/tune/runner.py) must be updated for this Ray version"
        ) from e


def asha_metric_sign(scheduler: ASHAScheduler) -> float:
    """+1 when the metric is maximised, -1 when minimised: how ASHA stores values in its rungs."""
    try:
        return float(cast(Any, scheduler._metric_op))  # None (no metric set) raises TypeError, caught below
    except (AttributeError, TypeError) as e:
        raise RuntimeError(
            f"Ray's ASHAScheduler no longer has _metric_op ({type(e).__name__}: {e}); "
            "LedgerASHA (ce_ray/tune/runner.py) must be updated for this Ray version"
        ) from e


class LedgerASHA(ASHAScheduler):
    """ASHA whose rungs survive a --resume.

    Tune checkpoints its search algorithm but not its scheduler: a restored sweep gets the scheduler
    as it was pickled when the sweep started, with empty rungs. Every trial after a resume was then
    judged only against the trials that reached a rung after it, and a trial that had passed a rung
    before the interruption was never counted, so a resumed sweep stopped far fewer trials (the
    end-to-end test once saw none stopped). Each trial's ledger keeps every validated result
    (step, value), and Tune re-adds every trial it restores, so on_trial_add records the ledger's
    results into the trial's bracket as ASHA itself records them: at each rung, the trial's first
    result at or past the rung's step. With several brackets (hyperband) a restored trial may land
    in another bracket than before; its results are recorded there."""

    def __init__(self, *, sweep_dir: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._sweep_dir = sweep_dir

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        ledger = read_ledger(Path(self._sweep_dir), trial.trial_id)
        if ledger is None:  # a new trial
            return
        results = sorted(ledger.checkpoints, key=lambda e: e.step)
        for milestone, recorded in asha_rungs(self, trial.trial_id):
            first = next((e for e in results if e.step >= milestone), None)
            if first is not None and trial.trial_id not in recorded:
                recorded[trial.trial_id] = asha_metric_sign(self) * first.value


def make_scheduler(sweep: Sweep) -> TrialScheduler:
    from ray.tune.schedulers import FIFOScheduler, MedianStoppingRule

    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()  # type: ignore[no-untyped-call]  # ray: untyped
    if s.type == "median":
        return MedianStoppingRule(
            time_attr=TIME_ATTR, grace_period=s.grace_period, min_samples_required=s.min_samples_required
        )
    return LedgerASHA(
        sweep_dir=str(sweep.directory),
        time_attr=TIME_ATTR,
        max_t=s.max_t,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        brackets=s.brackets if s.type == "hyperband" else 1,
    )


def make_search(sweep: Sweep, max_concurrent: int) -> tuple[Any, int | None]:
    """(search algorithm, TuneConfig.max_concurrent_trials). BasicVariantGenerator takes the limit
    itself: Tune ignores TuneConfig's limit for it ("requires a Searcher") and would start every
    trial at once, starving them all."""
    if sweep.search == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserError(
                "search: optuna needs the optuna package: pip install optuna (or use search: random / grid)"
            ) from None
        return OptunaSearch(seed=sweep.seed), max_concurrent
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent), None


@contextlib.contextmanager
def _tune_env() -> Iterator[None]:
    """Settings Tune reads from the environment while it runs (user values win):
    - every report reaches Tune, but val metrics come only at eval steps: Tune's strict check would
      reject the others; the schedulers skip results without the metric;
    - the experiment state is saved at most every 2 s (Tune's default is 10 s+), so a killed
      sweep loses (almost) no finished trial."""
    wanted = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "TUNE_GLOBAL_CHECKPOINT_S": "2"}
    old = {k: os.environ.get(k) for k in wanted}
    for k, v in wanted.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, was in old.items():
            if was is None:
                os.environ.pop(k, None)


# --- The sweep -----------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[dict[str, Any]]  # ranking, best first
    interrupted: bool = False
    model_uri: str | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    elapsed_s: float = 0.0
    lines: list[str] = field(default_factory=list)


def _comparable(sweep: Sweep) -> dict[str, Any]:
    d = sweep.to_dict()
    out: dict[str, Any] = json.loads(
        json.dumps(
            {k: d[k] for k in ("name", "base", "space", "metric", "mode", "num_samples", "search", "seed", "scheduler")}
        )
    )
    return out


def _check_dashboard(sweep: Sweep, log: Callable[[str], None]) -> None:
    """Stopping a trial early frees its Train placement group only through the dashboard's State
    API; without it the next trials wait forever for CPUs (docs/ray-notes.md, "Tune and placement
    groups"). Also warn when the cluster's processes would ask another cluster's State API
    (several Ray clusters on one machine; cluster.connect_ray prevents it for the clusters it
    starts)."""
    if sweep.scheduler.type == "fifo":
        return
    import ray

    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()  # type: ignore[no-untyped-call]  # ray: untyped
    except Exception:  # cannot tell (e.g. a client connection): let the sweep try
        return
    if not url:
        raise UserError(
            f"scheduler {sweep.scheduler.type} stops trials early, which frees their resources only when the Ray "
            "dashboard runs (it is off in this cluster); start Ray with the dashboard or use scheduler: fifo"
        )

    @ray.remote(num_cpus=0)
    def state_api_address() -> str:
        from ray.dashboard.utils import get_address_for_submission_client

        try:
            return get_address_for_submission_client(None)
        except Exception as e:
            return f"none ({type(e).__name__}: {e})"

    seen = ray.get(state_api_address.remote(), timeout=120)
    if url.split("://")[-1].rstrip("/") not in seen:
        log(
            f"warning: this cluster's processes find the State API at {seen}, not at its dashboard {url}: trials that "
            "the scheduler stops may keep their CPUs (several Ray clusters on this machine?). Start the cluster with "
            f"RAY_ADDRESS=<its GCS address> in its environment (ce-ray tune does when it starts Ray)"
        )


def _parent_run(sweep: Sweep, cfg: C.Config, state: dict[str, Any]) -> tracking.RunHandle | None:
    """The sweep's MLflow parent run: reopened from sweep.json on --resume."""
    if not cfg.mlflow.enabled:
        return None
    if state.get("mlflow"):
        parent = tracking.RunHandle.from_dict(state["mlflow"])
        assert parent is not None
        tracking.Store(parent.tracking_uri).reopen(parent.run_id)
        return parent
    params = {
        "sweep.metric": sweep.metric,
        "sweep.mode": sweep.mode,
        "sweep.num_samples": sweep.num_samples,
        "sweep.search": sweep.search,
        "sweep.seed": sweep.seed,
        "sweep.base": sweep.base_file,
        "sweep.overrides": " ".join(sweep.overrides),
        **{f"sweep.scheduler.{k}": v for k, v in vars(sweep.scheduler).items()},
        **{f"search_space.{k}": d.describe() for k, d in sweep.space.items()},
    }
    h = tracking.start_sweep_run(
        cfg,
        run_name=f"sweep-{sweep.name}",
        tags={TAG_SWEEP: sweep.name, "ce_ray.sweep_dir": str(sweep.directory)},
        params={k: str(v)[:6000] for k, v in params.items()},
    )  # MLflow's limit on a param value
    return h


def _register_best(
    sweep: Sweep, rows: list[dict[str, Any]], parent: tracking.RunHandle, log: Callable[[str], None]
) -> str | None:
    """Register the best trial's best checkpoint (an existing one: Train keeps only a few) as a
    model version tagged with the sweep and its metric."""
    from ce_ray.train import checkpoint as ckpt_io

    ledgers = {t.trial_id: t for t in read_ledgers(sweep.directory)}
    for row in rows:
        t = ledgers[row["trial_id"]]
        if t.best is None or not t.mlflow_run_id:
            continue
        sign = 1.0 if sweep.mode == "min" else -1.0
        # The best checkpoint first, then the others best-first (Train may have deleted it).
        for entry in sorted(t.checkpoints, key=lambda e: (e != t.best, sign * e.value)):
            found = ckpt_io.find_checkpoint_dir(Path(entry.checkpoint)) if Path(entry.checkpoint).exists() else None
            if found is None or not math.isfinite(entry.value):
                continue
            cfg = trial_config(
                sweep.base,
                {k: v for k, v in t.params.items() if k in sweep.space and sweep.space[k].kind != "tie"},
                sweep.ties,
                run_name=t.run_name,
            )
            model_uri = mlflow_run.register_generator(
                tracking.RunHandle(parent.tracking_uri, parent.experiment_id, t.mlflow_run_id), found, cfg
            )
            store = tracking.Store(parent.tracking_uri)
            store.tag_model_version(
                model_uri,
                {
                    TAG_SWEEP: sweep.name,
                    "ce_ray.metric": sweep.metric,
                    f"ce_ray.{sweep.metric}": entry.value,
                    "ce_ray.step": entry.step,
                    TAG_TRIAL: t.trial_id,
                },
            )
            store.set_tags(parent.run_id, {"ce_ray.best_trial": t.trial_id, "ce_ray.best_model": model_uri})
            store.log_metrics(parent.run_id, {f"best_{sweep.metric}": entry.value})
            log(f"registered {model_uri}: trial {t.trial_id} step {entry.step}, {sweep.metric} {entry.value:.4g}")
            return model_uri
    log("no trial left a checkpoint with a finite metric: nothing registered")
    return None


def run_sweep(sweep: Sweep, *, resume: bool = False, log: Callable[[str], None] = print) -> SweepOutcome:
    """Run (or with resume=True continue) a sweep; returns the ranking. Trials run as Tune
    trials of TorchTrainer runs; see the module docstring for what goes where."""
    t0 = time.monotonic()
    if is_uri(sweep.config.scale.storage_path):
        raise UserError(
            f"sweeps keep their ledgers and ranking on a filesystem: set scale.storage_path to a local or shared "
            f"folder, not {sweep.config.scale.storage_path!r}"
        )
    sweep_dir = sweep.directory
    state_file = sweep_dir / STATE_FILE
    state: dict[str, Any] = {}
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if not resume:
            raise UserError(
                f"sweep {sweep.name!r} already exists in {sweep_dir}: pass --resume to continue it, "
                "or --name NEW to start another"
            )
        saved = Sweep.from_dict(state["sweep"])
        if _comparable(saved) != _comparable(sweep):
            diff = [k for k, v in _comparable(saved).items() if _comparable(sweep)[k] != v]
            raise UserError(
                f"sweep {sweep.name!r} changed since it started ({', '.join(diff)} differ); resume it with the same "
                "sweep file and key=value arguments, or start a new sweep with --name NEW"
            )
    elif resume:
        raise UserError(
            f"nothing to resume: no sweep {sweep.name!r} in {sweep_dir.parent} "
            "(check --name and scale.storage_path, or start it without --resume)"
        )

    # Every trial would fail on missing shards, each after starting its workers: say it now.
    from ce_ray.data.shards import shard_files

    shard_files(sweep.config.data.shards, "train")
    shard_files(sweep.config.data.shards, "val")

    from ce_ray import cluster

    cluster.connect_ray()
    import ray
    from ray import tune

    _check_dashboard(sweep, log)
    res = ray.cluster_resources()  # type: ignore[no-untyped-call]  # ray: untyped
    conc = plan_concurrency(sweep, float(res.get("CPU", 0)), float(res.get("GPU", 0)))
    cfg = sweep.config
    keys = list(sweep.space)
    parent = _parent_run(sweep, cfg, state)
    state = {**state, "sweep": sweep.to_dict(), "status": "running", "mlflow": parent.to_dict() if parent else None}
    write_atomic(state_file, json.dumps(state, indent=1, sort_keys=True))
    log(
        f"{'resuming' if resume else 'starting'} sweep {sweep.name}: {sweep.total_trials} trials, {conc} at a time, "
        f"{sweep.scheduler.type} on {sweep.metric} ({sweep.mode}), in {sweep_dir}"
    )

    trainable = tune.with_resources(
        make_trial_driver(sweep.base, sweep.ties, sweep.name, str(sweep_dir / RUNS_DIR)), {"cpu": TRIAL_DRIVER_CPU}
    )
    status = "FAILED"
    try:
        with _tune_env():
            if resume and tune.Tuner.can_restore(str(sweep_dir)):
                # Finished trials stay finished; unfinished and errored ones run again, and their
                # Train runs continue from their latest checkpoints (same run names).
                tuner = tune.Tuner.restore(
                    str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True
                )
            else:
                callback = SweepCallback.for_sweep(sweep, parent)
                search_alg, tune_limit = make_search(sweep, conc)
                tuner = tune.Tuner(
                    trainable,
                    param_space=param_space(sweep),
                    tune_config=tune.TuneConfig(
                        metric=sweep.metric,
                        mode=sweep.mode,
                        num_samples=sweep.num_samples,
                        max_concurrent_trials=tune_limit,
                        scheduler=make_scheduler(sweep),
                        search_alg=search_alg,
                        trial_dirname_creator=_trial_dirname,
                    ),
                    run_config=tune.RunConfig(
                        name=sweep.name, storage_path=str(sweep_dir.parent), callbacks=[callback], verbose=1
                    ),
                )
            tuner.fit()
        # Interrupted (Ctrl-C / SIGINT): Tune saved its state and returned with trials unfinished.
        # Counted from our own ledgers, not the ResultGrid: on an interrupt Tune may mark trials
        # that never started TERMINATED, which made an interrupted sweep look finished.
        interrupted = unfinished_trials(sweep_dir, sweep.total_trials) > 0
        if interrupted:
            _mark_interrupted(sweep_dir, parent)
        rows = write_ranking(sweep_dir, sweep.metric, sweep.mode, keys)
        out = SweepOutcome(
            sweep_dir=sweep_dir,
            rows=rows,
            interrupted=interrupted,
            tracking_uri=parent.tracking_uri if parent else None,
            parent_run_id=parent.run_id if parent else None,
        )
        if not interrupted and parent:
            out.model_uri = state.get("registered") or _register_best(sweep, rows, parent, log)
            store = tracking.Store(parent.tracking_uri)
            store.log_artifact(parent.run_id, sweep_dir / RANKING_FILE)
            for row in rows:
                if row["mlflow_run_id"]:
                    store.set_tags(row["mlflow_run_id"], {"ce_ray.rank": row["rank"]})
        status = "KILLED" if interrupted else "FINISHED"
        state.update(status="interrupted" if interrupted else "finished", registered=out.model_uri)
        write_atomic(state_file, json.dumps(state, indent=1, sort_keys=True))
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent:
            tracking.end_run(parent, status)
    out.elapsed_s = time.monotonic() - t0
    out.lines = _summary_lines(sweep, out)
    for line in out.lines:
        log(line)
    return out


def unfinished_trials(sweep_dir: Path, total_trials: int) -> int:
    """Trials of the sweep that have not ended (completed, stopped early or errored), by our
    ledgers; trials that never started have none."""
    return total_trials - sum(t.status in ENDED for t in read_ledgers(sweep_dir))


def _mark_interrupted(sweep_dir: Path, parent: tracking.RunHandle | None) -> None:
    """Trials cut off by an interruption: ledger status "interrupted", MLflow child run KILLED
    (a --resume reopens both)."""
    for t in read_ledgers(sweep_dir):
        if t.status in ENDED:
            continue
        t.status = "interrupted"
        write_ledger(sweep_dir, t)
        if parent and t.mlflow_run_id:
            store = tracking.Store(parent.tracking_uri)
            store.set_tags(t.mlflow_run_id, {TAG_STATUS: "interrupted"})
            store.end(t.mlflow_run_id, "KILLED")


def _summary_lines(sweep: Sweep, out: SweepOutcome) -> list[str]:
    cols = columns_for(sweep.metric, list(sweep.space))
    lines = [
        f"sweep {sweep.name}: {len(out.rows)} trials ranked by {sweep.metric} ({sweep.mode}) "
        f"at each trial's best checkpoint, {out.elapsed_s:.0f} s",
        format_table(out.rows, cols),
        f"ranking     {out.sweep_dir / RANKING_FILE}",
    ]
    if out.parent_run_id:
        lines.append(f"mlflow run  {out.parent_run_id} (parent; one child per trial) at {out.tracking_uri}")
        if out.model_uri:
            lines.append(f"model       {out.model_uri}")
        assert out.tracking_uri is not None  # set together with parent_run_id
        lines.append(f"mlflow ui   {tracking.ui_command(out.tracking_uri)}")
    if out.interrupted:
        lines.append(
            f"interrupted: finished trials are kept; continue with: ce-ray tune {sweep.file} "
            f"{' '.join(sweep.cli) + ' ' if sweep.cli else ''}--name {sweep.name} --resume"
        )
    return lines


# --- CLI glue (cli.py owns the parser and calls these) ----------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (tune_configs/sweep_*.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="base config overrides (data.shards=..., train.steps=...) or sweep settings "
        "(num_samples=4, scheduler.grace_period=2)",
    )
    parser.add_argument("--name", help="sweep name (default: the file's name: key, else its file name without sweep_)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")


def run_from_args(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, args.overrides, name=args.name)
    out = run_sweep(sweep, resume=args.resume)
    if out.interrupted:
        return 130
    if not any(isinstance(r.get(sweep.metric), float) for r in out.rows):
        errors = [t.error for t in read_ledgers(out.sweep_dir) if t.error]
        raise UserError(
            f"no trial reached an evaluation with a checkpoint{': ' + errors[0] if errors else ''}; "
            f"see {out.sweep_dir / RANKING_FILE} and the trial logs above"
        )
    return 0
