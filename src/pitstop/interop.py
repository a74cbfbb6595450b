"""Export pitstop checkpoints to other formats, and import TensorFlow checkpoints.

- :func:`export` writes one checkpoint (or a subtree of it) as safetensors, a TensorFlow
  checkpoint, a SavedModel or a ``.keras`` file, for serving, sharing, or tools that do not
  read pitstop's format.
- :func:`import_tf_checkpoint` migrates a run that used ``tf.train.Checkpoint`` /
  ``tf.train.CheckpointManager``: it reads the TF checkpoint (into your objects, or as
  plain arrays) and saves it as a pitstop checkpoint, so training continues with pitstop.

``import pitstop.interop`` loads no framework: TensorFlow and safetensors are imported
inside the functions that need them, and a missing one raises an ``ImportError`` naming
the extra to install. Outputs are staged and published only when complete, never over an
existing output unless ``overwrite=True``. Pitstop directories and export outputs may be
local paths or fsspec URLs (TensorFlow writes to a local staging directory, uploaded after);
a TF checkpoint to import is read by TensorFlow, so it is a local path. See docs/interop.md.

Example:
    >>> import numpy as np, pitstop, tempfile, os
    >>> from pitstop import interop
    >>> d = tempfile.mkdtemp()
    >>> pitstop.save(os.path.join(d, "ckpt"), {"w": np.arange(3.0), "epoch": 2})
    >>> res = interop.export(os.path.join(d, "ckpt"), os.path.join(d, "w.safetensors"), to="safetensors")
    >>> res.arrays, res.step
    (1, 0)
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from ._errors import CheckpointError, CheckpointExistsError
from ._interop._source import read_source, staged_output
from ._interop._types import ExportResult, ImportResult, InteropError
from ._manager import CheckpointManager

__all__ = ["ExportResult", "FORMATS", "Format", "ImportResult", "InteropError", "export", "import_tf_checkpoint"]

Format = Literal["tf-checkpoint", "savedmodel", "keras", "safetensors"]
#: The formats :func:`export` writes.
FORMATS: tuple[str, ...] = get_args(Format)

# output files each format creates next to ``out`` (a suffix of its name) that must not exist yet
_CLAIMS = {"safetensors": ("",), "tf-checkpoint": (".index",), "savedmodel": ("",), "keras": ("",)}


def export(
    directory: str,
    out: str,
    *,
    to: Format,
    step: int | None = None,
    key: str | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    skip_unsupported: bool = False,
) -> ExportResult:
    """Export a checkpoint of ``directory`` to another format at ``out``.

    Formats:
        - ``"safetensors"``: every array, named by its pitstop path (``model/layers/0/vars/kernel``),
          readable by ``safetensors.numpy.load_file``; the header holds the step, metrics,
          plain values and metadata as JSON. Needs only the ``safetensors`` extra.
        - ``"tf-checkpoint"``: ``out`` is a checkpoint prefix (``out.index``, ``out.data-*``),
          readable by ``tf.train.load_checkpoint(out)`` and by
          ``tf.train.Checkpoint(model=..., optimizer=...).read(out)``; its ``save_counter`` is the step.
        - ``"savedmodel"``: a SavedModel directory (``model.export``) of the checkpoint's Keras
          model, for TF Serving and ``tf.saved_model.load``.
        - ``"keras"``: a ``.keras`` file (``model.save``) of the checkpoint's Keras model.

    Args:
        directory: The checkpoint directory (local path or fsspec URL).
        out: The output path or fsspec URL.
        to: One of :data:`FORMATS`.
        step: The step to export; ``None`` means the newest valid checkpoint.
        key: The subtree to export, by pitstop path (``"model"``, ``"params/encoder"``); for
            ``savedmodel``/``keras`` it picks the model when the state holds several.
        storage_options: fsspec options for URLs (used for ``directory`` and ``out``).
        overwrite: Replace an existing output instead of refusing.
        skip_unsupported: Leave out arrays the format cannot hold (say, complex128 in
            safetensors) instead of refusing; the result lists them.

    Returns:
        What was written (:class:`ExportResult`).

    Raises:
        InteropError: unknown format, output exists, no entry ``key``, no Keras model for
            ``savedmodel``/``keras``, or data the format cannot hold.
        CheckpointNotFoundError: no (such) checkpoint in ``directory``.
        CorruptCheckpointError: the checkpoint failed its checksums.
        StorageError: reading or writing failed.
        ImportError: the extra the format needs is not installed.

    Example:
        >>> from pitstop import interop
        >>> interop.export("runs/exp1", "exp1.safetensors", to="safetensors")  # doctest: +SKIP
    """
    if to not in FORMATS:
        raise InteropError(f"unknown export format {to!r}: choose one of {', '.join(FORMATS)}", path=directory)
    if step is not None and (type(step) is not int or step < 0):
        raise InteropError(f"step must be an int >= 0 or None, got {step!r}", path=directory)
    if to == "keras" and not out.endswith(".keras"):
        raise InteropError(f"a Keras file must end in .keras (Keras refuses other names): got {out!r}", path=out)
    _check_extra(to)
    source = read_source(directory, step, key, storage_options)
    with staged_output(out, storage_options, claims=_CLAIMS[to], overwrite=overwrite) as staged:
        if to == "safetensors":
            from ._interop._safetensors import write_safetensors

            count, skipped = write_safetensors(source, staged.path, skip_unsupported=skip_unsupported)
        elif to == "tf-checkpoint":
            from ._interop._tf import write_tf_checkpoint

            count, skipped = write_tf_checkpoint(source, staged.path, skip_unsupported=skip_unsupported)
        else:
            from ._interop._tf import write_keras_model

            count, skipped = write_keras_model(source, staged.path, to)
    return ExportResult(to, out, source.directory, source.step, source.key, count, tuple(staged.files), tuple(skipped))


def _check_extra(to: str) -> None:
    """Fail before reading anything when the format's extra is missing."""
    if to == "safetensors":
        try:
            import safetensors  # noqa: F401
        except ImportError as exc:
            from ._interop._types import missing_extra

            raise missing_extra("export to safetensors", "safetensors", exc) from exc
    else:
        from ._interop._tf import tf_module

        tf_module()


