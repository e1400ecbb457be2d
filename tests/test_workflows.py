"""Candidate and reference workflows through FireWorks' own rapidfire (tier 2 store)."""

from __future__ import annotations

import csv
import os

import pytest
from fireworks import Firework, FWorker, Workflow
from fireworks.core.rocket_launcher import rapidfire
from pymatgen.core import Structure

from amdflow.campaign import campaign_from_dict
from amdflow.firetasks import (
    AnalyzeTask,
    DedupTask,
    FunnelTask,
    PredictTask,
    RelaxKnownTask,
    RelaxReferenceTask,
    RelaxTask,
)
from amdflow.ops import add_campaign, campaign_status
from amdflow.workflows import PREDICT_PRIORITY, candidate_workflow

CONTRACT = {
    PredictTask: "{{amdflow.firetasks.stages.PredictTask}}",
    DedupTask: "{{amdflow.firetasks.stages.DedupTask}}",
    FunnelTask: "{{amdflow.firetasks.stages.FunnelTask}}",
    RelaxTask: "{{amdflow.firetasks.stages.RelaxTask}}",
    RelaxReferenceTask: "{{amdflow.firetasks.stages.RelaxReferenceTask}}",
    RelaxKnownTask: "{{amdflow.firetasks.stages.RelaxKnownTask}}",
    AnalyzeTask: "{{amdflow.firetasks.stages.AnalyzeTask}}",
}


@pytest.mark.parametrize(("cls", "name"), CONTRACT.items())
def test_firetask_names_are_the_database_contract(cls, name):
    params = {"candidate_id": "x", "campaign": "c", "element": "Fe", "prototype": "p", "known_id": "k"}
    task = cls(**{k: v for k, v in params.items() if k in cls.required_params + (cls.optional_params or [])})
    assert task.to_dict()["_fw_name"] == name
    fw = Firework(task)
    again = Firework.from_dict(fw.to_dict())
    assert type(again.tasks[0]) is cls


def test_candidate_workflow_shape():
    wf = candidate_workflow("abc123", "camp", "AlNi")
    assert isinstance(wf, Workflow)
    stages = [fw.spec["amdflow_stage"] for fw in wf.fws]
    assert stages == ["predict", "dedup", "relax", "analyze"]
    assert [fw.spec["_category"] for fw in wf.fws] == ["gpu", "cpu", "vasp", "cpu"]
    assert wf.fws[0].spec["_priority"] == PREDICT_PRIORITY
    assert all(fw.spec["_add_launchpad_and_fw_id"] for fw in wf.fws)
    # only ids travel in specs
    assert all("structure" not in fw.spec for fw in wf.fws)
    with_funnel = candidate_workflow("abc123", "camp", "AlNi", funnel=True)
    assert [fw.spec["amdflow_stage"] for fw in with_funnel.fws] == ["predict", "dedup", "funnel", "relax", "analyze"]
    assert [fw.spec["_category"] for fw in with_funnel.fws] == ["gpu", "cpu", "gpu", "vasp", "cpu"]
    assert [len(with_funnel.links[fw.fw_id]) for fw in with_funnel.fws] == [1, 1, 1, 1, 0]  # one chain


def test_reference_workflows_per_level():
    from amdflow.workflows import reference_workflow

    final = reference_workflow("camp", "Al", ["A_cF4_225_a"])
    ml = reference_workflow("camp", "Al", ["A_cF4_225_a"], level="funnel")
    assert [fw.spec["_category"] for fw in final.fws] == ["vasp", "cpu"] and "level" not in final.fws[0].tasks[0]
    assert [fw.spec["_category"] for fw in ml.fws] == ["gpu", "cpu"]
    assert ml.fws[0].tasks[0]["level"] == "funnel" and ml.fws[1].tasks[0]["level"] == "funnel"
    assert all(fw.spec["amdflow_level"] == "funnel" for fw in ml.fws)


