"""``pitstop.keras.Checkpoint``: one line in ``callbacks=[...]`` makes ``model.fit`` resumable.

Design reason: Keras's own ``BackupAndRestore`` restarts an interrupted epoch from its
first batch and keeps no optimizer-slot, RNG, metric or data-position guarantees;
``ModelCheckpoint(save_best_only=True)`` forgets its best value on restart (keras#17012).
This callback saves the whole training state through a :class:`pitstop.CheckpointManager`
-- model (every variable, dropout seed states included), optimizer, epoch, batch in epoch,
global step, the running epoch metrics, the ``pitstop.data.DataOrder``, the state of
``EarlyStopping``/``ReduceLROnPlateau`` and the global RNGs -- and on the next ``fit``
continues exactly where the last checkpoint was taken.

Mid-epoch resume: Keras counts an epoch's batches by calling ``model.train_function``
once per batch. On resume the callback wraps that function for the first ``K`` calls of
the resumed epoch (``K`` = batches of that epoch already trained) so that they train on
nothing: with a :func:`pitstop.data.tf_dataset` the dataset already starts at the restored
position, so the wrapper does not touch the iterator; with NumPy inputs and
``shuffle=False`` it pulls the ``K`` consumed batches from the iterator and drops them.
Keras's batch numbering, epoch length and progress bar stay those of an uninterrupted run.
Keras's own shuffle of NumPy inputs cannot be reproduced, so such runs resume at the start
of the interrupted epoch, with an :class:`InexactResumeWarning`. See ``docs/keras.md``.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from . import tensorflow as _tf_adapter  # registers the TensorFlow/Keras adapter
from ._errors import CheckpointError
from ._keras_config import ModelConfigError, load_model
from ._manager._manager import CheckpointManager, PartialRestoreWarning
from .data import DataOrder
from .data._tf import batching, consume

__all__ = ["Checkpoint", "InexactResumeWarning", "ModelConfigError", "load_model"]

del _tf_adapter

#: Keras warns at the end of every epoch of a dataset of unknown length; with a
#: ``tf_dataset`` that end is the design (each iteration is the rest of one epoch).
_RAN_OUT_MESSAGE = "Your input ran out of data"
#: Callbacks whose state is saved, and the attributes that make it up.
_TRACKED: dict[type, tuple[str, ...]] = {
    keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
}


class InexactResumeWarning(UserWarning):
    """A run resumed at an epoch start because the batches already trained cannot be skipped."""


def _build_compiled_metrics(model: Any, epoch_iterator: Any) -> None:
    """Build the compiled loss and metrics (Keras builds them lazily on the first batch) so a
    fresh process has the same metric variables to restore as the run that saved them.
    Keras does the same in ``fit`` under a distribution strategy; the iterator is reset
    afterwards, as ``fit`` does, so no batch is lost."""
    metrics = getattr(model, "_compile_metrics", None)
    loss = getattr(model, "_compile_loss", None)
    if (metrics is None or metrics.built) and (loss is None or loss.built):
        return
    build = getattr(model, "_symbolic_build", None)
    if build is not None:
        build(iterator=epoch_iterator)
        epoch_iterator.reset()


class _MetricState:
    """The model's running metric variables; restored values wait for the epoch to begin.

    Keras resets metrics at every epoch begin (after ``on_train_begin``), so restoring them
    then would be undone: the values are held and assigned in ``on_epoch_begin``.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.pending: list[np.ndarray[Any, Any]] | None = None

    @property
    def variables(self) -> list[Any]:
        # read when needed: Keras creates the compiled metrics' variables on the first batch
        return list(self.model.metrics_variables)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): np.asarray(v.numpy()) for i, v in enumerate(self.variables)}

    def load_state_dict(self, state: Any) -> None:
        self.pending = [np.array(state[str(i)]) for i in range(len(self.variables))]

    def apply(self) -> None:
        if self.pending is not None:
            for v, value in zip(self.variables, self.pending, strict=True):
                v.assign(value)
        self.pending = None


