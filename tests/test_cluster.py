"""cluster/: the cluster-launcher YAML against Ray's own schema, and the KubeRay manifests'
structure (GPU workers, pinned Ray version, loopback unless explained, entrypoints that load);
ce_ray/cluster.py: the port picker, the address pin and the quieting helpers (no Ray started)."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ce_ray import cluster
from ce_ray import config as C

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def train_overrides(command: str) -> tuple[str, list[str]]:
    """(--config, overrides) of a `python -m ce_ray.cli train ...` command line."""
    words = shlex.split(command)
    i = words.index("train")
    args = words[i + 1 :]
    cfg_path = args[args.index("--config") + 1]
    overrides = [w for w in args if "=" in w and not w.startswith("--")]
    return cfg_path, overrides


def test_launcher_yaml_validates_against_rays_schema():
    conf = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(conf, json.loads(RAY_SCHEMA.read_text()))  # Ray's own schema, as shipped


def test_launcher_yaml_passes_ray_up_checks():
    # What `ray up` does before launching anything: merge provider defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    conf = prepare_config(copy.deepcopy(yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())))
    validate_config(conf)
    assert conf["head_node_type"] == "head"
    assert conf["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("g")


def test_launcher_yaml_binds_the_dashboard_to_loopback():
    conf = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    head = " ".join(conf["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "--disable-usage-stats" in head


def test_launcher_yaml_rejects_what_the_schema_forbids():
    # The validation above is real: a typo'd key fails it.
    conf = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    conf["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(conf, json.loads(RAY_SCHEMA.read_text()))


def _pods(spec: dict) -> list[tuple[dict, dict]]:
    """(group, container) for the head and every worker group of a RayCluster spec."""
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name,kind", [("kuberay-raycluster.yaml", "RayCluster"), ("kuberay-rayjob.yaml", "RayJob")])
def test_kuberay_manifests_run_gpu_workers_on_the_pinned_ray(name, kind):
    docs = load_all(name)
    main = next(d for d in docs if d["kind"] == kind)
    assert main["apiVersion"] == "ray.io/v1"
    spec = main["spec"] if kind == "RayCluster" else main["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    workers = spec["workerGroupSpecs"]
    assert workers and all(
        c["resources"]["limits"]["nvidia.com/gpu"] == "1" for g in workers for c in g["template"]["spec"]["containers"]
    )
    images = {c["image"] for _, c in _pods(spec)}
    assert len(images) == 1  # head and workers run the same code
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    # Dashboard off loopback only where KubeRay needs it, with the reason written next to it.
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "operator" in (CLUSTER / name).read_text().split("dashboard-host")[1].splitlines()[0]
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_raycluster_shares_storage_and_limits_ingress():
    docs = {d["kind"]: d for d in load_all("kuberay-raycluster.yaml")}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for _, c in _pods(docs["RayCluster"]["spec"]):
        assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/cluster": docs["RayCluster"]["metadata"]["name"]}
    assert policy["policyTypes"] == ["Ingress"]


def test_entrypoints_in_cluster_files_are_valid_train_commands():
    job = next(d for d in load_all("kuberay-rayjob.yaml") if d["kind"] == "RayJob")
    commands = [job["spec"]["entrypoint"]]
    readme = (CLUSTER / "README.md").read_text()
    # Every `ce_ray.cli train` command in the README (backslash-continued lines joined).
    joined = readme.replace("\\\n", " ")
    commands += [
        line[line.index("python -m ce_ray.cli") :]
        for line in joined.splitlines()
        if "python -m ce_ray.cli train" in line
    ]
    assert len(commands) >= 4
    for cmd in commands:
        cfg_path, overrides = train_overrides(cmd.replace("$PWD", "/abs").replace("<head private IP>", "10.0.0.1"))
        cfg = C.load(ROOT / cfg_path, overrides)  # keys, types and values are all valid
        if cfg.scale.use_gpu:
            assert cfg.scale.gpus_per_worker == 1 and cfg.train.precision == "bf16"


# --- ce_ray/cluster.py -----------------------------------------------------------------------------


def test_gcs_port_is_free_and_below_the_ephemeral_range():
    import socket

    ports = cluster.free_ports(7)
    assert len(set(ports)) == 7
    assert all(
        cluster.PORT_RANGE[0] <= p < cluster.PORT_RANGE[1] < 32768 for p in ports
    )  # the kernel never hands them out for outgoing connections
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # still free: nothing kept it


def test_own_cluster_address_names_the_pinned_port_only_inside_the_block(monkeypatch):
    import os

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    with cluster.own_cluster_address() as port:
        assert os.environ["RAY_ADDRESS"] == f"127.0.0.1:{port}" and os.environ["RAY_GCS_SERVER_PORT"] == str(port)
    assert "RAY_ADDRESS" not in os.environ and "RAY_GCS_SERVER_PORT" not in os.environ  # no stale address left behind


def test_env_defaults_keep_what_the_user_set(monkeypatch):
    import os

    for k in cluster.RAY_ENV_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    cluster.set_env_defaults()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1"
    assert (
        os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0" and os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    )


def test_quiet_data_context_turns_bars_and_banners_off(monkeypatch):
    from types import SimpleNamespace

    fresh = lambda: SimpleNamespace(enable_progress_bars=True, use_ray_tqdm=True, print_on_execution_start=True)  # noqa: E731
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    ctx = fresh()
    cluster.quiet_data_context(ctx, progress_to_logs=True)  # no WARNING console handler: bars off
    assert (ctx.enable_progress_bars, ctx.use_ray_tqdm, ctx.print_on_execution_start) == (False, True, False)
    monkeypatch.setenv("RAY_DATA_LOGGING_CONFIG", "/x.yaml")
    ctx = fresh()
    cluster.quiet_data_context(ctx, progress_to_logs=True)  # progress as INFO lines: into the log files only
    assert (ctx.enable_progress_bars, ctx.use_ray_tqdm, ctx.print_on_execution_start) == (True, False, False)
    ctx = fresh()
    cluster.quiet_data_context(ctx)
    assert (ctx.enable_progress_bars, ctx.print_on_execution_start) == (False, False)
