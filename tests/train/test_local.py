"""The no-Ray local runner: the shared loop on the bundled photos, checkpoints, grids, resume, in
Ray Train's run root and layout (and resuming a run folder of the older checkpoints/step_N
layout), the same pre-flight, and MLflow when enabled."""

import json

import pytest

import ce_ray.config as C
from ce_ray.errors import UserError
from ce_ray.train import checkpoint as ck
from ce_ray.train.local import train_local


def tiny(shards, out, **train):
    return C.load(
        "tune_configs/smoke.yaml",
        [
            f"data.shards={shards}",
            f"train.output_dir={out}",
            f"scale.storage_path={out}",
            "mlflow.enabled=false",
            *(f"train.{k}={v}" for k, v in train.items()),
        ],
    )


def test_local_trainer_runs_on_bundled_photos(bundled_shards, tmp_path):
    cfg = tiny(bundled_shards, tmp_path)
    logs = []
    res = train_local(cfg, run_name="t1", log=logs.append)
    assert res.checkpoint.name == "checkpoint_step0000006" and res.checkpoint.parent == res.run_dir
    loaded = ck.load(res.checkpoint)
    assert loaded.step == 6 and loaded.config == cfg and loaded.optim is not None
    assert {"val_l1", "val_l2", "val_psnr"} <= set(loaded.metrics)
    assert sorted(p.name for p in (res.run_dir / "samples").glob("*.png")) == [
        "samples_step0000003.png",
        "samples_step0000006.png",
    ]
    lines = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 3, 4, 6]
    assert any("step 6/6" in line and "img/s" in line and "ETA" in line for line in logs)
    # keeps scale.checkpoints_to_keep (2) newest
    assert [p.name for p in sorted(res.run_dir.glob("checkpoint_step*"))] == [
        "checkpoint_step0000003",
        "checkpoint_step0000006",
    ]
    # metrics.jsonl names the checkpoints as Ray Train's does
    assert [(m["step"], m.get("checkpoint")) for m in lines] == [
        (2, None),
        (3, "checkpoint_step0000003"),
        (4, None),
        (6, "checkpoint_step0000006"),
    ]


def test_fresh_run_never_resumes_by_accident_and_resume_continues(bundled_shards, tmp_path):
    cfg = tiny(bundled_shards, tmp_path, steps=3)
    train_local(cfg, run_name="r", log=lambda s: None)
    with pytest.raises(UserError, match="--resume"):
        train_local(cfg, run_name="r", log=lambda s: None)
    more = C.replace(cfg, train={"steps": 6})
    logs = []
    res = train_local(more, run_name="r", resume=True, log=logs.append)
    assert logs[0].startswith(f"resuming run r in {tmp_path / 'r'}") and logs[0].endswith("from checkpoint_step0000003")
    assert ck.load(res.checkpoint).step == 6
    steps = [json.loads(line)["step"] for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6]  # 1-3 from the first run, 4-6 after resuming: no step repeated


def test_cli_local_resume_continues_step_weights_and_optimiser(bundled_shards, tmp_path, capsys):
    """`ce-ray train --local --run-name X --resume`: the CLI passes no log function, which once
    raised TypeError before the run could resume."""
    from ce_ray.cli import main

    common = [
        "train",
        "--local",
        "--config",
        "tune_configs/smoke.yaml",
        "--run-name",
        "cli",
        f"data.shards={bundled_shards}",
        f"train.output_dir={tmp_path}",
        f"scale.storage_path={tmp_path}",
        "mlflow.enabled=false",
    ]
    assert main([*common, "train.steps=3"]) == 0
    first = ck.load(tmp_path / "cli" / "checkpoint_step0000003")
    assert main([*common, "train.steps=5", "--resume"]) == 0
    assert "resuming run cli in" in capsys.readouterr().out
    second = ck.load(tmp_path / "cli" / "checkpoint_step0000005")
    assert second.step == 5
    # Adam's own step counter continued from 3 (the optimiser state was restored, not rebuilt)...
    steps = lambda c: {int(s["step"]) for s in c.optim["opt_g"]["state"].values()}  # noqa: E731
    assert steps(first) == {3} and steps(second) == {5}
    # ...and so did the weights: the first update after resuming starts from step 3's weights,
    # so they are closer to them than to a fresh initialisation.
    import torch

    from ce_ray.core.model import build_generator

    key = next(k for k in first.G if k.endswith("weight") and first.G[k].dim() == 4)
    torch.manual_seed(first.config.train.seed)
    init = build_generator(first.config.model).state_dict()[key]
    assert (second.G[key] - first.G[key]).abs().mean() < (second.G[key] - init).abs().mean()


def test_resume_continues_a_run_folder_of_the_old_layout(bundled_shards, tmp_path):
    """Runs written before the shared layout kept <run>/checkpoints/step_N/: they still resume,
    and the new checkpoints go where Ray Train puts them."""
    import shutil

    cfg = tiny(bundled_shards, tmp_path, steps=3)
    first = train_local(cfg, run_name="old", log=lambda s: None)
    legacy = first.run_dir / "checkpoints" / "step_0000003"
    legacy.parent.mkdir()
    shutil.move(first.checkpoint, legacy)  # now exactly what an older ce-ray left behind
    assert ck.run_checkpoints(first.run_dir) == [legacy]
    with pytest.raises(UserError, match="--resume"):
        train_local(cfg, run_name="old", log=lambda s: None)
    logs = []
    res = train_local(C.replace(cfg, train={"steps": 6}), run_name="old", resume=True, log=logs.append)
    assert logs[0].endswith("from step_0000003")
    assert res.checkpoint == first.run_dir / "checkpoint_step0000006" and ck.load(res.checkpoint).step == 6
    # Both layouts count towards scale.checkpoints_to_keep (2): step 3 (old layout) and step 6 stay.
    assert [p.name for p in ck.run_checkpoints(res.run_dir)] == ["step_0000003", "checkpoint_step0000006"]


def test_local_honours_mlflow_and_the_same_preflight_as_ray(bundled_shards, tmp_path):
    """--local with mlflow.enabled: one MLflow run with metrics, grids and the registered model,
    as the Ray driver records it; the pre-flight refuses too little data before anything starts."""
    from ce_ray import tracking
    from ce_ray.infer import resolve

    cfg = C.replace(tiny(bundled_shards, tmp_path), mlflow={"enabled": True, "experiment": "local-test"})
    res = train_local(cfg, run_name="ml", log=lambda s: None)
    assert res.model_uri == f"models:/{cfg.mlflow.registered_model}/1"
    client = tracking._client(res.mlflow_tracking_uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and "val_l2" in run.data.metrics
    assert {a.path for a in client.list_artifacts(res.mlflow_run_id)} >= {"checkpoint", "samples"}
    assert resolve.load_generator(res.model_uri, tracking_uri=res.mlflow_tracking_uri).step == 6
    with pytest.raises(UserError, match="fewer than data.batch_size"):
        train_local(C.replace(cfg, data={"batch_size": 4096}), run_name="big", log=lambda s: None)
    assert not (tmp_path / "big").exists()  # nothing started
