"""Checkpoint faults, injected for real: a writer killed inside a checkpoint write (--local and
Ray Train rank 0), a truncated latest checkpoint (--resume steps back to the newest intact one;
evaluate / serve / export / inpaint refuse it with one clear line), a disk that fills up during a
checkpoint (a small tmpfs as scale.storage_path).

The kill uses checkpoint.FAULT_INJECTION_KILL_ENV, the switch that exists only for these tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from probes import KillRank0InCheckpointWrite, ProbeHook, probes, state_digest

import ce_ray.config as C
from ce_ray.cli import main
from ce_ray.core.model import build_discriminator, build_generator
from ce_ray.errors import UserError
from ce_ray.infer import resolve
from ce_ray.train import checkpoint as ck
from ce_ray.train import driver as T
from ce_ray.train import local as local_mod
from ce_ray.train.local import train_local

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "tune_configs" / "smoke.yaml"
TINY = {"model": {"bottleneck": 32, "ngf": 8, "ndf": 8}, "data": {"batch_size": 4}}


def tiny_save(path: Path, step: int, seed: int = 0) -> Path:
    cfg = C.from_dict(TINY)
    torch.manual_seed(seed)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    return ck.save(path, G=G, D=D, step=step, config=cfg, optim={"opt_g": {"state": {}}})


def truncate(path: Path, keep: float = 0.5) -> tuple[int, int]:
    """Cut `path` to `keep` of its size; returns (new size, old size)."""
    old = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(old * keep))
    return int(old * keep), old


def local_cfg(shards: str, out: Path, storage: Path, *extra: str) -> C.Config:
    return C.load(
        SMOKE,
        [
            f"data.shards={shards}",
            f"train.output_dir={out}",
            f"scale.storage_path={storage}",
            "mlflow.enabled=false",
            *extra,
        ],
    )


@pytest.fixture
def restored(monkeypatch):
    """What train_local's loop restored (WorkerEnv.restore), recorded on the way into loop.run."""
    seen: list = []
    real = local_mod.run

    def spy(cfg, env):
        seen.append(env.restore)
        return real(cfg, env)

    monkeypatch.setattr(local_mod, "run", spy)
    return seen


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def same_weights(a: ck.Checkpoint, b: ck.Checkpoint) -> bool:
    return all(torch.equal(a.G[k], b.G[k]) for k in b.G) and all(torch.equal(a.D[k], b.D[k]) for k in b.D)


# --- Damage is found before torch.load, and named -------------------------------------------------