def import_tf_checkpoint(
    tf_path: str,
    directory: str,
    *,
    step: int | None = None,
    state: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ImportResult:
    """Save a checkpoint written by ``tf.train.Checkpoint`` as a pitstop checkpoint.

    With ``state`` (your objects, as you passed them to ``tf.train.Checkpoint``: e.g.
    ``{"model": model, "optimizer": optimizer, "epoch": 0}``) the TF checkpoint is read
    into them with ``tf.train.Checkpoint(**objects).read(path).assert_existing_objects_matched()``
    and ``state`` is saved with pitstop, so ``CheckpointManager(directory).restore(state)``
    later restores the same objects. Plain values in ``state`` are replaced by the TF
    checkpoint's variable of the same name when it has one. Without ``state``, every
    variable is stored as a NumPy array in a nested dict keyed by its checkpoint key
    (``model/layer_with_weights-0/kernel``), without the object graph and the save counter.

    Args:
        tf_path: A checkpoint prefix (``ckpts/ckpt-5``, or one of its files) or a directory
            written by ``tf.train.CheckpointManager`` (its latest checkpoint is taken).
        directory: The pitstop checkpoint directory to save into (path or fsspec URL).
        step: The pitstop step; default: the TF checkpoint's ``save_counter``, else the number
            in its name (``ckpt-5``), else 0.
        state: Objects to restore the TF checkpoint into and save (see above).
        metadata: Extra JSON metadata stored with the checkpoint (``imported_from`` is added).
        storage_options: fsspec options for a URL ``directory``.

    Returns:
        What was imported (:class:`ImportResult`).

    Raises:
        CheckpointNotFoundError: no TF checkpoint at ``tf_path``.
        CorruptCheckpointError: TensorFlow cannot read it.
        StateMismatchError: it does not match ``state``'s objects (TF's report is quoted).
        CheckpointExistsError: ``directory`` already has a checkpoint at that step.
        InteropError: ``state`` is unusable (not a dict of objects, an unbuilt model).
        ImportError: TensorFlow is not installed.

    Example:
        >>> from pitstop import interop
        >>> interop.import_tf_checkpoint("tf_ckpts", "runs/exp1")  # doctest: +SKIP
    """
    from ._interop import _tf

    if step is not None and (type(step) is not int or step < 0):
        raise InteropError(f"step must be an int >= 0 or None, got {step!r}", path=tf_path)
    _tf.tf_module()
    prefix = _tf.resolve_prefix(tf_path)
    skipped: list[str] = []
    if state is None:
        tree, counter, skipped = _tf.read_tf_variables(prefix)
        to_save: Any = tree
    else:
        counter, _ = _tf.restore_into(state, prefix)
        to_save = state
    chosen = step if step is not None else (counter if counter is not None else 0)
    meta = {**(metadata or {}), "imported_from": prefix, "imported_format": "tf-checkpoint"}
    # an import deletes nothing: the directory's recorded policy stays in force, and a
    # directory without one keeps all its checkpoints (and records that)
    options: dict[str, Any] = {} if _recorded_policy(directory, storage_options) else {"max_to_keep": None}
    with CheckpointManager(
        directory, async_save=False, capture_rng=False, storage_options=storage_options, **options
    ) as mgr:
        if chosen in mgr.all_steps():
            raise CheckpointExistsError(
                f"checkpoint step {chosen} already exists in {mgr.directory}; import under another step "
                "(step=...) or delete it first",
                path=mgr.directory,
                step=chosen,
            )
        mgr.save(chosen, to_save, metadata=meta, force=True)
        arrays = len(mgr.manifest(chosen).arrays)
        name = mgr.directory
    return ImportResult(prefix, name, chosen, arrays, tuple(skipped))


def _recorded_policy(directory: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether the newest readable checkpoint of ``directory`` records a retention policy."""
    with CheckpointManager(directory, capture_rng=False, storage_options=storage_options) as probe:
        for step in reversed(probe.all_steps()):
            try:
                return probe.manifest(step).policy is not None
            except CheckpointError:
                continue
    return False
