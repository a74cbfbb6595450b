"""torch objects in a state: tensors (all dtypes, in place), modules, optimizers,
schedulers, generators, the global RNG, and mismatch reports naming paths and shapes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import pitstop
import pitstop.torch


def net(hidden: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, classes)
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, sched: Any = None) -> list[float]:
    losses = []
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.uint16,
    ],
)
def test_tensor_dtypes_round_trip_in_place(tmp_path: Path, dtype: torch.dtype) -> None:
    src = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4).to(dtype)
    pitstop.save(tmp_path / "c", {"t": src})
    target = torch.zeros(3, 4, dtype=dtype)
    ptr = target.data_ptr()
    state = {"t": target}
    pitstop.restore(tmp_path / "c", state)
    assert state["t"] is target and target.data_ptr() == ptr
    assert torch.equal(target.view(torch.uint8), src.view(torch.uint8))  # bit-identical
    plain = pitstop.restore(tmp_path / "c")["t"]
    assert isinstance(plain, np.ndarray) and plain.shape == (3, 4)
    if dtype == torch.bfloat16:
        assert plain.dtype == np.dtype(ml_dtypes.bfloat16)


def test_bfloat16_is_stored_under_its_name(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"t": torch.ones(2, dtype=torch.bfloat16)})
    mgr = pitstop.CheckpointManager(tmp_path / "c2", async_save=False, capture_rng=False)
    mgr.save(1, {"t": torch.ones(2, dtype=torch.bfloat16)})
    mgr.close()
    assert pitstop.restore(tmp_path / "c")["t"].dtype.name == "bfloat16"


def test_non_contiguous_and_grad_tensors_are_copied_into_place(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    param = nn.Parameter(torch.randn(5))
    pitstop.save(tmp_path / "c", {"t": base.t(), "p": param})
    target_base = torch.zeros(3, 4)
    target = target_base.t()  # a non-contiguous view: restored with copy_
    p2 = nn.Parameter(torch.zeros(5))
    pitstop.restore(tmp_path / "c", {"t": target, "p": p2})
    assert torch.equal(target_base, base)
    assert torch.equal(p2.detach(), param.detach()) and p2.requires_grad


def test_module_restores_parameters_and_buffers_in_place(tmp_path: Path) -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, 3)
    pitstop.save(tmp_path / "c", {"model": model})
    fresh = net()
    ptrs = [p.data_ptr() for p in fresh.state_dict().values()]
    pitstop.restore(tmp_path / "c", {"model": fresh})
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [p.data_ptr() for p in fresh.state_dict().values()] == ptrs
    assert int(fresh[1].num_batches_tracked) == 3  # a buffer, not a parameter
    tree = pitstop.restore(tmp_path / "c")
    assert set(tree["model"]) == set(model.state_dict())


class WithExtraState(nn.Module):
    """A module keeping plain state of its own through get_extra_state()."""

    def __init__(self, extra: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.extra = extra

    def get_extra_state(self) -> Any:
        return self.extra  # the live object, as such modules usually do

    def set_extra_state(self, state: Any) -> None:
        self.extra = state


@pytest.mark.parametrize("saved", [{"k": 5, "hist": [5, 6]}, 7])
def test_module_extra_state_is_handed_to_set_extra_state(tmp_path: Path, saved: Any) -> None:
    src = WithExtraState(copy.deepcopy(saved))
    pitstop.save(tmp_path / "c", {"m": src})
    live = {"k": 0, "hist": [0, 0]} if isinstance(saved, dict) else 0
    dst = WithExtraState(live)
    pitstop.restore(tmp_path / "c", {"m": dst})
    assert dst.extra == saved
    assert torch.equal(dst.lin.weight, src.lin.weight)
    if isinstance(saved, dict):
        assert live == {"k": 0, "hist": [0, 0]}  # the module's old object was not written into


@pytest.mark.parametrize("opt_name", ["adam", "sgd_momentum", "adamw"])
def test_optimizer_restored_into_a_fresh_optimizer_continues_identically(tmp_path: Path, opt_name: str) -> None:
    def make(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        if opt_name == "adam":
            o: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        elif opt_name == "adamw":
            o = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
        else:
            o = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        return o, torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)

    torch.manual_seed(1)
    model = net()
    model.eval()  # no dropout: the comparison below is about optimizer state only
    opt, sched = make(model)
    train(model, opt, 3, sched)
    mgr = pitstop.CheckpointManager(tmp_path / "c", async_save=False, capture_rng=False)
    mgr.save(3, {"model": model, "opt": opt, "sched": sched})
    reference = copy.deepcopy(model)
    ref_opt, ref_sched = make(reference)
    ref_opt.load_state_dict(opt.state_dict())
    ref_sched.load_state_dict(sched.state_dict())
    expected = train(reference, ref_opt, 4, ref_sched)

    resumed = net()
    resumed.eval()
    new_opt, new_sched = make(resumed)
    assert not new_opt.state
    assert mgr.restore_or_initialize({"model": resumed, "opt": new_opt, "sched": new_sched}) == 3
    mgr.close()
    assert new_sched.last_epoch == 3 and new_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert train(resumed, new_opt, 4, new_sched) == expected
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_optimizer_restored_in_place_when_it_has_state(tmp_path: Path) -> None:
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    pitstop.save(tmp_path / "c", {"opt": opt})
    saved = copy.deepcopy(opt.state_dict())
    train(model, opt, 2)  # moves the state on
    exp_avg = opt.state[next(iter(model.parameters()))]["exp_avg"]
    pitstop.restore(tmp_path / "c", {"opt": opt})
    assert opt.state[next(iter(model.parameters()))]["exp_avg"] is exp_avg  # same tensor object
    for k, v in saved["state"].items():
        for name, t in v.items():
            assert torch.equal(opt.state_dict()["state"][k][name], t), (k, name)


def test_schedulers_round_trip(tmp_path: Path) -> None:
    def make() -> tuple[torch.optim.Optimizer, dict[str, Any]]:
        p = nn.Parameter(torch.ones(2))
        o = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
        o2 = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9)
        o3 = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
        return o, {
            "seq": torch.optim.lr_scheduler.SequentialLR(o, [warm, cos], milestones=[3]),
            "one": torch.optim.lr_scheduler.OneCycleLR(o2, max_lr=0.5, total_steps=20),
            "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau(o3, patience=10),
        }

    opt, scheds = make()
    for i in range(5):
        for o in (opt, scheds["one"].optimizer, scheds["plateau"].optimizer):
            o.step()
        for name, s in scheds.items():
            if name == "plateau":
                s.step(1.0 + i)
            else:
                s.step()
    pitstop.save(tmp_path / "c", {"scheds": scheds})
    _, fresh = make()
    pitstop.restore(tmp_path / "c", {"scheds": fresh})
    for name in scheds:
        assert fresh[name].state_dict() == scheds[name].state_dict(), name
        assert fresh[name].get_last_lr() == scheds[name].get_last_lr(), name
    assert fresh["plateau"].num_bad_epochs == scheds["plateau"].num_bad_epochs > 0


def test_generator_objects_continue_their_stream(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    torch.rand(7, generator=gen)
    pitstop.save(tmp_path / "c", {"gen": gen})
    expected = torch.rand(4, generator=gen)
    other = torch.Generator().manual_seed(99)
    pitstop.restore(tmp_path / "c", {"gen": other})
    assert torch.equal(torch.rand(4, generator=other), expected)


def test_global_torch_rng_is_captured_and_restored(tmp_path: Path) -> None:
    model = net()
    model.train()
    mgr = pitstop.CheckpointManager(tmp_path / "c", async_save=False)
    torch.rand(3)
    mgr.save(1, {"model": model})
    x = torch.ones(8, 4)
    expected = model(x)  # dropout draws from the global generator
    torch.manual_seed(1234)
    mgr.restore({"model": model})
    mgr.close()
    assert torch.equal(model(x), expected)


def test_changed_layer_shape_names_path_and_shapes(tmp_path: Path) -> None:
    pitstop.save(tmp_path / "c", {"model": net(classes=10)})
    new_head = net(classes=3)
    before = {k: v.clone() for k, v in new_head.state_dict().items()}
    with pytest.raises(
        pitstop.StateMismatchError, match=r"model/4\.weight: saved float32\[10, 8\], expected float32\[3, 8\]"
    ) as info:
        pitstop.restore(tmp_path / "c", {"model": new_head})
    assert {m.path for m in info.value.mismatched} == {"model/4.weight", "model/4.bias"}
    for k, v in new_head.state_dict().items():  # nothing was modified
        assert torch.equal(v, before[k]), k
    with pytest.warns(pitstop.PartialRestoreWarning):
        pitstop.restore(tmp_path / "c", {"model": new_head}, strict=False)
    assert torch.equal(new_head[4].weight, before["4.weight"])


def test_renamed_submodule_gets_a_rename_hint(tmp_path: Path) -> None:
    class A(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(3, 3)

    class B(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(3, 3)

    pitstop.save(tmp_path / "c", {"model": A()})
    with pytest.raises(pitstop.StateMismatchError) as info:
        pitstop.restore(tmp_path / "c", {"model": B()})
    msg = str(info.value)
    assert "model/backbone.weight" in msg and "model/encoder.weight" in msg and "renamed" in msg


def test_optimizer_over_other_parameters_is_a_mismatch(tmp_path: Path) -> None:
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 1)
    pitstop.save(tmp_path / "c", {"opt": opt})
    fewer = torch.optim.Adam(list(model.parameters())[:2], lr=1e-2)
    with pytest.raises(pitstop.StateMismatchError, match=r"opt/param_groups/0/params") as info:
        pitstop.restore(tmp_path / "c", {"opt": fewer})
    assert "strict=False" in str(info.value)


def test_fresh_optimizer_over_other_parameters_is_a_clear_error(tmp_path: Path) -> None:
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 1)
    pitstop.save(tmp_path / "c", {"opt": opt})
    bigger = net(hidden=16)
    fresh = torch.optim.Adam(bigger.parameters(), lr=1e-2)
    with pytest.raises(
        pitstop.StateMismatchError,
        match=r"Adam optimizer.*state/0/exp_avg: saved float32\[8, 4\], expected float32\[16, 4\]",
    ):
        pitstop.restore(tmp_path / "c", {"opt": fresh})
    assert not fresh.state  # left untouched
    fewer = torch.optim.Adam(list(model.parameters())[:2], lr=1e-2)
    with pytest.raises(pitstop.StateMismatchError, match=r"opt/param_groups/0/params"):
        pitstop.restore(tmp_path / "c", {"opt": fewer})


def test_unsupported_tensors_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(pitstop.UnsupportedStateError, match=r"sparse.*to_dense"):
        pitstop.save(tmp_path / "a", {"s": torch.eye(3).to_sparse()})
    with pytest.raises(pitstop.UnsupportedStateError, match=r"meta"):
        pitstop.save(tmp_path / "b", {"m": torch.empty(3, device="meta")})
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.json"))


def test_tensor_to_numpy_shares_memory() -> None:
    t = torch.zeros(4)
    a = pitstop.torch.tensor_to_numpy(t)
    a[1] = 5
    assert float(t[1]) == 5.0


def test_async_save_snapshots_tensors_before_training_moves_on(tmp_path: Path) -> None:
    w = torch.zeros(1000)
    with pitstop.CheckpointManager(tmp_path / "c", async_save=True, capture_rng=False) as mgr:
        mgr.save(1, {"w": w})
        w.add_(1.0)  # in place, while the save may still be writing
    with pitstop.CheckpointManager(tmp_path / "c") as mgr:
        assert float(mgr.restore()[1]["w"].sum()) == 0.0


def test_lbfgs_state_with_lists_of_tensors_restores_into_a_fresh_optimizer(tmp_path: Path) -> None:
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = nn.Linear(3, 1)
        return m, torch.optim.LBFGS(m.parameters(), lr=0.5, history_size=3)

    x, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)), torch.randn(16, 1)

    def steps(m: nn.Module, o: torch.optim.Optimizer, n: int) -> list[float]:
        def closure() -> torch.Tensor:
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        return [float(o.step(closure).detach()) for _ in range(n)]

    model, opt = make()
    steps(model, opt, 2)
    pitstop.save(tmp_path / "c", {"model": model, "opt": opt})
    expected = steps(model, opt, 2)
    model2, opt2 = make()
    pitstop.restore(tmp_path / "c", {"model": model2, "opt": opt2})
    assert isinstance(opt2.state[model2.weight]["old_dirs"][0], torch.Tensor)
    assert steps(model2, opt2, 2) == expected
