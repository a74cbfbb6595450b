"""PyTorch objects as checkpoint state: tensors, modules, optimizers, generators, RNG.

Importing this module registers an adapter with the core (it is imported automatically
the first time a torch object appears in a state, or when ``capture_rng`` runs in a
program that imported torch), so a state can hold:

- ``torch.Tensor`` (and ``nn.Parameter``) leaves, any dtype NumPy or ``ml_dtypes`` can
  represent (bfloat16 and the float8 types included). A contiguous CPU tensor is saved
  from, and restored into, its own memory (a NumPy view: no copy, no new allocation);
  other tensors go through a CPU copy and are restored with ``copy_`` into the existing
  tensor, keeping its device and identity;
- ``nn.Module``: its ``state_dict()`` (parameters *and* buffers such as BatchNorm's
  running statistics), restored in place;
- ``torch.optim.Optimizer``: per-parameter state tensors and ``param_groups`` as JSON
  values. A fresh optimizer whose state is still empty (``restore_or_initialize`` before
  the first step) is filled through ``Optimizer.load_state_dict``, exactly as torch does;
- LR schedulers (``LRScheduler`` subclasses and ``ReduceLROnPlateau``; chained ones too):
  their own ``state_dict()``/``load_state_dict()``, as for any stateful object;
- ``torch.Generator`` objects (their ``get_state()`` bytes).

Design reason: the adapter converts torch objects to NumPy views and hands them to the
core, which never imports torch (the safetensors layout: one thin adapter per
framework). The global RNGs -- ``torch.get_rng_state()`` and, where CUDA is available,
every CUDA device's generator -- are registered with ``capture_rng`` so that dropout and
random augmentation continue identically after a resume.
"""

from __future__ import annotations

import weakref
from typing import Any

import ml_dtypes
import numpy as np

try:
    import torch
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("pitstop.torch needs PyTorch: pip install 'pitstop[torch]'") from exc

from ._errors import Mismatch, StateMismatchError, UnsupportedStateError
from ._state._rng import register_rng
from ._state._tree import Stateful, describe_array, register_adapter, register_restore_hook, state_leaves

__all__ = ["tensor_to_numpy"]

#: torch dtypes NumPy cannot hold natively -> (same-size torch integer dtype, ml_dtypes type).
#: The tensor's bytes are reinterpreted, never converted, so a view shares memory.
_REINTERPRET: dict[torch.dtype, tuple[torch.dtype, Any]] = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16)}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name) and hasattr(ml_dtypes, _name):
        _REINTERPRET[getattr(torch, _name)] = (torch.uint8, getattr(ml_dtypes, _name))


def _numpy_view(t: torch.Tensor) -> np.ndarray[Any, Any]:
    """``t`` (a CPU tensor) as a NumPy array sharing its memory."""
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if t.dtype in _REINTERPRET:
        as_int, np_type = _REINTERPRET[t.dtype]
        return t.view(as_int).numpy().view(np_type)
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise UnsupportedStateError(
            f"cannot checkpoint a torch tensor of dtype {t.dtype}: pitstop stores the dtypes NumPy "
            "and ml_dtypes represent (bool, ints, floats incl. bfloat16/float8, complex64/128). "
            "Convert it, e.g. tensor.to(torch.float32)"
        ) from exc


def _check_storable(t: torch.Tensor) -> None:
    if t.layout != torch.strided:
        raise UnsupportedStateError(
            f"cannot checkpoint a {t.layout} torch tensor (shape {list(t.shape)}): pitstop stores dense "
            "tensors. Convert it with tensor.to_dense(), or save its components (indices, values)"
        )
    if t.is_quantized or t.device.type == "meta":
        kind = "quantized" if t.is_quantized else "meta (data-less)"
        raise UnsupportedStateError(
            f"cannot checkpoint a {kind} torch tensor of shape {list(t.shape)}: it has no plain "
            "array data. Dequantize or materialize it first"
        )


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """``tensor`` as a NumPy array: a view of its memory when it is a CPU tensor, else a CPU copy.

    bfloat16 and float8 tensors become arrays of the matching ``ml_dtypes`` type (same
    bytes, no conversion).

    Args:
        tensor: A dense tensor on any device.

    Returns:
        A NumPy array of the same shape and values.

    Raises:
        UnsupportedStateError: sparse, quantized or meta tensors, or a dtype NumPy cannot
            represent (complex32).

    Example:
        >>> import torch
        >>> tensor_to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype.name
        'bfloat16'
    """
    _check_storable(tensor)
    if tensor.device.type != "cpu":
        tensor = tensor.detach().to("cpu")
    return _numpy_view(tensor)