class _CallbackStates:
    """The counters of EarlyStopping/ReduceLROnPlateau in the fit's callback list.

    Saved as one JSON string, so adding or removing such a callback between runs does not
    make the checkpoint unreadable: states are matched by class and position.
    """

    def __init__(self, callbacks: list[Any]) -> None:
        self.callbacks = callbacks
        self.pending: dict[str, dict[str, Any]] | None = None

    @staticmethod
    def _key(callbacks: list[Any], cb: Any) -> str:
        same = [c for c in callbacks if type(c) is type(cb)]
        return f"{type(cb).__name__}:{same.index(cb)}"

    def state_dict(self) -> dict[str, str]:
        out: dict[str, dict[str, Any]] = {}
        for cb in self.callbacks:
            attrs = next(a for t, a in _TRACKED.items() if isinstance(cb, t))
            out[self._key(self.callbacks, cb)] = {a: _plain(getattr(cb, a, None)) for a in attrs}
        return {"json": json.dumps(out, sort_keys=True)}

    def load_state_dict(self, state: Any) -> None:
        try:
            loaded = json.loads(state["json"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"the saved callback states are unreadable: {exc}") from None
        self.pending = loaded if isinstance(loaded, dict) else {}

    def apply(self) -> None:
        if not self.pending:
            return
        for cb in self.callbacks:
            saved = self.pending.get(self._key(self.callbacks, cb))
            if isinstance(saved, dict):
                for name, value in saved.items():
                    setattr(cb, name, value)
        self.pending = None


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    try:
        number = float(np.asarray(value).item())
    except (TypeError, ValueError):
        return None
    return int(number) if isinstance(value, (np.integer,)) else number


def _numeric_logs(logs: Any) -> dict[str, float]:
    out = {}
    for k, v in (logs or {}).items():
        try:
            number = float(np.asarray(v).item())
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(k)] = number
    return out


def _fit_context(model: Any) -> tuple[list[Any], Any]:
    """The fit's callback list and epoch iterator, found on the call stack (or empty).

    Keras 3 gives a callback neither; both are locals of ``Model.fit`` and of the
    ``CallbackList`` calling us, so the stack is the one place that knows them.
    """
    callbacks: list[Any] = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if not callbacks and isinstance(owner, keras.callbacks.CallbackList):
            callbacks = list(owner.callbacks)
        if owner is model and "epoch_iterator" in frame.f_locals:
            return callbacks, frame.f_locals["epoch_iterator"]
        frame = frame.f_back  # type: ignore[assignment]
    return callbacks, None


