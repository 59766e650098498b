"""`ce-ray tune` end to end: tune_configs/sweep_smoke.yaml through the real CLI, interrupted with
SIGINT (Ctrl-C) once a trial has ended, then resumed with --resume; checked on disk and in MLflow.
At the end, the driver's ledgers and MLflow runs (SweepCallback, parent run, registered best)
without a cluster, in seconds.

One sweep serves both end-to-end tests (a sweep costs minutes on 2 cores). It runs in a subprocess with
its own local Ray cluster, started by cluster.connect_ray with its address in its processes'
environment: Train's placement-group cleaner, which frees the CPUs of a trial that ASHA stopped,
would otherwise ask whichever Ray cluster it auto-detects on this machine.
"""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ce_ray.infer import resolve
from ce_ray.tune import sweep as S

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
FIRST_TRIAL_TIMEOUT_S = 900  # generous: other test sessions share these 2 cores
STOP_TIMEOUT_S = 300
RESUME_TIMEOUT_S = 1200
SMOKE_TRIALS = yaml.safe_load((ROOT / "tune_configs" / "sweep_smoke.yaml").read_text())["num_samples"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")
    for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", "MLFLOW_TRACKING_URI"):  # a private cluster and store
        env.pop(k, None)
    return env


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _stop(proc: subprocess.Popen) -> None:
    """Only the process this test started: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ledgers(sweep_dir: Path) -> dict[str, dict]:
    return {t.trial_id: dataclasses.asdict(t) for t in S.read_ledgers(sweep_dir)}


@pytest.fixture(scope="module")
def smoke_sweep(bundled_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_smoke")
    cmd = [
        sys.executable,
        "-m",
        "ce_ray.cli",
        "tune",
        "tune_configs/sweep_smoke.yaml",
        f"data.shards={bundled_shards}",
        f"train.output_dir={root / 'out'}",
        f"scale.storage_path={root / 'ray'}",
    ]
    sweep_dir = root / "ray" / "sweeps" / "smoke"

    # 1. Start the sweep; Ctrl-C it as soon as one trial has ended.
    log1 = root / "first.log"
    with open(log1, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + FIRST_TRIAL_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if any(t["status"] in S.ENDED for t in _ledgers(sweep_dir).values()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, (
            f"the sweep ended before it could be interrupted (rc {proc.returncode}):\n{_tail(log1)}"
        )
        assert time.monotonic() < deadline, f"no trial ended within {FIRST_TRIAL_TIMEOUT_S} s:\n{_tail(log1)}"
        proc.send_signal(signal.SIGINT)
        rc1 = proc.wait(timeout=STOP_TIMEOUT_S)
    finally:
        _stop(proc)
    after_interrupt = _ledgers(sweep_dir)

    # 2. Resume it to the end.
    log2 = root / "resume.log"
    with open(log2, "w") as f:
        res = subprocess.run(
            cmd + ["--resume"], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=RESUME_TIMEOUT_S
        )
    return {
        "dir": sweep_dir,
        "rc1": rc1,
        "log1": log1,
        "rc2": res.returncode,
        "log2": log2,
        "after_interrupt": after_interrupt,
        "final": _ledgers(sweep_dir),
        "tracking_uri": f"sqlite:///{root / 'out' / 'mlflow.db'}",
    }


def test_resume_after_interruption_keeps_finished_trials(smoke_sweep):
    s = smoke_sweep
    assert s["rc1"] == 130, _tail(s["log1"])  # interrupted, and says so
    assert "--resume" in s["log1"].read_text(), "the interrupted sweep must print how to resume it"
    assert s["rc2"] == 0, _tail(s["log2"])
    before, final = s["after_interrupt"], s["final"]
    finished = {tid: t for tid, t in before.items() if t["status"] in S.ENDED}
    assert finished, "no trial had ended when the sweep was interrupted"
    for tid, t in finished.items():  # kept as they were, never run again
        assert final[tid]["starts"] == 1 and final[tid]["status"] == t["status"] and final[tid]["best"] == t["best"], (
            final[tid]
        )
    cut = [tid for tid, t in before.items() if t["status"] not in S.ENDED]
    assert all(before[tid]["status"] == "interrupted" for tid in cut), before
    assert len(final) == SMOKE_TRIALS and all(t["status"] in ("completed", "stopped_early") for t in final.values()), (
        final
    )
    for tid in cut:  # restarted trials continue their own Train run (named by the trial) to the end
        assert final[tid]["starts"] == 2
        assert (s["dir"] / S.RUNS_DIR / S.run_name_for("smoke", tid)).is_dir()


def test_smoke_sweep_end_to_end(smoke_sweep):
    from mlflow.tracking import MlflowClient

    s = smoke_sweep
    assert s["rc2"] == 0, _tail(s["log2"])
    final = s["final"]
    assert len(final) == SMOKE_TRIALS
    statuses = [t["status"] for t in final.values()]
    assert "stopped_early" in statuses, f"ASHA stopped no trial early: {statuses}"
    assert all(t["last_step"] == t["steps"] for t in final.values() if t["status"] == "completed")
    assert all(t["last_step"] < t["steps"] for t in final.values() if t["status"] == "stopped_early")
    for t in final.values():  # λadv = 1 − λrec in every trial
        assert t["params"]["loss.lambda_adv"] == pytest.approx(1 - t["params"]["loss.lambda_rec"])

    # The ranking: printed and written as CSV, best val_l2 first.
    with open(s["dir"] / S.RANKING_FILE) as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, SMOKE_TRIALS + 1)] and {
        r["trial_id"] for r in rows
    } == set(final)
    values = [float(r["val_l2"]) for r in rows]
    assert values == sorted(values)
    out = s["log2"].read_text()
    assert "rank  trial_id" in out and rows[0]["trial_id"] in out

    # MLflow: a parent run, one child per trial with params, per-step metrics and status.
    client = MlflowClient(s["tracking_uri"])
    exp = client.get_experiment_by_name("ce-ray-smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [
        r for r in runs if r.data.tags.get("ce_ray.sweep") == "smoke" and "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {
        r.data.tags["ce_ray.trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(final)
    for tid, run in children.items():
        assert run.data.tags["ce_ray.trial_status"] == final[tid]["status"]
        assert float(run.data.params["optim.lr_g"]) == pytest.approx(final[tid]["params"]["optim.lr_g"])
        assert run.data.params["mlflow.enabled"] == "False"  # the trial itself did not track; the sweep did
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss_g")]
        assert steps == sorted(steps) and len(steps) >= 2 and steps[-1] == final[tid]["last_step"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_l2")]

    # The best trial's generator, registered and tagged with the sweep and its metric.
    model_uri = parent.data.tags["ce_ray.best_model"]
    name, version = model_uri[len("models:/") :].rsplit("/", 1)
    mv = client.get_model_version(name, version)
    best = rows[0]
    assert mv.tags["ce_ray.sweep"] == "smoke" and mv.tags["ce_ray.metric"] == "val_l2"
    assert float(mv.tags["ce_ray.val_l2"]) == pytest.approx(float(best["val_l2"]))
    assert mv.run_id == children[best["trial_id"]].info.run_id
    assert parent.data.metrics["best_val_l2"] == pytest.approx(float(best["val_l2"]))

    # models:/ URIs resolve in the store the command names (resolve.py: flag, then
    # MLFLOW_TRACKING_URI, then outputs/mlflow.db): here the sweep's.
    loaded = resolve.load_generator(model_uri, tracking_uri=s["tracking_uri"])
    assert loaded.config.optim.lr_g == pytest.approx(final[best["trial_id"]]["params"]["optim.lr_g"])
    assert loaded.step == int(best["step"])


# --- The driver's ledgers and MLflow runs, without a cluster (seconds) ------------------------------


class _Trial:
    """What SweepCallback reads from a Tune trial."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config

    def get_error(self) -> str:
        return "Traceback ...\nRuntimeError: boom"


def test_sweep_callback_ledgers_and_mlflow_runs(tmp_path, monkeypatch):
    """SweepCallback and the parent run, through tracking.Store, on a SQLite store: child runs
    carry the trial config as params and the results as metrics at their step; the best
    checkpoint is registered and tagged; an interruption marks unfinished children KILLED."""
    import pickle

    from mlflow.tracking import MlflowClient

    from ce_ray import config as C
    from ce_ray.core.model import build_discriminator, build_generator
    from ce_ray.train import checkpoint as ckpt_io
    from ce_ray.tune import runner as T

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = S.load_sweep(
        ROOT / "tune_configs" / "sweep_smoke.yaml",
        [
            f"scale.storage_path={tmp_path / 'ray'}",
            f"train.output_dir={tmp_path / 'out'}",
            f"mlflow.tracking_uri={uri}",
            "mlflow.registered_model=tune-test",
        ],
    )
    cfg = sweep.config
    parent = T._parent_run(sweep, cfg, {})
    assert parent.tracking_uri == uri
    client = MlflowClient(uri)
    assert client.get_run(parent.run_id).data.params["sweep.metric"] == "val_l2"
    cb = T.SweepCallback.for_sweep(sweep, parent)
    cb = pickle.loads(pickle.dumps(cb))  # Tune pickles callbacks into its experiment state
    sampled = {"loss.lambda_rec": 0.99, "optim.lr_g": 1e-3, "optim.lr_d": 1e-4}
    a, b = _Trial("a", sampled), _Trial("b", {**sampled, "optim.lr_g": 1e-2})

    torch_ckpt = ckpt_io.save(
        tmp_path / "ckpt_a",
        G=build_generator(cfg.model),
        D=build_discriminator(cfg.model),
        step=3,
        config=S.trial_config(sweep.base, sampled, sweep.ties, run_name=S.run_name_for(sweep.name, "a")),
    )
    cb.on_trial_start(0, [], a)
    cb.on_trial_result(0, [], a, {"step": 2, "loss_g": 0.5, "done": False})
    cb.on_trial_result(0, [], a, {"step": 3, "loss_g": 0.4, "val_l2": 0.05, "checkpoint_path": str(torch_ckpt)})
    cb.on_trial_complete(0, [], a)
    cb.on_trial_start(0, [], b)
    cb.on_trial_result(0, [], b, {"step": 2, "loss_g": 0.9})

    la = json.loads((sweep.directory / "trials" / "a.json").read_text())
    assert (
        la["status"] == "stopped_early" and la["last_step"] == 3 and la["best"]["value"] == 0.05
    )  # ended before train.steps
    child = client.get_run(la["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id and child.data.tags[T.TAG_STATUS] == "stopped_early"
    assert child.info.status == "FINISHED"
    want = S.trial_config(sweep.base, sampled, sweep.ties, run_name=la["run_name"])
    assert child.data.params == {k: str(v) for k, v in C.flatten(want).items()}
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss_g")] == [(2, 0.5), (3, 0.4)]
    assert "done" not in child.data.metrics and "step" not in child.data.metrics  # Tune bookkeeping is not a metric

    # Ctrl-C now: b is cut off; its ledger and child run say so.
    T._mark_interrupted(sweep.directory, parent)
    lb = json.loads((sweep.directory / "trials" / "b.json").read_text())
    assert lb["status"] == "interrupted"
    assert client.get_run(lb["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(lb["mlflow_run_id"]).data.tags[T.TAG_STATUS] == "interrupted"

    # The best checkpoint of the best trial becomes a registered version, tagged with the sweep.
    rows = S.write_ranking(sweep.directory, sweep.metric, sweep.mode, list(sweep.space))
    model_uri = T._register_best(sweep, rows, parent, log=lambda line: None)
    assert model_uri == "models:/tune-test/1"
    version = client.get_model_version("tune-test", "1")
    assert (
        version.tags["ce_ray.trial_id"] == "a"
        and version.tags["ce_ray.val_l2"] == "0.05"
        and version.tags["ce_ray.step"] == "3"
    )
    run = client.get_run(parent.run_id)
    assert run.data.tags["ce_ray.best_trial"] == "a" and run.data.tags["ce_ray.best_model"] == model_uri
    assert run.data.metrics["best_val_l2"] == 0.05

    # Resuming reopens the parent run.
    client.set_terminated(parent.run_id, status="KILLED")
    assert T._parent_run(sweep, cfg, {"mlflow": parent.to_dict()}) == parent
    assert client.get_run(parent.run_id).info.status == "RUNNING"


def test_sweep_callback_survives_an_unreachable_store(tmp_path, capsys):
    """MLflow writes are best effort: a store that went away warns (at most once a minute) and the
    ledgers are still written."""
    from ce_ray import tracking
    from ce_ray.tune import runner as T

    class Down:  # every call into the store fails
        def __getattr__(self, name):
            raise OSError("store down")

    sweep = S.load_sweep(ROOT / "tune_configs" / "sweep_smoke.yaml", [f"scale.storage_path={tmp_path}"])
    cb = T.SweepCallback.for_sweep(sweep, tracking.RunHandle("http://127.0.0.1:9", "0", "p"))
    cb._store = Down()
    for tid in ("c", "d"):
        t = _Trial(tid, {"loss.lambda_rec": 0.99, "optim.lr_g": 1e-3, "optim.lr_d": 1e-4})
        cb.on_trial_start(0, [], t)
        cb.on_trial_complete(0, [], t)
        assert json.loads((sweep.directory / "trials" / f"{tid}.json").read_text())["status"] == "stopped_early"
    err = capsys.readouterr().err
    assert err.count("warning: MLflow") == 1 and "store down" in err  # one warning, not one per failed write


def test_a_resumed_asha_judges_newcomers_against_the_trials_before_the_interruption(tmp_path):
    """Tune does not checkpoint its scheduler; LedgerASHA rebuilds the rungs from the ledgers when
    Tune re-adds the restored trials, so a trial after a --resume is compared with all the trials
    that reached the rung, not only with those after it."""
    import pickle

    from ray.tune.schedulers import TrialScheduler

    from ce_ray.tune import runner as T

    sweep = S.load_sweep(ROOT / "tune_configs" / "sweep_smoke.yaml", [f"scale.storage_path={tmp_path / 'ray'}"])
    assert (sweep.scheduler.grace_period, sweep.scheduler.reduction_factor) == (3, 3)
    ledgers = {
        "a": [(3, 0.010), (6, 0.008)],
        "b": [(3, 0.020)],
        "c": [(3, 0.030)],
        "d": [],
    }  # d: interrupted before step 3
    for tid, results in ledgers.items():
        S.write_ledger(
            sweep.directory,
            S.TrialLedger(
                trial_id=tid,
                run_name=tid,
                params={},
                steps=6,
                checkpoints=[S.Evaluation(step=s, value=v, checkpoint="x") for s, v in results],
            ),
        )

    def restored_scheduler():
        sched = pickle.loads(pickle.dumps(T.make_scheduler(sweep)))  # what tuner.pkl gives back on resume
        assert sched.set_search_properties(sweep.metric, sweep.mode)
        for tid in ledgers:
            sched.on_trial_add(None, _Trial(tid, {}))
        return sched

    sched = restored_scheduler()
    # The restored rung holds a, b, c; its cutoff (best third, lower is better) lies between a and b.
    rung = dict(T.asha_rungs(sched, "a"))[3]
    assert rung == {"a": -0.010, "b": -0.020, "c": -0.030}
    assert sched.on_trial_result(None, _Trial("d", {}), {"step": 3, "val_l2": 0.025}) == TrialScheduler.STOP
    sched.on_trial_add(None, _Trial("e", {}))  # a new trial after the resume: no ledger yet
    assert sched.on_trial_result(None, _Trial("e", {}), {"step": 3, "val_l2": 0.005}) == TrialScheduler.CONTINUE
    # A restored trial that passed the rung before the interruption is not judged again there.
    assert sched.on_trial_result(None, _Trial("c", {}), {"step": 4, "val_l2": 0.5}) == TrialScheduler.CONTINUE
    # Without the ledgers (plain ASHA after a resume) d would have been the rung's first result: never stopped.
    plain = T.ASHAScheduler(time_attr=T.TIME_ATTR, max_t=6, grace_period=3, reduction_factor=3)
    plain.set_search_properties(sweep.metric, sweep.mode)
    plain.on_trial_add(None, _Trial("d", {}))
    assert plain.on_trial_result(None, _Trial("d", {}), {"step": 3, "val_l2": 0.025}) == TrialScheduler.CONTINUE


def test_the_private_asha_fields_ledger_asha_reads_still_exist():
    """LedgerASHA reads two private fields of Ray's ASHAScheduler (ce_ray/tune/runner.py says
    which). If a Ray upgrade moves them this fails here, naming the field, not silently in a sweep."""
    from ce_ray.tune import runner as T

    sched = T.ASHAScheduler(time_attr=T.TIME_ATTR, max_t=6, grace_period=3, reduction_factor=3)
    assert sched.set_search_properties("val_l2", "min")
    sched.on_trial_add(None, _Trial("a", {}))
    rungs = T.asha_rungs(sched, "a")
    assert [m for m, _ in rungs] == [3] and all(isinstance(r, dict) for _, r in rungs)
    assert T.asha_metric_sign(sched) == -1.0
    del sched._trial_info
    with pytest.raises(RuntimeError, match="_trial_info"):
        T.asha_rungs(sched, "a")
