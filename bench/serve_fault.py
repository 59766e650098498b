"""A Serve replica killed under load: `ce-ray serve`'s app on a private local Ray cluster (127.0.0.1),
16 concurrent clients, then SIGKILL of the replica's worker process while they keep sending.

    .venv/bin/python bench/serve_fault.py                     # the shipped model, 1 replica, ~1-2 min
    .venv/bin/python bench/serve_fault.py --replicas 2 --after 30

Goal: only the requests in flight at the kill may fail (a 5xx or a closed connection, never a hang),
and requests succeed again within 30 s. Every client request has a timeout (--client-timeout), so a
hang is counted, not waited on. The replica's PID comes from Ray's State API (list_actors, class
ServeReplica:<app>:<deployment>); the kill is os.kill(pid, SIGKILL), as the OOM killer or a crash would.

Prints key=value lines:
    total, ok, failed            requests sent / answered 200 with a PNG / not
    hung                         requests that ran into the client timeout
    failed_in_flight             failures among the requests in flight at the kill
    failed_sent_after_kill       failures among the requests sent after the kill
    failed_before_kill           failures before the kill (should be 0: the baseline)
    recovery_s                   kill -> the first success of a request sent after the kill
    last_failure_after_kill_s    kill -> the last failed request's end (0 when none failed)
    failure_kinds                e.g. 500:3,closed:1
    replica_restarted            1 when /healthz answers from a new replica id afterwards
    kill_to_new_replica_s        kill -> the new replica RUNNING (Serve's view)
The clients run as threads in this process, on the same cores as the replica (a shared 2-core
machine here): the numbers are an upper bound for a dedicated host.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster

from bench.kvlines import emit_lines  # noqa: E402

APP = "ce-ray-fault"


@dataclass
class Outcome:
    start: float  # time.monotonic()
    end: float
    status: str  # "200", "500", ..., "closed" (connection dropped/refused), "timeout"


def replica_pids(app: str, deployment: str) -> list[int]:
    """PIDs of the deployment's live replica actors (Ray's State API)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,  # this cluster: others may run on the machine
        filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")],
        detail=True,
    )
    return [int(a.pid) for a in actors if a.pid]


def running_replicas(app: str, deployment: str) -> list[str]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    reps = details["applications"][app]["deployments"][deployment]["replicas"]
    return [r["replica_id"] for r in reps if r["state"] == "RUNNING"]


