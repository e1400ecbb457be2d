"""Candidate workflows relaxed by VASP through Custodian, with the fake VASP as the VASP command.

The fake writes real-format outputs and prints a real VASP error on the first run of
every relaxation; Custodian must apply its correction (the error comes back if the
inputs did not change) and the campaign must still finish, with the corrections on the
task documents and one run type for candidates and references.
"""

from __future__ import annotations

import os
import sys

import pytest
from fireworks import FWorker
from fireworks.core.rocket_launcher import rapidfire
from pymatgen.core import Structure

from amdflow.campaign import campaign_from_dict
from amdflow.ops import add_campaign
from tests.conftest import SHARED

FAKE_VASP = f"{sys.executable} -m amdflow.testing.fake_vasp"


def _vasp_campaign(binary_campaign_dict: dict, **vasp: object) -> dict:
    return {**binary_campaign_dict, "relax": {"engine": "vasp", "reference_prototypes": ["fcc"], "vasp": {"kpoint_density": 20, **vasp}}}


def _run(lpad, tmp_path, env: dict) -> None:
    launches = tmp_path / "launches"
    launches.mkdir(exist_ok=True)
    cwd = os.getcwd()
    try:
        os.chdir(launches)
        rapidfire(lpad, FWorker(category=["gpu", "cpu", "vasp"], env=env), strm_lvl="ERROR")
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_campaign_through_fake_vasp_recovers_an_injected_error(db, lpad, binary_campaign_dict, tmp_path, monkeypatch):
    monkeypatch.setenv("AMDFLOW_VASP_POTCAR_SPEC", "true")
    monkeypatch.setenv("AMDFLOW_CUSTODIAN_POLL_S", "0.2")
    monkeypatch.setenv("AMDFLOW_FAKE_VASP_ERROR", "zbrent")
    if (SHARED / "vasp" / "errors" / "zbrent").exists():  # the real VASP stdout when we have it
        monkeypatch.setenv("AMDFLOW_FAKE_VASP_ERRORS_DIR", str(SHARED / "vasp" / "errors"))
    cfg = campaign_from_dict(_vasp_campaign(binary_campaign_dict))
    add_campaign(db, cfg)
    _run(lpad, tmp_path, {"vasp_cmd": FAKE_VASP})  # the VASP command from the FWorker's env

    states = {fw["state"] for fw in lpad.fireworks.find({}, {"state": 1})}
    assert states <= {"COMPLETED", "DEFUSED"}, states
    tasks = list(db.tasks.find({}))
    assert {t["kind"] for t in tasks} == {"candidate", "reference"} and len(tasks) >= 3
    run_types = {t["run_type"] for t in tasks}
    assert len(run_types) == 1 and run_types.pop().startswith("vasp-mp-")  # candidates and references comparable
    for t in tasks:
        assert t["engine"] == "vasp" and t["converged"]
        errors = [e for c in t["details"]["corrections"] for e in c["errors"]]
        assert "zbrent" in errors, t["details"]["corrections"]  # injected, corrected, recovered
        assert t["details"]["final_run"].startswith("vasprun.xml.static")  # double relaxation, then static
        assert t["details"]["potcar_symbols"] and t["details"]["incar"]["ISPIN"] == 2
        assert os.path.isdir(t["dir_name"]) and any(p.endswith(".gz") for p in os.listdir(t["dir_name"]))  # outputs gzipped
    refs = list(db.references.find({}))
    assert {r["state"] for r in refs} == {"relaxed"} and {r["element"] for r in refs} == {"Al", "Ni"}
    assert db.thermo.count_documents({"run_type": tasks[0]["run_type"]}) >= 3


@pytest.mark.slow
def test_unrecoverable_vasp_failure_fizzles_with_the_reason(db, lpad, binary_campaign_dict, tmp_path, monkeypatch):
    """max_errors 0: the first VASP error ends the relaxation; its Firework is FIZZLED, the others carry on."""
    monkeypatch.setenv("AMDFLOW_VASP_POTCAR_SPEC", "true")
    monkeypatch.setenv("AMDFLOW_CUSTODIAN_POLL_S", "0.2")
    monkeypatch.setenv("AMDFLOW_FAKE_VASP_ERROR", "zbrent")
    cfg = campaign_from_dict(_vasp_campaign(binary_campaign_dict, max_errors=0))
    add_campaign(db, cfg)
    _run(lpad, tmp_path, {"vasp_cmd": FAKE_VASP})
    relax = [fw["state"] for fw in lpad.fireworks.find({"spec.amdflow_stage": {"$in": ["relax", "reference"]}}, {"state": 1})]
    assert "COMPLETED" not in relax and relax.count("FIZZLED") >= 3  # the ones that ran (duplicates/screened: DEFUSED)
    failed = list(db.candidates.find({"state": "failed"}))
    assert failed and all(c["error"].startswith("relax: MaxCorrectionsPerJobError") for c in failed), [c["error"] for c in failed]
    reason = lpad.launches.find_one({"state": "FIZZLED"})["action"]["stored_data"]["_exception"]["_stacktrace"]
    assert "Max errors per job reached" in reason  # `lpad get_fws -s FIZZLED -d more` shows why
    # dedup and predict were not blocked by the failures
    assert lpad.fireworks.count_documents({"spec.amdflow_stage": "predict", "state": "COMPLETED"}) == 6


