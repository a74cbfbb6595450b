"""``pitstop export`` and ``pitstop import`` run in-process: output, --json, errors, URLs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import pitstop

from .conftest import Cli

load_file = pytest.importorskip("safetensors.numpy").load_file


def test_help_has_examples(run: Cli) -> None:
    for name in ("export", "import"):
        res = run(name, "--help")
        assert res.exit_code == 0
        assert "Example:" in res.stdout and f"pitstop {name} " in res.stdout
    assert "export" in run("--help").stdout and "import" in run("--help").stdout


def test_export_safetensors_text_and_json(run: Cli, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    res = run("export", ckpt, "--to", "safetensors", out, "--step", "2")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == f"exported {ckpt} step 2 to safetensors {out}: 3 arrays"
    assert load_file(str(out))["params/w"][0, 0] == 20.0
    res = run("export", ckpt, "--to", "safetensors", tmp_path / "k.safetensors", "--key", "params/layers", "--json")
    doc = json.loads(res.stdout)
    assert (doc["step"], doc["key"], doc["arrays"], doc["format"]) == (4, "params/layers", 1, "safetensors")
    assert list(load_file(str(tmp_path / "k.safetensors"))) == ["0/b"]


def test_export_errors_are_one_line(run: Cli, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"x")
    res = run("export", ckpt, "--to", "safetensors", out)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: the export output already exists") and res.stderr.count("\n") == 1
    assert run("export", ckpt, "--to", "safetensors", out, "--force").exit_code == 0
    res = run("export", tmp_path / "missing", "--to", "safetensors", tmp_path / "m.st")
    assert res.exit_code == 2 and "no checkpoint directory at" in res.stderr and "does not exist" in res.stderr
    res = run("export", ckpt, "--to", "onnx", out)
    assert res.exit_code == 2 and "'onnx' is not one of" in res.stderr
    res = run("export", ckpt, "--to", "safetensors", tmp_path / "x.st", "--key", "nope")
    assert res.exit_code == 2 and "error: no entry 'nope'" in res.stderr and "params" in res.stderr


def test_export_missing_extra_is_one_line(
    run: Cli, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    res = run("export", ckpt, "--to", "safetensors", tmp_path / "w.safetensors")
    assert res.exit_code == 2
    assert "pip install 'pitstop[safetensors]'" in res.stderr and res.stderr.count("\n") == 1


def test_export_between_memory_urls(run: Cli, memory_url: str) -> None:
    import fsspec
    from safetensors.numpy import load

    res = run("export", memory_url, "--to", "safetensors", f"{memory_url}-out/w.safetensors", "--json")
    assert res.exit_code == 0, res.output
    with fsspec.open(f"{memory_url}-out/w.safetensors", "rb") as f:
        assert load(f.read())["params/w"][0, 0] == 20.0
    fsspec.filesystem("memory").rm(f"{memory_url.removeprefix('memory://')}-out", recursive=True)


def test_import_tf_checkpoint_dir_to_memory_url(run: Cli, tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    import fsspec

    m = tf.Module()
    m.w = tf.Variable(np.arange(4.0))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(net=m), str(tmp_path / "tf"), max_to_keep=2)
    manager.save()
    latest = manager.save()
    url = "memory://pitstop-cli-import"
    try:
        res = run("import", tmp_path / "tf", url)
        assert res.exit_code == 0, res.output
        assert res.stdout.strip() == f"imported {latest} into {url} as step 2: 1 array"
        res = run("import", tmp_path / "tf", url, "--step", "9", "--json")
        doc = json.loads(res.stdout)
        assert (doc["step"], doc["source"], doc["arrays"]) == (9, latest, 1)
        np.testing.assert_array_equal(pitstop.restore(url)["net"]["w"], np.arange(4.0))
        res = run("import", tmp_path / "tf", url, "--step", "9")
        assert res.exit_code == 2 and "error: checkpoint step 9 already exists" in res.stderr
        res = run("import", tmp_path / "nothing", url)
        assert res.exit_code == 2 and "error: no TensorFlow checkpoint at" in res.stderr
    finally:
        fsspec.filesystem("memory").rm("pitstop-cli-import", recursive=True)


def test_export_tf_checkpoint_cli(run: Cli, ckpt: Path, tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    res = run("export", ckpt, "--to", "tf-checkpoint", tmp_path / "tf" / "ckpt", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["arrays"] == 4 and len(doc["files"]) == 2  # w, frozen, layers/0/b and the epoch
    reader = tf.train.load_checkpoint(str(tmp_path / "tf" / "ckpt"))
    assert reader.get_tensor("params/w/.ATTRIBUTES/VARIABLE_VALUE")[0, 0] == 40.0


def test_export_keras_formats_cli(run: Cli, tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    pitstop.save(tmp_path / "run", {"model": model})
    x = np.ones((2, 3), np.float32)
    res = run("export", tmp_path / "run", "--to", "savedmodel", tmp_path / "sm", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["files"] == [str(tmp_path / "sm")]
    served = tf.saved_model.load(str(tmp_path / "sm"))  # keep a reference: serve() uses its variables
    np.testing.assert_allclose(served.serve(x).numpy(), model(x).numpy(), rtol=1e-6)
    res = run("export", tmp_path / "run", "--to", "keras", tmp_path / "m.keras")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(keras.saving.load_model(str(tmp_path / "m.keras"))(x), model(x))
    res = run("export", tmp_path / "run", "--to", "keras", tmp_path / "m.h5")
    assert res.exit_code == 2 and "error: a Keras file must end in .keras" in res.stderr


def test_export_savedmodel_without_a_model_is_one_line(run: Cli, ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorflow")
    res = run("export", ckpt, "--to", "savedmodel", tmp_path / "sm")
    assert res.exit_code == 2
    assert res.stderr.startswith("error: cannot export step 4 of") and "no Keras model config" in res.stderr
    assert res.stderr.count("\n") == 1
