"""The shipped FireWorks configs and queue adapters load, with explicit categories."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fireworks import FWorker
from fireworks.utilities.fw_serializers import load_object_from_file

from amdflow.workflows import CATEGORIES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["gpu", "cpu", "vasp"])
def test_fworkers_have_explicit_categories(name):
    worker = FWorker.from_file(str(REPO / "fw_configs" / f"my_fworker_{name}.yaml"))
    assert worker.category == name
    assert name in CATEGORIES.values()


def test_launchpad_example_is_valid_yaml_with_timeout():
    spec = yaml.safe_load((REPO / "fw_configs" / "my_launchpad.yaml").read_text())
    assert spec["name"] == "amdflow"
    assert spec["mongoclient_kwargs"]["serverSelectionTimeoutMS"] <= 10_000


@pytest.mark.parametrize("path", sorted((REPO / "queue_adapters").glob("*.yaml")), ids=lambda p: p.name)
def test_queue_adapters_load(path):
    adapter = load_object_from_file(str(path))
    assert adapter.q_type in {"SLURM", "PBS"}
    kind = path.stem.split("_")[1]  # slurm_gpu -> gpu
    if kind == "gpu":
        assert "CUDA_VISIBLE_DEVICES=$g amdflow rocket" in adapter["rocket_launch"]
    else:  # each category has its own worker file, so a queue's rockets take only their stage's Fireworks
        assert f"rlaunch -w fw_configs/my_fworker_{kind}.yaml" in adapter["rocket_launch"]
        assert (REPO / "fw_configs" / f"my_fworker_{kind}.yaml").exists()


def test_every_category_has_a_queue_adapter_on_both_schedulers():
    for scheduler in ("slurm", "pbs"):
        for kind in set(CATEGORIES.values()):
            assert (REPO / "queue_adapters" / f"{scheduler}_{kind}.yaml").exists(), (scheduler, kind)
