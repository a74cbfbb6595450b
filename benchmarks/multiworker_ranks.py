#!/usr/bin/env python
"""Per-rank ``save()`` time of a 2-rank torch.distributed (gloo) job, two pitstop source trees
alternately in one run: how long each rank waits, not only the slowest one.

Runs the workers of ``benchmarks/multiworker.py`` (same state: ``--mb`` MiB of float32 in
16 arrays, changed before every save; ``max_to_keep=2``, so every timed save also deletes a
checkpoint). Compare a tree before a change with this one, e.g.::

    git archive <old-commit> src | tar -x -C /tmp/before
    .venv/bin/python benchmarks/multiworker_ranks.py --before-src /tmp/before/src
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
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(src: str, mb: int, saves: int, warmup: int) -> list[list[float]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=src)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for r in range(2):
            cmd = [sys.executable, str(HERE / "multiworker.py"), "--worker", "--port", str(port), "--rank", str(r),
                   "--world", "2", "--dir", os.path.join(tmp, "ck"), "--out", os.path.join(tmp, f"{r}.json"),
                   "--mb", str(mb), "--saves", str(saves), "--warmup", str(warmup)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"a worker failed with exit status {p.returncode}")
        return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-src", required=True, help="the src/ directory of the tree to compare with")
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--saves", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    srcs = {"before": args.before_src, "after": str(HERE.parent / "src")}
    times: dict[str, list[list[float]]] = {k: [[], []] for k in srcs}
    for _ in range(args.rounds):
        for name, src in srcs.items():
            for rank, ts in enumerate(run(src, args.mb, args.saves, args.warmup)):
                times[name][rank] += ts
    for rank in range(2):
        b, a = statistics.median(times["before"][rank]), statistics.median(times["after"][rank])
        print(f"rank {rank}: median save() before {b * 1e3:.1f} ms, after {a * 1e3:.1f} ms: {a / b:.2f}x "
              f"({len(times['after'][rank])} saves each)")  # fmt: skip


if __name__ == "__main__":
    main()
