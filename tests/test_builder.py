"""ThermoBuilder: incremental = full rebuild, super-systems rebuilt, run types kept apart, datasets."""

from __future__ import annotations

import csv
import random
from datetime import timedelta
from pathlib import Path

import pytest
from pymatgen.core import Composition, Structure
from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

from amdflow.builders.thermo import ThermoBuilder, run_builder
from amdflow.schemas import utcnow
from amdflow.thermo import known as kn
from tests.conftest import shared_path

RT = "test-rt"
ELEMENT_E = {"Al": -3.7, "Ni": -5.5, "Fe": -8.3, "Cu": -3.7, "Zn": -1.2}
BINARIES = ["AlNi", "AlNi3", "Al3Ni", "Al2Ni3", "FeAl", "Fe3Al", "FeAl3", "FeNi", "FeNi3", "CuZn", "CuZn3", "Cu3Zn"]
TERNARIES = ["Al2FeNi", "AlFeNi2", "AlFe2Ni", "Al6FeNi"]


def task(task_id: str, formula: str, energy_per_atom: float, run_type: str = RT, kind: str = "candidate",
         converged: bool = True, created_at=None) -> dict:
    comp = Composition(formula)
    return {"task_id": task_id, "formula": comp.reduced_formula, "chemsys": comp.chemical_system, "energy_per_atom": energy_per_atom,
            "kind": kind, "run_type": run_type, "converged": converged, "campaign": "c", "candidate_id": task_id,
            "created_at": created_at or utcnow()}


def mixing_energy(formula: str, rng: random.Random) -> float:
    comp = Composition(formula).fractional_composition
    base = sum(comp[el] * ELEMENT_E[el.symbol] for el in comp.elements)
    return base + rng.uniform(-0.5, 0.15)


def references() -> list[dict]:
    return [task(f"ref-{el}", el, e, kind="reference") for el, e in ELEMENT_E.items()]


def thermo_state(db) -> dict:
    return {(d["material_id"], d["hull_chemsys"]): d for d in db.thermo.find({}, {"_id": 0})}


def assert_same_state(a: dict, b: dict) -> None:
    """Equal thermo collections: same documents, values equal to 1e-9 eV/atom, build times aside."""
    from amdflow.builders.thermo import same_values

    assert set(a) == set(b)
    for key in a:
        assert same_values(a[key], b[key]), (key, a[key], b[key])


def build(db, **kwargs) -> list[tuple[str, str]]:
    builder = ThermoBuilder.from_db(db, **kwargs)
    run_builder(builder)
    return sorted(s for _, s in builder.rebuilt)


