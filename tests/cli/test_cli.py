"""The ``pitstop`` command line, run in-process with click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pitstop
from pitstop._cli import main
from pitstop._cli._common import manifest_entries
from pitstop._cli._diff import compare_arrays, parse_ref

from .conftest import Cli, flip_byte

COMMANDS = ["ls", "show", "verify", "gc"]


def _segment_of(directory: Path, step: int, path: str) -> tuple[Path, int]:
    """The object file and offset holding the first byte of array ``path`` at ``step``."""
    with pitstop.CheckpointManager(directory, max_to_keep=None) as mgr:
        m = mgr.manifest(step)
    arrays, _, _ = manifest_entries(m)
    (info,) = [a for a in arrays if a.path == path]
    seg = m.arrays[info.index].segments[0]
    return directory / "objects" / seg.object, seg.offset


# -- help and entry point -------------------------------------------------------------------


def test_help_lists_every_command_with_examples(run: Cli) -> None:
    res = run("--help")
    assert res.exit_code == 0
    for name in [*COMMANDS, "diff", "demo"]:
        assert name in res.stdout
        sub = run(name, "--help")
        assert sub.exit_code == 0
        assert "Example:" in sub.stdout
        assert "pitstop " + name in sub.stdout


def test_main_entry_point_prints_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert pitstop.__version__ in capsys.readouterr().out


# -- ls -------------------------------------------------------------------------------------


def test_ls_lists_steps_metrics_and_keeps_all_by_default(run: Cli, ckpt: Path) -> None:
    res = run("ls", ckpt)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == str(ckpt)
    for header in ("step", "time", "size", "own", "shared", "acc", "loss", "kept"):
        assert header in lines[2]
    rows = [ln for ln in lines if "latest" in ln]
    assert len(rows) == 4
    assert "0.333333" in res.stdout  # loss of step 3
    assert "4 checkpoints, 4 kept" in res.stdout
    assert "\x1b[" not in res.output  # no colour codes off a terminal
    assert all(ln == ln.rstrip() for ln in lines)


def test_ls_evaluates_a_policy_and_marks_the_best(run: Cli, ckpt: Path) -> None:
    res = run("ls", ckpt, "--max-to-keep", "1", "--best-metric", "loss", "--best-mode", "max")
    assert res.exit_code == 0, res.output
    row = {int(ln.split()[1]): ln for ln in res.stdout.splitlines() if ln[:1] == "│" and ln.split()[1].isdigit()}
    assert "1 *" in row[1] and "best loss" in row[1]
    assert "would be deleted" in row[2] and "would be deleted" in row[3]
    assert "latest" in row[4]
    assert "* best loss (max)" in res.stdout
    assert len(list(ckpt.glob("manifests/*.json"))) == 4  # nothing deleted


def test_ls_json_sizes_split_own_and_shared(run: Cli, ckpt: Path) -> None:
    doc = json.loads(run("ls", ckpt, "--json").stdout)
    assert [s["step"] for s in doc["steps"]] == [1, 2, 3, 4]
    assert doc["best_step"] is None
    for s in doc["steps"]:
        assert s["kept"] and s["reasons"] == ["latest"]
        assert s["own_bytes"] + s["shared_bytes"] == s["stored_bytes"]
        assert s["shared_bytes"] > 0  # `frozen` is stored once for all steps
        assert s["metrics"]["acc"] == pytest.approx(0.1 * s["step"])
        assert s["time_iso"]
    only_last = json.loads(run("ls", ckpt, "--json", "--max-to-keep", "1").stdout)
    last = only_last["steps"][-1]
    assert last["kept"] and last["own_bytes"] == last["stored_bytes"] and last["shared_bytes"] == 0
    assert [s["kept"] for s in only_last["steps"]] == [False, False, False, True]
    best = json.loads(run("ls", ckpt, "--json", "--best-metric", "acc", "--best-mode", "max").stdout)
    assert best["best_step"] == 4
    assert [s["best"] for s in best["steps"]] == [False, False, False, True]
    assert best["policy"]["best_metric"] == "acc"


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    """Steps 1, 3, 4 kept by the recorded policy (newest 2 plus the best "quality", mode max)."""
    d = tmp_path / "recorded"
    with pitstop.CheckpointManager(
        d, async_save=False, max_to_keep=2, best_metric="quality", best_mode="max", keep_best=1
    ) as mgr:
        for step, quality in zip((1, 2, 3, 4), (0.9, 0.1, 0.2, 0.3), strict=True):
            mgr.save(step, {"w": np.full(3, step)}, metrics={"quality": quality})
    return d


def test_ls_without_options_shows_the_recorded_policy(run: Cli, recorded: Path) -> None:
    doc = json.loads(run("ls", recorded, "--json").stdout)
    assert doc["policy"] == {
        "max_to_keep": 2,
        "best_metric": "quality",
        "best_mode": "max",
        "keep_best": 1,
        "keep_every": None,
    }
    assert doc["best_step"] == 1
    assert {s["step"]: s["reasons"] for s in doc["steps"]} == {1: ["best quality"], 3: ["latest"], 4: ["latest"]}
    assert "* best quality (max)" in run("ls", recorded).stdout
    # an option given replaces only itself: the recorded metric, mode and keep_best stay
    doc = json.loads(run("ls", recorded, "--json", "--max-to-keep", "1").stdout)
    assert doc["policy"]["max_to_keep"] == 1 and doc["policy"]["best_mode"] == "max"
    assert {s["step"]: s["kept"] for s in doc["steps"]} == {1: True, 3: False, 4: True}


def test_ls_and_plot_declare_the_same_retention_options(run: Cli) -> None:
    for command in ("ls", "plot"):
        text = run(command, "--help").stdout
        for option in ("--max-to-keep", "--best-metric", "--best-mode", "--keep-best", "--keep-every N"):
            assert option in text
        assert "Keep every step that is a multiple of N." in text
        assert "PITSTOP_STORAGE_OPTIONS" in text


def test_ls_reports_a_corrupt_manifest_and_goes_on(run: Cli, ckpt: Path) -> None:
    flip_byte(ckpt / "manifests" / f"{2:020d}.json", offset=100)
    res = run("ls", ckpt)
    assert res.exit_code == 0
    assert "corrupt manifest" in res.stdout
    doc = json.loads(run("ls", ckpt, "--json").stdout)
    assert "checksum" in doc["steps"][1]["error"]


def test_ls_of_a_directory_without_checkpoints(run: Cli, tmp_path: Path) -> None:
    d = tmp_path / "empty"
    with pitstop.CheckpointManager(d, async_save=False) as mgr:
        mgr.save(1, {"w": np.ones(2)})
        mgr.delete(1)
    res = run("ls", d)
    assert res.exit_code == 0
    assert "no checkpoints" in res.stdout
    assert json.loads(run("ls", d, "--json").stdout)["steps"] == []


def test_ls_rejects_bad_policy_options(run: Cli, ckpt: Path) -> None:
    res = run("ls", ckpt, "--max-to-keep", "0")
    assert res.exit_code == 2
    res = run("ls", ckpt, "--keep-best", "2")
    assert res.exit_code == 2
    assert "keep_best needs best_metric" in res.stderr


# -- show -----------------------------------------------------------------------------------


def test_show_prints_tree_and_details_of_the_latest_step(run: Cli, ckpt: Path) -> None:
    res = run("show", ckpt)
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "step 4  (latest)" in out
    assert "w  float32[3, 4]  48 B" in out
    assert "frozen  float32[4096]  16.0 KiB" in out
    assert "epoch  = 4" in out
    assert "b  float64[2]  16 B" in out
    assert '{"lr": 0.01, "tag": "unit"}' in out
    assert "acc=0.4  loss=0.25" in out
    assert f"pitstop {pitstop.__version__}" in out
    assert "\x1b[" not in res.output


def test_show_json_of_a_given_step(run: Cli, ckpt: Path) -> None:
    doc = json.loads(run("show", ckpt, "--step", "2", "--json").stdout)
    assert doc["step"] == 2 and doc["latest"] is False
    arrays = {a["path"]: a for a in doc["arrays"]}
    assert set(arrays) == {"params/frozen", "params/layers/0/b", "params/w"}
    assert arrays["params/w"] == {"path": "params/w", "dtype": "float32", "shape": [3, 4], "nbytes": 48}
    assert doc["values"] == {"epoch": 2}
    assert doc["metrics"] == {"acc": pytest.approx(0.2), "loss": 0.5}
    assert doc["metadata"] == {"lr": 0.01, "tag": "unit"}
    assert doc["versions"]["pitstop"] == pitstop.__version__
    assert doc["nbytes"] == sum(a["nbytes"] for a in doc["arrays"] + doc["rng_arrays"])


class Counter:
    """A stateful object as a framework would provide one."""

    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict[str, object]:
        return {"n": self.n, "seen": np.arange(3)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])


def test_show_and_diff_objects_tuples_and_special_floats(run: Cli, tmp_path: Path) -> None:
    d = tmp_path / "odd"
    with pitstop.CheckpointManager(d, async_save=False, max_to_keep=None) as mgr:
        for step in (1, 2):
            mgr.save(step, {"counter": Counter(step), "hist": (1.5, float("nan")), "empty": {}, "f": float("inf")})
    out = run("show", d).stdout
    assert "counter  <tests.cli.test_cli.Counter>  1 array, 24 B" in out
    assert "n  = 2" in out and "seen  int64[3]  24 B" in out
    assert "0  = 1.5" in out and "1  = nan" in out and "f  = inf" in out
    assert "empty  {}" in out
    doc = json.loads(run("show", d, "--json").stdout)
    assert doc["objects"] == {"counter": "tests.cli.test_cli.Counter"}
    assert doc["values"]["hist/1"] == "nan"
    diff = json.loads(run("diff", f"{d}@1", f"{d}@2", "--json").stdout)
    assert diff["values"] == [{"path": "counter/n", "a": 1, "b": 2}]
    assert diff["unchanged"] == 1 and diff["unchanged_values"] == 3  # NaN equals NaN


def test_show_of_a_missing_step_is_an_error(run: Cli, ckpt: Path) -> None:
    res = run("show", ckpt, "--step", "9")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: no checkpoint for step 9")
    assert "[1, 2, 3, 4]" in res.stderr


# -- diff -----------------------------------------------------------------------------------


def test_diff_of_two_steps_reports_the_changed_array(run: Cli, ckpt: Path) -> None:
    doc = json.loads(run("diff", f"{ckpt}@2", f"{ckpt}@4", "--json").stdout)
    assert doc["a"]["step"] == 2 and doc["b"]["step"] == 4
    assert doc["added"] == doc["removed"] == doc["mismatched"] == []
    (changed,) = doc["changed"]
    assert changed["path"] == "params/w"
    assert changed["max_abs_diff"] == 20.0  # w[0, 0]: 40 - 20
    assert changed["changed_elements"] == 12
    a = np.full((3, 4), 2.0)
    a[0, 0] = 20
    b = np.full((3, 4), 4.0)
    b[0, 0] = 40
    assert changed["rel_l2_diff"] == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a))
    assert doc["unchanged"] == 2
    assert doc["values"] == [{"path": "epoch", "a": 2, "b": 4}]
    assert doc["identical"] is False


def test_diff_text_defaults_to_the_latest_step(run: Cli, ckpt: Path) -> None:
    res = run("diff", f"{ckpt}@1", ckpt)
    assert res.exit_code == 0, res.output
    assert f"B: {ckpt}@4" in res.stdout
    (row,) = [ln for ln in res.stdout.splitlines() if ln.startswith("changed")]
    # every element grew by 3x its value: max |B-A| = 40 - 10, rel L2 = ||3 A|| / ||A|| = 3
    assert row.split()[1:] == ["params/w", "float32[3,", "4]", "float32[3,", "4]", "12/12", "30", "3"]
    assert "2 unchanged arrays" in res.stdout


def test_diff_across_directories(run: Cli, ckpt: Path, other_ckpt: Path) -> None:
    doc = json.loads(run("diff", ckpt, other_ckpt, "--json").stdout)
    assert [e["path"] for e in doc["added"]] == ["params/extra"]
    assert doc["added"][0]["dtype"] == "int32"
    assert [e["path"] for e in doc["removed"]] == ["params/layers/0/b"]
    assert doc["mismatched"] == [{"path": "params/frozen", "a": "float32[4096]", "b": "float64[4096]"}]
    (changed,) = doc["changed"]
    assert changed["path"] == "params/w"
    assert changed["max_abs_diff"] == 0.5
    assert changed["changed_elements"] == 1
    assert doc["values"] == []
    assert doc["unchanged_values"] == 1
    text = run("diff", ckpt, f"{other_ckpt}@7").stdout
    for word in ("added", "removed", "mismatched", "changed"):
        assert word in text


def test_diff_of_a_checkpoint_with_itself_is_identical(run: Cli, ckpt: Path) -> None:
    doc = json.loads(run("diff", f"{ckpt}@3", f"{ckpt}@3", "--json").stdout)
    assert doc["identical"] is True
    assert doc["unchanged"] == 3 and doc["changed"] == []


def test_diff_of_a_damaged_checkpoint_is_an_error(run: Cli, ckpt: Path) -> None:
    flip_byte(*_segment_of(ckpt, 4, "params/w"))
    res = run("diff", f"{ckpt}@1", ckpt)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: checkpoint step 4")
    assert "params/w" in res.stderr
    assert "Traceback" not in res.output


def test_parse_ref() -> None:
    assert parse_ref("runs/a@12") == ("runs/a", 12)
    assert parse_ref("runs/a") == ("runs/a", None)
    assert parse_ref("runs/a@latest") == ("runs/a", None)
    assert parse_ref("s3://user@host/run") == ("s3://user@host/run", None)
    assert parse_ref("s3://user@host/run@3") == ("s3://user@host/run", 3)


def test_compare_arrays_by_value() -> None:
    a = np.array([1.0, np.nan, 0.0, 3.0])
    assert compare_arrays(a, a.copy()) is None
    assert compare_arrays(a, np.array([1.0, np.nan, -0.0, 3.0])) is None  # equal values, other bits
    change = compare_arrays(a, np.array([1.0, np.nan, 0.0, 7.0]))
    assert change is not None and (change.changed, change.max_abs) == (1, 4.0)
    ints = compare_arrays(np.array([0, 2**40], np.uint64), np.array([5, 2**40], np.uint64))
    assert ints is not None and ints.max_abs == 5.0
    zero = compare_arrays(np.zeros(2, np.float32), np.ones(2, np.float32))
    assert zero is not None and zero.rel_l2 == float("inf")
    cplx = compare_arrays(np.array([1 + 1j]), np.array([1 + 4j]))
    assert cplx is not None and cplx.max_abs == 3.0


# -- verify ---------------------------------------------------------------------------------


def test_verify_intact(run: Cli, ckpt: Path) -> None:
    res = run("verify", ckpt)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"step {s}: ok" for s in (1, 2, 3, 4)] + [f"4 checkpoints intact in {ckpt}"]
    doc = json.loads(run("verify", ckpt, "--step", "2", "--json").stdout)
    assert doc == {"directory": str(ckpt), "ok": True, "steps": [{"step": 2, "ok": True, "problems": []}]}


def test_verify_names_the_damaged_array_and_exits_1(run: Cli, ckpt: Path) -> None:
    obj, offset = _segment_of(ckpt, 4, "params/w")
    flip_byte(obj, offset)
    res = run("verify", ckpt)
    assert res.exit_code == 1
    assert "step 3: ok" in res.stdout
    assert "step 4: CORRUPT" in res.stdout
    assert f"array params/w: object {obj.name}" in res.stdout
    assert "1 of 4 checkpoints damaged" in res.stdout
    doc = json.loads(run("verify", ckpt, "--json").stdout)
    assert doc["ok"] is False
    assert [s["ok"] for s in doc["steps"]] == [True, True, True, False]
    assert any("params/w" in p and "checksum" in p for p in doc["steps"][3]["problems"])
    assert run("verify", ckpt, "--step", "3").exit_code == 0


def test_verify_names_a_missing_file(run: Cli, ckpt: Path) -> None:
    obj, _ = _segment_of(ckpt, 1, "params/frozen")
    obj.unlink()
    res = run("verify", ckpt, "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert all(not s["ok"] for s in doc["steps"])  # every step shares `frozen`
    assert any(f"object {obj.name} is missing" in p for p in doc["steps"][0]["problems"])


def test_verify_of_a_missing_step_is_an_error(run: Cli, ckpt: Path) -> None:
    res = run("verify", ckpt, "--step", "99")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: no checkpoint for step 99")


# -- gc -------------------------------------------------------------------------------------


def test_gc_removes_leftovers(run: Cli, ckpt: Path) -> None:
    orphan = ckpt / "objects" / ("ab" * 16)
    orphan.write_bytes(b"x" * 1000)
    temporary = ckpt / "objects" / ".tmp-0123456789abcdef-cd"
    temporary.write_bytes(b"y" * 10)
    res = run("gc", ckpt, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "would free 2 files" in res.stdout and "(1000 bytes)" in res.stdout
    assert orphan.exists() and temporary.exists()
    doc = json.loads(run("gc", ckpt, "--json").stdout)
    assert doc["dry_run"] is False
    assert sorted(doc["files"]) == sorted(["objects/" + orphan.name, "objects/" + temporary.name])
    assert (doc["file_count"], doc["bytes"]) == (2, 1000)
    assert not orphan.exists() and not temporary.exists()
    assert run("verify", ckpt).exit_code == 0
    assert "freed 0 files, 0 B" in run("gc", ckpt).stdout


def test_gc_refuses_while_a_job_writes(run: Cli, ckpt: Path) -> None:
    with pitstop.CheckpointManager(ckpt, async_save=False, max_to_keep=None) as mgr:
        mgr.save(5, {"w": np.ones(2)})
        res = run("gc", ckpt)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: checkpoint directory")
    assert "another manager" in res.stderr


def test_gc_reports_warnings_as_one_line(run: Cli, ckpt: Path) -> None:
    flip_byte(ckpt / "manifests" / f"{1:020d}.json", offset=100)
    res = run("gc", ckpt)
    assert res.exit_code == 0
    assert "freed 0 files" in res.stdout
    (warning,) = res.stderr.splitlines()
    assert warning.startswith("warning: ") and "[1]" in warning


# -- errors, JSON and URLs for every command -----------------------------------------------


@pytest.mark.parametrize("command", [*COMMANDS, "diff"])
def test_nonexistent_directory_is_a_clear_error(run: Cli, tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nope"
    args: list[str | Path] = [command, missing, *([missing] if command == "diff" else [])]
    res = run(*args)
    assert res.exit_code == 2
    assert res.stderr == f"error: no checkpoint directory at {missing}: it does not exist\n"
    assert res.stdout == ""
    assert not missing.exists()  # never created


@pytest.mark.parametrize("command", COMMANDS)
def test_not_a_checkpoint_directory(run: Cli, tmp_path: Path, command: str) -> None:
    res = run(command, tmp_path)
    assert res.exit_code == 2
    assert "is not a pitstop checkpoint directory" in res.stderr
    (tmp_path / "f").write_text("")
    assert "is a file" in run(command, tmp_path / "f").stderr


@pytest.mark.parametrize("command", [*COMMANDS, "diff"])
def test_every_command_prints_one_json_document(run: Cli, ckpt: Path, command: str) -> None:
    args: list[str | Path] = [command, ckpt, "--json", *([f"{ckpt}@1"] if command == "diff" else [])]
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert isinstance(json.loads(res.stdout), dict)


def test_commands_work_on_fsspec_urls(run: Cli, memory_url: str) -> None:
    ls = json.loads(run("ls", memory_url, "--json").stdout)
    assert [s["step"] for s in ls["steps"]] == [1, 2]
    assert ls["directory"] == memory_url
    assert "params/w  float32[3, 4]" not in run("show", memory_url).stdout  # tree shows names
    assert "w  float32[3, 4]  48 B" in run("show", memory_url).stdout
    d = json.loads(run("diff", f"{memory_url}@1", memory_url, "--json").stdout)
    assert d["changed"][0]["path"] == "params/w" and d["changed"][0]["max_abs_diff"] == 10.0
    assert run("verify", memory_url).exit_code == 0
    assert json.loads(run("gc", memory_url, "--json").stdout)["file_count"] == 0
    res = run("ls", "memory://pitstop-cli-does-not-exist")
    assert res.exit_code == 2 and res.stderr.startswith("error: no checkpoint directory at memory://")


def test_unknown_url_protocol_and_bad_storage_option(run: Cli, ckpt: Path) -> None:
    res = run("ls", "nosuchproto://bucket/run")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: cannot open nosuchproto://bucket/run")
    res = run("ls", ckpt, "-o", "no-equals-sign")
    assert res.exit_code == 2
    assert "KEY=VALUE" in res.stderr


# -- demo -----------------------------------------------------------------------------------


def test_demo_runs_and_resumes(run: Cli, tmp_path: Path) -> None:
    pytest.importorskip("pitstop._demo")
    d = tmp_path / "demo"
    res = run("demo", "--numpy", "--dir", d, "--steps", "12")
    assert res.exit_code == 0, res.output
    assert run("verify", d).exit_code == 0
    res = run("demo", "--numpy", "--dir", d, "--steps", "24")
    assert res.exit_code == 0, res.output
    assert json.loads(run("ls", d, "--json").stdout)["steps"][-1]["step"] == 24
