"""Tier 3: several processes on one MongoDB-wire server (or a real MongoDB via AMDFLOW_TEST_MONGO_URI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import campaign_on_server, fault_figures, record_figures

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


FAMILY_CAMPAIGN = {
    "name": "race", "elements": ["Ni", "Al"],
    "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}],
    "generate": {"lattice_scales": [0.97, 0.98, 0.99, 1.0, 1.01, 1.02]},  # six copies of one B2 family
    "screen": {"max_formation_energy_per_atom": 2.0},
    "funnel": {"engine": "none"},
}

RACER = """
import sys, time
from amdflow.db import open_db
from amdflow.settings import get_settings
from amdflow import stages
lp_file, cid, sync_dir, slot = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[5])
if sys.argv[4] == "noclaim":  # the same race with the claim disabled
    import contextlib
    import amdflow.stages.dedup
    amdflow.stages.dedup.claim = lambda db, key, **kw: contextlib.nullcontext(True)
from amdflow.screen.predict import get_predictor
get_predictor()  # load the model before the start signal
import amdflow.select.dedup, pymatgen.analysis.structure_matcher  # and what dedup imports on first use
with open_db(None, get_settings(launchpad_file=lp_file)) as db:
    stages.load_campaign_config(db, "race")
    import pathlib
    sync = pathlib.Path(sync_dir)
    (sync / f"ready-{slot}").touch()
    while not (sync / "go").exists():
        time.sleep(0.05)
    go, stagger = (float(x) for x in (sync / "go").read_text().split())
    start_at = go + stagger * slot
    time.sleep(max(0.0, start_at - time.time()))
    stages.predict_stage(db, [cid])
    print(stages.dedup_stage(db, cid))