def test_incremental_builds_only_changed_systems_and_equals_full_rebuild(db, lpad):
    rng = random.Random(7)
    # round 1: Al-Ni only
    db.tasks.insert_many([t for t in references() if t["formula"] in ("Al", "Ni")])
    db.tasks.insert_many([task(f"b{i}", f, mixing_energy(f, rng)) for i, f in enumerate(BINARIES[:4])])
    assert build(db) == ["Al-Ni"]
    assert build(db) == []  # nothing new: nothing rebuilt
    # round 2: Fe, its binaries and the ternaries: new systems built; Al-Ni unchanged -> not rebuilt
    db.tasks.insert_many([t for t in references() if t["formula"] == "Fe"])
    db.tasks.insert_many([task(f"b{i}", f, mixing_energy(f, rng)) for i, f in enumerate(BINARIES[4:9], start=4)])
    db.tasks.insert_many([task(f"t{i}", f, mixing_energy(f, rng)) for i, f in enumerate(TERNARIES)])
    assert build(db) == ["Al-Fe", "Al-Fe-Ni", "Fe-Ni"]
    # round 3: an unrelated system
    db.tasks.insert_many([t for t in references() if t["formula"] in ("Cu", "Zn")])
    db.tasks.insert_many([task(f"b{i}", f, mixing_energy(f, rng)) for i, f in enumerate(BINARIES[9:], start=9)])
    assert build(db) == ["Cu-Zn"]
    # round 4: a new Al-Ni phase far below the hull: Al-Ni and its stored super-system rebuild
    db.tasks.insert_one(task("new-AlNi", "Al3Ni2", -5.5))
    assert build(db) == ["Al-Fe-Ni", "Al-Ni"]
    new = db.thermo.find_one({"material_id": "new-AlNi", "hull_chemsys": "Al-Fe-Ni"})
    assert new["is_stable"] and new["e_above_hull"] == 0
    # round 5: a task inserted late with an old time stamp is still seen (the count changed)
    db.tasks.insert_one(task("late", "FeNi2", -6.0, created_at=utcnow() - timedelta(days=30)))
    assert build(db) == ["Al-Fe-Ni", "Fe-Ni"]
    # round 6: a task replaced (re-run) and one deleted; the deleted one leaves no thermo doc
    db.tasks.replace_one({"task_id": "t0"}, task("t0", TERNARIES[0], -9.0))
    db.tasks.delete_one({"task_id": "b9"})
    assert build(db) == ["Al-Fe-Ni", "Cu-Zn"]
    assert db.thermo.count_documents({"material_id": "b9"}) == 0
    assert db.thermo.find_one({"material_id": "t0"})["is_stable"]
    # a Cu-Zn system restricted by chemsys= builds nothing else
    db.tasks.insert_one(task("cz", "CuZn2", -2.0))
    db.tasks.insert_one(task("an", "AlNi2", -5.0))
    assert build(db, chemsys=["Cu-Zn"]) == ["Cu-Zn"]
    assert build(db) == ["Al-Fe-Ni", "Al-Ni"]

    incremental = thermo_state(db)
    records = {(b["hull_chemsys"]): b["sources"] for b in db.thermo_builds.find()}
    db.thermo.delete_many({})
    db.thermo_builds.delete_many({})
    assert build(db, full=True) == ["Al-Fe", "Al-Fe-Ni", "Al-Ni", "Cu-Zn", "Fe-Ni"]
    assert_same_state(thermo_state(db), incremental)
    assert {(b["hull_chemsys"]): b["sources"] for b in db.thermo_builds.find()} == records
    # every material of Al-Ni has the same hull position in Al-Ni and in Al-Fe-Ni
    for (mid, system), doc in incremental.items():
        if system == "Al-Ni":
            sup = incremental[(mid, "Al-Fe-Ni")]
            assert sup["e_above_hull"] == pytest.approx(doc["e_above_hull"], abs=1e-9)
            assert sup["formation_energy_per_atom"] == pytest.approx(doc["formation_energy_per_atom"], abs=1e-12)


def test_run_types_never_mix(db):
    db.tasks.insert_many(references()[:2])  # Al, Ni of RT
    db.tasks.insert_many([task("a", "AlNi", -5.0)])
    other = [task(f"o-{t['task_id']}", t["formula"], t["energy_per_atom"] - 1.0, run_type="other", kind="reference")
             for t in references()[:2]]
    db.tasks.insert_many([*other, task("o-low", "AlNi", -99.0, run_type="other")])
    assert build(db) == ["Al-Ni", "Al-Ni"]
    a = db.thermo.find_one({"material_id": "a"})
    assert a["run_type"] == RT and a["is_stable"]  # the -99 eV/atom entry of the other run type does not touch it
    assert a["formation_energy_per_atom"] == pytest.approx(-5.0 - (-3.7 - 5.5) / 2)
    assert build(db, run_types=[RT]) == []


def test_unconverged_placed_but_not_shaping(db):
    db.tasks.insert_many(references()[:2])
    db.tasks.insert_many([task("ok", "AlNi", -5.0), task("bad", "AlNi3", -9.0, converged=False)])
    build(db)
    bad = db.thermo.find_one({"material_id": "bad"})
    assert not bad["in_hull"] and not bad["is_stable"] and bad["e_above_hull"] < 0
    assert db.thermo.find_one({"material_id": "ok"})["is_stable"]
    build(db, include_unconverged=True, full=True)
    assert db.thermo.find_one({"material_id": "bad"})["is_stable"]
    assert not db.thermo.find_one({"material_id": "ok"})["is_stable"]