def crop_png(size: int = 128) -> bytes:
    from PIL import Image

    from ce_ray.data.bundled import load_bundled

    rgb = dict(load_bundled())["skimage/chelsea"][:size, :size]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model URI (default: the shipped model)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--before", type=float, default=10.0, help="seconds of load before the kill")
    ap.add_argument("--after", type=float, default=45.0, help="seconds of load after the kill")
    ap.add_argument("--client-timeout", type=float, default=60.0, help="a request longer than this is a hang")
    ap.add_argument(
        "--health-check",
        default=None,
        metavar="PERIOD,TIMEOUT",
        help="the replicas' health_check_period_s,health_check_timeout_s instead of the app's: 10,30 "
        "(Serve's defaults) measures what the app's shorter period buys",
    )
    ap.add_argument("--out", default=None, help="also append the key=value lines to this file")
    args = ap.parse_args()

    import ray
    import requests
    from ray import serve
    from urllib3.filepost import encode_multipart_formdata

    from ce_ray import cluster
    from ce_ray.infer import serve as ce_serve
    from ce_ray.infer.serve import DEPLOYMENT_NAME, build_app, parse_models

    health = (ce_serve.HEALTH_CHECK_PERIOD_S, ce_serve.HEALTH_CHECK_TIMEOUT_S)
    if args.health_check:
        health = tuple(float(x) for x in args.health_check.split(","))
        # build_app options the module's deployment: swap in one with these checks (bench only)
        ce_serve.Inpainter = ce_serve.Inpainter.options(
            health_check_period_s=health[0], health_check_timeout_s=health[1]
        )

    body, ctype = encode_multipart_formdata({"image": ("crop.png", crop_png(), "image/png")})
    # The dashboard serves the State API that finds the replica's PID; it binds 127.0.0.1.
    cluster.start_local(num_cpus=2, dashboard=True, log_level="ERROR", _temp_dir=f"/tmp/ce_ray_bench/{os.getpid()}")
    quiet = {"enable_access_log": False, "log_level": "ERROR"}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        port = cluster.free_ports(1)[0]
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
        serve.run(
            build_app(parse_models([args.model], None), replicas=args.replicas, cpus_per_replica=0.5, threads=1),
            name=APP,
            route_prefix="/",
            logging_config=quiet,
        )
        url = f"http://127.0.0.1:{port}"
        before_id = requests.get(url + "/healthz", timeout=30).json()["replica"]

        def client() -> None:
            s = requests.Session()
            while not stop.is_set():
                t = time.monotonic()
                try:
                    r = s.post(
                        url + "/v1/inpaint",
                        data=body,
                        headers={"Content-Type": ctype},
                        timeout=(5.0, args.client_timeout),
                    )
                    ok = r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
                    status = "200" if ok else str(r.status_code)
                except requests.Timeout:
                    status = "timeout"
                except requests.ConnectionError:
                    status = "closed"
                    s = requests.Session()  # a dropped keep-alive connection: start over
                with lock:
                    outcomes.append(Outcome(t, time.monotonic(), status))
                if status not in ("200", "timeout"):
                    time.sleep(0.05)  # a refused request comes back at once: do not spin

        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for th in threads:
            th.start()
        time.sleep(args.before)
        pids = replica_pids(APP, DEPLOYMENT_NAME)
        if not pids:
            raise SystemExit("no live replica found through the State API")
        victim, old_ids = pids[0], set(running_replicas(APP, DEPLOYMENT_NAME))
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        new_replica_s = float("nan")
        end = t_kill + args.after
        while time.monotonic() < end:
            if new_replica_s != new_replica_s and set(running_replicas(APP, DEPLOYMENT_NAME)) - old_ids:
                new_replica_s = time.monotonic() - t_kill  # nan until Serve reports a replacement RUNNING
            time.sleep(0.25)
        stop.set()
        for th in threads:
            th.join(args.client_timeout + 10)
        after_id = requests.get(url + "/healthz", timeout=30).json()["replica"]
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()

    failed = [o for o in outcomes if o.status != "200"]
    in_flight = [o for o in outcomes if o.start < t_kill <= o.end]
    sent_after = sorted((o for o in outcomes if o.start >= t_kill), key=lambda o: o.start)
    first_ok = min((o.end for o in sent_after if o.status == "200"), default=float("nan"))
    fail_ends = [o.end for o in failed if o.end >= t_kill]
    lines = [
        f"clients={args.clients}",
        f"replicas={args.replicas}",
        f"total={len(outcomes)}",
        f"ok={len(outcomes) - len(failed)}",
        f"failed={len(failed)}",
        f"hung={sum(o.status == 'timeout' for o in outcomes)}",
        f"failed_in_flight={sum(o.status != '200' for o in in_flight)}",
        f"in_flight_at_kill={len(in_flight)}",
        f"failed_sent_after_kill={sum(o.status != '200' for o in sent_after)}",
        f"failed_before_kill={sum(o.status != '200' and o.end < t_kill for o in outcomes)}",
        f"recovery_s={first_ok - t_kill:.2f}",
        f"last_failure_after_kill_s={(max(fail_ends) - t_kill) if fail_ends else 0.0:.2f}",
        f"failure_kinds={','.join(f'{k}:{v}' for k, v in sorted(Counter(o.status for o in failed).items())) or 'none'}",
        f"replica_restarted={int(after_id != before_id)}",
        f"kill_to_new_replica_s={new_replica_s:.2f}",
        f"client_timeout_s={args.client_timeout:g}",
        f"health_check_period_s={health[0]:g}",
        f"health_check_timeout_s={health[1]:g}",
    ]
    emit_lines(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
