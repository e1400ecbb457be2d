"""The DFT budget (relax.budget): best-ranked first, the rest wait, `amdflow budget` releases them, never exceeded."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from fireworks import FWorker
from fireworks.core.rocket_launcher import rapidfire

from amdflow.campaign import campaign_from_dict
from amdflow.errors import AmdflowError
from amdflow.ops import add_campaign, campaign_status, change_budget, parse_budget_change


def test_budget_changes_parse_and_fail_clearly():
    assert parse_budget_change("+5", 10) == 15
    assert parse_budget_change("-3", 10) == 7
    assert parse_budget_change("4", None) == 4
    assert parse_budget_change("none", 4) is None
    with pytest.raises(AmdflowError, match="no relax budget to change"):
        parse_budget_change("+5", None)
    with pytest.raises(AmdflowError, match="negative"):
        parse_budget_change("-20", 10)
    with pytest.raises(AmdflowError, match="not \\+N"):
        parse_budget_change("lots", 10)


def test_budget_is_not_part_of_the_settings_hash(binary_campaign_dict):
    a = campaign_from_dict(binary_campaign_dict)
    b = campaign_from_dict({**binary_campaign_dict, "relax": {**binary_campaign_dict["relax"], "budget": 3}})
    assert a.config_hash() == b.config_hash()  # an allocation, not a setting: re-adding the file is not "changed"


def _rapidfire(lpad, folder):
    folder.mkdir(exist_ok=True)
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        rapidfire(lpad, FWorker(category=["gpu", "cpu", "vasp"]), strm_lvl="ERROR")
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_budget_relaxes_the_best_ranked_and_the_command_releases_more(db, lpad, binary_campaign_dict, tmp_path):
    cfg = campaign_from_dict({**binary_campaign_dict, "relax": {**binary_campaign_dict["relax"], "budget": 1}})
    add_campaign(db, cfg)
    _rapidfire(lpad, tmp_path / "l1")
    reached = [c for c in db.candidates.find({"campaign": cfg.name}) if c["state"] in ("analyzed", "over_budget")]
    analyzed = [c for c in reached if c["state"] == "analyzed"]
    waiting = [c for c in reached if c["state"] == "over_budget"]
    assert len(analyzed) == 1 and len(waiting) >= 2
    best = min(reached, key=lambda c: c["prediction"]["formation_energy_per_atom"])
    assert analyzed[0]["candidate_id"] == best["candidate_id"]  # the budget went to the best-ranked
    assert db.tasks.count_documents({"kind": "candidate"}) == 1
    status = campaign_status(db, cfg.name)
    assert status["budget"] == {"limit": 1, "used": 1, "over_budget": len(waiting)}
    assert status["candidates"]["over_budget"] == len(waiting)

    out = change_budget(db, cfg.name, "+1")
    assert (out["budget"], out["released"], out["waiting"]) == (2, 1, len(waiting) - 1)
    _rapidfire(lpad, tmp_path / "l2")
    states = [c["state"] for c in db.candidates.find({"campaign": cfg.name})]
    assert states.count("analyzed") == 2 and states.count("over_budget") == len(waiting) - 1
    assert db.tasks.count_documents({"kind": "candidate"}) == 2
    assert {fw["state"] for fw in lpad.fireworks.find({}, {"state": 1})} <= {"COMPLETED", "DEFUSED"}
    second = next(c for c in db.candidates.find({"campaign": cfg.name, "state": "analyzed"})
                  if c["candidate_id"] != best["candidate_id"])
    rest = [c for c in db.candidates.find({"campaign": cfg.name, "state": "over_budget"})]
    assert all(second["prediction"]["formation_energy_per_atom"] <= c["prediction"]["formation_energy_per_atom"] for c in rest)

    assert change_budget(db, cfg.name, "none")["released"] == len(waiting) - 1  # no limit: every waiting one goes on


TAKER = """
import sys, time, pathlib
from amdflow.db import open_db
from amdflow.settings import get_settings
from amdflow import stages
lp_file, go, ids = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3].split(",")
with open_db(None, get_settings(launchpad_file=lp_file)) as db:
    cfg, _ = stages.load_campaign_config(db, "budget-race")
    (go.parent / f"ready-{ids[0]}").touch()
    while not go.exists():
        time.sleep(0.01)
    got = 0
    for cid in ids:
        try:
            stages.take_budget_slot(db, cfg, {"candidate_id": cid})
            got += 1
        except stages.OverBudget:
            pass
    print(got)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_parallel_rockets_never_exceed_the_budget(mongo_launchpad_file, binary_campaign_dict, tmp_path):
    from amdflow.db import open_db
    from amdflow.ops import register_campaign
    from amdflow.settings import get_settings

    settings = get_settings(launchpad_file=mongo_launchpad_file)
    cfg = campaign_from_dict({**binary_campaign_dict, "name": "budget-race",
                              "relax": {**binary_campaign_dict["relax"], "budget": 7}})
    ids = [f"c{i:03d}" for i in range(40)]
    with open_db(None, settings) as db:
        register_campaign(db, cfg)
        db.candidates.insert_many([{"candidate_id": c, "campaign": "budget-race", "state": "unique"} for c in ids])
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", TAKER, str(mongo_launchpad_file), str(go), ",".join(ids[k::4])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 4:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a rocket failed to start"
        time.sleep(0.05)
    go.touch()
    taken = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        taken.append(int(out.strip().splitlines()[-1]))
    assert sum(taken) == 7  # exactly the budget, however the four interleaved
    with open_db(None, settings) as db:
        assert db.campaigns.find_one({"name": "budget-race"})["budget_used"] == 7
        assert db.candidates.count_documents({"campaign": "budget-race", "budget_slot": True}) == 7
        assert db.candidates.count_documents({"campaign": "budget-race", "state": "over_budget"}) == 33