def test_known_phases_as_is_and_e_above_known_hull(db):
    db.tasks.insert_many(references()[:2])
    # known AlNi at E_f = -0.4; candidates: one below it (new stable), one above (metastable)
    db.known.insert_one({**kn.known_doc("folder:k", "AlNi-known", ComputedEntry("AlNi", 2 * (-4.6 - 0.4)), RT), "created_at": utcnow()})
    db.tasks.insert_many([task("below", "AlNi", -5.1), task("above", "AlNi", -4.95)])
    assert build(db) == ["Al-Ni"]
    docs = {d["material_id"]: d for d in db.thermo.find({}, {"_id": 0})}
    known = next(d for d in docs.values() if d["kind"] == "known")
    assert known["source"] == "folder:k:AlNi-known" and not known["is_stable"]
    assert docs["below"]["e_above_known_hull"] == pytest.approx(-0.1)
    assert docs["above"]["e_above_known_hull"] == pytest.approx(0.05)
    assert docs["above"]["e_above_hull"] == pytest.approx(0.15)
    # the known phase itself is on the known hull and 0.1 above the full one
    assert known["e_above_known_hull"] == 0 and known["e_above_hull"] == pytest.approx(0.1)
    # a known doc of another run type changes nothing here
    db.known.insert_one({**kn.known_doc("folder:k", "x", ComputedEntry("AlNi", -99.0), "other"), "created_at": utcnow()})
    assert build(db, run_types=[RT]) == []


def test_missing_reference_recorded_not_raised(db):
    db.tasks.insert_many([references()[0], task("a", "AlNi", -5.0)])
    build(db)
    record = db.thermo_builds.find_one({"hull_chemsys": "Al-Ni"})
    assert "no elemental reference for ['Ni']" in record["error"]
    assert db.thermo.count_documents({}) == 0
    db.tasks.insert_one(references()[1])
    assert build(db) == ["Al-Ni"] and db.thermo.count_documents({}) == 3


def _import(db, entries: list[tuple[str, ComputedEntry]], label: str, run_type: str) -> None:
    now = utcnow()
    db.known.insert_many([{**kn.known_doc(label, key, e, run_type), "created_at": now} for key, e in entries])


@pytest.mark.shared
def test_li_fe_o_through_builder(db):
    rows = list(csv.DictReader(shared_path("datasets", "li_fe_o_pymatgen", "li_fe_o_reference_hull.csv").read_text().splitlines()))
    entries, seen = [], set()
    for i, r in enumerate(rows):
        comp = Composition({"Li": float(r["Li"]), "Fe": float(r["Fe"]), "O": float(r["O"])})
        key = (r["Name"], comp.formula, r["Final energy"])
        if key in seen:  # two rows are exact duplicates: a set holds 490 entries
            continue
        seen.add(key)
        entries.append((f"row{i}", ComputedEntry(comp, float(r["Final energy"]))))
    assert len(entries) == 490
    _import(db, entries, "pd_entries_test", "pymatgen-test")
    assert build(db) == ["Fe-Li-O", "Fe-O", "Li-O"]  # no Fe-Li compound in the set
    docs = {d["material_id"]: d for d in db.thermo.find({"hull_chemsys": "Fe-Li-O"}, {"_id": 0})}
    assert len(docs) == 490
    stable = {d["formula"] for d in docs.values() if d["is_stable"]}
    assert stable == {"Li", "Fe", "O2", "Li2O", "Li2O2", "FeO", "Fe3O4", "Fe2O3", "LiFeO2", "Li2FeO3", "Li5FeO4"}
    by_row = {d["material_id"].split(":")[-1].split("@")[0]: d for d in docs.values()}
    for i, r in enumerate(rows):
        if f"row{i}" in by_row:
            d = by_row[f"row{i}"]
            assert d["e_above_hull"] == pytest.approx(float(r["e_above_hull_per_atom_pymatgen"]), abs=1e-9)
            assert d["formation_energy_per_atom"] == pytest.approx(float(r["formation_energy_per_atom_pymatgen"]), abs=1e-9)


