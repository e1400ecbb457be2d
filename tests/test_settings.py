from __future__ import annotations

import pytest

from amdflow.errors import ConfigError
from amdflow.settings import get_settings


def test_defaults_and_env_read_when_called(monkeypatch, tmp_path):
    assert get_settings().launchpad_file is None
    monkeypatch.setenv("AMDFLOW_PREDICT_BATCH_SIZE", "17")
    assert get_settings().predict_batch_size == 17  # read at call time, not import


def test_yaml_file_and_priority(monkeypatch, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("predict_batch_size: 9\ndevice: cpu\n")
    monkeypatch.setenv("AMDFLOW_CONFIG_FILE", str(path))
    assert get_settings().predict_batch_size == 9
    monkeypatch.setenv("AMDFLOW_PREDICT_BATCH_SIZE", "11")
    assert get_settings().predict_batch_size == 11  # env beats file


def test_bad_settings_are_one_line(monkeypatch, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("predict_batch_sise: 9\n")
    monkeypatch.setenv("AMDFLOW_CONFIG_FILE", str(path))
    with pytest.raises(ConfigError, match="unknown key 'predict_batch_sise'"):
        get_settings()
    monkeypatch.setenv("AMDFLOW_CONFIG_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        get_settings()
    monkeypatch.delenv("AMDFLOW_CONFIG_FILE")
    monkeypatch.setenv("AMDFLOW_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="device"):
        get_settings()
