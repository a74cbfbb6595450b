"""``pitstop demo``: a small training run that can be killed at any moment and resumed.

Until the Keras demo lands (it needs the TensorFlow adapter), the demo trains a two-layer
NumPy network on a deterministic two-spirals data set with momentum SGD and dropout,
using a train/validation split and a shuffled data order from ``pitstop.data``, and
saves asynchronously every few steps with the global RNGs captured. Interrupt it (Ctrl-C
or ``kill -9``) and run it again: it resumes from the newest valid checkpoint, and at
the end compares its weights with an uninterrupted run computed in the same process.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import xxhash

from ._manager._manager import CheckpointManager

__all__ = ["main"]

BATCH = 32
SAVE_EVERY = 10
HIDDEN = 64


def spirals(n: int = 2000) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Two interleaved spirals: a classic non-linear toy problem, fully deterministic."""
    rng = np.random.default_rng(0)
    t = np.sqrt(rng.random(n // 2)) * 3 * np.pi
    arm = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (3 * np.pi)
    x = np.concatenate([arm, -arm]) + rng.normal(0, 0.02, (n, 2))
    y = np.concatenate([np.zeros(n // 2), np.ones(n // 2)]).astype(np.int64)
    return x.astype(np.float32), y


@dataclass
class Model:
    """A 2-64-2 MLP with ReLU, dropout and momentum SGD; its state is plain arrays."""

    params: dict[str, np.ndarray[Any, Any]]
    velocity: dict[str, np.ndarray[Any, Any]]

    @classmethod
    def create(cls) -> Model:
        rng = np.random.default_rng(42)
        params = {
            "w1": rng.normal(0, 1.0, (2, HIDDEN)).astype(np.float32),
            "b1": np.zeros(HIDDEN, np.float32),
            "w2": rng.normal(0, 0.2, (HIDDEN, 2)).astype(np.float32),
            "b2": np.zeros(2, np.float32),
        }
        return cls(params, {k: np.zeros_like(v) for k, v in params.items()})

    def logits(self, x: np.ndarray[Any, Any], drop: np.ndarray[Any, Any] | None = None) -> tuple[Any, Any]:
        h = np.maximum(x @ self.params["w1"] + self.params["b1"], 0)
        if drop is not None:
            h = h * drop
        return h, h @ self.params["w2"] + self.params["b2"]

    def step(self, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any], lr: float = 0.1) -> float:
        drop = (np.random.random((len(x), HIDDEN)) > 0.1).astype(np.float32) / 0.9  # global RNG
        h, z = self.logits(x, drop)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-9).mean())
        g = p
        g[np.arange(len(y)), y] -= 1
        g /= len(y)
        grads = {"w2": h.T @ g, "b2": g.sum(0)}
        gh = (g @ self.params["w2"].T) * (h > 0) * drop
        grads |= {"w1": x.T @ gh, "b1": gh.sum(0)}
        for k, v in self.params.items():
            self.velocity[k] *= 0.9
            self.velocity[k] += grads[k].astype(np.float32)
            v -= lr * self.velocity[k]
        return loss

    def accuracy(self, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> float:
        return float((self.logits(x)[1].argmax(1) == y).mean())

    def fingerprint(self) -> str:
        h = xxhash.xxh3_64()
        for k in sorted(self.params):
            h.update(self.params[k].tobytes())
        return h.hexdigest()


def train(total: int, mgr: CheckpointManager | None, progress: Any = None, delay: float = 0.0) -> tuple[Model, int]:
    """Train to ``total`` steps, resuming from ``mgr`` if given. Returns the model and the
    step training started from."""
    from .data import DataOrder, split

    x, y = spirals()
    parts = split(len(x), {"train": 0.8, "val": 0.2}, salt="demo-v1")
    train_idx, val_idx = parts["train"], parts["val"]
    model = Model.create()
    order = DataOrder(len(train_idx), seed=7)
    np.random.seed(123)
    state = {"params": model.params, "velocity": model.velocity, "order": order, "val_acc": 0.0}
    start = mgr.restore_or_initialize(state) if mgr is not None else 0
    interrupted = {"flag": False}

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupted["flag"] = True

    previous = signal.signal(signal.SIGINT, on_sigint) if mgr is not None else None
    try:
        for step in range(start + 1, total + 1):
            batch = train_idx[order.next_batch(BATCH)]
            loss = model.step(x[batch], y[batch])
            if progress is not None:
                progress(step, loss)
            if mgr is not None and (step % SAVE_EVERY == 0 or step == total or interrupted["flag"]):
                state["val_acc"] = model.accuracy(x[val_idx], y[val_idx])
                mgr.save(step, state, metrics={"loss": loss, "val_acc": state["val_acc"]}, force=True)
                if interrupted["flag"]:
                    mgr.wait_until_finished()
                    raise KeyboardInterrupt(step)
            if delay:
                time.sleep(delay)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return model, start


def main(directory: str | None, steps: int, fresh: bool, delay: float = 0.01) -> int:
    """Run the demo; returns the process exit status."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console()
    directory = directory or os.path.join(tempfile.gettempdir(), "pitstop-demo")
    if fresh and os.path.isdir(directory):
        import shutil

        shutil.rmtree(directory)
    with CheckpointManager(directory, max_to_keep=3, best_metric="val_acc", best_mode="max") as mgr:
        latest = mgr.latest_step()
        if latest is not None and latest >= steps:
            console.print(f"[bold]{directory}[/] already holds step {latest}; use --fresh to start over.")
        elif latest is not None:
            console.print(f"Resuming from step {latest} in [bold]{directory}[/] (kill me any time).")
        else:
            console.print(
                f"Training {steps} steps, checkpoints in [bold]{directory}[/]. Interrupt with Ctrl-C or kill -9, then rerun."
            )
        with Progress(TextColumn("step {task.completed:>4}/{task.total}"), BarColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                      console=console, transient=False) as bar:  # fmt: skip
            task = bar.add_task("train", total=steps, completed=latest or 0, loss=float("nan"))

            def progress(step: int, loss: float) -> None:
                bar.update(task, completed=step, loss=loss)

            try:
                model, start = train(steps, mgr, progress, delay)
            except KeyboardInterrupt as stop:
                bar.stop()
                console.print(
                    f"Interrupted: saved step {stop.args[0] if stop.args else '?'}. Run the same command to resume."
                )
                return 130
        mgr.wait_until_finished()
        mgr.verify(mgr.latest_step())
        best = mgr.best_step()
    reference, _ = train(steps, None)
    same = reference.fingerprint() == model.fingerprint()
    x, y = spirals()
    console.print(
        f"Finished {steps} steps (this run started at step {start}); accuracy {model.accuracy(x, y):.3f}, best checkpoint: step {best}."
    )
    console.print(f"Weights fingerprint {model.fingerprint()}; uninterrupted run: {reference.fingerprint()}.")
    if same:
        console.print("[green]Identical[/]: the resumed run ended with exactly the weights of an uninterrupted one.")
        return 0
    console.print("[red]Different[/]: the resumed run diverged from an uninterrupted one. Please report this.")
    return 1
