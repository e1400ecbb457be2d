"""The funnel: a universal potential between CGCNN and the final relax, with an ML hull of its own.

In-process store (tier 2). SevenNet-0 is the funnel's potential, CHGNet the final engine
(the laptop stand-in for DFT): two models, so the two hulls are different run types.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fireworks import FWorker
from fireworks.core.rocket_launcher import rapidfire
from pymatgen.core import Lattice, Structure

from amdflow.campaign import campaign_from_dict
from amdflow.errors import ConfigError
from amdflow.ops import add_campaign, campaign_status

FUNNEL_PREFIX = "sevennet-7net-0-0.13.0-mp2020-"  # then a hash of the funnel's settings (fmax, max_steps, ...)
FINAL_PREFIX = "chgnet-0.4.2-mp2020-in-model-"


def _b2() -> Structure:
    from amdflow.generate.templates import aflow_structure

    return aflow_structure("AB_cP2_221_b_a")


def write_templates(folder: Path) -> Path:
    """B2, B2 stretched to c/a 1.35 (StructureMatcher tells it apart unrelaxed, both relax to B2), L1_2."""
    from amdflow.generate.templates import aflow_structure

    folder.mkdir(parents=True, exist_ok=True)
    b2 = _b2()
    b2.to(filename=str(folder / "B2.cif"))
    a = b2.lattice.a
    Structure(Lattice.tetragonal(a / 1.35 ** (1 / 3), a * 1.35 ** (2 / 3)), b2.species, b2.frac_coords).to(
        filename=str(folder / "B2_stretched.cif"))
    aflow_structure("AB3_cP4_221_a_c").to(filename=str(folder / "L12.cif"))
    return folder


@pytest.fixture
def funnel_campaign_dict(tmp_path: Path) -> dict:
    return {
        "name": "AlNi-funnel", "elements": ["Ni", "Al"],
        "templates": [{"source": "folder", "path": str(write_templates(tmp_path / "templates"))}],
        "screen": {"max_formation_energy_per_atom": 0.5},
        "funnel": {"fmax": 0.1, "max_steps": 80, "max_e_above_hull": 0.05},
        "relax": {"fmax": 0.1, "max_steps": 80, "reference_prototypes": ["fcc"], "reference_ground_state": False},
        "output_dir": str(tmp_path / "out"),
    }


def run(lpad, tmp_path: Path, categories: list[str], query: dict | None = None) -> None:
    launches = tmp_path / "launches"
    launches.mkdir(exist_ok=True)
    cwd = os.getcwd()
    try:
        os.chdir(launches)
        rapidfire(lpad, FWorker(category=categories, query=query or {}), strm_lvl="ERROR")
    finally:
        os.chdir(cwd)


def by_formula(db) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in db.candidates.find({}, {"_id": 0}):
        out.setdefault(c["formula"], []).append(c)
    return out


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize(("funnel", "says"), [
    ({"engine": "mace"}, "key 'funnel.engine': Input should be 'none', 'chgnet' or 'sevennet'"),
    ({"engine": "sevennet", "model": "7net-omat"}, "SevenNet checkpoint '7net-omat' is not one shipped in the sevenn wheel: "
                                                   "use one of 7net-0, 7net-0_22may2024, 7net-l3i5, 7net-mf-0"),
    ({"engine": "sevennet", "model": "7net-mf-0", "modal": "omat24"}, "modal 'omat24' is not one of 7net-mf-0's (PBE, R2SCAN)"),
    ({"engine": "sevennet", "modal": "PBE"}, "modal 'PBE' is not one of 7net-0's (it has none: remove funnel.modal)"),
    ({"engine": "chgnet", "model": "7net-0"}, "engine chgnet has no choice of model: remove them"),
    ({"engine": "chgnet"}, "funnel.engine chgnet is also relax.engine: the funnel would repeat the final relaxation"),
    ({"max_e_above_hull": -0.1}, "key 'funnel.max_e_above_hull'"),
])
def test_bad_funnel_settings_are_one_line_naming_the_choices(funnel, says):
    with pytest.raises(ConfigError) as info:
        campaign_from_dict({"name": "x", "elements": ["Al", "Ni"], "templates": [{"source": "aflow"}], "funnel": funnel})
    assert says in str(info.value) and "\n" not in str(info.value)


def test_funnel_defaults_and_normalised_choices():
    base = {"name": "x", "elements": ["Al", "Ni"], "templates": [{"source": "aflow"}]}
    cfg = campaign_from_dict(base)
    assert (cfg.funnel.engine, cfg.funnel.model, cfg.funnel.modal, cfg.funnel.enabled) == ("sevennet", "7net-0", None, True)
    mf = campaign_from_dict({**base, "funnel": {"model": "7net-mf-0"}})
    assert mf.funnel.modal == "PBE"  # the first of its modals
    assert not campaign_from_dict({**base, "funnel": {"engine": "none"}}).funnel.enabled
    with_vasp = campaign_from_dict({**base, "funnel": {"engine": "chgnet"}, "relax": {"engine": "vasp"}})
    assert with_vasp.funnel.engine == "chgnet"  # CHGNet before DFT is fine


def test_a_campaign_stored_before_the_funnel_existed_ran_without_it(db):
    """A stored config without a funnel key is the campaign it was: no funnel (not today's default)."""
    from amdflow.stages import campaign_doc, load_campaign_config

    cfg = campaign_from_dict({"name": "old", "elements": ["Al", "Ni"], "templates": [{"source": "aflow"}]})
    doc = campaign_doc(cfg).to_mongo()
    del doc["config"]["funnel"]
    db.campaigns.insert_one(doc)
    stored, _ = load_campaign_config(db, "old")
    assert not stored.funnel.enabled


def test_a_campaign_stored_before_ground_state_references_keeps_its_references(db):
    """A stored relax section without reference_ground_state (amdflow before issue 25) relaxed only its
    reference_prototypes: read back, it still does (its reference Fireworks are those), not today's default."""
    from amdflow.stages import campaign_doc, load_campaign_config

    cfg = campaign_from_dict({"name": "old25", "elements": ["Al", "Ni"], "templates": [{"source": "aflow"}],
                              "relax": {"reference_prototypes": ["fcc", "bcc", "hcp"]}})
    doc = campaign_doc(cfg).to_mongo()
    del doc["config"]["relax"]["reference_ground_state"]
    db.campaigns.insert_one(doc)
    stored, _ = load_campaign_config(db, "old25")
    assert stored.relax.reference_structures() == ["A_cF4_225_a", "A_cI2_229_a", "A_hP2_194_c"]
    assert campaign_from_dict({"name": "new", "elements": ["Al", "Ni"], "templates": [{"source": "aflow"}]}
                              ).relax.reference_structures() == ["ground_state"]


# ---------------------------------------------------------------- the funnel through FireWorks
@pytest.mark.slow
def test_funnel_campaign_through_rapidfire(db, lpad, funnel_campaign_dict, tmp_path):
    """Every stage with the funnel on: the funnel relaxes, places on its own hull, dedups relaxed structures,
    cuts, and hands the ML-relaxed cell and its priority to the final relax; the two hulls never mix."""
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.core import Composition
    from pymatgen.entries.computed_entries import ComputedEntry

    cfg = campaign_from_dict(funnel_campaign_dict)
    report = add_campaign(db, cfg)
    assert (report.new_candidates, report.new_workflows, report.new_reference_workflows) == (4, 4, 4)  # 2 elements x 2 levels
    stored = db.campaigns.find_one({"name": cfg.name})
    FUNNEL_RUN_TYPE, FINAL_RUN_TYPE = stored["funnel_run_type"], stored["run_type"]
    assert FUNNEL_RUN_TYPE.startswith(FUNNEL_PREFIX) and FINAL_RUN_TYPE.startswith(FINAL_PREFIX)
    assert lpad.fireworks.count_documents({"spec.amdflow_stage": "funnel", "spec._category": "gpu"}) == 4
    funnel_refs = list(lpad.fireworks.find({"spec.amdflow_level": "funnel"}, {"spec": 1}))
    assert {fw["spec"]["_category"] for fw in funnel_refs if fw["spec"]["amdflow_stage"] == "reference"} == {"gpu"}

    run(lpad, tmp_path, ["gpu", "cpu", "vasp"])
    assert {fw["state"] for fw in lpad.fireworks.find({}, {"state": 1})} <= {"COMPLETED", "DEFUSED"}
    cands = by_formula(db)
    ids = {(c["template"]["template_id"], c["formula"]): c for group in cands.values() for c in group}
    b2, stretched = ids["B2.cif", "AlNi"], ids["B2_stretched.cif", "AlNi"]
    # the first dedup did not see it (unrelaxed, c/a 1.35), the second did: both relax to B2
    assert stretched["dedup"]["duplicate_of"] is None
    assert stretched["state"] == "duplicate" and stretched["funnel"]["duplicate_of"] == b2["candidate_id"]
    assert "relaxed into the same crystal" in stretched["funnel"]["reason"]
    assert b2["state"] == "analyzed" and b2["funnel"]["passed"] and b2["funnel"]["e_above_hull"] == pytest.approx(0.0, abs=1e-6)
    # the cut: on the ML hull, Al3Ni lies above 0.05 eV/atom
    cut = [c for c in ids.values() if c["state"] == "funnel_cut"]
    assert cut, [(c["formula"], c["state"], (c.get("funnel") or {}).get("e_above_hull"), c["funnel"].get("checked_at_relax"), c["funnel"].get("reason")) for c in ids.values()]
    assert all(c["funnel"]["e_above_hull"] > 0.05 and f"on the {FUNNEL_RUN_TYPE} hull" in c["funnel"]["reason"] for c in cut)
    for c in cut:  # nothing of it went further: cut at its funnel Firework, or (placed before AlNi3 lowered the hull:
        # one FunnelTask at a time here) at the check before its relax, which then only completes and defuses the rest
        relax_fw = lpad.fireworks.find_one({"fw_id": c["fw_ids"]["relax"]})
        if "checked before the final relax" in c["funnel"]["reason"]:
            launch = lpad.launches.find_one({"fw_id": relax_fw["fw_id"]})
            assert relax_fw["state"] == "COMPLETED" and launch["action"]["stored_data"]["funnel_cut"] == c["funnel"]["reason"]
        else:
            assert relax_fw["state"] == "DEFUSED"
        assert lpad.fireworks.find_one({"fw_id": c["fw_ids"]["analyze"]})["state"] == "DEFUSED"
        assert db.tasks.count_documents({"candidate_id": c["candidate_id"], "level": "final"}) == 0
    passed = [c for c in ids.values() if c["state"] == "analyzed"]
    assert len(passed) == len(ids) - 1 - len(cut)
    for c in passed:
        ml = db.tasks.find_one({"task_id": c["funnel"]["task_id"]})
        final = db.tasks.find_one({"task_id": c["task_id"]})
        assert (ml["level"], ml["run_type"], final["level"], final["run_type"]) == ("funnel", FUNNEL_RUN_TYPE, "final", FINAL_RUN_TYPE)
        assert final["input_structure"] == ml["final_structure"]  # the final relax starts from the ML-relaxed cell
        assert ml["n_steps"] >= 1 and ml["max_force"] >= 0 and isinstance(ml["converged"], bool)
        relax_fw = lpad.fireworks.find_one({"fw_id": c["fw_ids"]["relax"]})
        assert relax_fw["spec"]["_priority"] == pytest.approx(-100.0 - c["funnel"]["e_above_hull"], abs=1e-6)
        assert c["funnel"]["checked_at_relax"]["passed"]
    # references at both levels, each relaxed by its own engine
    refs = {(r["run_type"], r["element"]): r["state"] for r in db.references.find({})}
    assert refs == {(rt, el): "relaxed" for rt in (FUNNEL_RUN_TYPE, FINAL_RUN_TYPE) for el in ("Al", "Ni")}

    # consistency: every hull holds only entries of its own run type ...
    for t in db.thermo.find({}, {"material_id": 1, "run_type": 1}):
        assert db.tasks.find_one({"task_id": t["material_id"]})["run_type"] == t["run_type"]
    ml_thermo = {t["material_id"]: t["e_above_hull"] for t in db.thermo.find({"run_type": FUNNEL_RUN_TYPE, "hull_chemsys": "Al-Ni"})}
    entries = []
    for t in db.tasks.find({"run_type": FUNNEL_RUN_TYPE}):
        comp = Composition(t["formula"])
        entries.append(ComputedEntry(comp, t["energy_per_atom"] * comp.num_atoms, entry_id=t["task_id"]))
    pd = PhaseDiagram(entries)
    assert set(ml_thermo) == {e.entry_id for e in entries}
    for e in entries:  # ... and is the hull of those entries alone
        assert ml_thermo[e.entry_id] == pytest.approx(pd.get_e_above_hull(e, allow_negative=True), abs=1e-6)
    # ... so a DFT-side phase far below the hull moves the final hull and not the ML one
    from amdflow.stages import analyze_stage, refresh_funnel_hull

    fake = dict(db.tasks.find_one({"task_id": passed[0]["task_id"]}), task_id="fake-final-AlNi", candidate_id=None, kind="known")
    fake.pop("_id")
    fake["energy_per_atom"] -= 1.0
    db.tasks.insert_one(fake)
    analyze_stage(db, cfg.name, plot=False)
    refresh_funnel_hull(db, cfg, FUNNEL_RUN_TYPE)
    assert {t["material_id"]: t["e_above_hull"] for t in db.thermo.find({"run_type": FUNNEL_RUN_TYPE, "hull_chemsys": "Al-Ni"})} == \
        pytest.approx(ml_thermo)
    assert db.thermo.find_one({"material_id": passed[0]["task_id"], "hull_chemsys": "Al-Ni"})["e_above_hull"] > 0.5

    status = campaign_status(db, cfg.name)
    funnel = status["funnel"]
    assert funnel["run_type"] == FUNNEL_RUN_TYPE and funnel["relaxed"] == 4
    assert (funnel["passed"], funnel["cut"], funnel["relaxed_duplicates"]) == (len(passed), len(cut), 1)
    assert funnel["references"] == {"relaxed": 2} and status["references"] == {"relaxed": 2}
    assert status["candidates"]["funnel_cut"] == len(cut)

    from amdflow.ops import write_campaign_report

    page_path, _ = write_campaign_report(db, cfg)
    page = page_path.read_text()
    assert "<table id=\"stages\">" in page and "relaxed by the funnel&#x27;s potential" in page
    assert "id='hit-rate'" in page and "id='funnel-parity'" in page and (page_path.parent / "funnel_parity.png").exists()
    assert FUNNEL_RUN_TYPE in page and FINAL_RUN_TYPE in page  # which model made which energy


@pytest.mark.slow
def test_batched_funnel_check_before_relax_top_k_and_refunnel(db, lpad, tmp_path):
    """The batched funnel rocket on the in-process store; top_k_per_formula; a hull moved by a phase found later cuts a
    waiting candidate at its relax Firework; `amdflow refunnel` with a looser cut releases it, with a tighter one cuts."""
    from amdflow.ops import refunnel
    from amdflow.rocket import run_batched_rocket

    base = {"name": "AlNi-topk", "elements": ["Ni", "Al"],
            "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB_cF8_225_a_b"]}],  # B2 and B1: two AlNi
            "screen": {"max_formation_energy_per_atom": 2.0},
            "funnel": {"fmax": 0.1, "max_steps": 80, "max_e_above_hull": 5.0, "top_k_per_formula": 1},
            "relax": {"fmax": 0.1, "max_steps": 80, "reference_prototypes": ["fcc"], "reference_ground_state": False}, "output_dir": str(tmp_path / "out")}
    cfg = campaign_from_dict(base)
    add_campaign(db, cfg)
    run(lpad, tmp_path, ["gpu", "cpu"], {"spec.amdflow_stage": {"$ne": "funnel"}})  # predict, dedup, the funnel's references
    report = run_batched_rocket(lpad, batch_size=8, pipeline=False, stage="funnel")
    assert (report.fireworks, report.fizzled, report.batches) == (2, 0, 1)  # both in one relaxation batch
    for fw in lpad.fireworks.find({"spec.amdflow_stage": "funnel"}):
        assert fw["state"] == "COMPLETED" and lpad.launches.count_documents({"fw_id": fw["fw_id"]}) == 1
    cands = sorted(db.candidates.find({}), key=lambda c: c["funnel"]["energy_per_atom"])
    best, second = cands
    assert (best["state"], best["funnel"]["rank"]) == ("prerelaxed", 1)
    assert (second["state"], second["funnel"]["rank"]) == ("funnel_cut", 2)
    assert "rank 2 of its formula; top_k_per_formula is 1" in second["funnel"]["reason"]
    relax_fw = lpad.fireworks.find_one({"fw_id": best["fw_ids"]["relax"]})
    assert relax_fw["state"] == "READY"

    # a lower AlNi phase of the funnel's run type appears (another campaign's, say): the waiting candidate is now 0.3 above
    ml = db.tasks.find_one({"task_id": best["funnel"]["task_id"]})
    ml.pop("_id")
    db.tasks.insert_one({**ml, "task_id": "other-AlNi", "candidate_id": None, "campaign": None, "kind": "known",
                         "energy_per_atom": ml["energy_per_atom"] - 0.3, "energy": (ml["energy_per_atom"] - 0.3) * ml["nsites"]})
    strict = campaign_from_dict({**base, "funnel": {**base["funnel"], "max_e_above_hull": 0.1, "top_k_per_formula": None}})
    assert refunnel(db, strict)["cut"] == 1  # now outside: its relax Firework is defused before it starts
    assert lpad.fireworks.find_one({"fw_id": best["fw_ids"]["relax"]})["state"] == "DEFUSED"
    loose = campaign_from_dict({**base, "funnel": {**base["funnel"], "max_e_above_hull": 0.5, "top_k_per_formula": None}})
    counts = refunnel(db, loose)
    second_now = db.candidates.find_one({"candidate_id": second["candidate_id"]})["funnel"]
    assert (counts["released"], counts["cut"]) == (1 + (second_now["e_above_hull"] <= 0.5), 0)  # top-k gone, hull cut looser
    assert lpad.fireworks.find_one({"fw_id": best["fw_ids"]["relax"]})["state"] == "READY"
    assert db.candidates.find_one({"candidate_id": best["candidate_id"]})["funnel"]["e_above_hull"] == pytest.approx(0.3, abs=0.02)

    # the check before the relax: a cut tightened after the decision (`amdflow add --allow-changed-settings`) applies there
    from amdflow.ops import register_campaign

    register_campaign(db, campaign_from_dict({**base, "funnel": {**base["funnel"], "max_e_above_hull": 0.2, "top_k_per_formula": None}}),
                      allow_changed=True)
    run(lpad, tmp_path, ["vasp", "cpu"])
    after = db.candidates.find_one({"candidate_id": best["candidate_id"]})
    assert after["state"] == "funnel_cut" and "(checked before the final relax)" in after["funnel"]["reason"]
    assert after["funnel"]["checked_at_relax"]["e_above_hull"] == pytest.approx(0.3, abs=0.02)
    fw = lpad.fireworks.find_one({"fw_id": best["fw_ids"]["relax"]})
    launch = lpad.launches.find_one({"fw_id": fw["fw_id"], "state": "COMPLETED"})
    assert fw["state"] == "COMPLETED" and "funnel_cut" in launch["action"]["stored_data"]
    assert lpad.fireworks.find_one({"fw_id": best["fw_ids"]["analyze"]})["state"] == "DEFUSED"
    assert db.tasks.count_documents({"candidate_id": best["candidate_id"], "level": "final"}) == 0  # no DFT was spent
    released = refunnel(db, loose)  # and released again: the relax Firework cut at its check runs again
    assert released["released"] >= 1
    run(lpad, tmp_path, ["vasp", "cpu"])
    final = db.candidates.find_one({"candidate_id": best["candidate_id"]})
    assert final["state"] == "analyzed" and final["funnel"]["checked_at_relax"]["passed"]