def test_damaged_files_are_named_before_torch_load(tmp_path):
    good = tiny_save(tmp_path / "good", 3)
    meta = json.loads((good / "meta.json").read_text())
    assert set(meta["files"]) == {"model.pt", "optim.pt", "rng.pt"}
    data = (good / "model.pt").read_bytes()
    assert meta["files"]["model.pt"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def damaged(how) -> str:
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, d)
        how(d)
        with pytest.raises(ck.DamagedCheckpointError) as e:
            ck.load(d)
        assert str(e.value).startswith(f"checkpoint {str(d)!r} is damaged: ")
        return str(e.value)

    def flip(d: Path) -> None:
        b = bytearray((d / "model.pt").read_bytes())
        b[len(b) // 2] ^= 0xFF
        (d / "model.pt").write_bytes(bytes(b))

    n = len(data) // 2
    assert f"model.pt is {n:,} bytes but meta.json records {len(data):,} (truncated" in damaged(
        lambda d: truncate(d / "model.pt")
    )
    assert "model.pt does not match the sha256 meta.json records" in damaged(flip)
    assert "optim.pt is missing (meta.json records" in damaged(lambda d: (d / "optim.pt").unlink())
    assert "meta.json is missing (it is written last" in damaged(lambda d: (d / "meta.json").unlink())
    assert "meta.json is not valid JSON" in damaged(lambda d: truncate(d / "meta.json"))
    assert ck.load(good).step == 3  # the pristine one still loads


def test_checkpoints_from_before_the_manifest_still_load(tmp_path):
    """Checkpoints written before meta.json listed its files: they load; a damaged file is then
    caught by torch.load, with the same kind of message."""
    old = tiny_save(tmp_path / "old", 3)
    meta = json.loads((old / "meta.json").read_text())
    del meta["files"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert same_weights(ck.load(old), ck.load(tiny_save(tmp_path / "new", 3)))
    truncate(old / "model.pt")
    with pytest.raises(ck.DamagedCheckpointError, match=r"is damaged: model.pt cannot be read by torch.load"):
        ck.load(old)


def test_a_run_folder_never_yields_a_partial_or_damaged_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    tiny_save(run / ck.checkpoint_dir_name(3), 3)
    truncate(tiny_save(run / ck.checkpoint_dir_name(6), 6) / "model.pt")  # damaged
    partial = run / ck.checkpoint_dir_name(9)  # an upload cut off before meta.json: model.pt only
    partial.mkdir()
    shutil.copyfile(run / ck.checkpoint_dir_name(3) / "model.pt", partial / "model.pt")
    cut = run / ".checkpoint_step0000012.tmp-abc"  # ckpt_io.copy's temp folder, killed mid-write
    shutil.copytree(run / ck.checkpoint_dir_name(3), cut)

    warnings: list[str] = []
    assert [p.name for p in ck.run_checkpoints(run)] == ["checkpoint_step0000003", "checkpoint_step0000006"]
    assert ck.find_checkpoint_dir(run, warn=warnings.append) == run / "checkpoint_step0000003"
    assert len(warnings) == 1 and "checkpoint_step0000006' is damaged: model.pt is " in warnings[0]
    # evaluate / serve / export / inpaint given the run folder: the newest intact one, saying so.
    assert resolve.load_generator(str(run)).step == 3
    assert "checkpoint_step0000006' is damaged: model.pt" in capsys.readouterr().err
    # A later write at a step whose folder exists goes beside it, never into it.
    assert ck.free_checkpoint_name(str(run), 6) == "checkpoint_step0000006-2"
    assert ck.free_checkpoint_name(str(run), 9) == "checkpoint_step0000009-2"
    assert ck.free_checkpoint_name(str(run), 12) == "checkpoint_step0000012"
    tiny_save(run / "checkpoint_step0000006-2", 6)
    assert ck.run_checkpoints(run)[-1].name == "checkpoint_step0000006-2"
    assert ck.latest_intact(run, warn=warnings.append) == run / "checkpoint_step0000006-2"
    assert ck.remove_partial_writes(run) == [cut] and not cut.exists()


def test_commands_given_a_damaged_checkpoint_print_one_clear_line(tmp_path, capsys):
    """evaluate / serve / export / inpaint: the message checkpoint.verify raises, as one line, exit 2,
    before any work (serve: before Ray starts)."""
    d = tiny_save(tmp_path / "ck", 3)
    truncate(d / "model.pt")
    with pytest.raises(ck.DamagedCheckpointError) as e:
        ck.load(d)
    want = str(e.value)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(photo)
    commands = {
        "evaluate": ["evaluate", "--model", str(d), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "ev")],
        "serve": ["serve", "--model", str(d), "--port", "1"],
        "export": ["export", "--model", str(d), "--format", "torchscript", "-o", str(tmp_path / "g.pt")],
        "inpaint": ["inpaint", str(photo), "--model", str(d), "-o", str(tmp_path / "out.png")],
    }
    capsys.readouterr()
    for name, argv in commands.items():
        assert main(argv) == 2, name
        out = capsys.readouterr()
        assert out.err == f"ce-ray {name}: error: {want}\n", name
    assert "Traceback" not in want and not (tmp_path / "g.pt").exists() and not (tmp_path / "out.png").exists()


# --- Fault 1: the writer killed inside a checkpoint write -----------------------------------------


def test_local_writer_killed_mid_checkpoint_resumes_from_last_complete(bundled_shards, tmp_path, restored):
    """`ce-ray train --local` SIGKILLs itself inside the write of step 6's checkpoint (after model.pt);
    --resume continues from step 3, the last complete one, with exactly its weights."""
    argv = ["train", "--local", "--config", str(SMOKE), "--run-name", "k"]
    cfg_args = [f"data.shards={bundled_shards}", f"train.output_dir={tmp_path}", f"scale.storage_path={tmp_path}"]
    proc = subprocess.run(
        [sys.executable, "-m", "ce_ray.cli", *argv, *cfg_args, "mlflow.enabled=false"],
        cwd=ROOT,
        # TMPDIR: the killed process cannot remove its own temp folders; keep them under tmp_path.
        env={**os.environ, ck.FAULT_INJECTION_KILL_ENV: "6", "TMPDIR": str(_mkdir(tmp_path / "tmp"))},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "k"
    assert [p.name for p in ck.run_checkpoints(run)] == ["checkpoint_step0000003"]
    (cut,) = run.glob(".checkpoint_step0000006.tmp-*")  # the kill landed inside the write...
    assert (cut / "model.pt").is_file() and not (cut / "meta.json").exists()  # ...after its first file
    assert ck.find_checkpoint_dir(run) == run / "checkpoint_step0000003"

    logs: list[str] = []
    res = train_local(local_cfg(bundled_shards, tmp_path, tmp_path), run_name="k", resume=True, log=logs.append)
    assert logs[0] == f"resuming run k in {run} from checkpoint_step0000003"
    assert logs[1] == f"removed {cut.name}: a checkpoint write that was cut off" and not cut.exists()
    (first,) = restored
    last_complete = ck.load(run / "checkpoint_step0000003")
    assert first.step == 3 and same_weights(first, last_complete)
    assert first.optim["opt_g"]["state"].keys() == last_complete.optim["opt_g"]["state"].keys()
    assert res.checkpoint == run / "checkpoint_step0000006" and ck.load(res.checkpoint).step == 6


@pytest.fixture(scope="module")
def killed_ray_run(ray_session, bundled_shards, tmp_path_factory):
    """Ray Train, 2 workers, 10 steps, checkpoints at 5 and 10: rank 0 of the first worker group
    SIGKILLs itself inside the write of step 10's checkpoint into the run folder;
    FailureConfig(max_failures=1) restarts the group."""
    root = tmp_path_factory.mktemp("ckpt_kill")
    cfg = local_cfg(
        bundled_shards,
        root / "out",
        Path(ray_session) / "ckpt_kill",
        "train.steps=10",
        "train.log_every=5",
        "train.eval_every=5",
        "train.ckpt_every=5",
        "scale.max_failures=1",
    )
    probe_dir = root / "probes"
    probe_dir.mkdir()
    run = Path(runs_path(cfg, "kill-write"))
    s = T.train(cfg, run_name="kill-write", hook=KillRank0InCheckpointWrite(probe_dir, step=10), log=lambda _: None)
    partial = sorted(p.name for p in run.glob(".checkpoint_step*.tmp-*"))
    return {"cfg": cfg, "summary": s, "run": run, "probes": probe_dir, "root": root, "partial": partial}


def runs_path(cfg: C.Config, name: str) -> str:
    from ce_ray.train import runs

    return runs.run_path(runs.resolve_paths(cfg), name)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_rank0_killed_mid_checkpoint_restarts_from_last_complete(killed_ray_run):
    s, run = killed_ray_run["summary"], killed_ray_run["run"]
    assert s.step == 10 and Path(s.checkpoint) == run / "checkpoint_step0000010"
    # The kill landed inside the write: its temp folder is still there, never listed as a checkpoint.
    (cut,) = killed_ray_run["partial"]
    assert cut.startswith(".checkpoint_step0000010.tmp-")
    assert not (run / cut / "meta.json").exists() and (run / cut / "model.pt").is_file()
    starts = probes(killed_ray_run["probes"], "start")
    assert len(starts) == 4, starts  # two generations of two workers
    again = [p for p in starts if p["restored_step"] is not None]
    assert sorted(p["rank"] for p in again) == [0, 1]
    # Both ranks restored step 5, the last complete checkpoint, with exactly its weights.
    want = state_digest(ck.load(run / "checkpoint_step0000005").G)
    assert {(p["restored_step"], p["restored_from"], p["g_restored"]) for p in again} == {
        (5, str(run / "checkpoint_step0000005"), want)
    }
    assert [(h["step"], h.get("checkpoint")) for h in s.history] == [
        (5, "checkpoint_step0000005"),
        (10, "checkpoint_step0000010"),
    ]


# --- Fault 2: a truncated latest checkpoint --------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_ray_resume_skips_a_truncated_latest_checkpoint(killed_ray_run):
    """Truncate model.pt of the run's newest checkpoint (the one Ray's record names): --resume says
    which file and what is wrong, continues from step 5, and never writes into the damaged folder."""
    s, run, cfg = killed_ray_run["summary"], killed_ray_run["run"], killed_ray_run["cfg"]
    latest = run / "checkpoint_step0000010"
    now, was = truncate(latest / "model.pt")
    want = state_digest(ck.load(run / "checkpoint_step0000005").G)  # Ray may evict it once newer ones exist
    probe_dir = killed_ray_run["root"] / "probes2"
    probe_dir.mkdir()
    lines: list[str] = []
    # Keep every checkpoint: with Ray's default retention (latest + best by val_l2) the rewritten
    # step-10 folder is evicted whenever another checkpoint happens to score better.
    more = C.replace(cfg, train={"steps": 15}, scale={"checkpoints_to_keep": 10})
    r = T.train(more, run_name="kill-write", resume=True, hook=ProbeHook(probe_dir), log=lines.append)
    assert lines[0] == (
        f"warning: checkpoint '{latest}' is damaged: model.pt is {now:,} bytes but meta.json records {was:,} "
        "(truncated: cut off while written or since); skipping it"
    )
    assert lines[1] == "warning: continuing from the newest intact checkpoint, checkpoint_step0000005"
    assert lines[2] == f"resuming run kill-write in {run} from checkpoint_step0000005"
    starts = probes(probe_dir, "start")
    assert sorted((p["rank"], p["restored_step"], p["g_restored"]) for p in starts) == [(0, 5, want), (1, 5, want)]
    assert r.step == 15 and Path(r.checkpoint).name == "checkpoint_step0000015"
    new = [(h["step"], h.get("checkpoint")) for h in r.history[len(s.history) :]]
    assert new == [(10, "checkpoint_step0000010-2"), (15, "checkpoint_step0000015")]
    assert ck.load(run / "checkpoint_step0000010-2").step == 10


def test_local_resume_skips_a_truncated_latest_checkpoint(bundled_shards, tmp_path, capsys, restored):
    common = ["train", "--local", "--config", str(SMOKE), "--run-name", "t", "mlflow.enabled=false"]
    common += [f"data.shards={bundled_shards}", f"train.output_dir={tmp_path}", f"scale.storage_path={tmp_path}"]
    assert main(common) == 0
    run = tmp_path / "t"
    now, was = truncate(run / "checkpoint_step0000006" / "model.pt")
    last_complete = ck.load(run / "checkpoint_step0000003")  # deleted by the run once 6 and 9 exist (keep 2)
    capsys.readouterr()
    assert main([*common, "train.steps=9", "--resume"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        f"warning: checkpoint '{run / 'checkpoint_step0000006'}' is damaged: model.pt is {now:,} bytes but "
        f"meta.json records {was:,} (truncated: cut off while written or since); skipping it",
        "warning: continuing from the newest intact checkpoint, checkpoint_step0000003",
        f"resuming run t in {run} from checkpoint_step0000003",
    ]
    first, second = restored
    assert first is None and second.step == 3 and same_weights(second, last_complete)
    assert [p.name for p in ck.run_checkpoints(run)] == ["checkpoint_step0000006", "checkpoint_step0000009"]
    assert ck.load(run / "checkpoint_step0000006").step == 6  # rewritten whole by the resumed run


def test_resume_with_no_intact_checkpoint_left_says_so(bundled_shards, tmp_path):
    cfg = local_cfg(bundled_shards, tmp_path, tmp_path, "train.steps=3")
    train_local(cfg, run_name="z", log=lambda _: None)
    truncate(tmp_path / "z" / "checkpoint_step0000003" / "model.pt")
    with pytest.raises(UserError, match=r"run 'z' has no intact checkpoint to resume from \(checkpoint .* damaged"):
        train_local(C.replace(cfg, train={"steps": 6}), run_name="z", resume=True, log=lambda _: None)


# --- Fault 3: the disk fills up during a checkpoint ------------------------------------------------


def _mount(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def tmpfs(path: Path, size: int):
    path.mkdir(parents=True, exist_ok=True)
    done = _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def resize(path: Path, size: int) -> None:
    done = _mount(["-o", f"remount,size={size}", str(path)])
    assert done.returncode == 0, done.stderr


def test_disk_full_during_a_checkpoint(bundled_shards, tmp_path, restored):
    """--local on a tmpfs that holds the first checkpoint but not the next: a clear error naming the
    folder and the space needed, no temp folder left, the first checkpoint intact; --resume works
    once the disk is bigger."""
    with tmpfs(tmp_path / "disk", 16 << 20) as disk:
        cfg = local_cfg(bundled_shards, tmp_path / "out", disk, "train.steps=3")
        train_local(cfg, run_name="full", log=lambda _: None)
        run = disk / "full"
        first = run / "checkpoint_step0000003"
        size = sum(p.stat().st_size for p in first.iterdir())
        # Room for what is there plus half a checkpoint (pages of 4 KiB), so step 6's cannot fit.
        resize(disk, (shutil.disk_usage(disk).used + size // 2) // 4096 * 4096 + 4096)
        more = C.replace(cfg, train={"steps": 6})
        with pytest.raises(UserError) as e:
            train_local(more, run_name="full", resume=True, log=lambda _: None)
        msg = str(e.value)
        m = re.fullmatch(
            rf"no space left on the device of '{re.escape(str(run))}' to write checkpoint checkpoint_step0000006: "
            r"it needs ([\d,]+) bytes, ([\d,]+) are free\. The partial copy was removed and the run's earlier "
            r"checkpoints are intact: free space there \(or move scale.storage_path\), then continue with --resume",
            msg,
        )
        assert m, msg
        need, free = (int(g.replace(",", "")) for g in m.groups())
        assert abs(need - size) < 1024 and free < need  # step 6's size: step 3's, give or take meta.json
        assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint_step0000003"]
        assert ck.load(first).step == 3  # intact and loadable (sizes and sha256 checked)

        resize(disk, 16 << 20)  # space freed
        res = train_local(more, run_name="full", resume=True, log=lambda _: None)
        assert ck.load(res.checkpoint).step == 6
        assert [r.step if r else None for r in restored] == [None, 3, 3]
        assert same_weights(restored[2], ck.load(first))