def test_no_vasp_command_is_one_clear_error(db, lpad, binary_campaign_dict, tmp_path, monkeypatch):
    from amdflow.errors import AmdflowError
    from amdflow.relax import get_engine
    from amdflow.stages import reference_structure

    cfg = campaign_from_dict(_vasp_campaign(binary_campaign_dict))
    engine = get_engine(cfg.relax, env={})
    with pytest.raises(AmdflowError, match="no VASP command"):
        engine.relax(reference_structure("Al", "A_cF4_225_a"), tmp_path / "run")
    # a command that cannot run here is named, with the fix, before anything is written
    launcher = tmp_path / "bin" / "srun"  # a launcher that exists; the program it launches does not
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\nexec \"$@\"\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{launcher.parent}{os.pathsep}{os.environ['PATH']}")
    for cmd, prog in (("no_such_vasp_std", "no_such_vasp_std"), ("srun -n 4 --cpu-bind=cores /nonexistent/vasp_std", "/nonexistent/vasp_std")):
        engine = get_engine(cfg.relax, env={"vasp_cmd": cmd})
        with pytest.raises(AmdflowError, match=f"VASP command .*'{prog}' not found or not executable.*pre_rocket"):
            engine.relax(reference_structure("Al", "A_cF4_225_a"), tmp_path / "run2")
        assert not (tmp_path / "run2").exists()


def test_walltime_stop_is_unfinished_and_the_rerun_continues(db, lpad, binary_campaign_dict, tmp_path, monkeypatch):
    """Custodian's WalltimeHandler stops VASP cleanly and ends the job sequence without an error: amdflow
    must not take that run's energy as the result. The candidate fizzles with the reason, keeps its last
    structure, and the rerun starts from it."""
    import sys

    from amdflow import stages
    from amdflow.relax.base import WalltimeStop

    monkeypatch.setenv("AMDFLOW_VASP_POTCAR_SPEC", "true")
    monkeypatch.setenv("AMDFLOW_CUSTODIAN_POLL_S", "0.2")
    monkeypatch.setenv("AMDFLOW_FAKE_VASP_STEP_S", "0.4")  # slow ionic steps ...
    monkeypatch.setenv("PBS_WALLTIME", "2")  # ... and a queue walltime already (almost) over
    monkeypatch.setenv("AMDFLOW_VASP_CMD", f"{sys.executable} -m amdflow.testing.fake_vasp")
    cfg = campaign_from_dict(_vasp_campaign(binary_campaign_dict, handlers=["default", "walltime"]))
    add_campaign(db, cfg)
    cid = next(c["candidate_id"] for c in db.candidates.find({"formula": "AlNi"}))
    original = Structure.from_dict(db.candidates.find_one({"candidate_id": cid})["structure"])
    db.candidates.update_one({"candidate_id": cid}, {"$set": {"state": "unique"}})
    with pytest.raises(WalltimeStop, match=r"stopped before the queue's walltime after .* ionic steps.*--fizzled` continues"):
        stages.relax_candidate_stage(db, cid, tmp_path / "first")
    doc = db.candidates.find_one({"candidate_id": cid})
    assert doc["resume"]["dir"] == str(tmp_path / "first")
    stopped_at = Structure.from_dict(doc["resume"]["structure"])
    assert abs(stopped_at.volume - original.volume) > 1e-3  # it had relaxed some way
    assert db.tasks.count_documents({}) == 0  # no result from an unfinished run
    assert (tmp_path / "first" / "STOPCAR.gz").exists() or (tmp_path / "first" / "STOPCAR").exists()

    monkeypatch.delenv("PBS_WALLTIME")  # a longer job: the rerun continues and finishes
    monkeypatch.setenv("AMDFLOW_FAKE_VASP_STEP_S", "0")
    task_id = stages.relax_candidate_stage(db, cid, tmp_path / "second")
    task = db.tasks.find_one({"task_id": task_id})
    assert task["details"]["resumed_from"] == str(tmp_path / "first")
    assert Structure.from_dict(task["input_structure"]) == original  # the candidate is still the candidate
    from pymatgen.io.vasp import Vasprun

    first_step = Vasprun(tmp_path / "second" / "vasprun.xml.relax1.gz", parse_potcar_file=False).ionic_steps[0]["structure"]
    assert first_step.volume == pytest.approx(stopped_at.volume, rel=1e-6)  # VASP started from where it stopped
    assert "resume" not in db.candidates.find_one({"candidate_id": cid})
