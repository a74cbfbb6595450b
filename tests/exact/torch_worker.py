"""A PyTorch training loop made resumable by a CheckpointManager (run and SIGKILLed by the
exact-resume harness; protocol in harness.py).

An MLP with dropout and input noise from torch's global RNG, random per-example
augmentation seeded by the sampler (so it does not depend on which DataLoader worker
loads an example), a shuffled ``pitstop.data.DataOrderSampler`` feeding a DataLoader with
two prefetching workers, Adam with a StepLR schedule, async saves every ``--save-every``
steps.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import pitstop
from pitstop.data import DataOrder, DataOrderSampler

NUM_EXAMPLES = 100
BATCH_SIZE = 16  # 7 batches per epoch, the last one holds 4 examples


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Examples scaled by a random factor and randomly sign-flipped, from the example's seed."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.x = torch.from_numpy(rng.random((NUM_EXAMPLES, 8), dtype=np.float32))
        self.y = (self.x[:, :4].sum(dim=1) > self.x[:, 4:].sum(dim=1)).long()

    def __len__(self) -> int:
        return NUM_EXAMPLES

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = item
        gen = torch.Generator().manual_seed(seed)
        scale = 0.9 + 0.2 * torch.rand(8, generator=gen)
        sign = 1.0 if torch.rand((), generator=gen) < 0.5 else -1.0
        return self.x[index] * scale * sign, self.y[index]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--losses", required=True)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-capture-rng", action="store_true", help="the harness's negative control")
    args = parser.parse_args()
    os.makedirs(args.directory, exist_ok=True)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)

    order = DataOrder(NUM_EXAMPLES, seed=13)
    sampler = DataOrderSampler(order, batch_size=BATCH_SIZE, with_seeds=True)
    extra = {"prefetch_factor": 2, "multiprocessing_context": "fork"} if args.workers else {}
    loader = DataLoader(
        Augmented(), batch_sampler=sampler, num_workers=args.workers, generator=torch.Generator(), **extra
    )
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.25), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)

    state = {"model": model, "optimizer": opt, "schedule": sched, "data": sampler}
    mgr = pitstop.CheckpointManager(
        os.path.join(args.directory, "ckpt"),
        max_to_keep=2,
        save_interval_steps=args.save_every,
        async_save=True,
        capture_rng=not args.no_capture_rng,
    )
    step = mgr.restore_or_initialize(state)
    print(f"restored {step}" if step else "fresh", flush=True)
    model.train()
    with open(args.losses, "a") as losses:
        while step < args.steps:
            for xb, yb in loader:  # the rest of the current epoch, from the restored position
                xb = xb + 0.05 * torch.randn_like(xb)
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                sampler.advance()
                step += 1
                losses.write(f"{step} {loss.item()!r}\n")
                losses.flush()
                print(f"step {step}", flush=True)  # one write: a kill cannot cut it
                if mgr.save(step, state):
                    print(f"save-start {step}", flush=True)
                if step == args.steps:
                    break
    mgr.close()
    np.savez(os.path.join(args.directory, "final.npz"), **{k: v.numpy() for k, v in model.state_dict().items()})
    print("done", flush=True)


if __name__ == "__main__":
    main()
