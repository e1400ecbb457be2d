"""Faults on the multi-process tier: the database server restarted under running rockets; CPU rockets killed holding claims.

The restart test has its own server (file-backed, so a restart keeps the data, as MongoDB's
does); the kill tests share the session's. The figures the issue asks for are asserted and
printed: results lost 0, duplicated 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import _free_port, campaign_on_server, fault_figures, record_figures

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.fault]
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
        # ... for longer than --lost-after below, counted from the last change and from the last rocket that exited:
        # a rocket that died leaves its launches RUNNING with its last ping, and the rerun must find them lost (under
        # a loaded machine the rockets exited within 15 s of the rerun once, and their launches were not yet lost)
        quiet_since, last, alive = time.time(), None, set(range(len(rockets)))
        while time.time() - quiet_since < 17:
            now = sorted((ln["launch_id"], ln["state"]) for ln in lp.launches.find({}, {"launch_id": 1, "state": 1}))
            exited = {i for i in alive if rockets[i].poll() is not None}
            if now != last or exited:
                quiet_since, last, alive = time.time(), now, alive - exited
            time.sleep(1)
        outcomes = {name: r.poll() for name, r in zip(("gpu", "cpu_a", "cpu_b"), rockets, strict=True)}
        fizzled = lp.fireworks.count_documents({"state": "FIZZLED"})
        running = lp.fireworks.count_documents({"state": "RUNNING"})
        # What CI met once: a check-out whose database command met the restart left FireWorks' own lock (no time
        # stamp), and `rerun --fizzled` sat 300 s in FireWorks' WFLock on it. Leave one such lock on purpose.
        unfinished = lp.fireworks.find_one({"state": {"$nin": ["COMPLETED", "DEFUSED"]}}, {"fw_id": 1}) or lp.fireworks.find_one()
        lp.workflows.update_one({"nodes": unfinished["fw_id"], "locked": {"$exists": False}}, {"$set": {"locked": True}})
        left_locks = lp.workflows.count_documents({"locked": True})
        # ... then recover the way an operator would, while live rockets keep going
        t0 = time.time()
        rerun = subprocess.run([sys.executable, "-m", "amdflow", "rerun", "campaign.yaml", "--fizzled", "--lost", "--lost-after", "15",
                                "--stale-after", "15"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        said = " ".join((rerun.stdout + rerun.stderr).split())
        released = int(re.search(r"and (\d+) stale workflow locks", said).group(1))
        assert left_locks >= 1 and released >= 1 and time.time() - t0 < 120, (left_locks, said)
        final = [start("gpu2", gpu), start("cpu2", cpu)]
        errors = {}
        for i, r in enumerate(rockets + final):
            errors[i] = r.communicate(timeout=900)[1][-1500:]
        assert [r.returncode for r in final] == [0, 0], errors
        db = pymongo.MongoClient(server.uri)["faults"]
        figures = fault_figures(lp, db)
        record_figures("database_restart", {**figures, "rocket_exit_codes_after_restart": outcomes,
                                            "fizzled_after_restart": fizzled, "running_after_restart": running})
        stuck = [(fw["fw_id"], fw["name"], fw["state"]) for fw in lp.fireworks.find({"state": {"$nin": ["COMPLETED", "DEFUSED"]}})]
        assert figures["unfinished"] == 0 and figures["lost"] == 0 and figures["duplicated"] == 0, (figures, stuck, outcomes)
        assert db.candidates.count_documents({"state": {"$in": ["analyzed", "duplicate", "screened_out"]}}) == 6
    finally:
        server.stop()


@pytest.mark.parametrize("held", ["dedup", "hull"])
def test_kill_9_of_a_cpu_rocket_holding_a_claim(mongo_launchpad_file, tmp_path, binary_campaign_dict, held):
    """A CPU rocket killed with -9 inside a dedup claim (per formula) or the hull claim (per system) ->
    `amdflow rerun --lost` releases the claim and resets the launch -> two rockets finish: lost 0, duplicated 0.

    Without the release the claim would hold its formula's dedups (or the system's hull builds)
    until it went stale (300 s / 120 s); the test shows the claim was really held when killed.
    """
    import pymongo
    from fireworks import LaunchPad

    env, cli = campaign_on_server(tmp_path, mongo_launchpad_file, binary_campaign_dict)

    def start(name: str, args: list[str], extra: dict | None = None) -> subprocess.Popen:
        (tmp_path / name).mkdir()
        return subprocess.Popen(args, cwd=tmp_path / name, env={**env, **(extra or {})}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    cli("add", "campaign.yaml")
    lp = LaunchPad.from_file(str(mongo_launchpad_file))
    spec = yaml.safe_load(mongo_launchpad_file.read_text())
    db = pymongo.MongoClient(spec["host"])[spec["name"]]
    predictor = start("gpu", [sys.executable, "-m", "amdflow", "rocket", "-l", str(mongo_launchpad_file), "--batch-size", "8"])
    assert predictor.wait(timeout=600) == 0, predictor.stderr.read()[-2000:]
    assert lp.fireworks.count_documents({"spec.amdflow_stage": "predict", "state": "COMPLETED"}) == 6

    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump({"name": "cpu", "category": ["cpu", "vasp"], "query": "{}"}))
    cpu = [str(BIN / "rlaunch"), "-l", str(mongo_launchpad_file), "-w", str(tmp_path / "cpu.yaml"), "rapidfire", "--nlaunches", "0",
           "--sleep", "1"]
    failpoint = {"dedup": "AMDFLOW_FAILPOINT_DEDUP_DELAY_S", "hull": "AMDFLOW_FAILPOINT_HULL_DELAY_S"}[held]
    victim = start("victim", cpu, {failpoint: "300"})
    deadline = time.time() + 600
    lock = None
    while time.time() < deadline and lock is None:
        assert victim.poll() is None, victim.stderr.read()[-2000:]
        lock = db.locks.find_one({"_id": {"$regex": f"^{held}:"}})
        time.sleep(0.1)
    assert lock, f"the rocket never took a {held} claim"
    stage = {"dedup": "dedup", "hull": "analyze"}[held]
    killed = lp.fireworks.find_one({"state": "RUNNING", "spec.amdflow_stage": stage}, {"fw_id": 1})["fw_id"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert db.locks.find_one({"_id": lock["_id"]}), "the claim is left behind by the dead rocket"
    assert lp.get_fw_by_id(killed).state == "RUNNING"  # nobody told the LaunchPad

    time.sleep(2)
    rerun = cli("rerun", "campaign.yaml", "--lost", "--lost-after", "1", "--stale-after", "1")
    said = " ".join((rerun.stdout + rerun.stderr).split())  # the console may wrap its line
    assert "1 Fireworks reset" in said and "released 1 stale claims" in said, said
    assert db.locks.count_documents({}) == 0
    assert lp.get_fw_by_id(killed).state == "READY"

    finishers = [start("cpu_a", cpu), start("cpu_b", cpu)]
    for r in finishers:
        _, err = r.communicate(timeout=900)
        assert r.returncode == 0, err[-2000:]
    figures = fault_figures(lp, db)
    record_figures(f"kill_9_cpu_rocket_in_{held}_claim", figures)
    assert figures["unfinished"] == 0 and figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert sorted(ln["state"] for ln in lp.launches.find({"fw_id": killed})) == ["COMPLETED", "FIZZLED"]
    assert db.candidates.count_documents({"state": {"$in": ["analyzed", "duplicate", "screened_out"]}}) == 6
    # one representative per structure family: the duplicates point at kept candidates
    kept = {c["candidate_id"] for c in db.candidates.find({"state": "analyzed"}, {"candidate_id": 1})}
    for c in db.candidates.find({"state": "duplicate"}):
        assert c["dedup"]["duplicate_of"] in kept, c["dedup"]
    status = json.loads(cli("status", "campaign.yaml", "--json").stdout)
    assert status["thermo"]["stable_candidates"] >= 1


# which insert fails: 0 the candidates; 3 a reference workflow's, after its Fireworks (FireWorks inserts those
# first); 4 and 6 the inserts after a reference workflow, before its reference docs
@pytest.mark.parametrize("skip", [0, 3, 4, 6])
def test_a_database_failure_mid_add_is_one_line_and_the_same_command_finishes(mongo_uri, tmp_path, binary_campaign_dict, skip):
    """The server refuses one insert of `amdflow add` (``internal server error``, as a full WiredTiger cache answers;
    met at 100k candidates): one line naming the command and the fix, no traceback; the same command then adds
    what is missing, one workflow per candidate, nothing doubled."""
    import uuid

    import pymongo

    name = f"amdflow_fault_{uuid.uuid4().hex[:8]}"
    lp_file = tmp_path / "lp.yaml"
    lp_file.write_text(yaml.safe_dump({"host": mongo_uri, "name": name, "strm_lvl": "WARNING",
                                       "mongoclient_kwargs": {"serverSelectionTimeoutMS": 5000, "appname": "amdflow-fault"}}))
    env, cli = campaign_on_server(tmp_path, lp_file, binary_campaign_dict)
    admin = pymongo.MongoClient(mongo_uri).admin
    admin.command("configureFailPoint", "failCommand", mode={"skip": skip, "times": 1},
                  data={"failCommands": ["insert"], "errorCode": 1, "appName": "amdflow-fault"})
    try:
        failed = subprocess.run([sys.executable, "-m", "amdflow", "add", "campaign.yaml"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
    finally:
        admin.command("configureFailPoint", "failCommand", mode="off")
    err = " ".join(failed.stderr.split())
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert "the database failed during `amdflow add`" in err and "run the same command again" in err, err
    again = cli("add", "campaign.yaml")
    added, added_err = json.loads(again.stdout.strip().splitlines()[-1]), again.stderr
    db = pymongo.MongoClient(mongo_uri)[name]
    try:
        cands = list(db.candidates.find({}, {"candidate_id": 1, "fw_ids": 1}))
        assert len(cands) == 6 and all(c["fw_ids"] for c in cands), (added, cands)
        per_candidate = [w["metadata"]["candidate_id"] for w in db.workflows.find({"metadata.amdflow": "candidate"}, {"metadata": 1})]
        assert sorted(per_candidate) == sorted(c["candidate_id"] for c in cands)  # one each: none lost, none doubled
        wf_fw_ids = {i for w in db.workflows.find({}, {"nodes": 1}) for i in w["nodes"]}
        assert {fw["fw_id"] for fw in db.fireworks.find({}, {"fw_id": 1})} == wf_fw_ids  # no Firework without its workflow
        refs = sorted(w["metadata"]["element"] for w in db.workflows.find({"metadata.amdflow": "reference"}, {"metadata": 1}))
        assert refs == ["Al", "Ni"] and db.references.count_documents({}) == 2  # one reference workflow per element
        assert "add_started_at" not in db.campaigns.find_one({})  # the finished add took its mark away
        assert ("without their workflow removed" in added_err) == (skip == 3), added_err[-1000:]
    finally:
        pymongo.MongoClient(mongo_uri).drop_database(name)
