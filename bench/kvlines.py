"""The benchmarks' output: key=value lines to stdout and, with --out PATH, appended to that file
(bench/gpu_check.sh collects several scripts' lines into one file that way)."""

from __future__ import annotations


def emit_lines(lines: list[str], path: str | None = None) -> None:
    for line in lines:
        print(line, flush=True)
    if path and lines:
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")