class _TensorState:
    """A tensor leaf: saved from a NumPy view, restored in place.

    The array :meth:`state_dict` hands out is where the core reads a restored array into:
    for a contiguous CPU tensor it *is* the tensor's memory, so restoring costs one read
    and nothing else; otherwise :meth:`load_state_dict` ``copy_``\\ s it into the tensor.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self._shared: np.ndarray[Any, Any] | None = None

    def state_dict(self) -> np.ndarray[Any, Any]:
        t = self.tensor
        _check_storable(t)
        if t.device.type == "cpu" and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
            self._shared = _numpy_view(t)
            return self._shared
        self._shared = None
        return _c_order(tensor_to_numpy(t))

    def load_state_dict(self, value: Any) -> None:
        if self._shared is not None and value is self._shared:
            return  # the core read straight into the tensor's memory
        arr = _c_order(np.asarray(value))
        src = torch.from_numpy(arr.view(_storage_view_dtype(arr.dtype)))
        if self.tensor.dtype in _REINTERPRET:
            src = src.view(self.tensor.dtype)
        with torch.no_grad():
            self.tensor.copy_(src.reshape(self.tensor.shape))


def _c_order(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``a`` as a C-contiguous array of the same shape (``np.ascontiguousarray`` makes 0-d 1-d)."""
    return a if a.flags.c_contiguous else a.copy(order="C")


def _storage_view_dtype(dt: np.dtype[Any]) -> np.dtype[Any]:
    """A dtype ``torch.from_numpy`` accepts with the same bytes as ``dt`` (ml_dtypes -> ints)."""
    if dt.type.__module__.startswith("ml_dtypes"):
        return np.dtype(np.int16) if dt.itemsize == 2 else np.dtype(np.uint8)
    return dt


#: The state-dict key suffix of what a module returns from ``get_extra_state()`` (torch's
#: ``_EXTRA_STATE_KEY_SUFFIX``, a private name, so spelled out here).
_EXTRA_STATE = "_extra_state"


class _ModuleState:
    """An ``nn.Module``: its state dict (parameters and buffers), each tensor in place."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return dict(self.module.state_dict())

    def load_state_dict(self, state: Any) -> None:
        # every tensor was restored in place by its own leaf; what a module keeps with
        # get_extra_state() is handed back to its set_extra_state()
        extra = {k: v for k, v in state.items() if k.endswith(_EXTRA_STATE)}
        if extra:
            self.module.load_state_dict(extra, strict=False)


#: Optimizers whose state was empty when a restore began: their planned target state is
#: ``None`` so the core builds the saved state afresh instead of matching it key by key.
_FRESH: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


class _OptimizerState:
    """A torch optimizer: ``{"state": {param index: {name: tensor}}, "param_groups": [...]}``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        sd = self.optimizer.state_dict()
        state: dict[str, Any] | None = {str(k): dict(v) for k, v in sd["state"].items()}
        if not state and self.optimizer in _FRESH:
            state = None  # restore: take whatever was saved (see _mark_fresh_optimizers)
        groups = [dict(g) for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: Any) -> None:
        _FRESH.discard(self.optimizer)
        opt = self.optimizer
        saved_state = state["state"] or {}
        converted = {
            int(k): {name: _to_torch(v) for name, v in per_param.items()} for k, per_param in saved_state.items()
        }
        groups = [
            {k: (list(v) if k == "params" else _to_torch(v)) for k, v in g.items()} for g in state["param_groups"]
        ]
        if not opt.state:
            _check_slot_shapes(opt, converted)
        try:
            opt.load_state_dict({"state": converted, "param_groups": groups})
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise StateMismatchError(
                f"cannot load the saved state into {type(opt).__name__}: {exc}. The optimizer must "
                "be built over the same parameters, in the same groups, as the one that was saved"
            ) from exc


