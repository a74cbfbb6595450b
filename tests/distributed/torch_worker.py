"""One rank of a torch.distributed (gloo) training job that checkpoints with pitstop.

Run by tests/distributed/test_torch.py as separate processes:
    python torch_worker.py MODE DIR PORT RANK WORLD OUT
MODE: train (3 steps, save each), restore, preempt (train until SIGTERM), crash (rank 1
dies inside the save of step 2). Prints JSON lines the test reads.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import pitstop
from pitstop import _distributed
from pitstop.distributed import PerRank, TorchCoordinator


def main() -> None:
    mode, directory, port, rank, world, out = sys.argv[1:7]
    rank_i, world_i = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_i, world_size=world_i)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}  # share memory
    local = {"seen": np.zeros(1, np.int64), "seed": 1000 + rank_i}
    state: dict[str, object] = {"model": params, "step": 0}
    if mode != "restore1":
        state["local"] = PerRank(local)
    coord = TorchCoordinator()
    signals = ("SIGTERM",) if mode == "preempt" else ()
    interval = 1000 if mode == "preempt" else 1
    mgr = pitstop.CheckpointManager(
        directory, coordinator=coord, max_to_keep=None, preemption_signals=signals, save_interval_steps=interval
    )
    g = torch.Generator().manual_seed(rank_i)

    def train_step(step: int) -> None:
        x = torch.randn(16, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= world_i
        opt.step()
        local["seen"] += 16
        state["step"] = step

    def report(**kw: object) -> None:
        with open(out, "a") as f:
            f.write(json.dumps(kw) + "\n")

    if mode in ("restore", "restore1"):
        step, _ = mgr.restore(state)
        seen = None if mode == "restore1" else {"seen": int(local["seen"][0]), "seed": local["seed"]}
        report(step=step, weights={k: v.tolist() for k, v in params.items()}, local=seen)
        mgr.close()
        return
    if mode == "crash" and rank_i == 1:
        real = _distributed.write_part

        def dying(*args: object, **kw: object) -> object:
            if kw.get("step") == 2:
                os._exit(17)
            return real(*args, **kw)  # type: ignore[arg-type]

        _distributed.write_part = dying  # type: ignore[assignment]
    start = mgr.restore_or_initialize(state)
    total = 3 if mode in ("train", "crash") else 100_000
    try:
        for step in range(start + 1, total + 1):
            train_step(step)
            if mode == "preempt" and step == 3:
                report(ready=True)
            if mode == "preempt":
                time.sleep(0.01)
            mgr.save(step, state, metrics={"loss": float(step)})
    except pitstop.CheckpointError as exc:
        report(error=str(exc), type=type(exc).__name__)
        raise SystemExit(3) from None
    except SystemExit:
        report(preempted=True, step=state["step"], latest=mgr.latest_step())
        raise
    report(done=True, weights={k: v.tolist() for k, v in params.items()}, seen=int(local["seen"][0]))
    mgr.close()


if __name__ == "__main__":
    main()
