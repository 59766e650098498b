"""Config: paper defaults, strict loading, overrides, flattening."""

import pytest

import ce_ray.config as C
from ce_ray.errors import UserError


def test_defaults_are_the_papers():
    cfg = C.Config()
    assert (cfg.loss.lambda_rec, cfg.loss.lambda_adv) == (0.999, 0.001)
    assert cfg.optim.lr_g == pytest.approx(10 * cfg.optim.lr_d)  # G lr 10x D lr (train.lua)
    assert cfg.optim.beta1 == 0.5
    assert (cfg.data.load_size, cfg.data.fine_size, cfg.data.batch_size) == (350, 128, 64)
    assert cfg.mask.overlap == 4 and cfg.mask.overlap_weight == 10
    assert cfg.model.bottleneck == 4000


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 7\noptim:\n  lr_g: 1e-3\n")
    cfg = C.load(p, ["train.precision=bf16", "optim.lr_d=3e-5", "mask.kind=center", "data.flip=false"])
    assert cfg.train.steps == 7
    assert cfg.optim.lr_g == 1e-3  # PyYAML reads "1e-3" as a string; accepted as a number
    assert cfg.optim.lr_d == 3e-5
    assert cfg.train.precision == "bf16"
    assert cfg.data.flip is False


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.stepz=3"], "train.stepz"),
        (["bogus.x=1"], "bogus"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=1.5"], "train.steps"),
        (["data.flip=3"], "data.flip"),
        (["optim.lr_g=-1e-3"], "optim.lr_g"),
        (["loss.lambda_rec=1.5"], "loss.lambda_rec"),
        (["loss.lambda_adv=-0.1"], "loss.lambda_adv"),
        (["data.fine_size=100"], "data.fine_size"),
        (["train.precision=fp8"], "train.precision"),
        (["mask.kind=random_block"], "mask.kind"),  # centre generator cannot fill random holes
        (["data.batch_size=1"], "data.batch_size"),
        (["model.sync_bn=true", "scale.num_workers=2"], "model.sync_bn"),  # DDP: GPU only
        (["data.scale_jitter=1.5"], "data.scale_jitter"),
        (["data.scale_jitter=0.8"], "data.scale_jitter"),  # 350 * 0.2 < 128: crops would not fit
        (["optim.lr_decay=cosine"], "optim.lr_decay"),
        (["optim.decay_fraction=0"], "optim.decay_fraction"),
    ],
)
def test_bad_values_fail_naming_the_key(overrides, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        C.load(None, overrides)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="section.key=value"):
        C.load(None, ["train.steps"])
    with pytest.raises(UserError, match="section.key"):
        C.load(None, ["steps=3"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        C.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        C.load(listy)


def test_full_variant_accepts_random_masks():
    cfg = C.load(None, ["model.variant=full", "mask.kind=random_region"])
    assert cfg.mask.kind == "random_region"


def test_flatten_and_round_trip():
    cfg = C.load(None, ["train.steps=5"])
    flat = C.flatten(cfg)
    assert flat["train.steps"] == 5 and flat["loss.lambda_rec"] == 0.999
    assert all("." in k for k in flat)
    assert C.from_dict(C.to_dict(cfg)) == cfg


def test_replace_revalidates():
    cfg = C.replace(C.Config(), train={"steps": 3})
    assert cfg.train.steps == 3
    with pytest.raises(UserError):
        C.replace(cfg, optim={"lr_g": 0.0})


def test_every_yaml_in_tune_configs_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "tune_configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "tune_configs/ has no YAML files"
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# ce-ray "), f"{f.name} must open with the command that runs it"
        if f.name.startswith("sweep_"):
            continue  # sweep files are loaded by tests/test_tune.py with their own schema
        C.load(f)
