"""Sweep files (ce_ray/tune/sweep.py): every sweep_*.yaml loads, bad search spaces fail naming the key,
trial configs, concurrency sizing, ranking + CSV. No Ray: run_sweep's refusals happen before it
starts Ray."""

import csv
import json
import math
from pathlib import Path

import pytest

from ce_ray.errors import UserError
from ce_ray.fsutil import write_atomic
from ce_ray.tune import sweep as S

ROOT = Path(__file__).resolve().parents[2]
TUNE_CONFIGS = ROOT / "tune_configs"
BASE = "tune_configs/smoke.yaml"


def write(tmp_path: Path, text: str, name: str = "sweep_t.yaml") -> Path:
    p = tmp_path / name
    p.write_text(f"base: {ROOT / BASE}\n" + text)
    return p


GOOD = """
search_space:
  loss.lambda_rec: {uniform: [0.9, 0.9999]}
  loss.lambda_adv: {tie: "1 - loss.lambda_rec"}
  optim.lr_g: {loguniform: [1.0e-4, 1.0e-2]}
num_samples: 3
"""


@pytest.mark.parametrize("path", sorted(TUNE_CONFIGS.glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_loads_and_names_its_command(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # base paths are relative to the repo root
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# ce-ray tune tune_configs/{path.name}"), f"{path.name} must open with its exact command"
    sweep = S.load_sweep(path)
    assert sweep.space and sweep.total_trials >= 1
    assert sweep.config.mlflow.enabled  # the sweep tracks itself; trials switch it off


def test_smoke_sweep_keeps_the_issues_promises(monkeypatch):
    monkeypatch.chdir(ROOT)
    sweep = S.load_sweep(TUNE_CONFIGS / "sweep_smoke.yaml")
    assert sweep.name == "smoke"
    assert sweep.total_trials >= 4
    assert sweep.scheduler.type == "asha" and sweep.scheduler.grace_period < sweep.scheduler.max_t
    assert sweep.space["loss.lambda_adv"] == S.Dist("tie", ("loss.lambda_rec",))
    assert {sweep.space[k].kind for k in ("optim.lr_g", "optim.lr_d")} == {"loguniform"}
    assert S.plan_concurrency(sweep, cluster_cpus=2.0) == sweep.max_concurrent_trials == 2  # fits this 2-core machine
    assert sweep.scheduler.grace_period == sweep.config.train.eval_every  # the first evaluation is the rung
    assert sweep.scheduler.max_t == sweep.config.train.steps


def test_parse_good_file_ties_and_paths(tmp_path):
    sweep = S.load_sweep(write(tmp_path, GOOD), ["data.shards=rel/shards", "num_samples=5", "scheduler.grace_period=2"])
    assert sweep.name == "t" and sweep.num_samples == 5 and sweep.scheduler.grace_period == 2
    assert sweep.metric == "val_l2" and sweep.mode == "min" and sweep.search == "random"
    assert Path(sweep.base["data"]["shards"]).is_absolute()  # trials run in another working directory
    cfg = S.trial_config(sweep.base, {"loss.lambda_rec": 0.999, "optim.lr_g": 1e-3}, sweep.ties, run_name="t-x_00000")
    assert cfg.loss.lambda_adv == pytest.approx(0.001) and cfg.optim.lr_g == 1e-3
    assert cfg.mlflow.enabled is False and cfg.scale.run_name == "t-x_00000"  # the sweep's driver does MLflow
    assert sweep.directory == Path(sweep.config.scale.storage_path) / "sweeps" / "t"
    assert S.Sweep.from_dict(json.loads(json.dumps(sweep.to_dict()))) == sweep  # sweep.json round trip


def test_grid_choice_values_are_typed_by_the_config(tmp_path):
    p = write(
        tmp_path,
        "search_space:\n  optim.lr_d: {grid: ['1e-4', 2.0e-4]}\n  data.batch_size: {choice: [4, 8]}\n"
        "search: grid\nmetric: val_psnr\n",
    )
    sweep = S.load_sweep(p)
    assert sweep.space["optim.lr_d"].args == (1e-4, 2e-4)  # YAML 1.1 reads 1e-4 as a string
    assert sweep.total_trials == 4 and sweep.mode == "max"


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "search_space:\n  optim.lr_g: {normal: [0, 1]}\nnum_samples: 2\n",
            r"optim\.lr_g: unknown distribution 'normal'",
        ),
        ("search_space:\n  optim.lr_g: {uniform: [1.0e-3, 1.0e-3]}\nnum_samples: 2\n", r"optim\.lr_g: empty range"),
        ("search_space:\n  optim.lr_g: {loguniform: [1.0e-2, 1.0e-4]}\nnum_samples: 2\n", r"optim\.lr_g: empty range"),
        ("search_space:\n  data.batch_size: {randint: [8, 8]}\nnum_samples: 2\n", r"data\.batch_size: empty range"),
        (
            "search_space:\n  optim.lr_g: {loguniform: [0, 1.0e-2]}\nnum_samples: 2\n",
            r"optim\.lr_g: loguniform needs 0 < low",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [1.0e-3]}\nnum_samples: 2\n",
            r"optim\.lr_g: uniform needs \[low, high\]",
        ),
        (
            "search_space:\n  optim.lr_gg: {uniform: [0.1, 0.2]}\nnum_samples: 2\n",
            r"'optim\.lr_gg' is not a config key",
        ),
        (
            "search_space:\n  optimizer.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\n",
            r"'optimizer\.lr_g' is not a config key",
        ),
        ("search_space:\n  lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\n", r"'lr_g' is not a config key"),
        (
            "search_space:\n  scale.num_workers: {choice: [1, 2]}\nnum_samples: 2\n",
            r"scale\.num_workers.* cannot be searched",
        ),
        (
            "search_space:\n  loss.lambda_rec: {uniform: [0.5, 1.5]}\nnum_samples: 2\n",
            r"search_space loss\.lambda_rec: the value 1\.5",
        ),
        ("search_space:\n  mask.kind: {choice: [center, random_block]}\nnum_samples: 2\n", r"mask\.kind"),
        ("search_space:\n  optim.lr_g: {choice: []}\nnum_samples: 2\n", r"optim\.lr_g: choice needs a non-empty list"),
        (
            "search_space:\n  optim.lr_g: {choice: [1.0e-3, 1.0e-3]}\nnum_samples: 2\n",
            r"optim\.lr_g: choice lists a value twice",
        ),
        (
            "search_space:\n  optim.lr_g: {randint: [1, 3]}\nnum_samples: 2\n",
            r"optim\.lr_g: randint needs an integer key",
        ),
        (
            "search_space:\n  data.batch_size: {uniform: [4, 8]}\nnum_samples: 2\n",
            r"data\.batch_size: uniform needs a number-valued key",
        ),
        ("search_space:\n  optim.lr_g: 1.0e-3\nnum_samples: 2\n", r"optim\.lr_g: expected one distribution"),
        (
            'search_space:\n  loss.lambda_adv: {tie: "1 - loss.lambda_rec"}\nnum_samples: 2\n',
            r"loss\.lambda_adv: tie .* must refer to another searched key",
        ),
        (
            "search_space:\n  loss.lambda_rec: {uniform: [0.9, 1.0]}\n"
            '  loss.lambda_adv: {tie: "2 * loss.lambda_rec"}\nnum_samples: 2\n',
            r"must read \"1 - section\.key\"",
        ),
        ("search_space: {}\nnum_samples: 2\n", r"'search_space' must map"),
        ("search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\n", r"'num_samples'.* is required"),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 0\n",
            r"num_samples: expected an integer >= 1",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nsearch_spaces: {}\n",
            r"unknown key\(s\) search_spaces",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nmetric: fid\n",
            r"metric 'fid' is not one of",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nmetric: val_psnr\nmode: min\n",
            r"mode 'min' does not fit metric val_psnr",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nsearch: bayes\n",
            r"search 'bayes' is not one of",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nsearch: grid\n",
            r"search: grid needs finite values, but optim\.lr_g",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nscheduler: {type: pbt}\n",
            r"scheduler\.type 'pbt'",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nscheduler: {type: median, max_t: 4}\n",
            r"scheduler\.max_t for a median scheduler",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nscheduler: {max_t: 9}\n",
            r"scheduler\.max_t=9 is more steps than a trial trains \(train\.steps=6\)",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\n"
            "scheduler: {grace_period: 3, max_t: 2}\n",
            r"grace_period=3 must be <= scheduler\.max_t=2",
        ),
        (
            "search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nscheduler: {reduction_factor: 1}\n",
            r"reduction_factor must be > 1",
        ),
        ("search_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\nname: 'a b'\n", r"sweep name 'a b'"),
        (
            "overrides: [optim.lr_g=1.0e-3]\nsearch_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\n",
            r"optim\.lr_g is both searched",
        ),
        (
            "overrides: [train.stepz=3]\nsearch_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\n",
            r"train\.stepz",
        ),
    ],
)
def test_bad_sweep_files_fail_naming_the_problem(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        S.load_sweep(write(tmp_path, text))


def test_bad_base_and_command_line(tmp_path):
    p = tmp_path / "sweep_x.yaml"
    p.write_text("base: nowhere.yaml\nsearch_space:\n  optim.lr_g: {uniform: [0.1, 0.2]}\nnum_samples: 2\n")
    with pytest.raises(UserError, match="base config 'nowhere.yaml' not found"):
        S.load_sweep(p)
    good = write(tmp_path, GOOD)
    with pytest.raises(UserError, match="neither a config key"):
        S.load_sweep(good, ["samples=3"])
    with pytest.raises(UserError, match="must look like key=value"):
        S.load_sweep(good, ["num_samples"])
    with pytest.raises(UserError, match=r"loss\.lambda_rec is both searched"):
        S.load_sweep(good, ["loss.lambda_rec=0.5"])
    with pytest.raises(
        UserError, match=r"sweep file .*missing\.yaml' not found; pass one of tune_configs/sweep_\*\.yaml"
    ):
        S.load_sweep(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="is a training config"):
        S.load_sweep(ROOT / BASE)


def test_optuna_is_optional(tmp_path):
    sweep = S.load_sweep(write(tmp_path, GOOD + "search: optuna\n"))
    try:
        import optuna  # noqa: F401
    except ImportError:  # the usual case here: a clear way out
        from ce_ray.tune.runner import make_search

        with pytest.raises(UserError, match="pip install optuna"):
            make_search(sweep, 2)
    with pytest.raises(UserError, match="optuna cannot take grid"):
        S.load_sweep(
            write(tmp_path, "search_space:\n  optim.lr_g: {grid: [0.1, 0.2]}\nnum_samples: 2\nsearch: optuna\n")
        )


def test_concurrency_fits_the_cluster_or_says_what_to_change(tmp_path):
    from ce_ray.data.stream import DATA_TASK_CPUS

    p = write(tmp_path, GOOD + "max_concurrent_trials: 4\n")
    sweep = S.load_sweep(p, ["scale.num_workers=2", "scale.cpus_per_worker=0.25"])
    need = S.TRIAL_DRIVER_CPU + 2 * 0.25
    assert S.per_trial_cpus(sweep.config) == pytest.approx(need)
    fit = int((2.0 - DATA_TASK_CPUS) / need)  # Ray Data keeps its share free
    with pytest.raises(
        UserError, match=rf"max_concurrent_trials=4 does not fit this 2-CPU cluster.*set max_concurrent_trials={fit}"
    ):
        S.plan_concurrency(sweep, cluster_cpus=2.0)
    assert S.plan_concurrency(sweep, cluster_cpus=DATA_TASK_CPUS + 5 * need) == 3  # capped by the 3 trials there are
    auto = S.load_sweep(write(tmp_path, GOOD), ["scale.num_workers=2", "scale.cpus_per_worker=0.25"])
    assert S.plan_concurrency(auto, cluster_cpus=DATA_TASK_CPUS + 2 * need + 0.001) == 2
    with pytest.raises(UserError, match=r"not even one trial fits.*scale\.cpus_per_worker="):
        S.plan_concurrency(auto, cluster_cpus=DATA_TASK_CPUS + need / 2)
    gpu = S.load_sweep(write(tmp_path, GOOD), ["scale.use_gpu=true", "scale.num_workers=1"])
    assert S.plan_concurrency(gpu, cluster_cpus=64, cluster_gpus=2) == 2
    with pytest.raises(UserError, match="not even one trial fits.*0 GPUs"):
        S.plan_concurrency(gpu, cluster_cpus=64, cluster_gpus=0)


def _ledger(tid: str, status: str, value: float | None, **params) -> S.TrialLedger:
    best = None if value is None else S.Evaluation(step=6, value=value, checkpoint=f"/x/{tid}")
    return S.TrialLedger(
        trial_id=tid,
        run_name=f"s-{tid}",
        params=params,
        steps=6,
        starts=1,
        status=status,
        last_step=6,
        reports=4,
        best=best,
        checkpoints=[best] if best else [],
    )


def test_ranking_csv_and_table(tmp_path):
    ledgers = [
        _ledger("a", "completed", 0.2, **{"optim.lr_g": 1e-3}),
        _ledger("b", "stopped_early", 0.1, **{"optim.lr_g": 1e-2}),
        _ledger("c", "error", None, **{"optim.lr_g": 1e-1}),
        _ledger("d", "completed", math.nan, **{"optim.lr_g": 1e-4}),
    ]
    for t in ledgers:
        S.write_ledger(tmp_path, t)
    assert S.read_ledger(tmp_path, "b") == ledgers[1]  # one writer, one reader: the record round-trips
    rows = S.write_ranking(tmp_path, "val_l2", "min", ["optim.lr_g"])
    assert [r["trial_id"] for r in rows] == ["b", "a", "c", "d"]  # no or non-finite metric: last
    with open(tmp_path / S.RANKING_FILE) as f:
        got = list(csv.DictReader(f))
    assert (
        [r["rank"] for r in got] == ["1", "2", "3", "4"]
        and got[0]["status"] == "stopped_early"
        and got[0]["optim.lr_g"] == "0.01"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic write leaves no temp file
    table = S.format_table(rows, S.columns_for("val_l2", ["optim.lr_g"]))
    assert table.splitlines()[0].split()[:4] == ["rank", "trial_id", "status", "val_l2"] and "/x/b" not in table
    assert [t.trial_id for t in S.rank(ledgers, "val_psnr", "max")] == ["a", "b", "c", "d"]


def test_run_sweep_refuses_before_starting_ray(tmp_path):
    from ce_ray.tune.runner import run_sweep

    p = write(tmp_path, GOOD)
    args = [f"scale.storage_path={tmp_path / 'ray'}", f"train.output_dir={tmp_path / 'out'}"]
    with pytest.raises(UserError, match="no train shards"):  # before any trial starts its workers
        run_sweep(S.load_sweep(p, args + [f"data.shards={tmp_path / 'none'}"]))
    sweep = S.load_sweep(p, args)
    with pytest.raises(UserError, match="nothing to resume: no sweep 't'"):
        run_sweep(sweep, resume=True)
    write_atomic(sweep.directory / S.STATE_FILE, json.dumps({"sweep": sweep.to_dict()}))
    with pytest.raises(UserError, match="already exists.*--resume.*--name NEW"):
        run_sweep(sweep)
    changed = S.load_sweep(p, args + ["num_samples=7"])
    with pytest.raises(UserError, match=r"changed since it started \(num_samples differ\)"):
        run_sweep(changed, resume=True)


def test_interruption_is_counted_from_the_ledgers(tmp_path):
    # On Ctrl-C Tune marks trials whose actors were still starting TERMINATED in the objects it
    # returns (its saved state keeps them PENDING), so the sweep counts unfinished trials from
    # its own ledgers: trials that never started have none, cut ones are still "running".
    from ce_ray.tune.runner import unfinished_trials

    for t in [_ledger("a", "completed", 0.2), _ledger("b", "stopped_early", 0.1), _ledger("c", "running", None)]:
        S.write_ledger(tmp_path, t)
    assert unfinished_trials(tmp_path, 4) == 2  # c was cut, the fourth never started
    S.write_ledger(tmp_path, _ledger("c", "error", None))
    S.write_ledger(tmp_path, _ledger("d", "completed", 0.3))
    assert unfinished_trials(tmp_path, 4) == 0
