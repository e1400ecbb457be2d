"""Faults on the multi-process tier: the database server restarted under running rockets.

Own server per test (file-backed, so a restart keeps the data, as MongoDB's does). The
figures the issue asks for are asserted and printed: results lost 0, duplicated 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import _free_port

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
BIN = Path(sys.executable).parent


class Server:
    """The wire server on a fixed port and storage folder, restartable."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.storage = root / "data"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        import pymongo

        self.proc = subprocess.Popen([sys.executable, "-m", "amdflow.testing.wire_server", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--storage-path", str(self.storage)], stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=300).admin.command("ping")
                return
            except pymongo.errors.PyMongoError:
                time.sleep(0.2)
        raise RuntimeError("wire server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None


def _figures(lp, db) -> dict[str, int]:
    """Results lost and duplicated, counted from the documents."""
    states = {fw["fw_id"]: fw["state"] for fw in lp.fireworks.find({}, {"fw_id": 1, "state": 1})}
    completed: dict[int, int] = {}
    for launch in lp.launches.find({"state": "COMPLETED"}, {"fw_id": 1}):
        completed[launch["fw_id"]] = completed.get(launch["fw_id"], 0) + 1
    relaxations = lp.fireworks.count_documents({"spec.amdflow_stage": {"$in": ["relax", "reference"]}, "state": "COMPLETED"})
    unfinished = sum(s not in ("COMPLETED", "DEFUSED") for s in states.values())
    return {
        "fireworks": len(states),
        "unfinished": unfinished,
        "lost": unfinished + abs(relaxations - len(db.tasks.distinct("task_id"))),
        "duplicated": sum(n - 1 for n in completed.values()) + (db.tasks.count_documents({}) - len(db.tasks.distinct("task_id"))),
    }


def test_database_restart_under_running_rockets_loses_and_duplicates_nothing(tmp_path, binary_campaign_dict):
    import pymongo
    from fireworks import LaunchPad

    server = Server(tmp_path)
    server.start()
    try:
        lp_file = tmp_path / "my_launchpad.yaml"
        lp_file.write_text(yaml.safe_dump({"host": server.uri, "name": "faults", "logdir": None, "strm_lvl": "WARNING",
                                           "mongoclient_kwargs": {"serverSelectionTimeoutMS": 20000}}))
        (tmp_path / "campaign.yaml").write_text(yaml.safe_dump({**binary_campaign_dict, "output_dir": str(tmp_path / "out")}))
        # rockets ping their launches every 2 s, so a launch silent for 15 s is surely lost (production: hours)
        (tmp_path / "FW_config.yaml").write_text("PING_TIME_SECS: 2\n")
        env = {**os.environ, "AMDFLOW_LAUNCHPAD_FILE": str(lp_file), "AMDFLOW_PROGRESS": "false",
               "FW_CONFIG_FILE": str(tmp_path / "FW_config.yaml")}
        add = subprocess.run([sys.executable, "-m", "amdflow", "add", "campaign.yaml"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert add.returncode == 0, add.stderr[-2000:]
        lp = LaunchPad.from_file(str(lp_file))

        def start(name: str, args: list[str]) -> subprocess.Popen:
            (tmp_path / name).mkdir(exist_ok=True)
            return subprocess.Popen(args, cwd=tmp_path / name, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        (tmp_path / "cpu.yaml").write_text(yaml.safe_dump({"name": "cpu", "category": ["cpu", "vasp"], "query": "{}"}))
        gpu = [sys.executable, "-m", "amdflow", "rocket", "-l", str(lp_file), "--batch-size", "2"]
        cpu = [str(BIN / "rlaunch"), "-l", str(lp_file), "-w", str(tmp_path / "cpu.yaml"), "rapidfire", "--nlaunches", "0", "--sleep", "1"]
        rockets = [start("gpu", gpu), start("cpu_a", cpu), start("cpu_b", cpu)]
        # restart the server while relaxations are running
        deadline = time.time() + 300
        while time.time() < deadline and lp.launches.count_documents({"state": "COMPLETED"}) < 8:
            time.sleep(0.2)
        server.stop()
        time.sleep(3)  # rockets meet a dead server
        server.start()
        # The rockets reconnect (pymongo waits up to serverSelectionTimeoutMS), or a task whose write met the dead
        # server fizzles, or a rocket dies leaving its launch RUNNING (lost). Wait until the LaunchPad is quiet ...
        quiet_since, last = time.time(), None
        while time.time() - quiet_since < 15 and any(r.poll() is None for r in rockets):
            now = sorted((ln["launch_id"], ln["state"]) for ln in lp.launches.find({}, {"launch_id": 1, "state": 1}))
            if now != last:
                quiet_since, last = time.time(), now
            time.sleep(1)
        outcomes = {name: r.poll() for name, r in zip(("gpu", "cpu_a", "cpu_b"), rockets, strict=True)}
        fizzled = lp.fireworks.count_documents({"state": "FIZZLED"})
        running = lp.fireworks.count_documents({"state": "RUNNING"})
        # ... then recover the way an operator would, while live rockets keep going
        rerun = subprocess.run([sys.executable, "-m", "amdflow", "rerun", "campaign.yaml", "--fizzled", "--lost", "--lost-after", "15",
                                "--stale-after", "15"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        final = [start("gpu2", gpu), start("cpu2", cpu)]
        errors = {}
        for i, r in enumerate(rockets + final):
            errors[i] = r.communicate(timeout=900)[1][-1500:]
        assert [r.returncode for r in final] == [0, 0], errors
        db = pymongo.MongoClient(server.uri)["faults"]
        figures = _figures(lp, db)
        print(json.dumps({"database_restart": {**figures, "rocket_exit_codes_after_restart": outcomes,
                                               "fizzled_after_restart": fizzled, "running_after_restart": running}}))
        stuck = [(fw["fw_id"], fw["name"], fw["state"]) for fw in lp.fireworks.find({"state": {"$nin": ["COMPLETED", "DEFUSED"]}})]
        assert figures["unfinished"] == 0 and figures["lost"] == 0 and figures["duplicated"] == 0, (figures, stuck, outcomes)
        assert db.candidates.count_documents({"state": {"$in": ["analyzed", "duplicate", "screened_out"]}}) == 6
    finally:
        server.stop()
