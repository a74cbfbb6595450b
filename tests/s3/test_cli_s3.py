"""``pitstop ls`` / ``verify`` on s3:// against SeaweedFS, with options from the environment."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import pitstop
from pitstop._cli import cli

from .seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS


@pytest.fixture
def s3_ckpt(s3_url: str, s3_options: dict[str, Any]) -> str:
    with pitstop.CheckpointManager(s3_url, storage_options=s3_options, async_save=False, max_to_keep=None) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": np.full(100, step, np.float32)}, metrics={"loss": 1.0 / step})
    return s3_url


@pytest.fixture
def env(seaweed: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "PITSTOP_STORAGE_OPTIONS": f"endpoint_url={seaweed.endpoint}",
    }


def test_ls_and_verify_with_credentials_and_options_from_the_environment(s3_ckpt: str, env: dict[str, str]) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["ls", "--json", s3_ckpt], env=env, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert [c["step"] for c in json.loads(res.stdout)["steps"]] == [1, 2]
    res = runner.invoke(cli, ["verify", s3_ckpt], env=env, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert SECRET_KEY not in res.output


def test_verify_finds_damage_on_s3(s3_ckpt: str, env: dict[str, str], s3fs_client: Any) -> None:
    root = s3_ckpt.removeprefix("s3://")
    name = sorted(s3fs_client.ls(f"{root}/objects"))[-1]
    data = bytearray(s3fs_client.cat_file(name))
    data[0] ^= 0xFF
    s3fs_client.pipe_file(name, bytes(data))
    res = CliRunner().invoke(cli, ["verify", s3_ckpt], env=env, catch_exceptions=False)
    assert res.exit_code == 1
    assert name.rsplit("/", 1)[-1] in res.output


def test_wrong_secret_is_a_one_line_error_without_the_secret(s3_ckpt: str, env: dict[str, str]) -> None:
    wrong = "cli-wrong-secret-abcdef0123"
    env = {**env, "AWS_SECRET_ACCESS_KEY": wrong}
    res = CliRunner().invoke(cli, ["ls", s3_ckpt, "-o", 'config_kwargs={"retries": {"max_attempts": 1}}'], env=env)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and wrong not in res.stderr and wrong not in res.stdout
