"""Implementation of :mod:`pitstop.interop`: export to and import from other formats.

Split by concern so that no framework is imported before a function needs it:
``_source`` reads a pitstop checkpoint (and a subtree of it) and stages output files,
``_safetensors`` writes safetensors files (NumPy only), ``_tf`` writes and reads
TensorFlow checkpoints, SavedModels and ``.keras`` files. The public surface is
:mod:`pitstop.interop`.
"""

from __future__ import annotations

__all__: list[str] = []