def _check_slot_shapes(opt: torch.optim.Optimizer, state: dict[int, dict[str, Any]]) -> None:
    """Refuse saved slots shaped unlike their parameter before a fresh optimizer takes them.

    ``Optimizer.load_state_dict`` accepts such state silently and the next ``step()``
    fails (or broadcasts); only slots with as many dimensions as the parameter are
    compared, since some optimizers keep factored (lower-rank) statistics.
    """
    params = [p for g in opt.param_groups for p in g["params"]]
    mismatched = []
    for k, per_param in sorted(state.items()):
        if not 0 <= k < len(params):
            continue  # torch reports parameter-count mismatches itself
        p = params[k]
        for name, v in sorted(per_param.items()):
            if isinstance(v, torch.Tensor) and v.ndim == p.ndim > 0 and v.shape != p.shape:
                mismatched.append(
                    Mismatch(
                        f"state/{k}/{name}",
                        describe_array(_dtype_label(v), tuple(v.shape)),
                        describe_array(_dtype_label(p), tuple(p.shape)),
                    )
                )
    if mismatched:
        details = "; ".join(str(m) for m in mismatched)
        raise StateMismatchError(
            f"cannot restore the {type(opt).__name__} optimizer: its saved state does not fit its "
            f"parameters ({details}). Build the model and the optimizer exactly as they were "
            "saved, or leave the optimizer out of the restored state to start it afresh",
            mismatched=mismatched,
        )


def _dtype_label(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _to_torch(value: Any) -> Any:
    """Restored values back in the form torch keeps them: arrays -> CPU tensors."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        arr = _c_order(value)
        t = torch.from_numpy(arr.view(_storage_view_dtype(arr.dtype)).copy())
        for torch_dtype, (_, np_type) in _REINTERPRET.items():
            if arr.dtype == np.dtype(np_type):
                return t.view(torch_dtype)
        return t
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):  # e.g. LBFGS keeps lists of direction tensors
        return [_to_torch(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_torch(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    return value


class _GeneratorState:
    """A ``torch.Generator``: its ``get_state()`` bytes."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state().numpy()}

    def load_state_dict(self, state: Any) -> None:
        self.generator.set_state(torch.from_numpy(np.ascontiguousarray(state["state"], dtype=np.uint8)))


def _adapter(obj: object) -> Stateful | None:
    if isinstance(obj, torch.Tensor):
        return _TensorState(obj)
    if isinstance(obj, torch.nn.Module):
        return _ModuleState(obj)
    if isinstance(obj, torch.optim.Optimizer):
        return _OptimizerState(obj)
    if isinstance(obj, torch.Generator):
        return _GeneratorState(obj)
    return None


def _mark_fresh_optimizers(state: Any) -> None:
    """Before a restore: remember which optimizers in ``state`` have no state yet."""
    _FRESH.clear()
    for node in state_leaves(state):
        if isinstance(node, torch.optim.Optimizer) and not node.state:
            _FRESH.add(node)


def _torch_rng_capture() -> Any:
    out: dict[str, Any] = {"cpu": torch.get_rng_state().numpy()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        out["cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return out


def _torch_rng_restore(s: Any) -> None:
    torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(s["cpu"], dtype=np.uint8)))
    cuda = s.get("cuda")
    if cuda and torch.cuda.is_available():
        states = [torch.from_numpy(np.ascontiguousarray(c, dtype=np.uint8)) for c in cuda]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


register_adapter(_adapter)
register_restore_hook(_mark_fresh_optimizers)
register_rng("torch", _torch_rng_capture, _torch_rng_restore)
