"""Helper for tests/test_train.py::test_multinode_two_workers_on_two_nodes (not collected by pytest).

    python tests/multinode_run.py SHARDS WORKDIR PROBE_DIR

Starts a two-node ray.cluster_utils.Cluster on this machine (2 logical CPUs per node, its own temp dir and
ports, dashboard on 127.0.0.1), trains the smoke config with 2 workers placed STRICT_SPREAD (one
per node), prints one JSON line, and shuts its cluster down. The workers write probe files (node
id, generator digests: tests/probes.py) for the test to compare.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ce_ray import cluster  # noqa: E402

cluster.set_env_defaults()
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import probes  # noqa: E402  (tests/, this script's folder)
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from ce_ray import config as C  # noqa: E402
from ce_ray.train import driver as T  # noqa: E402


def main(shards: str, workdir: str, probe_dir: str) -> None:
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="cemn", dir="/tmp")
    # The cluster's processes inherit RAY_ADDRESS naming its own GCS: Train's placement-group
    # cleaner looks the cluster up without an address, which is ambiguous with the other Ray
    # clusters on this machine (see cluster.own_cluster_address).
    gcs_port, dash_port, agent_head, agent_worker = cluster.free_ports(
        4
    )  # below the ephemeral range (cluster.PORT_RANGE)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    # 2 logical CPUs per node (on a 2-core machine: oversubscribed, which is fine for a test):
    # a 0.5-CPU Train worker plus Ray Data's 1-CPU decode tasks (data.DATA_TASK_CPUS) must fit on
    # one node; with 1 CPU per node no node could ever start a decode task and training would hang.
    node = {"num_cpus": 2, "dashboard_agent_listen_port": agent_head}
    nodes = Cluster(
        initialize_head=True,
        head_node_args={
            **node,
            "gcs_server_port": gcs_port,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dash_port,
            "temp_dir": temp_dir,
        },
    )
    try:
        nodes.add_node(**{**node, "dashboard_agent_listen_port": agent_worker})
        nodes.wait_for_nodes()
        cluster.connect_ray(nodes.address)
        cluster.quiet_data_context()
        cfg = C.load(
            ROOT / "tune_configs" / "smoke.yaml",
            [
                f"data.shards={shards}",
                f"train.output_dir={workdir}/out",
                f"scale.storage_path={workdir}/runs",
                "scale.num_workers=2",
                "scale.cpus_per_worker=0.5",
                "mlflow.enabled=false",
            ],
        )
        summary = T.train(
            cfg,
            run_name="multinode",
            placement_strategy="STRICT_SPREAD",
            hook=probes.ProbeHook(probe_dir),
            log=lambda line: print(line, file=sys.stderr),
        )
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"step": summary.step, "checkpoint": summary.checkpoint, "nodes": alive}))
    finally:
        ray.shutdown()
        nodes.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)  # session logs of this throwaway cluster


if __name__ == "__main__":
    main(*sys.argv[1:4])