class Checkpoint(keras.callbacks.Callback):  # type: ignore[misc]
    """A Keras callback that makes ``model.fit`` resumable, exactly.

    On train begin it restores the newest valid checkpoint of ``directory`` (model,
    optimizer -- built first if needed --, epoch, batch in epoch, metrics, data order,
    EarlyStopping/ReduceLROnPlateau state, global RNGs) and makes ``fit`` continue there;
    it saves every ``save_freq`` batches and/or at every epoch end, keeps the newest
    ``max_to_keep`` and the best ``keep_best`` by ``monitor`` (the ranking is stored in
    the checkpoints, so it survives restarts), and on train end waits for the last save.

    For an exact mid-epoch resume feed ``fit`` a :func:`pitstop.data.tf_dataset` and pass
    its order as ``data_order``, or NumPy arrays with ``shuffle=False``. With NumPy arrays
    and Keras's shuffle the run resumes at the start of the interrupted epoch
    (:class:`InexactResumeWarning`).

    Args:
        directory: Checkpoint directory (path or fsspec URL).
        save_freq: ``"epoch"`` saves at every epoch end; an int ``N`` saves every ``N``
            batches (the checkpoint step is the global batch count) and at epoch ends.
        monitor: A ``logs`` key (``"val_loss"``) ranking checkpoints for ``keep_best``.
        mode: ``"min"`` or ``"max"``: whether a lower or higher ``monitor`` is better.
        keep_best: Keep the best K checkpoints by ``monitor`` besides the newest ones.
        max_to_keep: Keep the newest N checkpoints (``None``: all).
        restore_best_weights: On train end, load the model weights of the best checkpoint
            by ``monitor``.
        data_order: The :class:`pitstop.data.DataOrder` of the ``tf_dataset`` fed to
            ``fit``; it is saved, restored, and advanced by one batch after every train
            batch.
        **manager_options: More :class:`pitstop.CheckpointManager` options
            (``async_save``, ``keep_every_n_steps``, ``storage_options``, ...).

    Attributes:
        restored_step: The step restored by the last ``fit`` (``None``: started afresh).
        skipping: True inside ``on_train_batch_end`` for a batch that was not trained
            because the resumed run had already trained it before the interruption.

    Raises:
        ValueError: An option is invalid (raised here, not at train begin).

    Example:
        >>> order = pitstop.data.DataOrder(len(x), seed=0)              # doctest: +SKIP
        >>> ds = pitstop.data.tf_dataset((x, y), order, batch_size=32)  # doctest: +SKIP
        >>> model.fit(ds, epochs=10, callbacks=[                         # doctest: +SKIP
        ...     pitstop.keras.Checkpoint("runs/exp1", data_order=order, save_freq=100)])
    """

    def __init__(
        self,
        directory: str,
        *,
        save_freq: Literal["epoch"] | int = "epoch",
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        keep_best: int = 1,
        max_to_keep: int | None = 3,
        restore_best_weights: bool = False,
        data_order: DataOrder | None = None,
        **manager_options: Any,
    ) -> None:
        super().__init__()
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ValueError(f"save_freq must be 'epoch' or a positive int (batches), got {save_freq!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if monitor is not None and not isinstance(monitor, str):
            raise ValueError(f"monitor must be a logs key such as 'val_loss', got {monitor!r}")
        if restore_best_weights and monitor is None:
            raise ValueError("restore_best_weights needs monitor: name the metric that ranks checkpoints")
        if data_order is not None and not isinstance(data_order, DataOrder):
            raise ValueError(f"data_order must be a pitstop.data.DataOrder, got {type(data_order).__name__}")
        for name in ("best_metric", "best_mode", "keep_best", "max_to_keep", "capture_rng"):
            if name in manager_options:
                raise ValueError(f"{name} is set by Checkpoint itself; do not pass it in manager_options")
        self.directory = directory
        self.save_freq = save_freq
        self.monitor = monitor
        self.restore_best_weights = bool(restore_best_weights)
        self.data_order = data_order
        self._manager_options: dict[str, Any] = {
            "max_to_keep": max_to_keep,
            "keep_best": keep_best if monitor is not None else 0,
            "best_metric": monitor,
            "best_mode": mode,
            "capture_rng": True,
            **manager_options,
        }
        self.restored_step: int | None = None
        self._mgr: CheckpointManager | None = None
        self._reset_counters()

    # -- state ------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self._epoch = 0
        self._step_in_epoch = 0
        self._global_step = 0
        self._last_saved: int | None = None
        self._pending_epoch_logs: dict[str, Any] | None = None
        self._skip_calls = 0
        self._epoch_complete = False
        self._skipping_batch = False
        self._pull = False
        self._first_epoch = True
        self._original_train_function: Any = None
        self._ran_out_filter: Any = None
        self._batching: tuple[int, bool] | None = None

    @property
    def skipping(self) -> bool:
        """True for a batch of a resumed epoch that was trained before the interruption."""
        return self._skipping_batch

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": self.model,
            "optimizer": self.model.optimizer,
            "epoch": self._epoch,
            "step_in_epoch": self._step_in_epoch,
            "global_step": self._global_step,
            "metrics": self._metric_state,
            "callbacks": self._callback_states,
        }
        if self.data_order is not None:
            state["order"] = self.data_order
        return state

    def _save(self, logs: Any) -> None:
        assert self._mgr is not None
        step = self._global_step
        if step == self._last_saved:
            self._mgr.wait_until_finished()
            if step in self._mgr.all_steps():
                self._mgr.delete(step)  # the epoch-end state supersedes a save at its last batch
        self._mgr.save(step, self._state(), metrics=_numeric_logs(logs), force=True)
        self._last_saved = step

    # -- train begin / end ------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        self._cleanup()  # a previous fit with this callback may have ended by an exception
        self._reset_counters()
        callbacks, epoch_iterator = _fit_context(self.model)
        tracked = [cb for cb in callbacks if isinstance(cb, tuple(_TRACKED))]
        if epoch_iterator is not None and self._has_checkpoint():
            _build_compiled_metrics(self.model, epoch_iterator)
        self._metric_state = _MetricState(self.model)
        self._callback_states = _CallbackStates(tracked)
        if self.data_order is not None:
            self._batching = batching(self.data_order)
            if self._batching is None:
                raise CheckpointError(
                    "Checkpoint(data_order=...) needs the order of the dataset fed to fit: build that "
                    "dataset with pitstop.data.tf_dataset(source, order, batch_size=...)",
                    path=str(self.directory),
                )
            self._ran_out_filter = _ignore_ran_out()
        self._mgr = CheckpointManager(self.directory, **self._manager_options)
        self.restored_step = None
        if self._mgr.latest_step() is None:
            return
        state = self._state()
        step, _ = self._mgr.restore(state)
        self.restored_step = step
        self._last_saved = step
        self._epoch = int(state["epoch"])
        self._global_step = int(state["global_step"])
        skip = int(state["step_in_epoch"])
        self.model._initial_epoch = self._epoch
        if skip:
            self._plan_mid_epoch_resume(skip, epoch_iterator)

    def _has_checkpoint(self) -> bool:
        with CheckpointManager(self.directory, **self._manager_options) as probe:
            return probe.latest_step() is not None

    def _plan_mid_epoch_resume(self, skip: int, epoch_iterator: Any) -> None:
        per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        adapter = getattr(epoch_iterator, "data_adapter", None)
        if self.data_order is not None:
            self._pull = False
            problem = None
        elif type(adapter).__name__ == "ArrayDataAdapter" and not getattr(adapter, "_shuffle", True):
            self._pull = True
            problem = None
        elif type(adapter).__name__ == "ArrayDataAdapter":
            problem = "Keras's own shuffle of NumPy inputs cannot be reproduced"
        else:
            problem = f"the input ({type(adapter).__name__}) cannot be positioned at a batch"
        if problem is None and skip % per_call:
            problem = f"{skip} batches are not a multiple of steps_per_execution={per_call}"
        if problem is not None:
            warnings.warn(
                f"pitstop.keras.Checkpoint: resuming step {self.restored_step} at the start of epoch "
                f"{self._epoch + 1}, not at its batch {skip + 1}: {problem}, so the {skip} batches of this "
                "epoch trained before the interruption are trained again, in a new order (the weights are "
                "those of the checkpoint). For an exact resume feed fit a pitstop.data.tf_dataset and pass "
                "Checkpoint(data_order=...), or NumPy inputs with shuffle=False.",
                InexactResumeWarning,
                stacklevel=2,
            )
            self._metric_state.pending = None  # the epoch restarts: its metrics start afresh
            return
        self._step_in_epoch = skip
        self._skip_calls = skip // per_call
        # Saved after the epoch's last batch (before validation and epoch end): the order
        # already names the next data epoch, so a tf_dataset iteration begun now would
        # yield a whole new epoch inside this one. End the epoch where the data ended.
        self._epoch_complete = self.data_order is not None and self.data_order.position == 0
        self._original_train_function = self.model.train_function
        self.model.train_function = self._skipping_train_function

    def _skipping_train_function(self, iterator: Any) -> Any:
        if self._skip_calls <= 0:
            self.model.train_function = self._original_train_function
            if self._epoch_complete:
                # An uninterrupted run calls the train step once more here and the dataset
                # ends it with OutOfRangeError; the step's stateful ops (a Dropout layer's
                # seed generator) still run. Call it on an empty iterator of the same
                # dataset, so the epoch ends exactly so, without starting the next data epoch
                self._epoch_complete = False
                dataset = getattr(iterator, "_dataset", None)
                if not isinstance(dataset, tf.data.Dataset):
                    raise tf.errors.OutOfRangeError(None, None, "the resumed epoch has no batches left")
                return self._original_train_function(iter(dataset.take(0)))
            return self._original_train_function(iterator)
        self._skip_calls -= 1
        self._skipping_batch = True
        if self._pull and hasattr(iterator, "get_next"):  # the TF backend passes the iterator
            for _ in range(int(getattr(self.model, "steps_per_execution", 1) or 1)):
                iterator.get_next()
        if self._skip_calls == 0 and not self._epoch_complete:
            self.model.train_function = self._original_train_function
        return self.model.get_metrics_result()

    def on_train_end(self, logs: Any = None) -> None:
        try:
            if self._pending_epoch_logs is not None:
                self._save(self._pending_epoch_logs)
                self._pending_epoch_logs = None
            if self._mgr is not None:
                self._mgr.wait_until_finished()
                if self.restore_best_weights:
                    self._restore_best_weights()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        """Undo what on_train_begin set up: the train_function wrapper, the initial epoch,
        the warning filter, the manager."""
        if self._original_train_function is not None:
            if self.model is not None and self.model.train_function == self._skipping_train_function:
                self.model.train_function = self._original_train_function
            self._original_train_function = None
        if self.restored_step is not None and self.model is not None:
            self.model._initial_epoch = None
        if self._ran_out_filter is not None:
            _remove_filter(self._ran_out_filter)
            self._ran_out_filter = None
        if self._mgr is not None:
            mgr, self._mgr = self._mgr, None
            mgr.close()

    def _restore_best_weights(self) -> None:
        assert self._mgr is not None
        best = self._mgr.best_step()
        if best is None:
            warnings.warn(
                f"pitstop.keras.Checkpoint: no checkpoint in {self.directory} has the metric "
                f"{self.monitor!r}; the model keeps its last weights",
                UserWarning,
                stacklevel=3,
            )
            return
        options = {k: v for k, v in self._manager_options.items() if k in ("storage_options", "io_threads")}
        with CheckpointManager(self.directory, capture_rng=False, **options) as reader, warnings.catch_warnings():
            warnings.simplefilter("ignore", PartialRestoreWarning)
            reader.restore({"model": self.model}, step=best, strict=False)

    # -- epochs and batches -------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self._pending_epoch_logs is not None:
            self._save(self._pending_epoch_logs)
            self._pending_epoch_logs = None
        self._epoch = epoch
        if self._first_epoch:
            self._first_epoch = False
            self._callback_states.apply()
            self._metric_state.apply()
        else:
            self._step_in_epoch = 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._skipping_batch = False

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self._skipping_batch:
            return
        trained = batch + 1 - self._step_in_epoch
        before = self._global_step
        self._step_in_epoch = batch + 1
        self._global_step += trained
        if self.data_order is not None and self._batching is not None:
            size, drop = self._batching
            for _ in range(trained):
                consume(self.data_order, size, drop)
        if isinstance(self.save_freq, int) and self._global_step // self.save_freq > before // self.save_freq:
            self._save(logs)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        # Saved when the next epoch begins (or training ends): by then every callback has
        # seen this epoch's end, so EarlyStopping's counters are those after the epoch.
        self._epoch = epoch + 1
        self._step_in_epoch = 0
        self._pending_epoch_logs = logs if logs is not None else {}


def _ignore_ran_out() -> Any:
    warnings.filterwarnings("ignore", message=_RAN_OUT_MESSAGE, category=UserWarning)
    return warnings.filters[0]


def _remove_filter(entry: Any) -> None:
    filters: list[Any] = warnings.filters  # type: ignore[assignment]
    try:
        filters.remove(entry)
    except ValueError:
        return
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()