@pytest.mark.slow
def test_campaign_through_rapidfire(db, lpad, binary_campaign_dict, tmp_path):
    cfg = campaign_from_dict(binary_campaign_dict)
    report = add_campaign(db, cfg)
    assert (report.new_candidates, report.new_workflows, report.new_reference_workflows) == (6, 6, 2)
    again = add_campaign(db, cfg)
    assert (again.new_candidates, again.new_workflows, again.new_reference_workflows) == (0, 0, 0)

    launch_dir = tmp_path / "launches"
    launch_dir.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(launch_dir)
        rapidfire(lpad, FWorker(category=["gpu", "cpu", "vasp"]), strm_lvl="ERROR")
    finally:
        os.chdir(cwd)

    states = {fw["state"] for fw in lpad.fireworks.find({}, {"state": 1})}
    assert states <= {"COMPLETED", "DEFUSED"}
    # every Firework that ran, ran exactly once
    for fw in lpad.fireworks.find({"state": "COMPLETED"}):
        assert lpad.launches.count_documents({"fw_id": fw["fw_id"]}) == 1

    cands = {c["formula"]: c for c in db.candidates.find({}) if c["formula"] != "AlNi"}
    b2 = list(db.candidates.find({"formula": "AlNi"}))
    assert len(b2) == 2  # B2 NiAl at two lattice scales: one structure family, so one duplicate
    assert sorted(c["state"] for c in b2) == ["analyzed", "duplicate"]
    kept = next(c for c in b2 if c["state"] == "analyzed")
    dup = next(c for c in b2 if c["state"] == "duplicate")
    assert dup["dedup"]["duplicate_of"] == kept["candidate_id"]
    assert (kept["prediction"]["formation_energy_per_atom"], kept["candidate_id"]) <= (dup["prediction"]["formation_energy_per_atom"], dup["candidate_id"])
    # the duplicate's relax and analyze were defused
    assert {lpad.get_fw_by_id(dup["fw_ids"][s]).state for s in ("relax", "analyze")} == {"DEFUSED"}
    # relax priority follows the predicted energy
    relax_fw = lpad.get_fw_by_id(kept["fw_ids"]["relax"])
    assert relax_fw.spec["_priority"] == pytest.approx(-kept["prediction"]["formation_energy_per_atom"], abs=1e-6)

    # B2 NiAl is the most stable Ni-Al compound (DFT E_f ~ -0.6 to -0.7 eV/atom)
    thermo = db.thermo.find_one({"candidate_id": kept["candidate_id"]})
    assert thermo["is_stable"] and thermo["e_above_hull"] == 0.0
    assert -0.9 < thermo["formation_energy_per_atom"] < -0.4
    assert kept["thermo"]["is_stable"]
    task = db.tasks.find_one({"candidate_id": kept["candidate_id"]})
    assert task["engine"] == "chgnet" and "not a DFT energy" in task["engine_note"]
    assert task["run_type"].startswith("chgnet-")
    refs = list(db.references.find({}))
    assert {r["element"] for r in refs} == {"Al", "Ni"} and {r["state"] for r in refs} == {"relaxed"}
    assert set(cands) == {"AlNi3", "Al3Ni"}

    status = campaign_status(db, cfg.name)
    assert status["candidates_total"] == 6
    assert sum(status["candidates"].values()) == 6
    out = cfg.output_dir
    assert (out / "phase_diagram.png").stat().st_size > 10_000
    rows = list(csv.DictReader((out / "promising" / "summary.csv").read_text().splitlines()))
    assert kept["candidate_id"] in {r["candidate_id"] for r in rows}
    assert all(float(r["e_above_hull"]) <= 0.1 for r in rows)
    assert (out / "promising" / f"AlNi_{kept['candidate_id']}.cif").exists()

    # what `amdflow train CAMPAIGN` learns from: every material of the hull with its formation energy
    from amdflow.stages import campaign_training_data

    ids, structures, targets = campaign_training_data(db, cfg.name)
    assert len(ids) == db.thermo.count_documents({"hull_chemsys": cfg.chemsys}) == 3 + 2
    by_id = dict(zip(ids, targets, strict=True))
    assert by_id[thermo["material_id"]] == pytest.approx(thermo["formation_energy_per_atom"])
    assert all(Structure.from_dict(s).composition.reduced_formula for s in structures)
    assert all(by_id[r["ref_id"]] == pytest.approx(0.0, abs=1e-9) for r in refs)  # one fcc reference per element


@pytest.mark.slow
def test_candidate_analyzed_before_references_is_placed_later(db, lpad, binary_campaign_dict, tmp_path):
    """Relax and analyze a candidate before any reference: it stays 'relaxed' with no hull;
    once the references are relaxed, the campaign-level analyze places it."""
    from amdflow import stages

    cfg = campaign_from_dict(binary_campaign_dict)
    add_campaign(db, cfg)
    cid = next(c["candidate_id"] for c in db.candidates.find({"formula": "AlNi3"}))
    stages.predict_stage(db, [cid])
    assert stages.dedup_stage(db, cid) is None
    stages.relax_candidate_stage(db, cid)
    stages.analyze_stage(db, cfg.name, cid, plot=False)
    assert db.candidates.find_one({"candidate_id": cid})["state"] == "relaxed"
    assert db.thermo.count_documents({}) == 0
    for el in ("Al", "Ni"):
        stages.relax_reference_stage(db, cfg.name, el, cfg.relax.reference_prototypes[0])
    stages.analyze_stage(db, cfg.name, plot=False)
    doc = db.candidates.find_one({"candidate_id": cid})
    assert doc["state"] == "analyzed"
    # L1_2 Ni3Al is a stable phase (DFT E_f ~ -0.4 to -0.45 eV/atom); with only fcc Al/Ni it is on the hull
    assert doc["thermo"]["is_stable"] and -0.7 < doc["thermo"]["formation_energy_per_atom"] < -0.2
    # a later phase that lowers the hull updates the earlier candidate's summary (the thermo docs are the truth)
    from pymatgen.entries.computed_entries import ComputedEntry

    from amdflow.schemas import utcnow
    from amdflow.thermo.known import known_doc

    run_type = db.campaigns.find_one({"name": cfg.name})["run_type"]
    before = db.thermo.find_one({"candidate_id": cid})
    low = ComputedEntry("AlNi3", 4 * (before["energy_per_atom"] - 0.05))
    db.known.insert_one({**known_doc("test", "low-AlNi3", low, run_type), "created_at": utcnow()})
    stages.analyze_stage(db, cfg.name, plot=False)
    doc = db.candidates.find_one({"candidate_id": cid})
    assert not doc["thermo"]["is_stable"] and doc["thermo"]["e_above_hull"] == pytest.approx(0.05, abs=1e-6)
    assert doc["thermo"]["e_above_known_hull"] == pytest.approx(0.05, abs=1e-6)
