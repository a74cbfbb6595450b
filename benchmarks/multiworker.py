"""Multi-worker save time: 1 vs 2 torch.distributed (gloo) ranks on localhost, same state.

Each rank holds the same replicated state (``--mb`` MiB of float32 in 16 arrays, changed
before every save so nothing is deduplicated) plus a small PerRank value. Every save is
timed on every rank from just before ``save()`` to its return (the commit plus both
barriers); the table shows the median over ``--saves`` saves of the slowest rank, and
the ratio to one rank. ``--warmup`` saves come first and are not timed: until retention
(``max_to_keep=2``) starts deleting, every save writes into freshly allocated page cache,
which on these VMs costs 0.6-2.5 s per GiB at random (see README.md) and swamps
everything else. The 1- and 2-rank runs alternate ``--rounds`` times (load from other
processes hits both alike); the median is over all rounds. Run:

    python benchmarks/multiworker.py --mb 256 --saves 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch.distributed as dist

    import pitstop
    from pitstop.distributed import PerRank, TorchCoordinator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world)
    n = args.mb * (1 << 20) // 4 // 16
    state = {"params": [np.full(n, i, np.float32) for i in range(16)], "local": PerRank(np.zeros(4))}
    mgr = pitstop.CheckpointManager(args.dir, coordinator=TorchCoordinator(), max_to_keep=2, capture_rng=False)
    times = []
    for step in range(1, args.warmup + args.saves + 1):
        for a in state["params"]:
            a += len(state["params"])  # (+1 would make array i equal the last save's array i+1: deduplicated)
        dist.barrier()
        t0 = time.perf_counter()
        mgr.save(step, state)
        if step > args.warmup:
            times.append(time.perf_counter() - t0)
    mgr.close()
    with open(args.out, "w") as f:
        json.dump(times, f)


def run(world: int, mb: int, saves: int, warmup: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            cmd = [sys.executable, __file__, "--worker", "--port", str(port), "--rank", str(rank),
                   "--world", str(world), "--dir", os.path.join(tmp, "ck"), "--out", os.path.join(tmp, f"{rank}.json"),
                   "--mb", str(mb), "--saves", str(saves), "--warmup", str(warmup)]  # fmt: skip
            procs.append(subprocess.Popen(cmd))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a worker failed with exit status {p.returncode}")
        per_rank = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
    return [max(ts) for ts in zip(*per_rank, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed saves first (page cache, connections)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating 1-rank/2-rank runs")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--port", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--world", type=int)
    ap.add_argument("--dir")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for world in (1, 2) if r % 2 == 0 else (2, 1):
            times[world] += run(world, args.mb, args.saves, args.warmup)
    rows = [(world, statistics.median(ts)) for world, ts in times.items()]
    base = rows[0][1]
    print(f"multi-worker save, {args.mb} MiB replicated state, median of {args.rounds} x {args.saves} saves "
          f"after {args.warmup} warm-up saves (slowest rank)")  # fmt: skip
    print(f"{'ranks':>5} {'save s':>8} {'GB/s':>6} {'vs 1 rank':>9}")
    for world, t in rows:
        print(f"{world:>5} {t:8.3f} {args.mb / 1024 / t:6.2f} {t / base:8.2f}x")


if __name__ == "__main__":
    main()
