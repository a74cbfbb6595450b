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

import inspect
import json
import math
import os
import sys
import threading
import warnings
import weakref
from typing import Any, Literal, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from . import tensorflow as _tf_adapter  # registers the TensorFlow/Keras adapter
from ._errors import CheckpointError
from ._keras_config import ModelConfigError, load_model
from ._manager._manager import CheckpointManager
from ._manager._policy import Policy
from ._manager._reader import CheckpointReader
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


try:  # the containers of compiled metrics, where Keras looks for a metric's direction
    from keras.src.trainers.compile_utils import CompileMetrics, MetricsList

    _METRIC_CONTAINERS: tuple[Any, ...] = (CompileMetrics, MetricsList)
except ImportError:  # pragma: no cover - another Keras layout: only loss is inferred
    _METRIC_CONTAINERS = ()


#: The keyword options of CheckpointManager a Checkpoint passes on (checked in its constructor).
_MANAGER_OPTIONS = frozenset(inspect.signature(CheckpointManager).parameters) - {"directory", "storage"}


class InexactResumeWarning(UserWarning):
    """A run resumed at an epoch start because the batches already trained cannot be skipped."""


#: Every Checkpoint alive, to finish the managers of those whose fit raised.
_LIVE: weakref.WeakSet[Checkpoint] = weakref.WeakSet()


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


class _FitContext(NamedTuple):
    """What the running ``fit`` knows and a Keras 3 callback is not given."""

    callbacks: list[Any]  # the fit's callback list
    epoch_iterator: Any  # its training input, or None
    validates: bool | None  # whether it has validation data (None: unknown)


def _fit_context(model: Any) -> _FitContext:
    """The fit's callback list, epoch iterator and validation setting, found on the call
    stack (or empty).

    Keras 3 gives a callback none of them; they are locals of ``Model.fit`` and of the
    ``CallbackList`` calling us, so the stack is the one place that knows them.
    """
    callbacks: list[Any] = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if not callbacks and isinstance(owner, keras.callbacks.CallbackList):
            callbacks = list(owner.callbacks)
        if owner is model and "epoch_iterator" in frame.f_locals:
            validates = frame.f_locals["validation_data"] is not None if "validation_data" in frame.f_locals else None
            return _FitContext(callbacks, frame.f_locals["epoch_iterator"], validates)
        frame = frame.f_back  # type: ignore[assignment]
    return _FitContext(callbacks, None, None)


