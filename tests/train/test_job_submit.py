"""`ray job submit` against a real head started with `ray start --head`, as the README shows.

This starts a SECOND Ray cluster on the machine, next to the session one: its own temp dir and
explicit free ports for everything that has a fixed default (GCS, dashboard, client server,
dashboard agent, metrics, runtime-env agent), so it cannot collide with the session cluster or
with other users' clusters. It is stopped by SIGTERM to the `ray start --block` process this test
started, nothing else (never `ray stop`, which stops every Ray process on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from ce_ray.cluster import free_ports  # below the kernel's ephemeral range: this test was flaky without
from ce_ray.train import checkpoint as ckpt_io

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def processes_using(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (this head's unique temp dir). Reads /proc: psutil
    is not a dependency."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(entry))
        except OSError:  # gone, or not ours to read
            pass
    return out


@pytest.fixture
def head(tmp_path):
    """A real head: `ray start --head --block` from the venv, dashboard on 127.0.0.1."""
    temp_dir = tempfile.mkdtemp(prefix="cejob", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = free_ports(7)
    # The job must use the default store under train.output_dir, whatever this process points at.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is looked up on the head's PATH
        RAY_AUTH_MODE="disabled",  # a throwaway loopback cluster (docs/ray-notes.md, "Job submission and clusters")
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop in seconds, not 30 s
        # Its processes inherit this: Train's placement-group cleaner looks its cluster up without
        # an address, ambiguous with several clusters on one machine (cluster.own_cluster_address does the same).
        RAY_ADDRESS=f"127.0.0.1:{gcs}",
    )
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rt_env}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the dashboard did not come up in 180 s"
            time.sleep(1)
        yield {"url": url, "temp_dir": temp_dir, "proc": proc, "log": tmp_path / "head.log"}
    finally:
        proc.send_signal(signal.SIGTERM)  # only the head this test started
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        # Its raylet, GCS and workers carry the unique temp dir on their command lines.
        deadline = time.monotonic() + 60
        while processes_using(temp_dir) and time.monotonic() < deadline:
            time.sleep(1)
        left = processes_using(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's head still running: {left}"


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_trains_the_smoke_config(head, bundled_shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out, storage = tmp_path / "out", tmp_path / "runs"
    sid = f"ce-ray-smoke-{os.getpid()}"
    client_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    client_env["RAY_AUTH_MODE"] = "disabled"  # this head runs without token auth
    # Absolute paths: the job runs in its own unpacked copy of the working directory.
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        head["url"],
        "--working-dir",
        ".",
        "--submission-id",
        sid,
        "--no-wait",
        "--",
        "python",
        "-m",
        "ce_ray.cli",
        "train",
        "--config",
        "tune_configs/smoke.yaml",
        "--run-name",
        "job-smoke",
        f"data.shards={bundled_shards}",
        f"train.output_dir={out}",
        f"scale.storage_path={storage}",
    ]
    sub = subprocess.run(cmd, cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stdout + sub.stderr

    client = JobSubmissionClient(head["url"])
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(sid)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after 600 s:\n{client.get_job_logs(sid)[-4000:]}"
        time.sleep(2)
    logs = client.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]

    # The compact progress line and the closing summary reached the job's log, unprefixed.
    assert "step 6/6 | loss_d" in logs
    assert f"checkpoint  {storage / 'job-smoke' / 'checkpoint_step0000006'}" in logs
    # The checkpoint, in the storage path given on the command line.
    ckpt = ckpt_io.load(storage / "job-smoke" / "checkpoint_step0000006")
    assert ckpt.step == 6 and ckpt.config.data.shards == bundled_shards
    # The MLflow run, in the default SQLite store under train.output_dir.
    mlf = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = mlf.get_experiment_by_name("ce-ray-smoke")
    runs = mlf.search_runs([exp.experiment_id], filter_string="tags.`ce_ray.run_name` = 'job-smoke'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in mlf.get_metric_history(runs[0].info.run_id, "val_l2")] == [3, 6]
    assert {f.path for f in mlf.list_artifacts(runs[0].info.run_id, "samples")} == {
        "samples/samples_step0000003.png",
        "samples/samples_step0000006.png",
    }
    # The generator of this run, registered as a model version.
    versions = mlf.search_model_versions("name='ce-ray-generator'")
    assert [str(v.version) for v in versions if v.run_id == runs[0].info.run_id] == ["1"]
