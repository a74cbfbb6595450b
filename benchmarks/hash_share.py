#!/usr/bin/env python
"""How much of writing one large piece is its hash: xxh3-128 of a 64 MiB chunk vs its
durable local write, in one run. It decides whether overlapping the hash of a large piece
with its upload is worth doing (the object is named by the hash, so the upload cannot
start before it, except by writing under a temporary name and renaming: no rename on S3)::

    .venv/bin/python benchmarks/hash_share.py [--dir /path/on/the/disk/to/test]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import xxhash

from pitstop._engine._writer import CHUNK_BYTES
from pitstop._storage import _durable as _commit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="directory to write in (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    view = memoryview(np.random.default_rng(0).random(CHUNK_BYTES // 8).view(np.uint8))
    d = tempfile.mkdtemp(dir=args.dir, prefix="pitstop-hashbench-")
    hashes, writes = [], []
    try:
        for i in range(args.repeat):
            t0 = time.perf_counter()
            xxhash.xxh3_128_hexdigest(view)
            hashes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _commit.durable_write(d, f"o{i}", [view])
            writes.append(time.perf_counter() - t0)
            os.unlink(os.path.join(d, f"o{i}"))
    finally:
        os.rmdir(d)
    h, w = statistics.median(hashes), statistics.median(writes)
    mib = CHUNK_BYTES / 2**20
    s3 = 0.030 + CHUNK_BYTES / 200e6  # one PUT: ~30 ms latency, ~200 MB/s
    print(f"{mib:.0f} MiB chunk: hash {h * 1e3:.1f} ms ({mib / 1024 / h:.1f} GiB/s), durable write {w * 1e3:.1f} ms")
    print(f"hash share of hash + write: local {h / (h + w):.1%}; S3 at 30 ms + 200 MB/s per PUT {h / (h + s3):.1%}")


if __name__ == "__main__":
    main()