def _in_callback_list(callback: Any) -> bool:
    """Whether ``callback`` is in a ``CallbackList`` on this thread's stack (its fit runs)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList) and any(cb is callback for cb in owner.callbacks):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _directory_argument(directory: Any) -> str:
    """``directory`` as a string, refused up front when it cannot be a checkpoint directory
    (nothing is created here: the manager creates the directory when ``fit`` begins)."""
    if isinstance(directory, os.PathLike):
        directory = os.fspath(directory)
    if not isinstance(directory, str):
        raise TypeError(
            "directory must be a path (str or os.PathLike) or an fsspec URL such as 's3://bucket/run', "
            f"got {directory!r} ({type(directory).__name__})"
        )
    if not directory.strip():
        raise ValueError("directory must name a checkpoint directory, got an empty string")
    local = directory.removeprefix("file://") if "://" not in directory or directory.startswith("file://") else None
    if local is not None and os.path.exists(local) and not os.path.isdir(local):
        raise ValueError(f"directory {directory!r} is an existing file, not a directory: name a directory")
    return directory


def _infer_mode(model: Any, monitor: str) -> Literal["min", "max"] | None:
    """``mode="auto"`` as Keras 3 resolves it (``MonitorCallback._set_monitor_op``): ``loss``
    and ``val_loss`` are minimized; a compiled metric of that name is maximized when its
    ``_direction`` is ``"up"`` and minimized otherwise; anything else is unknown (``None``)."""
    name = monitor.removeprefix("val_")
    mode: Literal["min", "max"] | None = "min" if name == "loss" else None
    containers: list[Any] = list(getattr(model, "metrics", None) or [])
    for container in containers:
        if not isinstance(container, _METRIC_CONTAINERS):
            continue
        for metric in container.metrics:
            if metric.name == name and hasattr(metric, "_direction"):
                mode = "max" if metric._direction == "up" else "min"
    return mode


def _compiled_metrics_unbuilt(model: Any) -> bool:
    metrics = getattr(model, "_compile_metrics", None)
    return metrics is not None and not metrics.built


class Checkpoint(keras.callbacks.Callback):  # type: ignore[misc]
    """A Keras callback that makes ``model.fit`` resumable, exactly.

    On train begin it restores the newest valid checkpoint of ``directory`` (model,
    optimizer -- built first if needed --, epoch, batch in epoch, metrics, data order,
    EarlyStopping/ReduceLROnPlateau state, global RNGs) and makes ``fit`` continue there;
    it saves every ``save_freq`` batches and/or at every epoch end, keeps the newest
    ``max_to_keep`` and the best ``keep_best`` by ``monitor`` (the ranking is stored in
    the checkpoints, so it survives restarts), and on train end waits for the last save.

    The epoch-end checkpoint is taken in this callback's own ``on_epoch_end``, so a later
    callback that raises there never loses the finished epoch; when callbacks after this
    one then change their counters (``EarlyStopping``, ``ReduceLROnPlateau``) or the
    learning rate, the checkpoint is replaced, atomically, when the next epoch begins or
    training ends.

    For an exact mid-epoch resume feed ``fit`` a :func:`pitstop.data.tf_dataset` and pass
    its order as ``data_order``, or NumPy arrays with ``shuffle=False``. With NumPy arrays
    and Keras's shuffle the run resumes at the start of the interrupted epoch
    (:class:`InexactResumeWarning`).

    Epochs are absolute, as with Keras's ``BackupAndRestore``: ``fit(epochs=10)`` on a
    directory that already holds epoch 10 trains nothing (a ``UserWarning`` says so).

    Args:
        directory: Checkpoint directory: a path (``str`` or ``os.PathLike``) or an fsspec
            URL. Created when ``fit`` begins.
        save_freq: ``"epoch"`` saves at every epoch end; an int ``N`` saves every ``N``
            batches (the checkpoint step is the global batch count) and at epoch ends.
        monitor: A ``logs`` key (``"val_loss"``) ranking checkpoints for ``keep_best``.
            A key missing from an epoch's logs gives one ``UserWarning`` per ``fit``.
            ``None``: the ranking recorded in the directory, if any, stays as it is.
        mode: ``"auto"`` (infer the direction as Keras does: ``loss`` is minimized, a
            compiled metric follows its own direction, e.g. accuracy, AUC, precision are
            maximized), ``"min"`` or ``"max"``: whether a lower or higher ``monitor`` is
            better.
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
        TypeError: ``directory`` is not a path or URL.
        ValueError: An option is invalid (raised here, not at train begin); with
            ``mode="auto"``, ``fit`` raises it at train begin when the direction of
            ``monitor`` cannot be inferred (as Keras's callbacks do).

    Example:
        >>> order = pitstop.data.DataOrder(len(x), seed=0)              # doctest: +SKIP
        >>> ds = pitstop.data.tf_dataset((x, y), order, batch_size=32)  # doctest: +SKIP
        >>> model.fit(ds, epochs=10, callbacks=[                         # doctest: +SKIP
        ...     pitstop.keras.Checkpoint("runs/exp1", data_order=order, save_freq=100)])
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_freq: Literal["epoch"] | int = "epoch",
        monitor: str | None = None,
        mode: Literal["auto", "min", "max"] = "auto",
        keep_best: int = 1,
        max_to_keep: int | None = 3,
        restore_best_weights: bool = False,
        data_order: DataOrder | None = None,
        **manager_options: Any,
    ) -> None:
        super().__init__()
        self.directory = _directory_argument(directory)
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ValueError(f"save_freq must be 'epoch' or a positive int (batches), got {save_freq!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be a logs key such as 'val_loss', got {monitor!r}")
        if restore_best_weights and monitor is None:
            raise ValueError("restore_best_weights needs monitor: name the metric that ranks checkpoints")
        if data_order is not None and not isinstance(data_order, DataOrder):
            raise ValueError(f"data_order must be a pitstop.data.DataOrder, got {type(data_order).__name__}")
        for name in ("best_metric", "best_mode", "keep_best", "max_to_keep", "capture_rng"):
            if name in manager_options:
                raise ValueError(f"{name} is set by Checkpoint itself; do not pass it in manager_options")
        unknown = sorted(set(manager_options) - _MANAGER_OPTIONS)
        if unknown:
            raise TypeError(
                f"Checkpoint got unknown option(s) {', '.join(unknown)}: besides its own arguments it takes "
                f"CheckpointManager's ({', '.join(sorted(_MANAGER_OPTIONS))})"
            )
        Policy(  # the retention options fail here, not when fit begins
            max_to_keep=max_to_keep,
            keep_best=keep_best if monitor is not None else 0,
            best_metric=monitor,
            best_mode="min" if mode == "auto" else mode,
        )
        self.save_freq = save_freq
        self.monitor = monitor
        self.mode = mode
        self.keep_best = keep_best
        self.restore_best_weights = bool(restore_best_weights)
        self.data_order = data_order
        # The callback's documented defaults are passed as given, so a re-run with the same
        # arguments records the same policy (no PolicyChangedWarning). Without a monitor
        # the ranking options are left unset: the directory keeps the ranking it recorded.
        self._manager_options: dict[str, Any] = {"max_to_keep": max_to_keep, "capture_rng": True, **manager_options}
        self.restored_step: int | None = None
        self._mgr: CheckpointManager | None = None
        self._fit_thread: int | None = None
        self._reset_counters()
        _LIVE.add(self)

    # -- state ------------------------------------------------------------------------
    def _reset_counters(self) -> None:
        self._epoch = 0
        self._step_in_epoch = 0
        self._global_step = 0
        self._last_saved: int | None = None
        self._epoch_end: tuple[int, dict[str, float], Any] | None = None
        self._skip_calls = 0
        self._epoch_complete = False
        self._skipping_batch = False
        self._pull = False
        self._first_epoch = True
        self._original_train_function: Any = None
        self._ran_out_filter: Any = None
        self._batching: tuple[int, bool] | None = None
        self._validates: bool | None = None
        self._monitor_warned = False

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
        metrics = _numeric_logs(logs)
        if step == self._last_saved:
            # the epoch-end state supersedes the save at the epoch's last batch (or the
            # restored step): replaced atomically, the step is on disk throughout
            self._mgr._replace(step, self._state(), metrics=metrics)
        else:
            self._mgr.save(step, self._state(), metrics=metrics, force=True)
        self._last_saved = step

    def _changeable(self) -> Any:
        """What callbacks after this one may change once its ``on_epoch_end`` has saved:
        the counters of EarlyStopping/ReduceLROnPlateau and the learning rate."""
        try:
            value = self.model.optimizer.learning_rate  # a variable, or a schedule's tensor
            rate: float | None = float(value.numpy() if hasattr(value, "numpy") else value)
        except (AttributeError, TypeError, ValueError):
            rate = None
        return self._callback_states.state_dict()["json"], rate

    def _refresh_epoch_end(self) -> None:
        """Replace the last epoch-end checkpoint when callbacks after this one changed
        what it holds (their ``on_epoch_end`` ran after the save)."""
        pending, self._epoch_end = self._epoch_end, None
        if pending is None or self._mgr is None:
            return
        step, metrics, saved = pending
        if self._changeable() != saved:
            self._mgr._replace(step, self._state(), metrics=metrics)

    # -- train begin / end ------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        self._cleanup()  # a previous fit with this callback may have ended by an exception
        self._reset_counters()
        self.restored_step = None
        context = _fit_context(self.model)
        tracked = [cb for cb in context.callbacks if isinstance(cb, tuple(_TRACKED))]
        self._validates = context.validates
        if self.data_order is not None:
            self._batching = batching(self.data_order)
            if self._batching is None:
                raise CheckpointError(
                    "Checkpoint(data_order=...) needs the order of the dataset fed to fit: build that "
                    "dataset with pitstop.data.tf_dataset(source, order, batch_size=...)",
                    path=self.directory,
                )
        options = dict(self._manager_options)
        if self.monitor is not None:
            options.update(
                best_metric=self.monitor, keep_best=self.keep_best, best_mode=self._best_mode(context.epoch_iterator)
            )
        self._mgr = CheckpointManager(self.directory, **options)
        self._fit_thread = threading.get_ident()
        try:
            self._finish_abandoned()  # their last save is committed before we look for the newest
            self._begin(tracked, context.epoch_iterator)
        except BaseException:
            self._cleanup()
            raise

    def _best_mode(self, epoch_iterator: Any) -> Literal["min", "max"]:
        """``mode``, with ``"auto"`` resolved as Keras 3 does, once the model is compiled."""
        if self.mode != "auto":
            return self.mode
        assert self.monitor is not None
        mode = _infer_mode(self.model, self.monitor)
        if mode is None and epoch_iterator is not None and _compiled_metrics_unbuilt(self.model):
            _build_compiled_metrics(self.model, epoch_iterator)  # Keras builds them at the first batch
            mode = _infer_mode(self.model, self.monitor)
        if mode is None:
            raise ValueError(
                f"pitstop.keras.Checkpoint received monitor={self.monitor!r} with mode='auto', but the "
                "direction of that metric cannot be inferred (as Keras infers it: 'loss'/'val_loss', or a "
                "compiled metric with a direction, such as accuracy or AUC). Pass mode='max' to keep the "
                "checkpoints with the highest value, or mode='min' for the lowest."
            )
        return mode

    def _begin(self, tracked: list[Any], epoch_iterator: Any) -> None:
        assert self._mgr is not None
        has_checkpoint = self._mgr.latest_step() is not None
        if epoch_iterator is not None and has_checkpoint:
            _build_compiled_metrics(self.model, epoch_iterator)
        self._metric_state = _MetricState(self.model)
        self._callback_states = _CallbackStates(tracked)
        if self.data_order is not None:
            self._ran_out_filter = _ignore_ran_out()
        if not has_checkpoint:
            return
        state = self._state()
        step, _ = self._mgr.restore(state)
        self.restored_step = step
        self._last_saved = step
        self._epoch = int(state["epoch"])
        self._global_step = int(state["global_step"])
        skip = int(state["step_in_epoch"])
        self.model._initial_epoch = self._epoch
        self._warn_if_nothing_to_train(step, skip)
        if skip:
            self._plan_mid_epoch_resume(skip, epoch_iterator)
        else:
            self._metric_state.pending = None  # an epoch starts afresh, as Keras resets its metrics

    def _warn_if_nothing_to_train(self, step: int, skip: int) -> None:
        epochs = (self.params or {}).get("epochs")
        if not isinstance(epochs, int) or self._epoch < epochs:
            return
        done = f"{self._epoch} epochs" + (f" and {skip} batches of epoch {self._epoch + 1}" if skip else "")
        warnings.warn(
            f"pitstop.keras.Checkpoint: the checkpoint restored from {self.directory} (step {step}) has trained "
            f"{done}, and this fit has epochs={epochs}, so it trains nothing. Epochs are absolute, as with "
            f"keras.callbacks.BackupAndRestore: pass epochs greater than {self._epoch} to train on, or use a new "
            "directory to train from scratch.",
            UserWarning,
            stacklevel=2,
        )

    def _finish_abandoned(self) -> None:
        """Finish the managers of earlier ``Checkpoint`` callbacks on this directory whose
        ``fit`` raised (Keras then skips ``on_train_end``): their last save is committed
        and their lock released, so this fit restores and saves as if they had ended."""
        assert self._mgr is not None
        here = threading.get_ident()
        for other in list(_LIVE):
            mgr = other._mgr
            if other is self or mgr is None or mgr.directory != self._mgr.directory or other._fit_thread != here:
                continue
            if _in_callback_list(other):
                continue  # its fit is still running (this fit runs inside it)
            try:
                other._cleanup()
            except Exception as exc:  # its error has nobody else to go to
                warnings.warn(
                    f"pitstop.keras.Checkpoint: the last save of an earlier fit to {self.directory} failed "
                    f"({type(exc).__name__}: {exc}); this fit resumes from the newest checkpoint committed",
                    UserWarning,
                    stacklevel=4,
                )

    def wait_until_finished(self) -> None:
        """Wait for the save in flight and raise its error, if it failed.

        ``fit`` waits by itself when it ends normally. When ``fit`` raised (Keras then skips
        ``on_train_end``), the last save may still be in flight: this waits for it, raises
        its error, and releases the directory (as the end of ``fit`` would). Called during
        ``fit`` (from a callback) it only waits. Safe to call at any time, also before any
        ``fit`` or after it ended.

        Raises:
            StorageError: the last save failed (other ``CheckpointError``s likewise).

        Example:
            >>> ckpt = pitstop.keras.Checkpoint("runs/exp1")          # doctest: +SKIP
            >>> try:                                                    # doctest: +SKIP
            ...     model.fit(x, y, epochs=10, callbacks=[ckpt])
            ... finally:
            ...     ckpt.wait_until_finished()
        """
        mgr = self._mgr
        if mgr is None:
            return
        if self._fit_running():
            mgr.wait_until_finished()
        else:
            self._cleanup()

    def _fit_running(self) -> bool:
        if self._fit_thread != threading.get_ident():
            return any(t.ident == self._fit_thread for t in threading.enumerate())
        return _in_callback_list(self)

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
            self._refresh_epoch_end()
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
        with CheckpointReader(self.directory, **options) as reader:
            reader.restore({"model": self.model}, step=best, expect_partial=True)

    # -- epochs and batches -------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._refresh_epoch_end()
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
        # Saved here, so a callback after this one that raises cannot lose the epoch; what
        # such callbacks change afterwards is caught up by _refresh_epoch_end.
        logs = logs if logs is not None else {}
        self._check_monitor(epoch, logs)
        self._epoch = epoch + 1
        self._step_in_epoch = 0
        self._save(logs)
        self._epoch_end = (self._global_step, _numeric_logs(logs), self._changeable())

    def _check_monitor(self, epoch: int, logs: dict[str, Any]) -> None:
        """Warn, once per fit, when ``monitor`` is not in an epoch's logs (as Keras's
        ``ModelCheckpoint`` warns): such checkpoints cannot be ranked by it."""
        if self.monitor is None or self._monitor_warned or self.monitor in logs:
            return
        if self.monitor.startswith("val_") and self._validates and not any(k.startswith("val_") for k in logs):
            return  # an epoch without validation (validation_freq > 1): expected
        self._monitor_warned = True
        warnings.warn(
            f"pitstop.keras.Checkpoint: monitor={self.monitor!r} is not in the logs of epoch {epoch + 1} "
            f"(they have: {', '.join(map(repr, logs)) or 'no keys'}), so its checkpoint is not ranked by it "
            "(keep_best, restore_best_weights). Name one of those keys; a 'val_' key needs validation data "
            "in fit.",
            UserWarning,
            stacklevel=2,
        )


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