@pytest.mark.shared
def test_sc_al_c_through_folder_import_and_builder(db, tmp_path):
    from monty.serialization import dumpfn

    folder = shared_path("datasets", "sc_al_c_mp2019")
    rows = list(csv.DictReader((folder / "sc_al_c_reference_hull.csv").read_text().splitlines()))
    energy = {r["material_id"]: float(r["energy_per_atom_eV"]) for r in rows}
    entries = []
    for cif in sorted((folder / "structures").glob("*.cif")):
        mid = cif.stem.split("_")[0]
        s = Structure.from_file(cif)
        entries.append(ComputedStructureEntry(s, energy[mid] * len(s), entry_id=mid))
    # half as one list file, the rest one file each, gzipped: the folder reader takes both
    (tmp_path / "known" / "single").mkdir(parents=True)
    dumpfn(entries[:45], tmp_path / "known" / "first.json")
    for e in entries[45:]:
        dumpfn(e, tmp_path / "known" / "single" / f"{e.entry_id}.json.gz")
    read = kn.read_entry_folder(tmp_path / "known")
    assert len(read.entries) == 91 and not read.skipped
    kept, _ = kn.within_own_hull(read.entries, None)
    _import(db, kept, "folder:known", "mp2019")
    assert build(db) == ["Al-C", "Al-C-Sc", "Al-Sc", "C-Sc"]
    docs = {d["source"].split(":")[-1]: d for d in db.thermo.find({"hull_chemsys": "Al-C-Sc"}, {"_id": 0})}
    assert len(docs) == 91
    assert sum(d["is_stable"] for d in docs.values()) == 15
    for r in rows:
        assert docs[r["material_id"]]["e_above_hull"] == pytest.approx(float(r["e_above_hull_eV_per_atom_pymatgen"]), abs=1e-6)
    # the own-hull filter keeps the 15 stable phases and those within 0.1 eV/atom
    within, _ = kn.within_own_hull(read.entries, 0.1)
    expected = {r["material_id"] for r in rows if float(r["e_above_hull_eV_per_atom_pymatgen"]) <= 0.1}
    assert {k for k, _ in within} == expected


@pytest.mark.multiprocess
def test_mrun_runs_the_serialized_builder(mongo_uri, tmp_path):
    """maggma's `mrun` runs the builder from its JSON, on MongoDB stores, in its own process."""
    import subprocess
    import sys
    import uuid

    import pymongo
    from maggma.stores import MongoStore
    from monty.serialization import dumpfn
    from pymongo.uri_parser import parse_uri

    name = f"mrun_{uuid.uuid4().hex[:8]}"
    client = pymongo.MongoClient(mongo_uri)
    try:
        db = client[name]
        db.tasks.insert_many([{k: v for k, v in t.items()} for t in references()[:2]])
        db.tasks.insert_many([task("a", "AlNi", -5.0), task("b", "AlNi3", -5.2)])

        host, port = parse_uri(mongo_uri)["nodelist"][0]

        def store(coll: str) -> MongoStore:
            return MongoStore(database=name, collection_name=coll, host=host, port=port)

        builder = ThermoBuilder(store("tasks"), store("thermo"), store("thermo_builds"), known=store("known"))
        dumpfn(builder, tmp_path / "thermo_builder.json")
        mrun = Path(sys.executable).with_name("mrun")
        proc = subprocess.run([str(mrun), "--no_bars", str(tmp_path / "thermo_builder.json")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        docs = {d["material_id"]: d for d in db.thermo.find({"hull_chemsys": "Al-Ni"})}
        assert set(docs) == {"ref-Al", "ref-Ni", "a", "b"}
        assert docs["a"]["is_stable"] and docs["a"]["formation_energy_per_atom"] == pytest.approx(-5.0 + (3.7 + 5.5) / 2)
        assert db.thermo_builds.count_documents({"hull_chemsys": "Al-Ni", "error": None}) == 1
    finally:
        client.drop_database(name)
        client.close()


def test_result_of_an_older_snapshot_never_overwrites_a_newer_one(db):
    """Two analyze steps build at once: the one that read before a new task arrived writes nothing."""
    db.tasks.insert_many([*references()[:2], task("a", "AlNi", -5.0)])
    slow = ThermoBuilder.from_db(db)
    items = [slow.process_item(item) for item in slow.get_items()]  # read and computed: without "late"
    db.tasks.insert_one(task("late", "AlNi3", -6.0))
    assert build(db) == ["Al-Ni"]  # the newer snapshot, written first
    slow.update_targets(items)  # the older one arrives last
    assert slow.superseded == [(RT, "Al-Ni")] and slow.rebuilt == []
    assert db.thermo.find_one({"material_id": "late"})["is_stable"]  # not deleted by the stale result
    assert not db.thermo.find_one({"material_id": "a"})["is_stable"]
    assert build(db) == []
