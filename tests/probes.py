"""A test-side train.WorkerHook: every Ray Train worker writes probe files that the fault-injection
and multi-node tests read (not collected by pytest).

    <probe_dir>/start-<pid>.json              pid, rank, Ray node id, the step it restored (or null),
                                              the folder it restored and a digest of the restored generator
    <probe_dir>/end-rank<r>-<pid>.json        pid, rank, node, last step, generator digests

`g_params` (SHA-256 of the generator's trainable parameters) is equal on every DDP rank after every
step; `g_state` also covers buffers, whose BatchNorm running statistics differ between ranks unless
model.sync_bn is on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def probes(probe_dir: Path, kind: str) -> list[dict]:
    """The probe records of one kind ("start" or "end"), in file name order."""
    return [json.loads(p.read_text()) for p in sorted(Path(probe_dir).glob(f"{kind}-*.json"))]


def _digest(items) -> str:
    h = hashlib.sha256()
    for k, v in items:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_digest(state: dict) -> str:
    """SHA-256 of a state dict's tensors in order (a checkpoint's G, as loaded)."""
    return _digest(state.items())


class ProbeHook:
    """Pass as train.train(..., hook=ProbeHook(dir)). Pickled by value into the workers: this
    module is not importable there (tests/ is not on their sys.path)."""

    def __init__(self, probe_dir: str | os.PathLike):
        self.probe_dir = str(probe_dir)
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def _write(self, name: str, record: dict) -> None:
        from ce_ray.fsutil import write_atomic

        write_atomic(Path(self.probe_dir) / name, json.dumps(record))  # readers never see half a file

    def _where(self, rank: int) -> dict:
        import ray

        return {"pid": os.getpid(), "rank": rank, "ray_node_id": ray.get_runtime_context().get_node_id()}

    def started(self, rank: int, restored) -> None:
        self._write(
            f"start-{os.getpid()}.json",
            {
                **self._where(rank),
                "restored_step": restored.step if restored is not None else None,
                "restored_from": str(restored.path) if restored is not None else None,
                "g_restored": state_digest(restored.G) if restored is not None else None,
            },
        )

    def finished(self, rank: int, step: int, models: list) -> None:
        from ce_ray.core.model import Generator

        G = next((m for m in models if isinstance(m, Generator)), None)
        self._write(
            f"end-rank{rank}-{os.getpid()}.json",
            {
                **self._where(rank),
                "step": step,
                "g_params": _digest(G.named_parameters()) if G is not None else None,
                "g_state": _digest(G.state_dict().items()) if G is not None else None,
            },
        )


class KillRank0InCheckpointWrite(ProbeHook):
    """ProbeHook that also makes rank 0 of the first worker group SIGKILL itself inside the write
    of step `step`'s checkpoint into the run folder, after its first file (the fault-injection
    switch checkpoint.FAULT_INJECTION_KILL_ENV, set in that one process only). The restarted group
    restores a checkpoint, so it never sets it."""

    def __init__(self, probe_dir: str | os.PathLike, step: int):
        super().__init__(probe_dir)
        self.step = step

    def started(self, rank: int, restored) -> None:
        super().started(rank, restored)
        from ce_ray.train import checkpoint

        if rank == 0 and restored is None:
            os.environ[checkpoint.FAULT_INJECTION_KILL_ENV] = str(self.step)
