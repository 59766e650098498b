"""Checkpoint directories: bit-identical round trip, optimiser/RNG state, safety, atomicity."""

import hashlib
import json
import pickle
import random

import numpy as np
import pytest
import torch
from helpers import load_models

import ce_ray.config as C
from ce_ray.core.model import build_discriminator, build_generator
from ce_ray.core.step import GanStep
from ce_ray.errors import UserError
from ce_ray.infer import resolve
from ce_ray.train import checkpoint as ck

TINY = {"model": {"bottleneck": 32, "ngf": 8, "ndf": 8}, "data": {"batch_size": 4}, "train": {"steps": 9}}


def trained(cfg):
    torch.manual_seed(0)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    step = GanStep(G, D, cfg, torch.device("cpu"))
    x = torch.rand(4, 3, 128, 128) * 2 - 1
    h = torch.zeros(4, 1, 128, 128)
    h[:, :, 36:92, 36:92] = 1
    for _ in range(2):
        step(x, h)
    return G, D, step, x, h


def test_round_trip_is_bit_identical(tmp_path):
    cfg = C.from_dict(TINY)
    G, D, step, x, h = trained(cfg)
    path = ck.save(tmp_path / "ck", G=G, D=D, step=2, config=cfg, optim=step.state_dict(), metrics={"val_l2": 0.1})
    loaded = ck.load(path)
    assert loaded.step == 2 and loaded.config == cfg and loaded.metrics == {"val_l2": 0.1}
    G2, D2 = load_models(loaded)
    G.eval(), G2.eval(), D.eval(), D2.eval()
    with torch.no_grad():
        assert torch.equal(G(x), G2(x))
        assert torch.equal(D(x[:, :, 32:96, 32:96]), D2(x[:, :, 32:96, 32:96]))
    # Optimiser state restored: the next step from the copy equals the next step of the original.
    step2 = GanStep(G2.train(), D2.train(), cfg, torch.device("cpu"))
    step2.load_state_dict(loaded.optim)
    G.train(), D.train()
    torch.manual_seed(1)
    step(x, h)
    torch.manual_seed(1)
    step2(x, h)
    for a, b in zip(G.parameters(), G2.parameters()):
        assert torch.equal(a, b)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"]["train"]["steps"] == 9  # the whole resolved config travels with it


def test_rng_state_round_trip(tmp_path):
    cfg = C.from_dict(TINY)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = ck.save(tmp_path / "ck", G=G, D=D, step=0, config=cfg)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ck.restore_rng(ck.load(path).rng)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_load_generator_from_a_directory(tmp_path):
    cfg = C.from_dict(TINY)
    G, D, *_ = trained(cfg)
    ck.save(tmp_path / "nested" / "ck", G=G, D=D, step=5, config=cfg)
    lg = resolve.load_generator(str(tmp_path / "nested"))  # finds the checkpoint below a folder too
    assert lg.step == 5 and not lg.model.training
    G.eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(lg.model(x), G(x))


def test_refuses_pickled_code(tmp_path):
    cfg = C.from_dict(TINY)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    path = ck.save(tmp_path / "ck", G=G, D=D, step=0, config=cfg)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(path / "model.pt", "wb") as f:
        pickle.dump({"G": Evil()}, f)
    # Even with meta.json's size and sha256 rewritten to match the file, torch.load refuses it.
    meta = json.loads((path / "meta.json").read_text())
    data = (path / "model.pt").read_bytes()
    meta["files"]["model.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="model.pt cannot be read by torch.load"):
        ck.load(path)


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve.load_generator(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no ce-ray checkpoint"):
        resolve.load_generator(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not a ce-ray checkpoint"):
        ck.load(tmp_path / "empty")


def test_save_is_atomic(tmp_path, monkeypatch):
    cfg = C.from_dict(TINY)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    good = ck.save(tmp_path / "ck", G=G, D=D, step=1, config=cfg)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "capture_rng", boom)
    with pytest.raises(OSError):
        ck.save(tmp_path / "ck", G=G, D=D, step=2, config=cfg)
    assert ck.load(good).step == 1  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp leftovers


def test_run_folders_of_both_layouts_load_their_latest_checkpoint(tmp_path):
    """evaluate / inpaint / serve take a run folder as well as a checkpoint folder: Ray Train's and
    --local's <run>/checkpoint_stepN/, and the older --local <run>/checkpoints/step_N/."""
    cfg = C.from_dict(TINY)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    new, old = tmp_path / "new-run", tmp_path / "old-run"
    for step in (3, 12):
        ck.save(new / ck.checkpoint_dir_name(step), G=G, D=D, step=step, config=cfg)
        ck.save(old / "checkpoints" / f"step_{step:07d}", G=G, D=D, step=step, config=cfg)
    (new / "checkpoint_step0000099.tmp-x").mkdir()  # not a checkpoint (a half-written one): ignored
    assert [p.name for p in ck.run_checkpoints(new)] == ["checkpoint_step0000003", "checkpoint_step0000012"]
    assert [p.name for p in ck.run_checkpoints(old)] == ["step_0000003", "step_0000012"]
    assert ck.run_checkpoints(tmp_path / "missing") == []
    for run in (new, old):
        assert resolve.checkpoint_dir(str(run)).name.endswith("0000012")  # the latest, not the first in name order
        assert resolve.load_generator(str(run)).step == 12
        old_ckpt = run / ("checkpoint_step0000003" if run == new else "checkpoints/step_0000003")
        assert resolve.checkpoint_dir(str(old_ckpt)) == old_ckpt and resolve.load_generator(str(old_ckpt)).step == 3
    assert ck.checkpoint_dir_name(200) == "checkpoint_step0000200"


def test_fresh_run_names_skip_existing_folders(tmp_path, monkeypatch):
    names = iter(["aaaa0000", "bbbb1111"])
    monkeypatch.setattr(ck.secrets, "token_hex", lambda n: next(names))
    (tmp_path / "run-aaaa0000").mkdir()
    assert ck.fresh_run_name(str(tmp_path)) == "run-bbbb1111"