"""


def run_race(mongo_launchpad_file, tmp_path, claim: bool, hold_s: float = 1.0,
             stagger_s: float = 0.3) -> tuple[list[str], list[dict], int, list[str]]:
    """Six processes predict then dedup one member each of a B2 family.

    They predict in order of decreasing energy, ``stagger_s`` apart, and every decision is
    held open for ``hold_s`` between reading the family and writing (a test failpoint):
    without the claim, each racer sees only higher-energy, undecided members and keeps itself.
    """
    import time

    from amdflow.campaign import campaign_from_dict
    from amdflow.db import open_db
    from amdflow.ops import add_campaign
    from amdflow.settings import get_settings

    cfg = campaign_from_dict({**FAMILY_CAMPAIGN, "output_dir": str(tmp_path / "out")})
    settings = get_settings(launchpad_file=mongo_launchpad_file)
    from pymatgen.core import Structure

    from amdflow.screen.predict import get_predictor

    with open_db(None, settings) as db:
        add_campaign(db, cfg, workflows=False)
        docs = list(db.candidates.find({"campaign": "race"}))
    assert len(docs) == 6
    energy = dict(zip([d["candidate_id"] for d in docs], get_predictor().predict([Structure.from_dict(d["structure"]) for d in docs]), strict=True))
    ids = sorted(energy, key=lambda c: -energy[c])  # highest energy predicts first
    assert len({round(float(e), 9) for e in energy.values()}) == 6
    env = {**os.environ, "AMDFLOW_FAILPOINT_DEDUP_DELAY_S": str(hold_s)}
    sync = tmp_path / ("sync-claim" if claim else "sync-noclaim")
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(mongo_launchpad_file), cid, str(sync), "claim" if claim else "noclaim", str(k)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for k, cid in enumerate(ids)]
    deadline = time.time() + 300
    while len(list(sync.glob("ready-*"))) < len(procs):  # every racer has imported, loaded and connected
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a racer failed to start"
        time.sleep(0.1)
    (sync / "go").write_text(f"{time.time() + 0.5} {stagger_s}")  # then they go stagger_s apart
    answers = []  # what each racer's dedup returned (what its Firework would tell FireWorks)
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        answers.append(out.strip().splitlines()[-1])
    with open_db(None, settings) as db:
        cands = list(db.candidates.find({"campaign": "race"}))
        return [c["state"] for c in cands], cands, db.coll("locks").count_documents({}), answers


def test_concurrent_dedup_keeps_exactly_one_per_family(mongo_launchpad_file, tmp_path):
    states, cands, locks, answers = run_race(mongo_launchpad_file, tmp_path, claim=True)
    assert sorted(states) == ["duplicate"] * 5 + ["unique"]
    rep = next(c for c in cands if c["state"] == "unique")
    # and the Fireworks were told the same: one kept, five duplicates of it
    assert sorted(answers) == sorted([rep["candidate_id"]] * 5 + ["None"])
    links = {c["candidate_id"]: c["dedup"]["duplicate_of"] for c in cands}
    for cid in links:  # every duplicate leads to the one representative
        seen = set()
        while links[cid] is not None and cid not in seen:
            seen.add(cid)
            cid = links[cid]
        assert cid == rep["candidate_id"]
    assert locks == 0  # every claim was released


def test_without_the_claim_the_same_race_keeps_several(mongo_launchpad_file, tmp_path):
    """The control: the race above is real, so the claim is what makes dedup parallel-safe.

    Each racer decides the whole bucket it sees; the last writer's decisions stand in the
    documents, but the earlier racers have already told their Fireworks "kept": several
    members of one family would go on to the relax stage.
    """
    # a wide window, so that on a loaded machine the later racers still read before the first writes
    _, _, _, answers = run_race(mongo_launchpad_file, tmp_path, claim=False, hold_s=4.0, stagger_s=0.2)
    assert answers.count("None") > 1


@pytest.mark.fault
def test_campaign_survives_kill_9_of_a_rocket(mongo_launchpad_file, tmp_path, binary_campaign_dict):
    """amdflow add (CLI) -> a rocket killed with -9 mid-relax -> lpad detect_lostruns --rerun -> two rockets finish.

    No result is lost or duplicated: every Firework completes (or is defused) with exactly
    one completed launch, and there is one task document per relaxation. Then status, report and the Python API
    on the same database (every read on an index; the API sends no write).
    """
    import json
    import signal
    import time

    import yaml

    env, cli = campaign_on_server(tmp_path, mongo_launchpad_file, binary_campaign_dict)

    added = json.loads(cli("add", "campaign.yaml").stdout.strip().splitlines()[-1])
    assert added["new_workflows"] == 6
    lp = launchpad(mongo_launchpad_file)

    def rocket(name: str) -> subprocess.Popen:
        cwd = tmp_path / name
        cwd.mkdir()
        return subprocess.Popen([str(BIN / "rlaunch"), "-l", str(mongo_launchpad_file), "-s", "rapidfire", "--nlaunches", "0"],
                                cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    victim = rocket("victim")
    deadline = time.time() + 300
    running = None
    while time.time() < deadline and victim.poll() is None:
        running = lp.fireworks.find_one({"state": "RUNNING", "spec.amdflow_stage": {"$in": ["relax", "reference"]}}, {"fw_id": 1})
        if running:
            break
        time.sleep(0.1)
    assert running, "the rocket never started a relaxation"
    # mid-relax, not inside FireWorks' own check-out: wait until the check-out released its workflow lock
    # (a rocket killed in that millisecond window leaves FireWorks' lock; see docs/hpc.md, `lpad admin unlock`)
    while time.time() < deadline and lp.workflows.find_one({"nodes": running["fw_id"]}, {"locked": 1}).get("locked"):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    killed = running["fw_id"]
    assert lp.get_fw_by_id(killed).state == "RUNNING"  # nobody told the LaunchPad

    time.sleep(2)
    lost = subprocess.run([str(BIN / "lpad"), "-l", str(mongo_launchpad_file), "detect_lostruns", "--time", "1", "--rerun"],
                          capture_output=True, text=True, timeout=120)
    assert lost.returncode == 0, lost.stderr
    assert lp.get_fw_by_id(killed).state == "READY"

    finishers = [rocket("a"), rocket("b")]
    for r in finishers:
        _, err = r.communicate(timeout=900)
        assert r.returncode == 0, err[-2000:]

    states = {fw["fw_id"]: fw["state"] for fw in lp.fireworks.find({}, {"fw_id": 1, "state": 1})}
    assert set(states.values()) <= {"COMPLETED", "DEFUSED"}, states
    completed = {}
    for launch in lp.launches.find({"state": "COMPLETED"}, {"fw_id": 1}):
        completed[launch["fw_id"]] = completed.get(launch["fw_id"], 0) + 1
    assert set(completed.values()) == {1}
    assert set(completed) == {i for i, s in states.items() if s == "COMPLETED"}
    assert lp.launches.count_documents({"fw_id": killed}) == 2  # the lost launch and the rerun
    assert lp.get_fw_by_id(killed).state == "COMPLETED"

    status = json.loads(cli("status", "campaign.yaml", "--json").stdout)
    assert status["candidates_total"] == 6 and status["references"] == {"relaxed": 2}
    relax_done = sum(1 for fw in lp.fireworks.find({"spec.amdflow_stage": {"$in": ["relax", "reference"]}, "state": "COMPLETED"}))
    from pymongo import MongoClient

    spec = yaml.safe_load(mongo_launchpad_file.read_text())
    tasks = MongoClient(spec["host"])[spec["name"]]["tasks"]
    assert tasks.count_documents({}) == relax_done == len(tasks.distinct("task_id"))
    figures = fault_figures(lp, MongoClient(spec["host"])[spec["name"]])
    record_figures("kill_9_relax_rocket", figures)
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert status["thermo"]["stable_candidates"] >= 1
    report = cli("report", "campaign.yaml")
    assert "AlNi" in report.stdout
    watched = cli("status", "campaign.yaml", "--watch", "--interval", "0.2")  # nothing left to run: one refresh, then exit
    assert "COMPLETED" in watched.stdout
    assert_status_and_report_use_indexes(mongo_launchpad_file, tmp_path / "campaign.yaml")
    assert_open_campaign_by_name_sends_no_write(mongo_launchpad_file, binary_campaign_dict["name"], cli)


def assert_open_campaign_by_name_sends_no_write(lp_file: Path, name: str, cli) -> None:
    """The Python API on a MongoDB LaunchPad, by campaign name: the stored answers, and not one write command sent."""
    from pymongo import monitoring

    import amdflow

    sent: list[str] = []
    listening = [True]  # pymongo cannot unregister a listener: it stops recording when this check is done

    class Commands(monitoring.CommandListener):
        def started(self, event):
            if listening[0]:
                sent.append(event.command_name)

        def succeeded(self, event):
            pass

        def failed(self, event):
            pass

    monitoring.register(Commands())
    with amdflow.open_campaign(name, launchpad=lp_file) as camp:
        hull = camp.thermo()
        cands = camp.candidates()
        pd = camp.phase_diagram()
        entries = camp.entries()
        done = cands.loc[cands["state"] == "analyzed", "candidate_id"]
        structure = camp.structure(done.iloc[0][:8])
        history = camp.history(done.iloc[0])
        stored = list(camp.db.thermo.find({"run_type": camp.run_type, "hull_chemsys": "Al-Ni"}, {"_id": 0, "material_id": 1}))
    listening[0] = False
    writes = {"insert", "update", "delete", "findAndModify", "createIndexes", "drop", "dropIndexes"}
    assert sent and not writes & set(sent), sorted(set(sent))
    assert sorted(hull["material_id"]) == sorted(d["material_id"] for d in stored) and len(entries) == len(hull)
    assert {e.entry_id for e in pd.stable_entries} >= set(hull.loc[hull["is_stable"] & (hull["kind"] == "candidate"), "material_id"])
    assert len(structure) >= 2 and list(history["stage"])[-1] == "analyze"
    shown = json.loads(cli("show", "campaign.yaml", done.iloc[0][:10], "--json").stdout)
    assert shown["candidate_id"] == done.iloc[0] and shown["thermo"]


def assert_status_and_report_use_indexes(lp_file: Path, campaign_file: Path) -> None:
    """Every read `amdflow status` and `amdflow report` send is planned on an index (explain: no COLLSCAN)."""
    import yaml
    from pymongo import MongoClient

    from amdflow.campaign import load_campaign
    from amdflow.db import open_db
    from amdflow.ops import campaign_status, write_campaign_report
    from amdflow.settings import get_settings
    from amdflow.testing.query_plans import collection_scans, record_reads

    spec = yaml.safe_load(lp_file.read_text())
    cfg = load_campaign(campaign_file)
    from amdflow.api import open_campaign
    from amdflow.show import candidate_report

    with record_reads(spec["name"]) as reads, open_db(None, get_settings(launchpad_file=lp_file)) as db:
        campaign_status(db, cfg.name)
        write_campaign_report(db, cfg)
    with open_db(None, get_settings(launchpad_file=lp_file)) as db:
        shown = db.candidates.find_one({"state": "analyzed"}, {"candidate_id": 1})["candidate_id"]
    with record_reads(spec["name"]) as shows, open_campaign(campaign_file, lp_file) as camp:  # `amdflow show` of an id prefix
        assert candidate_report(camp, shown[:10])["candidate_id"] == shown
    reads += shows
    assert len(reads) > 10 and any("$gte" in json.dumps(r["command"], default=str) for r in shows)
    scans = collection_scans(MongoClient(spec["host"]), reads)
    assert scans == [], "\n".join(json.dumps(s["command"], default=str)[:300] for s in scans)


def test_qlaunch_with_the_shipped_slurm_adapter_and_a_fake_sbatch(mongo_launchpad_file, tmp_path):
    """qlaunch writes a job script from queue_adapters/slurm_cpu.yaml; the fake sbatch runs it; the rocket completes the Firework."""
    import shutil

    from fireworks import Firework, ScriptTask

    repo = Path(__file__).resolve().parents[1]
    work = tmp_path / "work"
    (work / "fw_configs").mkdir(parents=True)
    shutil.copy(mongo_launchpad_file, work / "fw_configs" / "my_launchpad.yaml")  # the adapter's relative paths
    shutil.copy(repo / "fw_configs" / "my_fworker_cpu.yaml", work / "fw_configs" / "my_fworker_cpu.yaml")
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    sbatch = fakebin / "sbatch"
    sbatch.write_text('#!/usr/bin/env bash\n# fake SLURM: run the job script now, say what sbatch says\n'
                      'echo "$@" > "$(dirname "$0")/sbatch_args"\nbash "${@: -1}" > job.out 2>&1\necho "Submitted batch job 4242"\n')
    sbatch.chmod(0o755)
    lp = launchpad(mongo_launchpad_file)
    lp.reset(password=None, require_password=False, max_reset_wo_password=1000)
    lp.add_wf(Firework(ScriptTask.from_str("echo amdflow-queue-test > marker.txt"), spec={"_category": "cpu"}, name="queued"))
    lp.add_wf(Firework(ScriptTask.from_str("true"), spec={"_category": "gpu"}, name="not for this worker"))
    env = {**os.environ, "PATH": f"{fakebin}:{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "qlaunch"), "-q", str(repo / "queue_adapters" / "slurm_cpu.yaml"),
                           "-w", "fw_configs/my_fworker_cpu.yaml", "-l", "fw_configs/my_launchpad.yaml", "singleshot"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    script = (work / "FW_submit.script").read_text()
    assert "#SBATCH --job-name=amdflow-cpu" in script and "rlaunch -w fw_configs/my_fworker_cpu.yaml" in script
    assert (fakebin / "sbatch_args").exists()
    states = {fw["name"]: fw["state"] for fw in lp.fireworks.find({}, {"name": 1, "state": 1})}
    assert states == {"queued": "COMPLETED", "not for this worker": "READY"}
    assert list(work.rglob("marker.txt"))


@pytest.mark.fault
def test_batched_rockets_with_a_cpu_rocket(mongo_launchpad_file, tmp_path):
    """Two batched GPU rockets and one CPU rlaunch together: every predict Firework runs once, with a
    proper launch; a candidate whose stored structure is broken fizzles alone."""
    import yaml

    from amdflow.campaign import campaign_from_dict
    from amdflow.db import open_db
    from amdflow.ops import add_campaign
    from amdflow.settings import get_settings

    cfg = campaign_from_dict({
        "name": "batched", "elements": ["Fe", "Al", "Ni"],
        "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB3_cP4_221_a_c", "AB2C_cF16_225_a_c_b", "ABC_cF12_216_b_c_a"]}],
        "generate": {"lattice_scales": [0.98, 1.0, 1.02], "min_bond_ratio": 0.0},  # every scale kept: 45 candidates
        "funnel": {"engine": "none"},  # the batched predict rocket beside CPU rockets (the funnel's rockets: test_funnel.py)
        "output_dir": str(tmp_path / "out"),
    })
    settings = get_settings(launchpad_file=mongo_launchpad_file)
    with open_db(None, settings) as db:
        add_campaign(db, cfg)
        broken = db.candidates.find_one({"formula": "AlFe"})["candidate_id"]
        db.candidates.update_one({"candidate_id": broken}, {"$set": {"structure.sites": [{"species": "nonsense"}]}})
        total = db.candidates.count_documents({})
    assert total == 45
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump({"name": "cpu", "category": "cpu", "query": "{}"}))
    env = {**os.environ, "AMDFLOW_PROGRESS": "false"}
    procs = []
    for k in range(2):
        cwd = tmp_path / f"gpu{k}"
        cwd.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "amdflow", "rocket", "-l", str(mongo_launchpad_file), "--batch-size", "8"],
                                      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (tmp_path / "cpu").mkdir()
    procs.append(subprocess.Popen([str(BIN / "rlaunch"), "-l", str(mongo_launchpad_file), "-w", str(tmp_path / "cpu.yaml"), "-s",
                                   "rapidfire", "--nlaunches", "0"], cwd=tmp_path / "cpu", env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    # rapidfire leaves when nothing is ready for a moment; a queue would send the next rocket
    drain = subprocess.run([str(BIN / "rlaunch"), "-l", str(mongo_launchpad_file), "-w", str(tmp_path / "cpu.yaml"), "-s",
                            "rapidfire", "--nlaunches", "0"], cwd=tmp_path / "cpu", env=env, capture_output=True, text=True, timeout=600)
    assert drain.returncode == 0, drain.stderr[-2000:]
    lp = launchpad(mongo_launchpad_file)
    predict = {fw["fw_id"]: fw for fw in lp.fireworks.find({"spec.amdflow_stage": "predict"})}
    assert len(predict) == 45
    launches = list(lp.launches.find({"fw_id": {"$in": list(predict)}}))
    assert len(launches) == 45 and len({ln["fw_id"] for ln in launches}) == 45  # each ran exactly once
    assert all(ln["fworker"]["name"].startswith("amdflow-batched-rocket@") for ln in launches)
    assert all([h["state"] for h in ln["state_history"]] == ["RUNNING", ln["state"]] for ln in launches)
    with open_db(None, settings) as db:
        bad = db.candidates.find_one({"candidate_id": broken})
        assert bad["state"] == "failed" and bad["error"].startswith("predict:")
        assert lp.get_fw_by_id(bad["fw_ids"]["predict"]).state == "FIZZLED"
        for c in db.candidates.find({"candidate_id": {"$ne": broken}}):
            assert lp.get_fw_by_id(c["fw_ids"]["predict"]).state == "COMPLETED"
            dedup = lp.get_fw_by_id(c["fw_ids"]["dedup"])
            if c["prediction"]["passed"]:
                assert dedup.spec["_priority"] == pytest.approx(-c["prediction"]["formation_energy_per_atom"], abs=1e-6)
                assert dedup.state == "COMPLETED"  # the CPU rockets ran it
            else:
                assert dedup.state == "DEFUSED"


@pytest.mark.fault
def test_kill_9_of_the_batched_rocket_then_four_rockets_finish(mongo_launchpad_file, tmp_path, binary_campaign_dict):
    """The batched GPU rocket killed with -9 mid-batch -> `lpad detect_lostruns --rerun` -> two batched rockets and
    two CPU rockets (dedup, relax, analyze) together finish the campaign: every Firework exactly one completed
    launch, the killed batch's launches kept as FIZZLED history, one task document per relaxation."""
    import json
    import signal
    import time

    import yaml

    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump({**binary_campaign_dict, "output_dir": str(tmp_path / "out")}))
    env = {**os.environ, "AMDFLOW_LAUNCHPAD_FILE": str(mongo_launchpad_file), "AMDFLOW_PROGRESS": "false"}
    add = subprocess.run([sys.executable, "-m", "amdflow", "add", "campaign.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert add.returncode == 0, add.stderr[-2000:]
    lp = launchpad(mongo_launchpad_file)

    def start(name: str, args: list[str], extra: dict | None = None) -> subprocess.Popen:
        cwd = tmp_path / name
        cwd.mkdir()
        return subprocess.Popen(args, cwd=cwd, env={**env, **(extra or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    gpu = [sys.executable, "-m", "amdflow", "rocket", "-l", str(mongo_launchpad_file), "--batch-size", "4"]
    victim = start("victim", gpu, {"AMDFLOW_FAILPOINT_PREDICT_DELAY_S": "120"})
    deadline = time.time() + 120
    # batch 1 (4) is predicting; the pipeline has already checked out batch 2 (the other 2)
    # (both sides written: between a batch's launches and its Fireworks' update lies a millisecond window, in which
    # the Fireworks are still claims, RESERVED, that the stale-claim reset returns; that is not what this test kills)
    while time.time() < deadline and (lp.launches.count_documents({"state": "RUNNING"}) < 6
                                      or lp.fireworks.count_documents({"state": "RUNNING"}) < 6):
        assert victim.poll() is None, victim.stderr.read()[-2000:]
        time.sleep(0.1)
    running = sorted(ln["fw_id"] for ln in lp.launches.find({"state": "RUNNING"}, {"fw_id": 1}))
    assert len(running) == 6, "the batched rocket never held its two batches"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert {lp.get_fw_by_id(i).state for i in running} == {"RUNNING"}  # nobody told the LaunchPad
    assert lp.workflows.count_documents({"locked": {"$exists": True}}) == 0  # the batch held no workflow lock

    time.sleep(2)
    lost = subprocess.run([str(BIN / "lpad"), "-l", str(mongo_launchpad_file), "detect_lostruns", "--time", "1", "--rerun"],
                          capture_output=True, text=True, timeout=120)
    assert lost.returncode == 0, lost.stderr
    assert {lp.get_fw_by_id(i).state for i in running} == {"READY"}

    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump({"name": "cpu", "category": ["cpu", "vasp"], "query": "{}"}))
    cpu = [str(BIN / "rlaunch"), "-l", str(mongo_launchpad_file), "-w", str(tmp_path / "cpu.yaml"), "rapidfire", "--nlaunches", "0",
           "--sleep", "1"]
    rockets = [start("gpu_a", gpu), start("gpu_b", gpu), start("cpu_a", cpu), start("cpu_b", cpu)]
    for r in rockets:
        _, err = r.communicate(timeout=900)
        assert r.returncode == 0, err[-2000:]

    states = {fw["fw_id"]: fw["state"] for fw in lp.fireworks.find({}, {"fw_id": 1, "state": 1})}
    assert set(states.values()) <= {"COMPLETED", "DEFUSED"}, states
    completed: dict[int, int] = {}
    for launch in lp.launches.find({"state": "COMPLETED"}, {"fw_id": 1}):
        completed[launch["fw_id"]] = completed.get(launch["fw_id"], 0) + 1
    assert set(completed.values()) == {1}  # nothing ran twice
    assert set(completed) == {i for i, s in states.items() if s == "COMPLETED"}  # nothing lost
    for i in running:  # the killed launch is history, the rerun completed
        assert sorted(ln["state"] for ln in lp.launches.find({"fw_id": i})) == ["COMPLETED", "FIZZLED"]
    predict_workers = {ln["fworker"]["name"].split("@")[0] for ln in lp.launches.find({"state": "COMPLETED", "fw_id": {"$in": running}})}
    assert predict_workers == {"amdflow-batched-rocket"}
    relaxed = lp.fireworks.count_documents({"spec.amdflow_stage": {"$in": ["relax", "reference"]}, "state": "COMPLETED"})
    from pymongo import MongoClient

    spec = yaml.safe_load(mongo_launchpad_file.read_text())
    tasks = MongoClient(spec["host"])[spec["name"]]["tasks"]
    assert relaxed >= 3 and tasks.count_documents({}) == relaxed == len(tasks.distinct("task_id"))
    figures = fault_figures(lp, MongoClient(spec["host"])[spec["name"]])
    record_figures("kill_9_batched_gpu_rocket", figures)
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    status = subprocess.run([sys.executable, "-m", "amdflow", "status", "campaign.yaml", "--json"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert json.loads(status.stdout)["thermo"]["stable_candidates"] >= 1


CLAIM_HOLDER = """
import sys, time
from amdflow.db import open_db
from amdflow.settings import get_settings
import amdflow.stages.common as common
lp_file, role, sync = sys.argv[1], sys.argv[2], sys.argv[3]
if sys.argv[4] == "noheartbeat":  # the control: the claim as it was, never refreshed while held
    common._heartbeat = lambda *a, **k: None
import pathlib
sync = pathlib.Path(sync)
with open_db(None, get_settings(launchpad_file=lp_file)) as db:
    if role == "holder":
        with common.claim(db, "funnel:race:AlNi", stale_s=1.0) as held:
            (sync / "held").write_text(str(time.time()))
            time.sleep(4.0)  # work that outlasts stale_s (the second dedup's matching, a slow hull)
            print("released", time.time())
    else:
        while not (sync / "held").exists():
            time.sleep(0.02)
        with common.claim(db, "funnel:race:AlNi", stale_s=1.0, timeout_s=30) as held:
            print("got", time.time())
"""


def _claim_race(lp_file: Path, tmp_path: Path, mode: str) -> tuple[float, float]:
    sync = tmp_path / f"sync-{mode}"
    sync.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", CLAIM_HOLDER, str(lp_file), "holder", str(sync), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    taker = subprocess.Popen([sys.executable, "-c", CLAIM_HOLDER, str(lp_file), "taker", str(sync), mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_h, err_h = holder.communicate(timeout=120)
    out_t, err_t = taker.communicate(timeout=120)
    assert holder.returncode == 0 and taker.returncode == 0, (err_h[-2000:], err_t[-2000:])
    return float(out_h.split()[-1]), float(out_t.split()[-1])


def test_a_claim_held_longer_than_its_stale_time_is_not_taken_over(mongo_launchpad_file, tmp_path):
    """Issue 25: a claim is extended while held, so a second process waits for the holder's release even when the
    holder's work outlasts stale_s; without the heartbeat (the control) the second process takes it over mid-work."""
    released, got = _claim_race(mongo_launchpad_file, tmp_path, "heartbeat")
    assert got >= released - 0.05, (released, got)  # waited for the release (clock of one machine)
    released, got = _claim_race(mongo_launchpad_file, tmp_path, "noheartbeat")
    assert got < released - 1.0, (released, got)  # taken over while the holder still worked: the race is real


TWIN_DECIDER = """
import json, sys
from pymatgen.core import Structure
import amdflow.relax
from amdflow.relax.base import RelaxResult
from amdflow.db import open_db
from amdflow.settings import get_settings
from amdflow import stages
lp_file, cid, twin_file = sys.argv[1:4]
twin = json.loads(open(twin_file).read())
# its ML relaxation ends in its twin's crystal, 0.05 eV/atom lower (the stage's logic is under test, not the potential)
amdflow.relax.relax_many = lambda engine, structures, workers=1: [
    RelaxResult(Structure.from_dict(twin["structure"]), twin["energy"], True, 5, 0.01, 0.1) for _ in structures]
with open_db(None, get_settings(launchpad_file=lp_file)) as db:
    print([o.duplicate_of for o in stages.funnel_stage(db, [cid])])
"""


def test_the_relax_check_reads_the_candidate_under_the_claim_a_demoting_twin_holds(mongo_launchpad_file, tmp_path):
    """Issue 25, the second dedup: candidate A passed the funnel and waits for its final relax; its twin B (another
    template, relaxed by the potential into A's crystal, lower) is decided in another process, which demotes A while
    it holds the formula's claim. The relax check for A, handed A's document as read before (still 'prerelaxed'),
    must wait for the claim, read A again and stop it: one DFT relaxation per crystal. Reading outside the claim (the
    old code) passes A, and both twins go to DFT."""
    import time

    from fireworks import FWorker
    from fireworks.core.rocket_launcher import rapidfire

    from amdflow.campaign import campaign_from_dict
    from amdflow.db import open_db
    from amdflow.ops import add_campaign
    from amdflow.settings import get_settings
    from amdflow.stages import FunnelCut, funnel_stage
    from amdflow.stages.funnel import check_before_relax

    cfg = campaign_from_dict({
        "name": "twins", "elements": ["Ni", "Al"], "output_dir": str(tmp_path / "out"),
        "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB_cF8_225_a_b"]}],  # B2 and rocksalt AlNi
        "generate": {"lattice_scales": [1.0], "include_subsystems": False},
        "screen": {"mode": "threshold", "max_formation_energy_per_atom": 2.0},
        "funnel": {"fmax": 0.1, "max_steps": 60, "max_e_above_hull": 5.0},
        "relax": {"fmax": 0.1, "max_steps": 60, "reference_prototypes": ["fcc"], "reference_ground_state": False}})
    settings = get_settings(launchpad_file=mongo_launchpad_file)
    with open_db(None, settings) as db:
        add_campaign(db, cfg)
        launches = tmp_path / "launches"
        launches.mkdir()
        cwd = os.getcwd()
        try:
            os.chdir(launches)  # predict, dedup and the references of both levels
            rapidfire(db.launchpad, FWorker(category=["gpu", "cpu", "vasp"], query={"spec.amdflow_stage": {"$in": ["predict", "dedup", "reference"]}}),
                      strm_lvl="ERROR")
        finally:
            os.chdir(cwd)
        ids = {d["template"]["template_id"]: d["candidate_id"] for d in db.candidates.find({"formula": "AlNi", "state": "unique"})}
        a, b = ids["AB_cP2_221_b_a"], ids["AB_cF8_225_a_b"]
        assert funnel_stage(db, [a])[0].passed  # A: relaxed, kept, waiting for its final relax
        stale = db.candidates.find_one({"candidate_id": a}, {"_id": 0})
        assert stale["state"] == "prerelaxed" and not stale.get("relax_started_at")
        task = db.tasks.find_one({"task_id": stale["funnel"]["task_id"]})
        twin = tmp_path / "twin.json"
        twin.write_text(json.dumps({"structure": task["final_structure"], "energy": task["uncorrected_energy"] - 0.05 * task["nsites"]}))
        decider = subprocess.Popen([sys.executable, "-c", TWIN_DECIDER, str(mongo_launchpad_file), b, str(twin)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "AMDFLOW_FAILPOINT_FUNNEL_DECIDE_DELAY_S": "3"})
        locks = db.coll("locks")
        deadline = time.time() + 240
        while locks.find_one({"_id": "funnel:twins:AlNi"}) is None:  # B's decision holds the formula's claim
            assert time.time() < deadline and decider.poll() is None, decider.communicate()[1][-2000:]
            time.sleep(0.02)
        with pytest.raises(FunnelCut, match=f"same crystal as {b}"):
            check_before_relax(db, cfg, stale, start=lambda doc: pytest.fail("A's final relax started"))
        out, err = decider.communicate(timeout=120)
        assert decider.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "[None]"  # B kept
        now = {d["candidate_id"]: d for d in db.candidates.find({"candidate_id": {"$in": [a, b]}})}
        assert now[a]["state"] == "duplicate" and now[a]["funnel"]["duplicate_of"] == b and not now[a].get("relax_started_at")
        assert now[b]["state"] == "prerelaxed" and now[b]["funnel"]["passed"] is True
