#!/usr/bin/env python
"""Save/restore throughput to a local SeaweedFS (S3) vs. a plain s3fs upload/download of the same bytes.

Starts its own ``weed mini`` on 127.0.0.1 (tests/s3/seaweed.py: every port pinned to a
free one, data in a scratch directory removed at the end), then, in the same run:

- pitstop: ``CheckpointManager(s3://...).save`` (sync, a fresh directory each time, so
  nothing is deduplicated) and ``restore`` in place into the existing arrays;
- baseline: s3fs ``pipe_file`` of each array's bytes (one object per array, uploaded on
  the same number of threads) and ``cat_file`` back into the arrays.

The two sides run alternately (baseline, pitstop, pitstop, baseline, ...) so that load from
other processes hits both alike. Prints medians and the ratio pitstop / baseline (1.0 = as
fast as a plain s3fs copy).
Run from the repository root::

    .venv/bin/python benchmarks/s3.py                 # 512 MiB in 8 arrays, 4 repeats
    .venv/bin/python benchmarks/s3.py --mib 128 --arrays 4 --repeat 2
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3.seaweed
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tests.s3.seaweed import SeaweedFS

import pitstop

_REQUESTS: collections.Counter[str] = collections.Counter()


def _count_requests() -> None:
    """Count every S3 API call (all of s3fs's calls end in ``AioBaseClient._make_api_call``)."""
    from aiobotocore.client import AioBaseClient

    original = AioBaseClient._make_api_call

    async def counted(self: Any, operation_name: str, api_params: Any) -> Any:
        _REQUESTS[operation_name] += 1
        return await original(self, operation_name, api_params)

    AioBaseClient._make_api_call = counted  # type: ignore[method-assign]


def _requests_of(fn: Any) -> str:
    _REQUESTS.clear()
    fn()
    return ", ".join(f"{n} {k}" for k, n in _REQUESTS.most_common())


def _interleaved(base: Any, ours: Any, repeat: int) -> tuple[float, float]:
    """Median seconds of ``base`` and ``ours``, run alternately (ABBA...) so that load from
    other processes on a shared host hits both sides alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(repeat):
        order = ((0, base), (1, ours)) if r % 2 == 0 else ((1, ours), (0, base))
        for side, fn in order:
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="total state size in MiB")
    ap.add_argument("--arrays", type=int, default=8, help="number of equal float32 arrays")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--threads", type=int, default=8, help="IO threads for pitstop and for the baseline")
    args = ap.parse_args()

    import s3fs

    _count_requests()
    scratch = Path(tempfile.mkdtemp(prefix="pitstop-s3-bench-"))
    server = SeaweedFS(scratch)
    try:
        server.start()
        server.make_bucket("bench")
        fs = s3fs.S3FileSystem(**server.options, skip_instance_cache=True, use_listings_cache=False)
        n = (args.mib << 20) // 4 // args.arrays
        rng = np.random.default_rng(0)
        state = {f"a{i}": rng.standard_normal(n, dtype=np.float32) for i in range(args.arrays)}
        total = sum(a.nbytes for a in state.values())
        pool = ThreadPoolExecutor(args.threads)

        def plain_upload() -> str:
            prefix = f"bench/plain-{uuid.uuid4().hex[:8]}"
            list(pool.map(lambda kv: fs.pipe_file(f"{prefix}/{kv[0]}", kv[1].tobytes()), state.items()))
            return prefix

        last_plain = [plain_upload()]

        def plain_save() -> None:
            last_plain[0] = plain_upload()

        def plain_restore() -> None:
            def get(kv: tuple[str, np.ndarray[Any, Any]]) -> None:
                kv[1].reshape(-1).view(np.uint8)[:] = np.frombuffer(fs.cat_file(f"{last_plain[0]}/{kv[0]}"), np.uint8)

            list(pool.map(get, state.items()))

        urls: list[str] = []

        def pitstop_save() -> None:
            url = f"s3://bench/pitstop-{uuid.uuid4().hex[:8]}"
            with pitstop.CheckpointManager(
                url, storage_options=server.options, async_save=False, capture_rng=False, io_threads=args.threads
            ) as mgr:
                mgr.save(1, state)
            urls.append(url)

        pitstop_save()  # warm-up: connection pool, imports

        def pitstop_restore() -> None:
            with pitstop.CheckpointManager(
                urls[-1], storage_options=server.options, capture_rng=False, io_threads=args.threads
            ) as mgr:
                mgr.restore(state)

        rows = []
        for name, ours, base in (
            ("save", pitstop_save, plain_save),
            ("restore", pitstop_restore, plain_restore),
        ):
            b, p = _interleaved(base, ours, args.repeat)
            rows.append((name, p, b))
        requests = [(name, _requests_of(ours), _requests_of(base)) for name, ours, base in (
            ("save", pitstop_save, plain_save), ("restore", pitstop_restore, plain_restore))]  # fmt: skip
        pool.shutdown()
        print(f"SeaweedFS {server.endpoint}, {total / 2**20:.0f} MiB in {args.arrays} arrays, "
              f"{args.threads} IO threads, median of {args.repeat}")  # fmt: skip
        print(f"{'':8} {'pitstop MB/s':>13} {'s3fs MB/s':>10} {'ratio (time)':>13}")
        for name, p, b in rows:
            print(f"{name:8} {total / p / 1e6:13.1f} {total / b / 1e6:10.1f} {p / b:13.2f}")
        print("S3 requests of one save/restore (pitstop: a fresh manager each time, lease included):")
        for name, ours, base in requests:
            print(f"  {name:8} pitstop: {ours}\n  {'':8} s3fs:    {base}")
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