@pytest.mark.slow
def test_without_the_funnels_references_the_decision_waits_for_the_relax_check(db, lpad, tmp_path):
    """Funnel relaxations before the potential's own elemental references: passed, deferred; the relax Firework
    fizzles naming the missing references; once they are relaxed, a rerun relaxes it."""
    from amdflow.ops import rerun_fizzled

    cfg = campaign_from_dict({"name": "AlNi-deferred", "elements": ["Ni", "Al"],
                              "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}],
                              "screen": {"max_formation_energy_per_atom": 2.0},
                              "funnel": {"fmax": 0.1, "max_steps": 80},
                              "relax": {"fmax": 0.1, "max_steps": 80, "reference_prototypes": ["fcc"], "reference_ground_state": False},
                              "output_dir": str(tmp_path / "out")})
    add_campaign(db, cfg)
    no_ml_refs = {"spec.amdflow_level": {"$exists": False}}
    run(lpad, tmp_path, ["gpu", "cpu", "vasp"], no_ml_refs)
    (cand,) = list(db.candidates.find({}))
    assert "funnel" in cand, (cand["state"], cand.get("error"), [(fw["spec"]["amdflow_stage"], fw["state"]) for fw in lpad.fireworks.find({})])
    assert cand["funnel"]["deferred"] and cand["funnel"]["passed"] and cand["funnel"]["e_above_hull"] is None
    relax = lpad.fireworks.find_one({"fw_id": cand["fw_ids"]["relax"]})
    assert relax["state"] == "FIZZLED"
    assert f"no place on the funnel's {db.campaigns.find_one({})['funnel_run_type']} hull of Al-Ni yet" in db.candidates.find_one({})["error"]
    run(lpad, tmp_path, ["gpu", "cpu"], {"spec.amdflow_level": "funnel"})  # the potential's references
    assert db.candidates.find_one({})["funnel"]["e_above_hull"] == pytest.approx(0.0, abs=1e-6)  # the hull caught up
    rerun_fizzled(db, cfg.name)
    run(lpad, tmp_path, ["gpu", "cpu", "vasp"])
    assert db.candidates.find_one({})["state"] == "analyzed"


