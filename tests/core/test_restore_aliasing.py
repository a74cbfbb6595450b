"""An in-place restore never writes plain values into containers a ``state_dict()`` returned.

Objects often return their own live lists/dicts from ``state_dict()``, and several objects may
share one (chained LR schedulers share ``_last_lr``). The restore planner copies such a
container before it writes restored plain values into it, so each ``load_state_dict`` gets its
own fresh containers and nothing an object still holds changes behind its back; arrays are
still restored in place into the buffers the state dict returned.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

import pitstop


class History:
    """Keeps a live list and returns it (not a copy) from ``state_dict()``."""

    def __init__(self, values: list[Any], weights: np.ndarray[Any, Any] | None = None) -> None:
        self.values = values
        self.weights = np.zeros(3) if weights is None else weights
        self.loaded: list[Any] | None = None
        self.values_at_load: list[Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values, "meta": {"tags": self.values, "n": len(self.values)}, "w": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values_at_load = list(self.values)  # what the object held when asked to load
        self.loaded = state["values"]
        self.weights = state["w"]


def test_objects_sharing_one_list_are_restored_independently(tmp_path: Path) -> None:
    a, b = History([1, 2]), History([30, 40])
    pitstop.save(tmp_path / "c", {"a": a, "b": b})

    shared = [0, 0]
    fa, fb = History(shared), History(shared)
    pitstop.restore(tmp_path / "c", {"a": fa, "b": fb})
    assert fa.loaded == [1, 2]
    assert fb.loaded == [30, 40]
    assert fa.loaded is not fb.loaded
    assert shared == [0, 0]  # the list both objects hold was not written behind their backs


def test_live_internal_list_is_not_mutated_before_load_state_dict(tmp_path: Path) -> None:
    h = History(["x", "y"])
    pitstop.save(tmp_path / "c", {"h": h})

    live = ["old", "old"]
    fresh = History(live)
    pitstop.restore(tmp_path / "c", {"h": fresh})
    assert fresh.values_at_load == ["old", "old"]  # untouched when load_state_dict ran
    assert live == ["old", "old"]
    assert fresh.loaded == ["x", "y"]
    assert fresh.loaded is not live


def test_arrays_in_a_copied_container_are_still_restored_in_place(tmp_path: Path) -> None:
    h = History([1], np.array([1.0, 2.0, 3.0]))
    pitstop.save(tmp_path / "c", {"h": h})

    buf = np.zeros(3)
    fresh = History([0], buf)
    pitstop.restore(tmp_path / "c", {"h": fresh})
    assert fresh.weights is buf  # the same buffer, filled in place (zero-copy contract)
    assert buf.tolist() == [1.0, 2.0, 3.0]
    assert fresh.loaded == [1]


def test_plain_values_are_still_written_into_the_users_own_containers(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"epoch": 7, "hist": [1, 2], "h": History([5])})
    state: dict[str, Any] = {"epoch": 0, "hist": [0, 0], "h": History([0])}
    hist = state["hist"]
    pitstop.restore(tmp_path / "c", state)
    assert state["epoch"] == 7
    assert state["hist"] is hist and hist == [1, 2]
    assert state["h"].loaded == [5]


class Nested:
    """A state dict of an OrderedDict subclass with an attribute, a tuple holding a list."""

    class Meta(OrderedDict[str, Any]):
        pass

    def __init__(self, lr: float) -> None:
        self.meta = Nested.Meta(lr=lr)
        self.meta.version = 3  # type: ignore[attr-defined]
        self.pair = ([lr], "x")
        self.got: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "pair": self.pair}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.got = state


def test_copied_containers_keep_their_type_and_tuples_do_not_leak_writes(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"n": Nested(0.5)})
    fresh = Nested(0.1)
    meta, inner = fresh.meta, fresh.pair[0]
    pitstop.restore(tmp_path / "c", {"n": fresh})
    assert type(fresh.got["meta"]) is Nested.Meta
    assert fresh.got["meta"].version == 3
    assert fresh.got["meta"] == {"lr": 0.5} and meta == {"lr": 0.1}
    assert fresh.got["pair"] == ([0.5], "x") and inner == [0.1]
