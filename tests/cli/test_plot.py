"""``pitstop plot``: a PNG of metric curves with kept and best checkpoints marked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import pitstop
from pitstop._cli._plot import infer_mode

from .conftest import Cli

image = pytest.importorskip("matplotlib.image")

RED = np.array([0.839, 0.153, 0.157])  # matplotlib's tab:red, the best-value star
ORANGE = np.array([1.0, 0.498, 0.055])  # tab:orange, checkpoints the policy would delete


def _count_color(png: np.ndarray, rgb: np.ndarray) -> int:
    return int(np.sum(np.all(np.abs(png[..., :3] - rgb) < 0.02, axis=-1)))


def test_png_has_the_requested_size_and_content(run: Cli, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    res = run("plot", ckpt, "--output", out, "--width", "640", "--height", "480")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"wrote {out} (640x480 px): 2 metrics over 4 checkpoints, 4 kept"
    png = image.imread(str(out))
    assert png.shape[:2] == (480, 640)
    assert png[..., :3].std() > 0.05  # not blank
    assert _count_color(png, RED) > 50  # the best stars are drawn
    assert _count_color(png, ORANGE) == 0  # no policy: every checkpoint is kept


def test_policy_marks_deleted_and_best_json(run: Cli, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "loss.png"
    res = run("plot", ckpt, "--metric", "loss", "--max-to-keep", "1", "--keep-every", "2", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kept"] == [2, 4] and doc["steps"] == [1, 2, 3, 4]
    assert doc["height"] == 440 and doc["width"] == 1000  # default: 120 + 320 per metric
    (loss,) = doc["metrics"]
    assert (loss["metric"], loss["mode"], loss["best_step"], loss["best_value"]) == ("loss", "min", 4, 0.25)
    png = image.imread(str(out))
    assert png.shape[:2] == (440, 1000)
    assert _count_color(png, ORANGE) > 20  # steps 1 and 3 drawn as "would be deleted"


def test_best_metric_mode_and_policy_best(run: Cli, ckpt: Path, tmp_path: Path) -> None:
    res = run("plot", ckpt, "--best-metric", "acc", "--best-mode", "min", "-o", tmp_path / "p.png", "--json")
    doc = json.loads(res.stdout)
    modes = {m["metric"]: (m["mode"], m["best_step"]) for m in doc["metrics"]}
    assert modes == {"acc": ("min", 1), "loss": ("min", 4)}
    assert doc["policy_best_step"] == 1
    assert infer_mode("val_accuracy") == "max" and infer_mode("val_loss") == "min"


def test_writes_to_a_memory_url_from_a_memory_url(run: Cli, memory_url: str) -> None:
    import fsspec

    target = f"{memory_url}-plots/p.png"
    res = run("plot", memory_url, "-o", target)
    assert res.exit_code == 0, res.output
    with fsspec.open(target, "rb") as f:
        png = image.imread(f, format="png")
    assert png.shape[:2] == (760, 1000)
    fsspec.filesystem("memory").rm(f"{memory_url.removeprefix('memory://')}-plots", recursive=True)


def test_storage_options_come_from_the_environment_and_the_option(
    run: Cli, memory_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pitstop._cli import _plot

    seen: list[dict[str, object]] = []
    real = _plot.open_reader

    def spy(location: str, storage_options: dict[str, object], **policy: object) -> pitstop.CheckpointReader:
        seen.append(storage_options)
        return real(location, storage_options, **policy)

    monkeypatch.setattr(_plot, "open_reader", spy)
    monkeypatch.setenv("PITSTOP_STORAGE_OPTIONS", "skip_instance_cache=true")
    assert run("plot", memory_url, "-o", tmp_path / "env.png").exit_code == 0
    res = run("plot", memory_url, "--storage-option", "skip_instance_cache=false", "-o", tmp_path / "opt.png")
    assert res.exit_code == 0, res.output
    assert seen == [{"skip_instance_cache": True}, {"skip_instance_cache": False}]
    assert (tmp_path / "env.png").exists() and (tmp_path / "opt.png").exists()


def test_without_options_the_recorded_policy_and_mode_are_plotted(run: Cli, tmp_path: Path) -> None:
    d = tmp_path / "recorded"
    with pitstop.CheckpointManager(
        d, async_save=False, max_to_keep=2, best_metric="quality", best_mode="max", keep_best=1
    ) as mgr:
        for step, quality in zip((1, 2, 3, 4), (0.9, 0.1, 0.2, 0.3), strict=True):
            mgr.save(step, {"w": np.full(3, step)}, metrics={"quality": quality})
    doc = json.loads(run("plot", d, "-o", tmp_path / "p.png", "--json").stdout)
    assert doc["steps"] == [1, 3, 4] and doc["kept"] == [1, 3, 4] and doc["policy_best_step"] == 1
    (quality,) = doc["metrics"]
    assert infer_mode("quality") == "min"  # by name; the recorded mode wins for the recorded metric
    assert (quality["mode"], quality["best_step"]) == ("max", 1)


def test_errors_are_one_line(run: Cli, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = run("plot", ckpt, "--metric", "nope", "-o", tmp_path / "p.png")
    assert res.exit_code == 2
    assert res.stderr == f"error: no metric 'nope' in {ckpt}; saved metrics: acc, loss\n"
    bare = tmp_path / "bare"
    pitstop.save(bare, {"w": np.ones(2)})
    res = run("plot", bare, "-o", tmp_path / "p.png")
    assert res.exit_code == 2 and "have no metrics to plot" in res.stderr
    res = run("plot", tmp_path / "missing", "-o", tmp_path / "p.png")
    assert res.exit_code == 2 and "no checkpoint directory at" in res.stderr
    res = run("plot", ckpt)
    assert res.exit_code == 2 and "Missing option '-o' / '--output'" in res.stderr
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = run("plot", ckpt, "-o", tmp_path / "p.png")
    assert res.exit_code == 2 and "pip install 'pitstop[plot]'" in res.stderr
    assert not (tmp_path / "p.png").exists()


def test_a_corrupt_manifest_is_left_out_with_a_warning(run: Cli, ckpt: Path, tmp_path: Path) -> None:
    manifest = ckpt / "manifests" / f"{2:020d}.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"step":2', b'"step":3'))
    res = run("plot", ckpt, "-o", tmp_path / "p.png", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == [1, 3, 4]
    assert res.stderr.startswith("warning: step 2 left out: ")


def test_help_has_an_example(run: Cli) -> None:
    res = run("plot", "--help")
    assert res.exit_code == 0 and "Example:" in res.stdout and "pitstop plot " in res.stdout
