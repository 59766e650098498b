"""cluster/: the cluster-launcher YAML against Ray's own schema, and the KubeRay manifests'
structure (GPU workers, pinned Ray version, loopback unless explained, entrypoints that load)."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

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
    args = words[i + 1:]
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
        c["resources"]["limits"]["nvidia.com/gpu"] == "1" for g in workers for c in g["template"]["spec"]["containers"])
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
    commands += [line[line.index("python -m ce_ray.cli"):] for line in joined.splitlines() if "python -m ce_ray.cli train" in line]
    assert len(commands) >= 4
    for cmd in commands:
        cfg_path, overrides = train_overrides(cmd.replace("$PWD", "/abs").replace("<head private IP>", "10.0.0.1"))
        cfg = C.load(ROOT / cfg_path, overrides)  # keys, types and values are all valid
        if cfg.scale.use_gpu:
            assert cfg.scale.gpus_per_worker == 1 and cfg.train.precision == "bf16"
