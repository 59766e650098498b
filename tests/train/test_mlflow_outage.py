"""The MLflow tracking server goes away mid-run, for real: a `mlflow server` subprocess (SQLite
store and artifact folder in tmp_path) is killed (SIGKILL to its process group) during a --local
training run and started again on the same port and store. Training goes on; what rank 0 could
not log is kept and lands when the server is back, or, if it is not back by the end, the run ends
with one message naming what is missing and the command (`ce-ray train --sync-mlflow`) that logs
it and registers the model, which then works.

The Ray driver's rank 0 uses the same tracker (mlflow_run.worker_tracker -> MlflowTracker, closed
after loop.run in train_fn_per_worker) and the same bounded registration, so the --local runner
stands for both here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import ce_ray.config as C
from ce_ray.errors import UserError
from ce_ray.train import mlflow_run
from ce_ray.train.local import train_local

MLFLOW = Path(sys.executable).parent / "mlflow"
START_TIMEOUT_S = 90  # a fresh SQLite store takes ~20 s to create on a loaded 2-core machine


class Server:
    """One `mlflow server` on a fixed port and store, killed and started again by the tests."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.root / f"server{self.starts}.log", "wb")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: fewer processes
        self.proc = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'store.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes uvicorn with it
            env=env,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / f'server{self.starts}.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer within {START_TIMEOUT_S} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow_server"))
    s.start()
    yield s
    s.kill()


def _cfg(shards: str, out: Path, uri: str, experiment: str) -> C.Config:
    return C.load(
        "tune_configs/smoke.yaml",
        [
            f"data.shards={shards}",
            f"train.output_dir={out}",
            f"scale.storage_path={out}",
            "train.steps=10",
            "train.log_every=1",
            "train.eval_every=3",
            "train.ckpt_every=5",
            f"mlflow.tracking_uri={uri}",
            f"mlflow.experiment={experiment}",
            f"mlflow.registered_model={experiment}-generator",
        ],
    )


def _steps(client: MlflowClient, run_id: str, key: str = "loss_rec") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _pictures(client: MlflowClient, run_id: str) -> list[str]:
    return sorted(Path(f.path).name for f in client.list_artifacts(run_id, "samples"))


def _run_id(client: MlflowClient, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])[0].info.run_id


EVAL_PICTURES = [f"samples_step{s:07d}.png" for s in (3, 5, 6, 9, 10)]  # eval_every 3 and every checkpoint


def test_server_killed_mid_run_and_back_before_the_end(server, bundled_shards, tmp_path, monkeypatch, capsys):
    """Killed after step 2, started again after step 6: steps 3-6 (and their pictures) are kept and
    land with step 7's write, during training; the model is registered at the end."""
    if not server.up():
        server.start()
    monkeypatch.setattr(mlflow_run, "RETRY_AFTER_S", 0.0)  # try at every step, so "when it is back" is step 7
    cfg = _cfg(bundled_shards, tmp_path, server.uri, "outage-back")
    client = MlflowClient(server.uri)
    seen_at_step_8: list[int] = []

    def log(line: str) -> None:
        if line.startswith("step 2/"):
            server.kill()
        elif line.startswith("step 6/"):
            assert not server.up()
            server.start()
        elif line.startswith("step 8/"):
            seen_at_step_8.extend(_steps(client, _run_id(client, "outage-back")))

    res = train_local(cfg, run_name="back", log=log)
    err = capsys.readouterr().err
    assert seen_at_step_8 == list(range(1, 9))  # 3-6 landed once the server answered, before the run ended
    assert _steps(client, res.mlflow_run_id) == list(range(1, 11))
    assert _pictures(client, res.mlflow_run_id) == EVAL_PICTURES
    assert client.get_run(res.mlflow_run_id).info.status == "FINISHED"
    assert res.model_uri == "models:/outage-back-generator/1"
    assert err.count("does not answer") == 1 and err.count("answers again") == 1
    assert "sent the" in err and "did not take" not in err


def test_server_not_back_by_the_end_names_the_one_command_that_logs_and_registers(
    server, bundled_shards, tmp_path, capsys
):
    """Killed after step 2 and still away when training ends: the run still finishes its
    checkpoints, then says which steps and pictures are missing and the command that logs them and
    registers the model; with the server back that command does both, and a second time nothing."""
    from ce_ray.cli import main

    if not server.up():
        server.start()
    cfg = _cfg(bundled_shards, tmp_path, server.uri, "outage-gone")

    def log(line: str) -> None:
        if line.startswith("step 2/"):
            server.kill()

    with pytest.raises(UserError) as e:
        train_local(cfg, run_name="gone", log=log)
    run_dir = tmp_path / "gone"
    command = f"ce-ray train --sync-mlflow {run_dir} mlflow.tracking_uri={server.uri}"
    assert "training finished" in str(e.value) and command in str(e.value)
    assert (run_dir / "checkpoint_step0000010").is_dir()  # the training itself is complete
    err = capsys.readouterr().err
    assert "did not take the metrics of 8 step(s) (3, 4, 5, 6, 7, 8, 9, 10)" in err
    assert "5 picture(s) (samples_step0000003.png" in err and command in err

    server.start()
    argv = command.split()[1:]
    assert main(argv) == 0
    client = MlflowClient(server.uri)
    run_id = _run_id(client, "outage-gone")
    assert _steps(client, run_id) == list(range(1, 11))
    jsonl = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in sorted(client.get_metric_history(run_id, "loss_rec"), key=lambda m: m.step)] == [
        r["loss_rec"] for r in jsonl
    ]
    assert _pictures(client, run_id) == EVAL_PICTURES
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [v.version for v in client.search_model_versions("name='outage-gone-generator'")] == ["1"]
    assert "model models:/outage-gone-generator/1 registered now from checkpoint_step0000010" in capsys.readouterr().out
    assert main(argv) == 0  # again: nothing twice
    out = capsys.readouterr().out
    assert (
        "logged 0 missing metric points and 0 picture(s); model models:/outage-gone-generator/1 was registered" in out
    )
    assert len(client.get_metric_history(run_id, "loss_rec")) == 10
