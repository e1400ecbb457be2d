"""Known phases: import from a folder, relaxed the campaign's way, labelled, on the known hull."""

from __future__ import annotations

import os

import pytest
from fireworks import FWorker
from fireworks.core.rocket_launcher import rapidfire
from monty.serialization import dumpfn
from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

from amdflow.campaign import campaign_from_dict
from amdflow.errors import AmdflowError, ConfigError
from amdflow.generate.templates import aflow_index
from amdflow.ops import add_campaign
from amdflow.thermo import known as kn


def _b2_nial():
    s = aflow_index()["AB_cP2_221_b_a"].copy()
    s.replace_species({s[0].specie: "Al", s[1].specie: "Ni"})
    s.scale_lattice(2 * 11.8)
    return s


def _l12_ni3al():
    s = aflow_index()["AB3_cP4_221_a_c"].copy()
    a, b = {site.specie.symbol for site in s}
    majority = max((a, b), key=lambda el: sum(site.specie.symbol == el for site in s))
    s.replace_species({majority: "Ni", ({a, b} - {majority}).pop(): "Al"})
    s.scale_lattice(4 * 11.3)
    return s


@pytest.fixture
def known_folder(tmp_path):
    folder = tmp_path / "known"
    folder.mkdir()
    dumpfn(ComputedStructureEntry(_b2_nial(), -12.0, entry_id="mp-1487"), folder / "NiAl.json")
    dumpfn([ComputedStructureEntry(_l12_ni3al(), -22.0, entry_id="mp-2593"),
            ComputedStructureEntry(_l12_ni3al().copy().replace_species({"Al": "Cu"}), -20.0, entry_id="mp-cu")],  # not Al-Ni
           folder / "more.json.gz")
    (folder / "broken.json").write_text("{not json")
    return folder


def test_folder_reader_reports_unusable_files(known_folder, tmp_path):
    read = kn.read_entry_folder(known_folder)
    assert sorted(k for k, _ in read.entries) == ["mp-1487", "mp-2593", "mp-cu"]
    assert [w for w, _ in read.skipped] == ["broken.json"]
    assert kn.for_elements(read.entries, ["Al", "Ni"]) == [e for e in read.entries if e[0] != "mp-cu"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        kn.read_entry_folder(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not found"):
        kn.read_entry_folder(tmp_path / "nowhere")


def test_config_errors_name_the_fix(binary_campaign_dict, known_folder):
    with pytest.raises(ConfigError, match="energies: as_is needs run_type"):
        campaign_from_dict({**binary_campaign_dict, "analyze": {"known_phases": {"source": "folder", "path": str(known_folder), "energies": "as_is"}}})
    with pytest.raises(ConfigError, match="needs a path"):
        campaign_from_dict({**binary_campaign_dict, "analyze": {"known_phases": {"source": "folder"}}})


def test_relax_mode_needs_structures(db, binary_campaign_dict, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    dumpfn(ComputedEntry("AlNi", -12.0, entry_id="x1"), folder / "x.json")
    cfg = campaign_from_dict({**binary_campaign_dict, "analyze": {"known_phases": {"source": "folder", "path": str(folder)}}})
    with pytest.raises(AmdflowError, match="folder:bare:x1 have no structure, so they cannot be relaxed"):
        add_campaign(db, cfg)


@pytest.mark.slow
def test_known_phases_relaxed_the_campaign_way(db, lpad, binary_campaign_dict, known_folder, tmp_path):
    campaign = {**binary_campaign_dict, "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}],
                "generate": {"lattice_scales": [1.0]},
                "analyze": {"known_phases": {"source": "folder", "path": str(known_folder), "max_e_above_hull": None}}}
    cfg = campaign_from_dict(campaign)
    report = add_campaign(db, cfg)
    assert report.known["kept"] == 2 and report.known["relaxations"] == 2 and len(report.known["skipped"]) == 1
    again = add_campaign(db, cfg)
    assert again.known["imported"] == 0 and again.known["relaxations"] == 0  # idempotent
    cwd = os.getcwd()
    (tmp_path / "launches").mkdir()
    try:
        os.chdir(tmp_path / "launches")
        rapidfire(lpad, FWorker(category=["gpu", "cpu", "vasp"]), strm_lvl="ERROR")
    finally:
        os.chdir(cwd)
    assert {fw["state"] for fw in lpad.fireworks.find({}, {"state": 1})} <= {"COMPLETED", "DEFUSED"}
    run_type = db.campaigns.find_one({"name": cfg.name})["run_type"]
    known_tasks = list(db.tasks.find({"kind": "known"}))
    assert {t["source"] for t in known_tasks} == {"folder:known:mp-1487", "folder:known:mp-2593"}
    assert {t["run_type"] for t in known_tasks} == {run_type}
    thermo = {t["material_id"]: t for t in db.thermo.find({"hull_chemsys": "Al-Ni"})}
    assert sum(t["kind"] == "known" for t in thermo.values()) == 2
    # the B2 candidate is the known B2 NiAl relaxed the same way: on the hull, but not below the known one
    cand = next(t for t in thermo.values() if t["kind"] == "candidate")
    assert cand["formula"] == "AlNi" and cand["is_stable"]
    assert cand["e_above_known_hull"] == pytest.approx(0.0, abs=2e-3)
    known_b2 = next(t for t in thermo.values() if t.get("source") == "folder:known:mp-1487")
    assert known_b2["energy_per_atom"] == pytest.approx(cand["energy_per_atom"], abs=2e-3)


def test_materials_project_source_through_mp_api(db, binary_campaign_dict, monkeypatch):
    """source: mp asks mp-api for the campaign's system and imports its entries (the client is faked: no network)."""
    import sys
    import types

    asked = {}

    class FakeRester:
        def __init__(self, key):
            asked["key"] = key

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def get_entries_in_chemsys(self, elements):
            asked["elements"] = sorted(elements)
            return [ComputedStructureEntry(_b2_nial(), -12.0, entry_id="mp-1487"),
                    ComputedStructureEntry(_l12_ni3al(), -22.0, entry_id="mp-2593")]

    module = types.ModuleType("mp_api.client")
    module.MPRester = FakeRester
    monkeypatch.setitem(sys.modules, "mp_api", types.ModuleType("mp_api"))
    monkeypatch.setitem(sys.modules, "mp_api.client", module)
    cfg = campaign_from_dict({**binary_campaign_dict, "analyze": {"known_phases": {"source": "mp", "max_e_above_hull": None}}})
    monkeypatch.delenv("MP_API_KEY", raising=False)
    monkeypatch.delenv("AMDFLOW_MP_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="need an API key: set AMDFLOW_MP_API_KEY"):
        add_campaign(db, cfg)
    assert db.candidates.count_documents({}) == 0  # stopped before generating anything
    monkeypatch.setenv("AMDFLOW_MP_API_KEY", "secret-key")
    report = add_campaign(db, cfg)
    assert asked == {"key": "secret-key", "elements": ["Al", "Ni"]}
    assert report.known["kept"] == 2 and report.known["relaxations"] == 2
    assert {d["source"] for d in db.known.find()} == {"mp:mp-1487", "mp:mp-2593"}
    assert "secret-key" not in str(list(db.known.find({}, {"_id": 0, "structure": 0})))