# ---------------------------------------------------------------- several processes (tier 3)
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.fault
def test_funnel_rockets_exactly_once_after_one_is_killed(mongo_launchpad_file, tmp_path):
    """A batched funnel rocket killed with -9 mid-batch -> `amdflow rerun --lost` -> two batched funnel rockets finish:
    every funnel Firework exactly one completed launch, one ML task per candidate, every candidate decided once. The
    batches hold random-search starts too (two passes each; stop_found high, so every start is relaxed)."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from fireworks import LaunchPad
    from pymongo import MongoClient

    from tests.conftest import campaign_on_server, record_figures

    campaign = {"name": "AlNi-funnel-mp", "elements": ["Ni", "Al"],
                "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB3_cP4_221_a_c", "AB_cF8_225_a_b",
                                                                 "AB3_cF16_225_a_bc"]},
                              # random starts in the same batches: their two passes under the same kill
                              {"source": "random", "compositions": ["AlNi", "AlNi3"], "n_structures": 3, "max_atoms": 4,
                               "first_pass_steps": 10, "stop_found": 1000}],
                "screen": {"max_formation_energy_per_atom": 2.0},
                "funnel": {"fmax": 0.1, "max_steps": 60, "max_e_above_hull": 0.1},
                "relax": {"fmax": 0.1, "max_steps": 60, "reference_prototypes": ["fcc"], "reference_ground_state": False}}
    env, cli = campaign_on_server(tmp_path, mongo_launchpad_file, campaign)
    cli("add", "campaign.yaml")
    lp = LaunchPad.from_file(str(mongo_launchpad_file))
    run(lp, tmp_path, ["gpu", "cpu"], {"spec.amdflow_stage": {"$ne": "funnel"}})  # predict, dedup, the funnel's references
    funnel_fws = [fw["fw_id"] for fw in lp.fireworks.find({"spec.amdflow_stage": "funnel", "state": "READY"}, {"fw_id": 1})]
    assert len(funnel_fws) >= 5

    def rocket(name: str, extra: dict | None = None) -> subprocess.Popen:
        cwd = tmp_path / name
        cwd.mkdir()
        return subprocess.Popen([sys.executable, "-m", "amdflow", "rocket", "--stage", "funnel", "--batch-size", "2"], cwd=cwd,
                                env={**env, **(extra or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    victim = rocket("victim", {"AMDFLOW_FAILPOINT_FUNNEL_DELAY_S": "120"})
    deadline = time.time() + 180
    while time.time() < deadline and lp.launches.count_documents({"state": "RUNNING"}) < 4:  # a batch and the next, checked out
        assert victim.poll() is None, victim.stderr.read()[-2000:]
        time.sleep(0.1)
    killed = sorted(ln["fw_id"] for ln in lp.launches.find({"state": "RUNNING"}, {"fw_id": 1}))
    assert len(killed) == 4, "the funnel rocket never held two batches"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    time.sleep(2)
    lost = cli("rerun", "campaign.yaml", "--lost", "--lost-after", "1")
    assert "lost launches: 4" in " ".join(lost.stderr.split())
    finishers = [rocket("a"), rocket("b")]
    for r in finishers:
        _, err = r.communicate(timeout=600)
        assert r.returncode == 0, err[-2000:]
    # On a loaded machine one finisher can wait longer than the formula claim's timeout while the other decides that
    # formula: its candidates are left undecided and their Fireworks fizzle with the claim's reason (by design: the
    # relaxations are kept, `rerun --fizzled` decides them). Anything else unfinished is a failure of this test.
    unfinished = [fw for fw in funnel_fws if not lp.launches.find_one({"fw_id": fw, "state": "COMPLETED"}, {"_id": 1})]
    if unfinished:
        reasons = {fw: str((lp.launches.find_one({"fw_id": fw, "state": "FIZZLED"}, sort=[("launch_id", -1)]) or {})
                           .get("action")) for fw in unfinished}
        assert all("could not claim" in why for why in reasons.values()), reasons
        cli("rerun", "campaign.yaml", "--fizzled")
        _, err = (last := rocket("a2")).communicate(timeout=600)
        assert last.returncode == 0, err[-2000:]

    completed: dict[int, int] = {}
    dirs = set()
    for launch in lp.launches.find({"fw_id": {"$in": funnel_fws}, "state": "COMPLETED"}, {"fw_id": 1, "launch_dir": 1}):
        completed[launch["fw_id"]] = completed.get(launch["fw_id"], 0) + 1
        dirs.add(Path(launch["launch_dir"]).name)
    assert completed == dict.fromkeys(funnel_fws, 1)  # nothing lost, nothing ran twice
    assert {"a", "b"} <= dirs <= {"a", "b", "a2"}  # the two rockets shared the work
    for fw_id in killed:  # the killed launches stay as history
        states = sorted(ln["state"] for ln in lp.launches.find({"fw_id": fw_id}))
        assert states[0] == "COMPLETED" and set(states[1:]) == {"FIZZLED"}
    spec = __import__("yaml").safe_load(mongo_launchpad_file.read_text())
    db = MongoClient(spec["host"])[spec["name"]]
    ml_tasks = list(db.tasks.find({"level": "funnel", "kind": "candidate"}, {"task_id": 1}))
    assert len(ml_tasks) == len({t["task_id"] for t in ml_tasks}) == len(funnel_fws)
    decided = [c["state"] for c in db.candidates.find({"fw_ids.funnel": {"$in": funnel_fws}}, {"state": 1})]
    assert len(decided) == len(funnel_fws) and set(decided) <= {"prerelaxed", "funnel_cut", "duplicate"}
    assert db["locks"].count_documents({}) == 0  # every formula's and hull's claim released
    # the figures of the other fault tests, for the funnel's Fireworks (the relax ones wait for their own rockets)
    lost = sum(1 for fw in funnel_fws if completed.get(fw, 0) == 0) + abs(len(ml_tasks) - len(funnel_fws))
    starts = list(db.candidates.find({"fw_ids.funnel": {"$in": funnel_fws}, "template.source": "random"}))
    assert starts and all(c["funnel"]["task_id"] for c in starts)  # each random start relaxed once, kept
    record_figures("kill_9_funnel_rocket", {"fireworks": len(funnel_fws), "unfinished": 0, "lost": lost,
                                            "duplicated": sum(n - 1 for n in completed.values())})
    status = json.loads(cli("status", "campaign.yaml", "--json").stdout)["funnel"]
    assert status["relaxed"] == len(funnel_fws) and status["passed"] + status["cut"] + status["relaxed_duplicates"] == len(funnel_fws)


@pytest.mark.slow
def test_a_failing_funnel_relaxation_fizzles_alone_with_its_reason(db, lpad, tmp_path, monkeypatch):
    """One structure whose ML relaxation raises: that candidate is failed with `funnel: ...`, its Firework FIZZLED with
    the reason; the rest of the batch is decided; `amdflow rerun --fizzled` and another batch finish it."""
    from amdflow.ops import rerun_fizzled
    from amdflow.relax.sevennet_engine import SevenNetEngine
    from amdflow.rocket import run_batched_rocket

    cfg = campaign_from_dict({"name": "AlNi-broken", "elements": ["Ni", "Al"],
                              "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB3_cP4_221_a_c"]}],
                              "screen": {"max_formation_energy_per_atom": 2.0}, "funnel": {"fmax": 0.1, "max_steps": 60},
                              "relax": {"fmax": 0.1, "max_steps": 60, "reference_prototypes": ["fcc"], "reference_ground_state": False},
                              "output_dir": str(tmp_path / "out")})
    add_campaign(db, cfg)
    run(lpad, tmp_path, ["gpu", "cpu"], {"spec.amdflow_stage": {"$ne": "funnel"}})
    original = SevenNetEngine.relax_many

    def one_breaks(self, structures, workers=1):
        results = original(self, structures, workers)
        return [FloatingPointError("the relaxation diverged (energy nan) after 7 steps") if s.composition.reduced_formula == "AlNi"
                else r for s, r in zip(structures, results, strict=True)]

    monkeypatch.setattr(SevenNetEngine, "relax_many", one_breaks)
    report = run_batched_rocket(lpad, batch_size=8, pipeline=False, stage="funnel")
    assert (report.fireworks, report.fizzled) == (2, 1)
    broken = db.candidates.find_one({"formula": "AlNi"})
    assert broken["state"] == "failed" and broken["error"] == "funnel: FloatingPointError: the relaxation diverged (energy nan) after 7 steps"
    fw = lpad.fireworks.find_one({"fw_id": broken["fw_ids"]["funnel"]})
    assert fw["state"] == "FIZZLED"
    assert "diverged" in lpad.launches.find_one({"fw_id": fw["fw_id"]})["action"]["stored_data"]["_message"]
    assert {c["state"] for c in db.candidates.find({"formula": {"$ne": "AlNi"}})} <= {"prerelaxed", "funnel_cut"}
    monkeypatch.setattr(SevenNetEngine, "relax_many", original)
    assert rerun_fizzled(db, cfg.name, "funnel").reset == [fw["fw_id"]]
    assert run_batched_rocket(lpad, batch_size=8, pipeline=False, stage="funnel").fireworks == 1
    assert db.candidates.find_one({"formula": "AlNi"})["state"] in ("prerelaxed", "funnel_cut")


@pytest.mark.slow
def test_a_guard_tripped_ml_relaxation_is_passed_on_flagged_not_dropped(db, lpad, tmp_path, monkeypatch):
    """The potential's hole is no evidence against the crystal: a candidate whose ML relaxation trips the guard goes
    on to the final relax unranked, flagged funnel.ml_failed; its Firework completes; status counts it."""
    from amdflow.ops import campaign_status
    from amdflow.relax.guards import GuardTripped
    from amdflow.relax.sevennet_engine import SevenNetEngine
    from amdflow.rocket import run_batched_rocket
    from amdflow.stages import ML_FAILED_PRIORITY

    cfg = campaign_from_dict({"name": "AlNi-hole", "elements": ["Ni", "Al"],
                              "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB3_cP4_221_a_c"]}],
                              "screen": {"max_formation_energy_per_atom": 2.0}, "funnel": {"fmax": 0.1, "max_steps": 60},
                              "relax": {"fmax": 0.1, "max_steps": 60, "reference_prototypes": ["fcc"],
                                        "reference_ground_state": False},
                              "output_dir": str(tmp_path / "out")})
    add_campaign(db, cfg)
    run(lpad, tmp_path, ["gpu", "cpu"], {"spec.amdflow_stage": {"$ne": "funnel"}})
    original = SevenNetEngine.relax_many

    def hole(self, structures, workers=1):
        results = original(self, structures, workers)
        return [GuardTripped("the relaxation went unphysical after 4 steps: 0.9 A^3/atom") if s.composition.reduced_formula == "AlNi"
                else r for s, r in zip(structures, results, strict=True)]

    monkeypatch.setattr(SevenNetEngine, "relax_many", hole)
    report = run_batched_rocket(lpad, batch_size=8, pipeline=False, stage="funnel")
    assert report.fizzled == 0
    flagged = db.candidates.find_one({"formula": "AlNi"})
    assert flagged["state"] == "prerelaxed" and flagged["funnel"]["ml_failed"] is True and flagged["funnel"]["passed"] is True
    assert "went unphysical" in flagged["funnel"]["ml_error"] and flagged["funnel"].get("energy_per_atom") is None
    assert lpad.fireworks.find_one({"fw_id": flagged["fw_ids"]["funnel"]})["state"] == "COMPLETED"
    assert campaign_status(db, cfg.name)["funnel"]["ml_failed"] == 1
    monkeypatch.setattr(SevenNetEngine, "relax_many", original)
    relax_fw = lpad.fireworks.find_one({"fw_id": flagged["fw_ids"]["relax"]})
    assert relax_fw["state"] == "READY" and relax_fw["spec"]["_priority"] == ML_FAILED_PRIORITY  # after every ranked one
    run(lpad, tmp_path, ["gpu", "cpu", "vasp"])  # the final relax takes it like any passed candidate
    done = db.candidates.find_one({"formula": "AlNi"})
    assert done["state"] == "analyzed" and done["funnel"]["ml_failed"] is True
    assert db.tasks.find_one({"task_id": done["task_id"]})["level"] == "final"


@pytest.mark.slow
def test_a_formula_whose_claim_times_out_waits_and_the_rest_of_the_batch_is_decided(db, lpad, tmp_path, monkeypatch):
    """Another process holds AlNi's claim past the timeout: the batch's other formulas are decided, AlNi's candidate
    is left undecided (not failed) with its ML relaxation stored, and the rerun decides it without relaxing again."""
    from amdflow.schemas import utcnow
    from amdflow.stages import funnel as funnel_module
    from amdflow.stages import funnel_stage

    cfg = campaign_from_dict({"name": "AlNi-busy", "elements": ["Ni", "Al"],
                              "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a", "AB3_cP4_221_a_c"]}],
                              "screen": {"max_formation_energy_per_atom": 2.0}, "funnel": {"fmax": 0.1, "max_steps": 60},
                              "relax": {"fmax": 0.1, "max_steps": 60, "reference_prototypes": ["fcc"],
                                        "reference_ground_state": False},
                              "output_dir": str(tmp_path / "out")})
    add_campaign(db, cfg)
    run(lpad, tmp_path, ["gpu", "cpu"], {"spec.amdflow_stage": {"$ne": "funnel"}})
    ids = [d["candidate_id"] for d in db.candidates.find({"state": "unique"})]
    busy = db.candidates.find_one({"formula": "AlNi", "state": "unique"})["candidate_id"]
    db.coll("locks").insert_one({"_id": f"funnel:{cfg.name}:AlNi", "owner": "another-host:1:1", "at": utcnow()})
    monkeypatch.setattr(funnel_module, "FORMULA_CLAIM_TIMEOUT_S", 0.5)
    outcomes = {o.candidate_id: o for o in funnel_stage(db, ids)}
    assert "could not claim 'funnel:AlNi-busy:AlNi'" in outcomes[busy].error and "ML relaxation is kept" in outcomes[busy].error
    others = [c for c in ids if c != busy]
    assert others and all(outcomes[c].error is None for c in others)  # the rest of the batch stands
    assert {db.candidates.find_one({"candidate_id": c})["state"] for c in others} <= {"prerelaxed", "funnel_cut", "duplicate"}
    left = db.candidates.find_one({"candidate_id": busy})
    assert left["state"] == "unique" and not left.get("funnel")  # undecided, not failed
    run_type = db.campaigns.find_one({"name": cfg.name})["funnel_run_type"]
    stored = db.tasks.find_one({"candidate_id": busy, "run_type": run_type})
    assert stored is not None  # its relaxation is kept
    db.coll("locks").delete_one({"_id": f"funnel:{cfg.name}:AlNi"})  # the other process finished

    def no_relaxation(*a, **k):
        raise AssertionError("relaxed again")

    monkeypatch.setattr("amdflow.relax.relax_many", no_relaxation)
    again = funnel_stage(db, [busy])[0]
    assert again.error is None and db.candidates.find_one({"candidate_id": busy})["state"] in ("prerelaxed", "funnel_cut")
    assert db.tasks.find_one({"task_id": stored["task_id"]})["created_at"] == stored["created_at"]


def test_a_collapsing_cell_ends_as_a_failed_relaxation_not_a_record_low_energy():
    """What bench_discovery met: SevenNet-0 drove cells to 0.85 A^3/atom and -2e25 eV/atom (a hole of the potential).

    The batched relaxation now ends such a structure with the reason (volume ratio, energy floor)
    and the rest of the batch relaxes as before. Checked on the guard itself (a state that left
    the bounds) and through the real SevenNet batch: in a bcc Fe cell squeezed to 1.2 A SevenNet-0
    finds a hole (below the energy floor in one step), so it must end as failed while its batch
    mate, started near equilibrium, relaxes.
    """
    from types import SimpleNamespace

    import torch
    from pymatgen.core import Lattice, Structure

    from amdflow.campaign import FunnelConfig
    from amdflow.generate.volume import atomic_volume
    from amdflow.relax import get_funnel_engine
    from amdflow.relax.guards import volume_bounds as _volume_bounds
    from amdflow.relax.torchsim_relax import ENERGY_FLOOR_EV_PER_ATOM, _unphysical

    cell = torch.stack([torch.eye(3) * 3.0, torch.eye(3) * 2.0, torch.eye(3) * 3.0, torch.eye(3) * 5.0]).double()
    state = SimpleNamespace(system_idx=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), n_systems=4, cell=cell,
                            energy=torch.tensor([-10.0, -10.0, 2 * ENERGY_FLOOR_EV_PER_ATOM - 2, -10.0]).double())
    # start volumes 13.5 A^3/atom each: kept, collapsed to 4/13.5, below the energy floor, blown up to 62.5/13.5
    assert _unphysical(state, [(0.5 * 13.5, 3.0 * 13.5)] * 4).tolist() == [False, True, True, True]
    # the bounds: from the smaller / the larger of the start and the elements' own volume, so that a cell the volume
    # rule left at a third of its elements' volume may expand to it (the demo's Ce3InFe, 10.4 -> 31.6 A^3/atom)
    fe = atomic_volume("Fe")
    compressed = Structure(Lattice.cubic((2 * fe / 3) ** (1 / 3)), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    low, high = _volume_bounds(compressed)
    assert low == pytest.approx(0.5 * fe / 3) and high == pytest.approx(3.0 * fe)

    engine = get_funnel_engine(FunnelConfig(engine="sevennet", max_steps=40))
    good = Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    squeezed = Structure(Lattice.cubic(1.2), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    results = engine.relax_many([good, squeezed], 1)  # squeezed: SevenNet-0 falls to -1.7e8 eV/atom in one step
    assert not isinstance(results[0], BaseException) and -9.5 < results[0].energy / 2 < -7.0, results[0]
    assert isinstance(results[1], FloatingPointError) and "went unphysical" in str(results[1]), results[1]
    assert "started at 0.86" in str(results[1])
