"""Multi-worker checkpoints with the collectives of the framework a job already runs.

Pass a coordinator to the manager on every worker; every worker calls ``save`` and
``restore`` with the same arguments. Each worker writes only its share (replicated arrays
are split among the workers and written once; :class:`PerRank` values by their own rank)
to the shared checkpoint directory, and rank 0 commits after a barrier. The barrier and
every other agreement is one collective of the framework (``all_max`` of a few ints):
pitstop opens no socket of its own. See ``docs/distributed.md``.

Example (torch, started by ``torchrun --nproc-per-node 2 train.py``)::

    import torch.distributed as dist, pitstop
    from pitstop.distributed import PerRank, TorchCoordinator

    dist.init_process_group("gloo")
    mgr = pitstop.CheckpointManager("/shared/run1", coordinator=TorchCoordinator())
    state = {"model": model, "optimizer": opt, "data": PerRank(order)}
    start = mgr.restore_or_initialize(state)

The frameworks are imported only when a coordinator is created, never by ``import pitstop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._distributed import Coordinator, PerRank
from ._errors import CheckpointError

__all__ = ["Coordinator", "PerRank", "TFCoordinator", "TorchCoordinator"]


def _collective_error(framework: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"a {framework} collective of the checkpoint protocol failed ({type(exc).__name__}: {exc}). "
        "Another worker probably died or called save()/restore() with different arguments; "
        "nothing was committed by this save. Restart the job: it resumes from the last committed step."
    )


class _RankedCoordinator:
    """What both coordinators share: the rank and world size fixed at creation."""

    _rank: int
    _world: int

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self._rank}, world_size={self._world})"


class TorchCoordinator(_RankedCoordinator):
    """The coordinator of a ``torch.distributed`` job (gloo, or nccl with a GPU).

    Args:
        group: The process group whose members save together (default: the world).

    Raises:
        CheckpointError: ``torch.distributed`` is not initialized.

    Example:
        >>> mgr = pitstop.CheckpointManager(d, coordinator=TorchCoordinator())  # doctest: +SKIP
    """

    def __init__(self, group: Any = None) -> None:
        try:
            import torch
            import torch.distributed as dist
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError("TorchCoordinator needs torch: pip install 'pitstop[torch]'") from exc
        if not dist.is_available() or not dist.is_initialized():
            raise CheckpointError(
                "torch.distributed is not initialized: call torch.distributed.init_process_group() "
                "before creating a TorchCoordinator"
            )
        self._torch = torch
        self._dist = dist
        self._group = group
        self._rank = int(dist.get_rank(group))
        self._world = int(dist.get_world_size(group))
        self._device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"

    def all_max(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum of ``values`` over every rank of the group."""
        t = self._torch.tensor([int(v) for v in values] or [0], dtype=self._torch.int64, device=self._device)
        try:
            self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self._group)
        except Exception as exc:  # torch raises RuntimeError / DistBackendError subclasses
            raise _collective_error("torch.distributed", exc) from exc
        return [int(v) for v in t.tolist()][: len(values)]


class TFCoordinator(_RankedCoordinator):
    """The coordinator of a ``tf.distribute.MultiWorkerMirroredStrategy`` job.

    Ranks follow the strategy's own numbering: the ``chief`` task (if any) is rank 0,
    then the ``worker`` tasks in order. Call it from the training loop's Python code
    (cross-replica context), not inside ``strategy.run``.

    Args:
        strategy: The job's ``MultiWorkerMirroredStrategy``.

    Example:
        >>> strategy = tf.distribute.MultiWorkerMirroredStrategy()  # doctest: +SKIP
        >>> mgr = pitstop.CheckpointManager(d, coordinator=TFCoordinator(strategy))  # doctest: +SKIP
    """

    def __init__(self, strategy: Any) -> None:
        try:
            import tensorflow as tf
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError("TFCoordinator needs TensorFlow: pip install 'pitstop[tensorflow]'") from exc
        resolver = getattr(strategy, "cluster_resolver", None)
        if resolver is None:
            raise CheckpointError(
                f"{type(strategy).__name__} has no cluster_resolver: TFCoordinator needs a "
                "MultiWorkerMirroredStrategy (one-process strategies need no coordinator)"
            )
        cluster = resolver.cluster_spec().as_dict()
        chiefs = len(cluster.get("chief", []))
        workers = len(cluster.get("worker", []))
        task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
        if task_type not in ("chief", "worker"):
            raise CheckpointError(f"TFCoordinator runs on chief and worker tasks, not on a {task_type!r} task")
        self._tf = tf
        self._strategy = strategy
        self._rank = task_id if task_type == "chief" else chiefs + task_id
        self._world = max(chiefs + workers, 1)

    def all_max(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum of ``values`` over every worker (an all-gather of the strategy)."""
        tf = self._tf
        n = max(len(values), 1)
        local = tf.constant([int(v) for v in values] or [0], dtype=tf.int64)

        def gather() -> Any:
            ctx = tf.distribute.get_replica_context()
            return ctx.all_gather(local, axis=0)

        try:
            gathered = self._strategy.run(gather)
            first = self._strategy.experimental_local_results(gathered)[0]
            out = tf.reduce_max(tf.reshape(first, (-1, n)), axis=0).numpy()
        except Exception as exc:  # TF raises UnavailableError, InternalError, ...
            raise _collective_error("tf.distribute", exc) from exc
        return [int(v) for v in out][: len(values)]