def test_amdflow_run_decides_over_budget_relaxations_in_bulk(db, lpad, binary_campaign_dict, tmp_path, monkeypatch):
    """Past the budget, `amdflow run` ends the waiting relax Fireworks through one bulk check-out (no Rocket each),
    with RelaxTask's own decision; the result equals the Rocket's (the test above), and `amdflow budget` still works."""
    import fireworks.core.rocket_launcher as launcher

    from amdflow import ops

    cfg = campaign_from_dict({**binary_campaign_dict, "relax": {**binary_campaign_dict["relax"], "budget": 1},
                              "output_dir": str(tmp_path / "out")})
    add_campaign(db, cfg)
    rockets: list[str] = []
    real = launcher.launch_rocket

    def counted(lp, fworker=None, fw_id=None, **kw):
        doc = lp.fireworks.find_one({"fw_id": fw_id}, {"spec.amdflow_stage": 1}) if fw_id else None
        rockets.append((doc or {}).get("spec", {}).get("amdflow_stage", "?"))
        return real(lp, fworker, fw_id=fw_id, **kw)

    monkeypatch.setattr(launcher, "launch_rocket", counted)
    ops.run_campaign(db, cfg)
    states = [c["state"] for c in db.candidates.find({"campaign": cfg.name})]
    waiting = states.count("over_budget")
    assert states.count("analyzed") == 1 and waiting >= 2
    assert rockets.count("relax") == 1  # only the one relaxation that had the budget went through a Rocket
    relax = {fw["spec"]["candidate_id"]: fw for fw in lpad.fireworks.find({"spec.amdflow_stage": "relax"})}
    for cand in db.candidates.find({"campaign": cfg.name, "state": "over_budget"}):
        fw = relax[cand["candidate_id"]]
        assert fw["state"] == "COMPLETED" and len(fw["launches"]) == 1
        launch = lpad.launches.find_one({"launch_id": fw["launches"][0]})
        assert "relax budget of 1 spent" in launch["action"]["stored_data"]["over_budget"]
        analyze = lpad.fireworks.find_one({"fw_id": cand["fw_ids"]["analyze"]})
        assert analyze["state"] == "DEFUSED"
    assert not [p for p in (tmp_path / "out" / "launches").rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert db.tasks.count_documents({"kind": "candidate"}) == 1

    out = change_budget(db, cfg.name, "+1")
    assert out["released"] == 1
    ops.run_campaign(db, cfg)
    states = [c["state"] for c in db.candidates.find({"campaign": cfg.name})]
    assert states.count("analyzed") == 2 and states.count("over_budget") == waiting - 1
    assert db.tasks.count_documents({"kind": "candidate"}) == 2
