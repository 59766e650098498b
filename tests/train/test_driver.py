"""train.py: Ray Train end to end on the session cluster (2 CPU workers, tiny config), MLflow
contents of that run, resume, a worker process killed mid-run, multi-node placement; plus the
cheap checks (CLI glue, run-name rules, pre-flight errors, every YAML in tune_configs/ loads).

The Ray tests share one smoke run (module fixture `smoke`); the resume test continues it, so it
runs after the tests that inspect it (pytest keeps file order).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from probes import ProbeHook, probes

from ce_ray import config as C
from ce_ray.errors import UserError
from ce_ray.infer import resolve
from ce_ray.train import checkpoint as ckpt_io
from ce_ray.train import driver as T
from ce_ray.train import runs
from ce_ray.tune.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "tune_configs" / "smoke.yaml"


def smoke_config(shards: str, out: Path, storage: Path, *extra: str) -> C.Config:
    return C.load(
        SMOKE,
        [
            f"data.shards={shards}",
            f"train.output_dir={out}",
            f"scale.storage_path={storage}",
            f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            *extra,
        ],
    )


# --- No Ray ---------------------------------------------------------------------------------------


YAMLS = sorted((ROOT / "tune_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in YAMLS if not p.name.startswith("sweep_")], ids=lambda p: p.name)
def test_every_tune_config_loads(path):
    cfg = C.load(path)
    assert cfg.train.steps >= 1
    assert path.read_text().startswith("# ce-ray "), "each YAML opens with the command that launches it"


@pytest.mark.parametrize("path", [p for p in YAMLS if p.name.startswith("sweep_")], ids=lambda p: p.name)
def test_every_sweep_file_loads(path):
    # Sweep files are not training configs: they name a base config plus a search space.
    load_sweep(path)
    assert path.read_text().startswith("# ce-ray tune "), "each YAML opens with the command that launches it"


def test_resolve_paths_makes_worker_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = runs.resolve_paths(C.load(SMOKE, ["data.shards=rel/shards", "scale.storage_path=s3://bucket/runs"]))
    assert cfg.data.shards == str(tmp_path / "rel" / "shards")
    assert cfg.train.output_dir == str(tmp_path / "outputs")
    assert cfg.scale.storage_path == "s3://bucket/runs"  # URIs stay URIs


def test_fresh_runs_get_unique_names(tmp_path):
    cfg = runs.resolve_paths(C.load(SMOKE, [f"scale.storage_path={tmp_path}"]))
    (tmp_path / "taken").mkdir()
    names = {ckpt_io.fresh_run_name(cfg.scale.storage_path) for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("run-") for n in names)


def test_preflight_user_errors_before_ray_starts(bundled_shards, tmp_path):
    base = smoke_config(bundled_shards, tmp_path / "out", tmp_path / "runs")
    with pytest.raises(UserError, match="--resume needs"):
        T.train(base, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        T.train(base, run_name="never-ran", resume=True)
    # 9 photos x 2 crops / 2 workers = 9 crops per worker: a batch of 16 never fills.
    with pytest.raises(UserError, match="data.batch_size=16"):
        T.train(C.replace(base, data={"batch_size": 16}))
    with pytest.raises(UserError, match="no train shards"):
        T.train(C.replace(base, data={"shards": str(tmp_path / "missing")}))
    with pytest.raises(UserError, match="maintenance mode"):
        T.train(C.replace(base, mlflow={"tracking_uri": str(tmp_path / "mlruns")}))
    with pytest.raises(UserError, match=r"model\.sync_bn.*needs GPU workers"):  # caught when the config loads
        T.train(C.replace(base, model={"sync_bn": True}))


def test_user_error_inside_a_worker_comes_back_as_one(monkeypatch):
    import ray.train

    err = ray.train.WorkerGroupError(
        "rank 1 failed", {1: UserError("an epoch of the train shards yielded no full batch")}
    )
    assert str(T._user_error_in(err)) == "an epoch of the train shards yielded no full batch"
    assert T._user_error_in(ray.train.WorkerGroupError("x", {0: RuntimeError("bug")})) is None


def test_cli_local_runs_the_same_loop_without_ray(bundled_shards, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            str(SMOKE),
            f"data.shards={bundled_shards}",
            f"train.output_dir={tmp_path}",
            f"scale.storage_path={tmp_path}",  # the run root of both drivers
            "train.steps=2",
            "--run-name",
            "loc",
            "--local",
        ]
    )
    assert T.run_from_args(args) == 0
    assert (tmp_path / "loc" / "checkpoint_step0000002" / "meta.json").is_file()
    assert "checkpoint" in capsys.readouterr().out
    # The same name again without --resume is refused (local runs follow the same rule).
    with pytest.raises(UserError, match="--resume"):
        T.run_from_args(args)


# --- Ray: the shared smoke run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke(ray_session, bundled_shards, tmp_path_factory):
    """`ce-ray train --config tune_configs/smoke.yaml` on the session cluster: 2 CPU workers."""
    root = tmp_path_factory.mktemp("smoke")
    cfg = smoke_config(bundled_shards, root / "out", Path(ray_session) / "smoke")
    lines: list[str] = []
    t0 = time.perf_counter()
    summary = T.train(cfg, hook=ProbeHook(_mkdir(root / "probes")), log=lines.append)
    return {
        "cfg": runs.resolve_paths(cfg),
        "summary": summary,
        "root": root,
        "lines": lines,
        "seconds": time.perf_counter() - t0,
    }


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_training_end_to_end(smoke):
    cfg, s = smoke["cfg"], smoke["summary"]
    assert s.step == cfg.train.steps == 6
    assert s.run_name.startswith("run-")  # no name given: a fresh one
    assert Path(s.checkpoint).name == "checkpoint_step0000006"
    # Ray kept the latest and the best by val_l2 (both checkpoints of this short run).
    kept = sorted(p.name for p in Path(s.run_path).glob("checkpoint_step*"))
    assert kept == ["checkpoint_step0000003", "checkpoint_step0000006"]
    ck = ckpt_io.load(s.checkpoint)
    assert ck.step == 6 and ck.config == cfg  # the resolved config, absolute paths included
    assert ck.optim is not None and ck.rng is not None
    assert set(ck.optim) >= {"opt_g", "opt_d"}

    # Every report reached metrics.jsonl (result.metrics only has the latest checkpoint's).
    steps = [h["step"] for h in s.history]
    assert steps == [2, 3, 4, 6]  # log every 2; eval + checkpoint every 3; the last step always
    for h in s.history:
        for key in ("loss_d", "loss_g", "loss_rec", "d_real", "d_fake", "img_per_s", "lr_g", "lr_d", "eta_s"):
            assert key in h, key
        assert h["lr_g"] == cfg.optim.lr_g and h["lr_d"] == cfg.optim.lr_d
    evals = [h for h in s.history if "val_psnr" in h]
    assert [h["step"] for h in evals] == [3, 6]
    assert all(h.get("checkpoint") == f"checkpoint_step{h['step']:07d}" for h in evals)
    assert 0 < evals[-1]["val_l2"] < 1 and evals[-1]["val_psnr"] > 0

    # Two DDP ranks in two processes, equal generator weights at the end.
    ends = probes(smoke["root"] / "probes", "end")
    assert sorted(e["rank"] for e in ends) == [0, 1]
    assert len({e["pid"] for e in ends}) == 2
    assert ends[0]["g_params"] == ends[1]["g_params"]
    # The compact progress line came out of rank 0, and the summary says where things are.
    assert any(line.startswith("mlflow ui   mlflow ui --backend-store-uri sqlite:///") for line in smoke["lines"])


@pytest.mark.ray
def test_device_crops_under_ray_train(ray_session, bundled_shards, tmp_path):
    """data.device_crops under Ray Train, 2 DDP workers: each loads its equal share of the decoded
    photos onto its device once and cuts every batch there; the run completes and the ranks end
    with equal weights."""
    cfg = smoke_config(
        bundled_shards,
        tmp_path / "out",
        tmp_path / "runs",
        "data.device_crops=true",
        "data.repeat=4",
        "train.steps=3",
        "mlflow.enabled=false",
    )
    summary = T.train(cfg, hook=ProbeHook(_mkdir(tmp_path / "probes")), log=lambda line: None)
    assert summary.step == 3
    ends = probes(tmp_path / "probes", "end")
    assert sorted(e["rank"] for e in ends) == [0, 1] and ends[0]["g_params"] == ends[1]["g_params"]


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_contents_of_the_run(smoke):
    cfg, s = smoke["cfg"], smoke["summary"]
    client = MlflowClient(s.mlflow_tracking_uri)
    run = client.get_run(s.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == s.run_name
    assert client.get_experiment(run.info.experiment_id).name == cfg.mlflow.experiment
    # The flattened config as params.
    assert run.data.params == {k: str(v) for k, v in C.flatten(cfg).items()}
    # Metrics per step, from rank 0.
    assert [m.step for m in client.get_metric_history(s.mlflow_run_id, "loss_g")] == [2, 3, 4, 6]
    assert [m.step for m in client.get_metric_history(s.mlflow_run_id, "val_psnr")] == [3, 6]
    for key in ("loss_d", "d_real", "d_fake", "img_per_s", "lr_g", "lr_d"):
        assert client.get_metric_history(s.mlflow_run_id, key), key
    # A sample grid (masked input | output | truth) per evaluation, as PNG, in a local folder.
    pngs = sorted(f.path for f in client.list_artifacts(s.mlflow_run_id, "samples"))
    assert pngs == ["samples/samples_step0000003.png", "samples/samples_step0000006.png"]
    first = Path(s.mlflow_artifacts, pngs[0])
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(first).startswith(str(Path(cfg.train.output_dir) / "mlartifacts"))  # not a worker temp dir
    # The final checkpoint, and the generator as a registered version loadable by models:/ URI.
    names = {f.path for f in client.list_artifacts(s.mlflow_run_id, "checkpoint")}
    assert {"checkpoint/meta.json", "checkpoint/model.pt", "checkpoint/optim.pt"} <= names
    assert s.model_uri.startswith(f"models:/{cfg.mlflow.registered_model}/")
    g = resolve.load_generator(s.model_uri, tracking_uri=s.mlflow_tracking_uri)
    assert g.step == 6
    want = ckpt_io.load(s.checkpoint).G
    assert all(torch.equal(v, want[k]) for k, v in g.model.state_dict().items())


@pytest.mark.ray
def test_existing_run_name_never_resumes_by_accident(smoke):
    s, cfg = smoke["summary"], smoke["cfg"]
    with pytest.raises(UserError, match="already exists.*--resume"):
        T.train(cfg, run_name=s.run_name)
    # Resuming with another network, or past the end, is refused before any worker starts.
    with pytest.raises(UserError, match="different network.*model.ngf"):
        T.train(C.replace(cfg, model={"ngf": 16}), run_name=s.run_name, resume=True)
    with pytest.raises(UserError, match="already at step 6"):
        T.train(cfg, run_name=s.run_name, resume=True)


@pytest.mark.ray
@pytest.mark.slow
def test_resume_continues_from_latest_checkpoint(smoke):
    s, cfg = smoke["summary"], smoke["cfg"]
    before = len(s.history)
    more = C.replace(cfg, train={"steps": 8})
    r = T.train(more, run_name=s.run_name, resume=True, hook=ProbeHook(smoke["root"] / "probes"), log=lambda line: None)
    assert r.run_path == s.run_path and r.step == 8
    # The new reports continue after step 6; none repeats an earlier step.
    assert [h["step"] for h in r.history[before:]] == [8]
    starts = [p for p in probes(smoke["root"] / "probes", "start") if p["restored_step"] is not None]
    assert sorted(p["restored_step"] for p in starts) == [6, 6]  # both ranks restored step 6
    # Optimiser state came back: Adam's per-parameter step count went 6 -> 8, not 0 -> 2.
    opt = ckpt_io.load(r.checkpoint).optim["opt_g"]
    assert {int(v["step"]) for v in opt["state"].values()} == {8}
    # The same MLflow run goes on, with the changed setting recorded.
    assert r.mlflow_run_id == s.mlflow_run_id
    run = MlflowClient(r.mlflow_tracking_uri).get_run(r.mlflow_run_id)
    assert run.data.tags["resumed.train.steps"] == "8" and run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(r.mlflow_tracking_uri).get_metric_history(r.mlflow_run_id, "loss_g")] == [
        2,
        3,
        4,
        6,
        8,
    ]


# --- Ray: a worker process killed mid-run ----------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_killed_worker_process_run_finishes_from_last_checkpoint(ray_session, bundled_shards, tmp_path):
    """SIGKILL the rank-1 training process after the first checkpoint; FailureConfig(max_failures=1)
    restarts the worker group from the latest checkpoint and every remaining step runs."""
    probe_dir = _mkdir(tmp_path / "probes")
    # repeat=8: 36 crops per worker per epoch, so an epoch is 9 steps and the run lasts long
    # enough (40 steps) for the kill to land mid-run.
    cfg = smoke_config(
        bundled_shards,
        tmp_path / "out",
        Path(ray_session) / "kill",
        "data.repeat=8",
        "train.steps=40",
        "train.log_every=5",
        "train.eval_every=10",
        "train.ckpt_every=10",
        "scale.max_failures=1",
        "mlflow.enabled=false",
    )
    name = "kill-test"
    metrics_file = Path(runs.resolve_paths(cfg).scale.storage_path) / name / ckpt_io.METRICS_FILE
    killed: dict = {}

    def killer() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            ckpts = []
            if metrics_file.exists():
                ckpts = [json.loads(line) for line in metrics_file.read_text().splitlines() if '"checkpoint"' in line]
            rank1 = [p for p in probes(probe_dir, "start") if p["rank"] == 1]
            if ckpts and rank1:
                # Only the pid our own worker reported: nothing else on the machine is touched.
                os.kill(rank1[0]["pid"], signal.SIGKILL)
                killed.update(pid=rank1[0]["pid"], after_step=ckpts[-1]["step"])
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    s = T.train(cfg, run_name=name, hook=ProbeHook(probe_dir), log=lambda line: None)
    watcher.join(timeout=5)
    assert killed, "the run finished before a checkpoint could be observed"
    assert s.step == 40 and Path(s.checkpoint).name == "checkpoint_step0000040"

    starts = probes(probe_dir, "start")
    assert len(starts) == 4, starts  # two generations of two workers
    restarted = [p for p in starts if p["restored_step"] is not None]
    assert len(restarted) == 2 and killed["pid"] not in {p["pid"] for p in restarted}
    restored = restarted[0]["restored_step"]
    assert restarted[1]["restored_step"] == restored >= killed["after_step"] >= 10
    # After the restart, every log step from the checkpoint to the end was reported, in order.
    steps = [h["step"] for h in s.history]
    tail = steps[len(steps) - steps[::-1].index(restored + 5) - 1 :]
    assert tail == list(range(restored + 5, 41, 5))
    ends = probes(probe_dir, "end")
    assert sorted(e["rank"] for e in ends) == [0, 1] and {e["step"] for e in ends} == {40}
    assert ends[0]["g_params"] == ends[1]["g_params"]


# --- Multi-node: its own Ray instance, in a subprocess ---------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_multinode_two_workers_on_two_nodes(bundled_shards, tmp_path):
    """ray.cluster_utils.Cluster with two nodes on this machine. A process can hold only one Ray
    connection, and this one holds the session cluster, so the script runs in a subprocess with
    its own cluster (own temp dir and ports) and reports through probe files."""
    probe_dir = _mkdir(tmp_path / "probes")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_TRAIN_COLLECTIVE_TIMEOUT_S="120")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_run.py"), bundled_shards, str(tmp_path), str(probe_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ends = probes(probe_dir, "end")
    assert sorted(e["rank"] for e in ends) == [0, 1]
    assert ends[0]["ray_node_id"] != ends[1]["ray_node_id"], "STRICT_SPREAD put both workers on one node"
    assert ends[0]["step"] == ends[1]["step"] == 6
    # DDP kept the ranks in lockstep: identical generator parameters. (BatchNorm running
    # statistics are buffers, updated from each rank's own batch after DDP's last broadcast, and
    # SyncBatchNorm needs GPUs, so they are not compared.)
    assert ends[0]["g_params"] == ends[1]["g_params"]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 6 and len(result["nodes"]) == 2
