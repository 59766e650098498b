"""How long rank 0's MLflow write holds a training step while the tracking server is away.

    python bench/mlflow_outage.py [--out PATH]

Three servers that are not there: a closed port (connection refused), a port that accepts
connections but never answers (a hung server), and, for comparison, MLflow's own client with its
default retries against the closed port (given up on after --default-cap-s). Prints key=value lines.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kvlines import emit_lines  # noqa: E402
from ce_ray.tracking import RunHandle  # noqa: E402
from ce_ray.train.mlflow_run import MlflowTracker  # noqa: E402


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--default-cap-s", type=float, default=30.0)
    args = ap.parse_args()
    lines = []
    with socket.socket() as s:  # a free port, closed again: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    hung = socket.socket()  # listens (the kernel completes the handshake) but never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    quiet = lambda m: None  # noqa: E731
    for name, port in (("refused", closed), ("hung", hung.getsockname()[1])):
        t = MlflowTracker(RunHandle(f"http://127.0.0.1:{port}", "0", "r", "/runs/r"), log=quiet)
        first = _timed(lambda t=t: t.log_metrics({"loss": 1.0}, 1))
        later = _timed(lambda t=t: t.log_metrics({"loss": 1.0}, 2))  # within RETRY_AFTER_S: kept, not tried
        lines += [f"mlflow_{name}_first_write_s={first:.3f}", f"mlflow_{name}_next_write_s={later:.6f}"]
    hung.close()

    from mlflow.tracking import MlflowClient

    from ce_ray.tracking import _metrics

    done = threading.Event()

    def default_client() -> None:
        try:
            MlflowClient(f"http://127.0.0.1:{closed}").log_batch("r", metrics=_metrics({"loss": 1.0}, 1))
        except Exception:
            pass
        done.set()

    t0 = time.perf_counter()
    threading.Thread(target=default_client, daemon=True).start()
    finished = done.wait(args.default_cap_s)
    took = time.perf_counter() - t0
    lines.append(f"mlflow_default_client_refused_write_s={'' if finished else '>'}{took:.1f}")
    emit_lines(lines, args.out)


if __name__ == "__main__":
    main()
