"""loop.run's rank contract without Ray, in seconds: with a fake WorkerEnv at world size 2, every rank
reports at the same steps (Ray Train's report is a barrier), and only rank 0 checkpoints, validates,
logs and calls the tracker. Ranks run one after the other with an identity `wrap` (no DDP) on
in-memory batches of the smoke config."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from ce_ray import config as C
from ce_ray.core.masks import holes_for
from ce_ray.train import checkpoint as ck
from ce_ray.train.loop import WorkerEnv, run

SMOKE = Path(__file__).resolve().parents[2] / "tune_configs" / "smoke.yaml"
BATCHES_PER_EPOCH = 4  # 6 steps: the loop crosses an epoch boundary


@pytest.fixture(scope="module")
def cfg() -> C.Config:
    # One torch thread: a tiny model on a shared 2-core machine runs fastest that way.
    return C.load(SMOKE, ["mlflow.enabled=false", "train.device=cpu", "train.threads=1"])


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # loop.run sets train.threads for the whole process
    yield
    torch.set_num_threads(threads)


def batches(cfg: C.Config, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    s, b = cfg.data.fine_size, cfg.data.batch_size
    return [
        (
            torch.from_numpy(rng.uniform(-1, 1, (b, 3, s, s)).astype(np.float32)),
            torch.from_numpy(holes_for(cfg.mask, s, b, rng)),
        )
        for _ in range(BATCHES_PER_EPOCH)
    ]


class Recorder:
    """Everything one rank did through its WorkerEnv."""

    def __init__(self):
        self.reports: list[tuple[int, bool, set]] = []  # (step, passed a checkpoint, metric keys)
        self.checkpoint_steps: list[int] = []  # read from the checkpoint directory while it exists
        self.logs: list[str] = []
        self.tracker: list[tuple[str, object]] = []
        self.val_calls = 0

    # Tracker
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.append(("log_metrics", step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        self.tracker.append(("log_artifact", (artifact_path, Path(path).name)))

    # report
    def report(self, metrics: dict[str, float], ckpt_dir: Path | None) -> None:
        self.reports.append((int(metrics["step"]), ckpt_dir is not None, set(metrics)))
        if ckpt_dir is not None:  # the loop deletes it once report returns (Ray has uploaded it by then)
            self.checkpoint_steps.append(ck.load(ckpt_dir).step)


def run_rank(cfg: C.Config, rank: int, val_data) -> Recorder:
    rec = Recorder()
    data = batches(cfg, seed=rank)  # each rank its own shard

    def val() -> object:
        rec.val_calls += 1
        return val_data()

    env = WorkerEnv(
        train_batches=lambda epoch: iter(data),
        val_data=val,
        report=rec.report,
        rank=rank,
        world_size=2,
        device=torch.device("cpu"),
        wrap=lambda m: m,
        tracker=rec,
        log=rec.logs.append,
    )
    last = run(cfg, env)
    assert last["step"] == cfg.train.steps
    return rec


def val_set(cfg: C.Config) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(99)
    s, n = cfg.data.fine_size, cfg.data.val_images
    return torch.from_numpy(rng.uniform(-1, 1, (n, 3, s, s)).astype(np.float32)), torch.from_numpy(
        holes_for(cfg.mask, s, n, rng)
    )


def test_every_rank_reports_at_the_same_steps_and_only_rank_0_does_the_rest(cfg):
    # The val set as train.py hands it over: a Future, resolved while training runs; the loop
    # waits on it at its first evaluation.
    future: Future = Future()
    threading.Timer(0.2, lambda: future.set_result(val_set(cfg))).start()
    r0 = run_rank(cfg, 0, lambda: future)
    r1 = run_rank(cfg, 1, lambda: val_set(cfg))
    steps = [2, 3, 4, 6]  # log every 2; eval + checkpoint every 3; the last step always
    assert (
        [s for s, _, _ in r0.reports] == [s for s, _, _ in r1.reports] == steps
    )  # the barrier: same steps, same count

    # Rank 0 checkpoints at the checkpoint steps (a real checkpoint directory), rank 1 never.
    assert [s for s, ckpt, _ in r0.reports if ckpt] == r0.checkpoint_steps == [3, 6]
    assert not any(ckpt for _, ckpt, _ in r1.reports) and r1.checkpoint_steps == []

    # Rank 0 validates (at every checkpoint step) and asks for the val set once; rank 1 never.
    assert r0.val_calls == 1 and r1.val_calls == 0
    assert [s for s, _, keys in r0.reports if {"val_l1", "val_l2", "val_psnr"} <= keys] == [3, 6]
    assert not any(k.startswith("val_") for _, _, keys in r1.reports for k in keys)
    # ...but both ranks report the training metrics.
    assert all({"loss_g", "loss_d", "img_per_s", "step"} <= keys for _, _, keys in r0.reports + r1.reports)

    # Only rank 0 logs its progress line and talks to the tracker.
    assert len(r0.logs) == len(steps) and all(f"step {s}/{cfg.train.steps}" in line for s, line in zip(steps, r0.logs))
    assert r1.logs == []
    assert [s for kind, s in r0.tracker if kind == "log_metrics"] == steps
    assert [a for kind, a in r0.tracker if kind == "log_artifact"] == [
        ("samples", "samples_step0000003.png"),
        ("samples", "samples_step0000006.png"),
    ]
    assert r1.tracker == []


def test_a_failed_background_val_read_fails_the_run(cfg):
    failed: Future = Future()
    failed.set_exception(RuntimeError("the val read failed"))
    with pytest.raises(RuntimeError, match="the val read failed"):  # raised in the training thread, not lost
        run_rank(cfg, 0, lambda: failed)
