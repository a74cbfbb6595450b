"""Export to safetensors: every array by its pitstop path, plain values in the header."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import pitstop
from pitstop import interop

from .conftest import array_state

safe_open = pytest.importorskip("safetensors").safe_open
load_file = pytest.importorskip("safetensors.numpy").load_file


def test_every_array_round_trips_with_step_metrics_and_values(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    res = interop.export(str(run_dir), str(out), to="safetensors")
    assert (res.format, res.step, res.arrays, res.files) == ("safetensors", 2, 7, (str(out),))
    loaded = load_file(str(out))
    expected = array_state(2)
    p = expected["params"]
    assert sorted(loaded) == sorted(
        ["params/dense/kernel", "params/dense/bias", "params/blocks/0/w", "params/blocks/1/w", "params/half",
         "params/mask", "step_counter"]
    )  # fmt: skip
    np.testing.assert_array_equal(loaded["params/dense/kernel"], p["dense"]["kernel"])
    np.testing.assert_array_equal(loaded["params/blocks/0/w"], p["blocks"][0]["w"])
    np.testing.assert_array_equal(loaded["params/mask"], p["mask"])
    assert loaded["step_counter"].shape == () and int(loaded["step_counter"]) == 20
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
    assert meta["step"] == "2"
    assert json.loads(meta["metrics"]) == {"loss": 0.5}
    assert json.loads(meta["values"]) == {"epoch": 2, "lr": 0.01, "tag": "unit"}
    assert json.loads(meta["metadata"]) == {"note": "interop"}


def test_bfloat16_is_kept_bit_exact(tmp_path: Path) -> None:
    # safetensors' NumPy loader has no bfloat16 (torch and flax read it): check the raw bytes
    half = np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16)
    pitstop.save(tmp_path / "bf", {"half": half, "f8": np.ones(2, ml_dtypes.float8_e4m3fn)})
    out = tmp_path / "m.safetensors"
    interop.export(str(tmp_path / "bf"), str(out), to="safetensors")
    data = out.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert (header["half"]["dtype"], header["half"]["shape"]) == ("BF16", [5])
    assert header["f8"]["dtype"] == "F8_E4M3"
    start, end = header["half"]["data_offsets"]
    assert data[8 + header_len + start : 8 + header_len + end] == half.tobytes()


def test_key_exports_a_subtree_and_names_arrays_from_it(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense.safetensors"
    res = interop.export(str(run_dir), str(out), to="safetensors", key="params/dense", step=1)
    assert res.key == "params/dense"
    loaded = load_file(str(out))
    assert sorted(loaded) == ["bias", "kernel"]
    np.testing.assert_array_equal(loaded["kernel"], array_state(1)["params"]["dense"]["kernel"])


def test_unknown_key_lists_what_exists(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(interop.InteropError, match=r"no entry 'params/dens'.*params holds blocks, dense, half, mask"):
        interop.export(str(run_dir), str(tmp_path / "x.safetensors"), to="safetensors", key="params/dens")
    assert not (tmp_path / "x.safetensors").exists()


def test_existing_output_is_refused_then_replaced_with_overwrite(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(interop.InteropError, match=r"already exists: .*m\.safetensors.*overwrite=True"):
        interop.export(str(run_dir), str(out), to="safetensors")
    assert out.read_bytes() == b"precious"
    interop.export(str(run_dir), str(out), to="safetensors", overwrite=True)
    assert "params/mask" in load_file(str(out))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pitstop-export")] == []


def test_unsupported_dtype_is_refused_or_skipped_and_listed(tmp_path: Path) -> None:
    d = tmp_path / "c"
    pitstop.save(d, {"z": np.ones(2, np.complex128), "w": np.ones(3, np.float32), "lr": float("nan")})
    out = tmp_path / "c.safetensors"
    with pytest.raises(
        interop.InteropError, match=r"z: dtype complex128 has no safetensors equivalent.*skip_unsupported"
    ):
        interop.export(str(d), str(out), to="safetensors")
    assert not out.exists()
    res = interop.export(str(d), str(out), to="safetensors", skip_unsupported=True)
    assert res.skipped == ("z: dtype complex128 has no safetensors equivalent",)
    assert list(load_file(str(out))) == ["w"]
    with safe_open(str(out), "np") as f:
        assert json.loads(f.metadata()["values"]) == {"lr": "nan"}  # strict JSON, as in manifests


def test_unknown_format_and_missing_checkpoint(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(interop.InteropError, match=r"unknown export format 'onnx': choose one of tf-checkpoint, "):
        interop.export(str(run_dir), str(tmp_path / "x"), to="onnx")  # type: ignore[arg-type]
    with pytest.raises(pitstop.CheckpointNotFoundError, match="no checkpoint in"):
        interop.export(str(tmp_path / "nothing"), str(tmp_path / "x"), to="safetensors")
    with pytest.raises(pitstop.CheckpointNotFoundError, match=r"step 7.*existing steps: \[1, 2\]"):
        interop.export(str(run_dir), str(tmp_path / "x"), to="safetensors", step=7)
    assert not (tmp_path / "nothing").exists()


def test_missing_extra_names_it(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"pip install 'pitstop\[safetensors\]'"):
        interop.export(str(run_dir), str(tmp_path / "m.safetensors"), to="safetensors")


def test_corrupt_checkpoint_is_reported_and_nothing_written(run_dir: Path, tmp_path: Path) -> None:
    for obj in (run_dir / "objects").iterdir():
        data = bytearray(obj.read_bytes())
        data[0] ^= 0xFF
        obj.write_bytes(bytes(data))
    with pytest.raises(pitstop.CorruptCheckpointError):
        interop.export(str(run_dir), str(tmp_path / "m.safetensors"), to="safetensors", step=2)
    assert not (tmp_path / "m.safetensors").exists()


def test_fsspec_urls_in_and_out(memory_url: str) -> None:
    import fsspec
    from safetensors.numpy import load

    src = f"{memory_url}/run"
    with pitstop.CheckpointManager(src, async_save=False) as mgr:
        mgr.save(3, array_state(3))
    res = interop.export(src, f"{memory_url}/out/m.safetensors", to="safetensors")
    assert res.files == (f"memory:///{memory_url.removeprefix('memory://')}/out/m.safetensors",)
    with fsspec.open(f"{memory_url}/out/m.safetensors", "rb") as f:
        loaded = load(f.read())
    np.testing.assert_array_equal(loaded["params/dense/kernel"], array_state(3)["params"]["dense"]["kernel"])


def test_public_names_are_sorted_and_complete() -> None:
    assert interop.__all__ == sorted(interop.__all__)
    assert interop.FORMATS == ("tf-checkpoint", "savedmodel", "keras", "safetensors")
    assert issubclass(interop.InteropError, pitstop.CheckpointError) and issubclass(interop.InteropError, ValueError)
    for name in interop.__all__:
        assert hasattr(interop, name)


def test_importing_interop_loads_no_framework() -> None:
    code = (
        "import sys, pitstop.interop\n"
        "bad = [m for m in ('tensorflow', 'keras', 'torch', 'safetensors', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
