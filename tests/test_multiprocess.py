"""Tier 3: several processes on one MongoDB-wire server (or a real MongoDB via AMDFLOW_TEST_MONGO_URI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
BIN = Path(sys.executable).parent


def launchpad(path: Path):
    from fireworks import LaunchPad

    return LaunchPad.from_file(str(path))


def test_wire_server_patch_is_in_place():
    from secantus import commands

    from amdflow.testing.wire_server import patch_find_and_modify

    patch_find_and_modify()
    patch_find_and_modify()  # idempotent: one wrapper, not two
    handler = commands._HANDLERS["findandmodify"]
    assert handler._amdflow_serialized and not getattr(handler.__wrapped__, "_amdflow_serialized", False)
    assert commands._HANDLERS["findAndModify"] is handler  # the spelling drivers send


def test_four_rockets_run_every_firework_exactly_once(mongo_launchpad_file, tmp_path):
    from fireworks import Firework, ScriptTask

    lp = launchpad(mongo_launchpad_file)
    lp.reset(password=None, require_password=False, max_reset_wo_password=1000)
    lp.bulk_add_wfs([Firework(ScriptTask.from_str("true"), name=f"fw{i}") for i in range(200)])
    rockets = []
    for k in range(4):
        cwd = tmp_path / f"rocket{k}"
        cwd.mkdir()
        rockets.append(subprocess.Popen([str(BIN / "rlaunch"), "-l", str(mongo_launchpad_file), "-s", "rapidfire", "--nlaunches", "0"],
                                        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for r in rockets:
        _, err = r.communicate(timeout=600)
        assert r.returncode == 0, err[-2000:]
    assert lp.fireworks.count_documents({"state": "COMPLETED"}) == 200
    assert lp.launches.count_documents({}) == 200  # one launch per Firework: none ran twice
    per_fw = {}
    for launch in lp.launches.find({}, {"fw_id": 1}):
        per_fw[launch["fw_id"]] = per_fw.get(launch["fw_id"], 0) + 1
    assert set(per_fw.values()) == {1} and len(per_fw) == 200
    # work really was shared between the rockets
    dirs = {Path(launch["launch_dir"]).parent.name for launch in lp.launches.find({}, {"launch_dir": 1})}
    assert len(dirs) >= 2
