"""Screening modes: threshold, predicted energy above the current hull, top-k per formula."""

from __future__ import annotations

import itertools

import pytest

from amdflow import stages
from amdflow.campaign import campaign_from_dict
from amdflow.ops import add_campaign
from amdflow.thermo.hull import predicted_e_above_hull


def test_predicted_e_above_hull_known_answers():
    phases = [("FeAl", -0.5)]
    assert predicted_e_above_hull("Fe3Al", -0.3, phases, ["Fe", "Al"]) == pytest.approx(-0.05)
    assert predicted_e_above_hull("FeAl3", -0.1, phases, ["Fe", "Al"]) == pytest.approx(0.15)
    assert predicted_e_above_hull("FeAl", -0.2, [], ["Fe", "Al"]) == pytest.approx(-0.2)  # only the elements


def campaign(tmp_path, **screen):
    return campaign_from_dict({
        "name": "modes", "elements": ["Ni", "Al"],
        "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB3_cP4_221_a_c"]}],
        "generate": {"lattice_scales": [0.97, 1.0, 1.03]},
        "screen": {"max_formation_energy_per_atom": 1.0, **screen},
        "funnel": {"engine": "none"},  # the screen's modes: no funnel between them and the relax
        "output_dir": str(tmp_path / "out"),
    })


def test_hull_mode_uses_computed_phases(db, tmp_path):
    cfg = campaign(tmp_path, mode="hull", max_e_above_hull=0.1)
    doc = add_campaign(db, cfg, workflows=False)
    assert doc.new_candidates == 9
    run_type = db.campaigns.find_one({"name": "modes"})["run_type"]
    # a deep computed AlNi phase: the hull at Ni3Al (x_Al = 0.25) is then -1.0 eV/atom
    db.thermo.insert_one({"material_id": "m1", "hull_chemsys": "Al-Ni", "run_type": run_type, "formula": "AlNi",
                          "formation_energy_per_atom": -2.0, "e_above_hull": 0.0})
    ids = [c["candidate_id"] for c in db.candidates.find({})]
    outcomes = {o.candidate_id: o for o in stages.predict_stage(db, ids)}
    for c in db.candidates.find({}):
        pred = c["prediction"]
        assert pred["mode"] == "hull"
        if c["formula"] == "AlNi3":
            assert pred["e_above_hull"] == pytest.approx(pred["formation_energy_per_atom"] + 1.0, abs=1e-6)
        assert pred["passed"] == (pred["e_above_hull"] <= 0.1) == outcomes[c["candidate_id"]].passed
        if not pred["passed"]:
            assert "above the current hull" in pred["reason"] and c["state"] == "screened_out"
    assert any(not c["prediction"]["passed"] for c in db.candidates.find({"formula": "AlNi3"}))


def test_top_k_keeps_the_k_lowest_per_formula_in_any_order(db, tmp_path):
    cfg = campaign(tmp_path, mode="top_k", top_k=1)
    add_campaign(db, cfg, workflows=False)
    ids = sorted(c["candidate_id"] for c in db.candidates.find({}))
    stages.predict_stage(db, ids)
    energies = {c["candidate_id"]: (c["prediction"]["formation_energy_per_atom"], c["candidate_id"]) for c in db.candidates.find({})}
    results = []
    for order in (ids, ids[::-1], [ids[i] for i in (4, 0, 8, 2, 6, 1, 7, 3, 5)]):
        db.candidates.update_many({}, {"$set": {"prediction.passed": True, "state": "passed", "dedup": None}})
        for cid in order:
            stages.dedup_stage(db, cid)
        results.append({c["candidate_id"]: c["state"] for c in db.candidates.find({})})
    assert results[0] == results[1] == results[2]
    for formula, group in itertools.groupby(sorted(db.candidates.find({}), key=lambda c: c["formula"]), key=lambda c: c["formula"]):
        group = list(group)
        best = min(group, key=lambda c: energies[c["candidate_id"]])
        kept = [c for c in group if results[0][c["candidate_id"]] != "screened_out"]
        assert [c["candidate_id"] for c in kept] == [best["candidate_id"]], formula
        assert all("top_k is 1" in c["prediction"]["reason"] for c in group if c is not best)


def test_rescreen_with_new_settings_redoes_unrelaxed_candidates(db, lpad, tmp_path):
    import os

    from fireworks import FWorker
    from fireworks.core.rocket_launcher import rapidfire

    from amdflow.ops import rescreen

    cfg = campaign(tmp_path)  # threshold mode, 1.0 eV/atom: everything passes
    add_campaign(db, cfg)
    os.chdir(tmp_path)
    rapidfire(lpad, FWorker(category=["gpu"]), strm_lvl="ERROR")
    assert {c["state"] for c in db.candidates.find({})} == {"passed"}
    # relax one candidate's chain by hand (as if a VASP rocket had run it)
    first = db.candidates.find_one({"formula": "AlNi"})
    relax_id = first["fw_ids"]["relax"]
    lpad.fireworks.update_one({"fw_id": relax_id}, {"$set": {"state": "COMPLETED"}})
    stricter = campaign(tmp_path, max_formation_energy_per_atom=-5.0)  # nothing passes now
    counts = rescreen(db, stricter)
    assert counts == {"reset": 8, "kept": 1}
    assert db.campaigns.find_one({"name": "modes"})["config"]["screen"]["max_formation_energy_per_atom"] == -5.0
    rapidfire(lpad, FWorker(category=["gpu"]), strm_lvl="ERROR")
    states = {c["candidate_id"]: c["state"] for c in db.candidates.find({})}
    assert states.pop(first["candidate_id"]) == "passed"  # the relaxed one kept its result
    assert set(states.values()) == {"screened_out"}
    for c in db.candidates.find({"candidate_id": {"$in": list(states)}}):
        assert {lpad.get_fw_by_id(c["fw_ids"][s]).state for s in ("dedup", "relax", "analyze")} == {"DEFUSED"}


def test_a_decided_family_is_not_reopened_by_a_later_lower_energy_member(db, tmp_path):
    """Predicted after its family's representative was kept, a lower-energy member becomes its duplicate."""
    cfg = campaign(tmp_path)
    add_campaign(db, cfg, workflows=False)
    family = sorted(db.candidates.find({"formula": "AlNi"}), key=lambda c: c["candidate_id"])
    first, second = family[0]["candidate_id"], family[1]["candidate_id"]
    stages.predict_stage(db, [first])
    assert stages.dedup_stage(db, first) is None  # alone so far: kept
    stages.predict_stage(db, [second])
    db.candidates.update_one({"candidate_id": second}, {"$set": {"prediction.formation_energy_per_atom": -9.0}})  # even if lower
    assert stages.dedup_stage(db, second) == first
    assert db.coll("locks").count_documents({}) == 0
