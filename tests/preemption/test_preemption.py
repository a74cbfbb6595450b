"""Preemption: a signal makes the manager save at the next step boundary, commit, and exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pitstop
from pitstop._manager._preempt import parse_signals

TRAINER = Path(__file__).with_name("trainer.py")


def _env() -> dict[str, str]:
    src = str(Path(pitstop.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_training_saves_exits_0_and_resumes_bit_identically(tmp_path: Path, sig: signal.Signals) -> None:
    ref = tmp_path / "ref.npz"
    subprocess.run([sys.executable, str(TRAINER), str(tmp_path / "ref"), str(ref)], env=_env(), check=True)

    d, out = tmp_path / "run", tmp_path / "out.npz"
    with subprocess.Popen([sys.executable, str(TRAINER), str(d), str(out), "--slow"], env=_env(),
                          stdout=subprocess.PIPE, text=True) as p:  # fmt: skip
        assert p.stdout is not None
        for line in p.stdout:
            if int(line) == 37:  # off the save interval (25)
                p.send_signal(sig)
                break
        rest = p.stdout.read()
        assert p.wait(timeout=120) == 0
    assert not out.exists()  # it stopped early
    stopped = int(rest.split()[-1]) if rest.split() else 37
    mgr = pitstop.CheckpointManager(d)
    assert mgr.all_steps() == [25, stopped]  # the preemption checkpoint, off the interval
    assert stopped < 200
    subprocess.run([sys.executable, str(TRAINER), str(d), str(out)], env=_env(), check=True)
    a, b = np.load(ref), np.load(out)
    assert a["w"].tobytes() == b["w"].tobytes()
    assert a["losses"].tobytes() == b["losses"].tobytes()


def test_preempted_flag_without_exit(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    mgr = pitstop.CheckpointManager(tmp_path, save_interval_steps=100, preemption_signals=["usr1"],
                                    exit_on_preemption=False)  # fmt: skip
    assert signal.getsignal(signal.SIGUSR1) != previous
    state = {"w": np.ones(3)}
    assert mgr.save(1, state) is False
    os.kill(os.getpid(), signal.SIGUSR1)
    assert not mgr.preempted
    assert mgr.save(2, state) is True  # off the interval: saved because of the signal
    assert mgr.preempted and mgr.all_steps() == [2]
    mgr.close()
    assert signal.getsignal(signal.SIGUSR1) == previous  # handler handed back


def test_without_opt_in_no_handler_is_installed(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with pitstop.CheckpointManager(tmp_path) as mgr:
        assert {s: signal.getsignal(s) for s in before} == before
        mgr.save(1, {"a": np.zeros(1)})


def test_bad_signal_names_are_refused() -> None:
    assert parse_signals(("SIGTERM", "usr1", 10, signal.SIGTERM)) == [signal.SIGTERM, signal.SIGUSR1]
    with pytest.raises(ValueError, match="'SIGNOPE' is not a signal"):
        parse_signals(["SIGNOPE"])
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        parse_signals(["SIGKILL"])


def test_second_signal_goes_to_the_previous_handler(tmp_path: Path) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        mgr = pitstop.CheckpointManager(tmp_path, preemption_signals=["SIGUSR1"], exit_on_preemption=False)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == []
        os.kill(os.getpid(), signal.SIGUSR1)  # still no step boundary: the old handler acts
        assert seen == [signal.SIGUSR1]
        mgr.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)
