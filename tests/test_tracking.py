"""tracking.py without Ray: where the store is, the driver's run, rank 0's tracker, and the
registered generator loading back through resolve.checkpoint_dir("models:/...")."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ce_ray import config as C
from ce_ray import tracking
from ce_ray.core.model import build_discriminator, build_generator
from ce_ray.errors import UserError
from ce_ray.infer import resolve
from ce_ray.train import checkpoint as ckpt_io
from ce_ray.train import mlflow_run
from ce_ray.train.loop import NullTracker

SMOKE = Path(__file__).resolve().parents[1] / "tune_configs" / "smoke.yaml"


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return C.load(
        SMOKE,
        [
            f"train.output_dir={tmp_path / 'out'}",
            "mlflow.experiment=tracking-test",
            "mlflow.registered_model=tracking-test-generator",
        ],
    )


@pytest.fixture
def tiny_checkpoint(cfg, tmp_path) -> Path:
    torch.manual_seed(0)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model, cfg.data.fine_size)
    return ckpt_io.save(
        tmp_path / "ckpt", G=G, D=D, step=6, config=cfg, optim={"opt_g": {}, "opt_d": {}}, metrics={"val_l2": 0.1}
    )


def test_tracking_uri_default_is_sqlite_under_output_dir(cfg, tmp_path):
    uri = tracking.tracking_uri(cfg)
    assert uri == f"sqlite:///{(tmp_path / 'out').resolve() / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")  # absolute: Ray workers run in another directory
    assert tracking.artifact_location(cfg, uri) == ((tmp_path / "out").resolve() / "mlartifacts").as_uri()


def test_tracking_uri_precedence_config_then_env(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:5999"
    assert tracking.artifact_location(cfg, "http://127.0.0.1:5999") is None  # the server decides
    explicit = C.replace(cfg, mlflow={"tracking_uri": "sqlite:///rel/m.db"})
    assert tracking.tracking_uri(explicit) == f"sqlite:///{Path('rel/m.db').resolve()}"


def test_file_store_uri_is_a_user_error(cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for bad in ("./mlruns", "file:///tmp/mlruns"):
        with pytest.raises(UserError, match="sqlite:///"):
            tracking.tracking_uri(C.replace(cfg, mlflow={"tracking_uri": bad}))


def test_disabled_mlflow_gives_no_run_and_noop_trackers(cfg):
    off = C.replace(cfg, mlflow={"enabled": False})
    assert tracking.start_run(off, run_name="x", run_path="/nowhere/x", resume=False) is None
    assert isinstance(mlflow_run.worker_tracker(None, 0), NullTracker)
    handle = tracking.RunHandle("sqlite:////tmp/never.db", "1", "abc")
    assert isinstance(mlflow_run.worker_tracker(handle, 1), NullTracker)  # only rank 0 talks to MLflow
    assert isinstance(mlflow_run.worker_tracker(handle, 0), mlflow_run.MlflowTracker)


def test_run_params_metrics_artifacts_and_resume(cfg, tmp_path):
    h = tracking.start_run(cfg, run_name="r1", run_path="/storage/r1", resume=False)
    client = MlflowClient(h.tracking_uri)
    exp = client.get_experiment(h.experiment_id)
    assert exp.artifact_location == ((tmp_path / "out").resolve() / "mlartifacts").as_uri()
    run = client.get_run(h.run_id)
    assert run.data.params == {k: str(v) for k, v in C.flatten(cfg).items()}
    assert run.data.tags[tracking.TAG_RUN_PATH] == "/storage/r1"

    # What rank 0 does through loop.run's tracker interface.
    tracker = mlflow_run.MlflowTracker(tracking.RunHandle.from_dict(h.to_dict()))
    tracker.log_metrics({"loss_g": 0.5, "img_per_s": 10.0}, step=2)
    tracker.log_metrics({"loss_g": 0.25, "img_per_s": 12.0}, step=4)
    png = tmp_path / "samples_step0000004.png"
    png.write_bytes(b"\x89PNG fake")
    tracker.log_artifact(png, "samples")
    hist = client.get_metric_history(h.run_id, "loss_g")
    assert [(m.step, m.value) for m in hist] == [(2, 0.5), (4, 0.25)]
    assert [f.path for f in client.list_artifacts(h.run_id, "samples")] == ["samples/samples_step0000004.png"]
    assert Path(tracking.artifact_dir(h), "samples", png.name).is_file()  # a local folder the user can open

    # Resuming the same Ray run reopens the same MLflow run; a changed param becomes a tag.
    more = C.replace(cfg, train={"steps": 60})
    h2 = tracking.start_run(more, run_name="r1", run_path="/storage/r1", resume=True)
    assert h2.run_id == h.run_id
    tags = client.get_run(h.run_id).data.tags
    assert tags["resumed.train.steps"] == "60"
    assert client.get_run(h.run_id).data.params["train.steps"] == str(cfg.train.steps)
    # A fresh run with the same name is a different MLflow run.
    h3 = tracking.start_run(cfg, run_name="r1", run_path="/storage/other", resume=True)
    assert h3.run_id != h.run_id
    tracking.end_run(h, "FINISHED")
    assert client.get_run(h.run_id).info.status == "FINISHED"


def test_tracker_survives_an_unreachable_store(capsys, tmp_path):
    # A tracking-store hiccup must not kill training: keep what could not be sent, send it with
    # the next call that gets through, and at close() name what never did and how to log it.
    from mlflow.exceptions import MlflowException

    t = mlflow_run.MlflowTracker(tracking.RunHandle("http://127.0.0.1:9", "0", "nope", "/runs/r1"), retry_after_s=0.0)
    sent: list = []
    state = {"down": True}

    def log_batch(run_id, metrics):
        if state["down"]:
            raise OSError("down")
        if any(m.key == "bad" for m in metrics):
            raise MlflowException("refused", error_code="INVALID_PARAMETER_VALUE")  # a 400: never sent again
        sent.extend((m.key, m.step) for m in metrics)

    def log_artifact(run_id, path, artifact_path=None):
        if state["down"]:
            raise OSError("down")
        sent.append((artifact_path, Path(path).name, Path(path).read_bytes()))

    t.client = type("Flaky", (), {"log_batch": staticmethod(log_batch), "log_artifact": staticmethod(log_artifact)})()
    t.log_metrics({"a": 1.0}, 1)
    png = tmp_path / "samples_step0000001.png"
    png.write_bytes(b"grid")
    t.log_artifact(png, "samples")
    png.unlink()  # the loop deletes its picture once log_artifact returns: the tracker kept a copy
    t.log_artifact(Path("/nonexistent.png"), "samples")  # cannot even be copied: named, not kept
    assert sent == [] and "does not answer (OSError: down)" in capsys.readouterr().err
    state["down"] = False
    t.log_metrics({"a": 2.0}, 2)
    assert sent == [("a", 1), ("a", 2), ("samples", "samples_step0000001.png", b"grid")]
    assert "answers again" in capsys.readouterr().err
    t.log_metrics({"bad": 1.0}, 3)
    state["down"] = True
    t.log_metrics({"a": 4.0}, 4)
    t.close()
    err = capsys.readouterr().err
    assert "did not take the metrics of 2 step(s) (3, 4) and 1 picture(s) (nonexistent.png)" in err
    assert "ce-ray train --sync-mlflow /runs/r1 mlflow.tracking_uri=http://127.0.0.1:9" in err


def test_bounded_http_lowers_mlflow_retries_for_a_block_only(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")  # lower than the bound: the user's stays
    with tracking.bounded_http(tracking.BEST_EFFORT_HTTP):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
        with tracking.bounded_http(tracking.FINAL_HTTP):  # nested (re-entrant lock): never raised
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"


def test_registered_generator_resolves_and_loads(cfg, tiny_checkpoint):
    h = tracking.start_run(cfg, run_name="reg", run_path="/storage/reg", resume=False)
    tracking.log_checkpoint(h, tiny_checkpoint)
    uri = mlflow_run.register_generator(h, tiny_checkpoint, cfg)
    assert uri == f"models:/{cfg.mlflow.registered_model}/1"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # registering leaves no store behind for later runs
    with tracking.using(h.tracking_uri):
        _check_registered(uri, h, cfg, tiny_checkpoint)
    tracking.end_run(h)


def _check_registered(uri: str, h, cfg, tiny_checkpoint: Path) -> None:

    # ce-ray's own path (Serve, evaluate): the checkpoint directory inside the model version.
    found = resolve.checkpoint_dir(uri, h.tracking_uri)
    assert (found / ckpt_io.META_FILE).is_file() and (found / ckpt_io.MODEL_FILE).is_file()
    assert not (found / ckpt_io.OPTIM_FILE).exists()  # the exported model carries no optimiser state
    g = resolve.load_generator(uri, tracking_uri=h.tracking_uri)
    assert g.step == 6 and g.config.model == cfg.model
    want = ckpt_io.load(tiny_checkpoint).G
    for k, v in g.model.state_dict().items():
        assert torch.equal(v, want[k]), k

    # No pickled code anywhere in the model: the pyfunc is logged from ce_ray/infer/pyfunc.py.
    model_dir = Path(mlflow.artifacts.download_artifacts(uri))
    assert not list(model_dir.rglob("*.pkl")) and not list(model_dir.rglob("*.pickle"))
    assert (model_dir / "MLmodel").is_file()
    reqs = (model_dir / "requirements.txt").read_text()
    assert "torch==" in reqs and "ce-ray==" in reqs

    # Generic MLflow tooling loads it too, and it inpaints only the hole.
    model = mlflow.pyfunc.load_model(uri)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    out = model.predict(x)
    assert out.shape == x.shape
    assert np.array_equal(out[:, :, :32, :], x[:, :, :32, :])  # context outside the centre is untouched
    assert not np.array_equal(out[:, :, 40:88, 40:88], x[:, :, 40:88, 40:88])

    # The final checkpoint is in the run too (with optimiser state, for resuming elsewhere).
    names = {f.path for f in MlflowClient(h.tracking_uri).list_artifacts(h.run_id, "checkpoint")}
    assert {"checkpoint/meta.json", "checkpoint/model.pt", "checkpoint/optim.pt"} <= names


def test_deleted_experiment_is_a_user_error(cfg):
    h = tracking.start_run(cfg, run_name="d", run_path="/storage/d", resume=False)
    MlflowClient(h.tracking_uri).delete_experiment(h.experiment_id)
    with pytest.raises(UserError, match="deleted"):
        tracking.start_run(cfg, run_name="d2", run_path="/storage/d2", resume=False)


def test_using_a_store_leaves_the_users_tracking_uri_as_it_was(tmp_path, monkeypatch):
    """MLflow's own temporary switch unsets MLFLOW_TRACKING_URI on exit; tracking.using restores it."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'users.db'}")
    with tracking.using(f"sqlite:///{tmp_path / 'other.db'}"):
        assert mlflow.get_tracking_uri().endswith("other.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'users.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with tracking.using(f"sqlite:///{tmp_path / 'other.db'}"):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ  # nothing exported for good either
