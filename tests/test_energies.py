"""Energies a referee would sign (issue 25): ground-state references, corrections, one scale per hull.

Known answers: MP2020's fitted values (pymatgen's MP2020Compatibility.yaml: oxide -0.687 eV per O,
Cl -0.614 eV per Cl, Fe's GGA/GGA+U mixing -2.256 eV per Fe), the space groups of MP's
elemental ground states, and which elements the shipped table says differ from MP's cell.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from amdflow.campaign import FunnelConfig, RelaxConfig, campaign_from_dict
from amdflow.errors import AmdflowError
from amdflow.relax.base import RelaxResult, corrected_energy
from amdflow.relax.guards import GuardTripped, check_trajectory
from amdflow.thermo.corrections import (
    CorrectionError,
    CorrectionScheme,
    correct,
    energy_on_scale,
    mp_hubbards,
    policy_for,
)
from amdflow.thermo.ground_states import GROUND_STATES, build_ground_state, ground_state_structure
from tests.conftest import shared_path


def _fe2o3() -> Structure:  # any cell of the composition: MP2020's corrections depend on the composition only
    return Structure(Lattice.cubic(5), ["Fe", "Fe", "O", "O", "O"],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.25, 0.25, 0], [0, 0.25, 0.25], [0.25, 0, 0.25]])


# ---------------------------------------------------------------- the shipped ground states
def test_the_shipped_file_is_what_the_recipes_build():
    """The package data equals a fresh build: scripts/make_element_ground_states.py was run after the last table change."""
    for el in GROUND_STATES:
        shipped, built = ground_state_structure(el), build_ground_state(el)
        assert shipped.composition.reduced_formula == built.composition.reduced_formula, el
        assert set(shipped.composition.elements) == {Composition(el).elements[0]}, el
        assert len(shipped) == len(built) and np.allclose(shipped.lattice.matrix, built.lattice.matrix, atol=1e-6), el
        assert np.allclose(shipped.frac_coords, built.frac_coords, atol=1e-6), el


def test_ground_states_have_mps_space_groups_and_molecules_keep_their_bonds():
    expected = {"C": "P6_3/mmc", "B": "R-3m", "Si": "Fd-3m", "Al": "Fm-3m", "Fe": "Im-3m", "Ga": "Cmce", "Se": "P2_1/c",
                "S": "Fddd", "I": "Cmce", "N": "P2_13", "Sn": "Fd-3m", "Mn": "I-43m", "Ge": "Fd-3m", "As": "R-3m"}
    for el, sg in expected.items():
        assert SpacegroupAnalyzer(ground_state_structure(el), symprec=0.01).get_space_group_symbol() == sg, el
    for el, bond in {"H": 0.741, "N": 1.098, "O": 1.208, "F": 1.412, "Cl": 1.988, "Br": 2.281, "I": 2.666}.items():
        s = ground_state_structure(el)
        d = s.distance_matrix + np.eye(len(s)) * 99
        assert d.min(axis=1) == pytest.approx([bond] * len(s), abs=0.01), el  # each atom's partner at the molecule's bond
        assert np.sort(d, axis=1)[:, 1].min() > bond + 0.5, el  # and the next atom farther: molecules, not chains


def test_every_mp_elemental_reference_has_a_ground_state_of_its_id():
    path = shared_path("datasets", "mp_elemental_refs", "2023-02-07-mp-elemental-reference-entries.json.gz")
    with gzip.open(path, "rt") as fh:
        refs = json.load(fh)
    assert set(refs) == set(GROUND_STATES)
    for el, entry in refs.items():
        gs = GROUND_STATES[el]
        assert gs.mp_id == entry["entry_id"].removesuffix("-GGA") and gs.mp_nsites == int(sum(entry["composition"].values())), el
        if gs.agreement in ("same", "size"):  # MP's cell size (its primitive, or the cell MP keeps for magnetic order)
            assert len(ground_state_structure(el)) == gs.mp_nsites, el
        else:  # a structure MP's is not: the table says what MP has
            assert gs.note, f"{el}: differs without saying how"


@pytest.mark.parametrize(("elements", "types"), [
    (["Na", "B", "C"], {"Na": "alpha-Mn type (I-43m)", "B": "alpha-B (R-3m)", "C": "graphite (A9, P6_3/mmc)"}),
    (["Si", "C"], {"Si": "diamond", "C": "graphite (A9, P6_3/mmc)"}),
    (["Al", "P"], {"Al": "fcc", "P": "Hittorf's violet P (P2/c)"}),
])
def test_a_minimal_campaign_takes_each_elements_ground_state(db, tmp_path, elements, types):
    """Only name, elements and templates: the references queued are MP's ground states (graphite C, alpha-B, ...)."""
    from amdflow.ops import register_campaign
    from amdflow.stages import pending_references, reference_name, reference_structure

    cfg = campaign_from_dict({"name": "-".join(elements), "elements": elements,
                              "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}],
                              "output_dir": str(tmp_path)})
    doc = register_campaign(db, cfg)
    pending = pending_references(db, cfg, doc["run_type"])
    assert sorted((r.element, r.prototype) for r in pending) == sorted((el, "ground_state") for el in elements)
    for r in pending:
        assert reference_name(r.element, r.prototype).startswith(types[r.element] + " [ground state; MP mp-")
        s = reference_structure(r.element, r.prototype)
        assert len(s) == len(ground_state_structure(r.element)) and s.composition.chemical_system == r.element
    assert GROUND_STATES["P"].agreement == "differs" and "fibrous" in GROUND_STATES["P"].note  # MP's cell is not in the library


def test_an_extra_prototype_that_is_the_ground_state_is_not_relaxed_twice(db, tmp_path):
    """reference_prototypes [diamond, fcc] for Si-Cu: Si's ground state is diamond and Cu's is fcc, so each element
    gets its ground state and only the other prototype (the CP2K campaign relaxed diamond Si twice before)."""
    from amdflow.ops import register_campaign
    from amdflow.stages import pending_references

    cfg = campaign_from_dict({"name": "Si-Cu", "elements": ["Si", "Cu"],
                              "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}],
                              "relax": {"reference_prototypes": ["diamond", "fcc"]}, "output_dir": str(tmp_path)})
    doc = register_campaign(db, cfg)
    pending = sorted((r.element, r.prototype) for r in pending_references(db, cfg, doc["run_type"]))
    assert pending == [("Cu", "A_cF8_227_a"), ("Cu", "ground_state"), ("Si", "A_cF4_225_a"), ("Si", "ground_state")]
    off = cfg.relax.model_copy(update={"reference_ground_state": False})
    assert off.element_reference_structures("Si") == ["A_cF8_227_a", "A_cF4_225_a"]  # no ground state: both relaxed


# ---------------------------------------------------------------- corrections
def test_mp2020_corrections_of_oxides_chlorides_and_u_metals():
    fe2o3 = correct(_fe2o3(), -38.0, "mp2020")
    assert fe2o3.correction == pytest.approx(3 * -0.687 + 2 * -2.256)  # oxide anion + Fe's GGA/GGA+U mixing
    assert {a["name"] for a in fe2o3.adjustments} == {"MP2020 anion correction (oxide)", "MP2020 GGA/GGA+U mixing correction (Fe)"}
    assert fe2o3.uncorrected_energy == -38.0 and fe2o3.energy == pytest.approx(-38.0 - 6.573)
    cato3 = Structure(Lattice.cubic(3.9), ["Ca", "Ti", "O", "O", "O"],
                      [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
    assert correct(cato3, -40.0, "mp2020").correction == pytest.approx(3 * -0.687)  # Ti gets no U: anion only
    nacl = Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert correct(nacl, -7.0, "mp2020").correction == pytest.approx(-0.614)
    alni = Structure(Lattice.cubic(2.9), ["Al", "Ni"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert correct(alni, -10.0, "mp2020").correction == 0.0  # an intermetallic: nothing to correct
    assert mp_hubbards(Composition("Fe2O3")) == {"Fe": 5.3} and mp_hubbards(Composition("FeAl")) == {}


def test_a_uncorrectable_entry_is_one_line_naming_the_fix():
    with pytest.raises(CorrectionError) as info:  # Fe2O3 computed without U cannot join MP's GGA/GGA+U mix
        correct(_fe2o3(), -38.0, "mp2020", {"run_type": "GGA", "is_hubbard": False, "hubbards": {}})
    msg = str(info.value)
    assert "Fe2O3" in msg and "expected 5.3" in msg and "hubbard: mp" in msg and "\n" not in msg and len(msg) < 300


@pytest.mark.parametrize(("engine", "cfg", "scheme"), [
    ("chgnet", RelaxConfig(), CorrectionScheme.IN_MODEL),  # trained on MP2020-corrected energies: nothing applied
    ("sevennet", FunnelConfig(engine="sevennet"), CorrectionScheme.MP2020),  # SevenNet-0: MPtrj's uncorrected energies
    ("sevennet", FunnelConfig(engine="sevennet", model="7net-mf-0", modal="R2SCAN"), CorrectionScheme.NONE),
    ("sevennet", FunnelConfig(engine="sevennet", model="7net-mf-0"), CorrectionScheme.MP2020),  # its PBE modal
    ("vasp", RelaxConfig(engine="vasp"), CorrectionScheme.MP2020),
    ("vasp", RelaxConfig(engine="vasp", vasp={"input_set": "mp_r2scan"}), CorrectionScheme.NONE),
    ("cp2k", RelaxConfig(engine="cp2k"), CorrectionScheme.NONE),
])
def test_each_engine_gets_its_correction_scheme(engine, cfg, scheme):
    assert policy_for(engine, cfg).scheme is scheme


def test_in_model_and_none_schemes_leave_the_energy_alone_and_mp2020_corrects_it():
    result = RelaxResult(_fe2o3(), -38.0, True, 3, 0.01, 1.0)
    in_model = corrected_energy(SimpleNamespace(correction=policy_for("chgnet", RelaxConfig())), result)
    assert (in_model.energy, in_model.correction, in_model.scheme) == (-38.0, 0.0, CorrectionScheme.IN_MODEL)
    sevennet = corrected_energy(SimpleNamespace(correction=policy_for("sevennet", FunnelConfig(engine="sevennet"))), result)
    assert sevennet.correction == pytest.approx(-6.573)
    # a VASP run reports its own +U: the correction follows the run, not MP's table
    vasp = corrected_energy(SimpleNamespace(correction=policy_for("vasp", RelaxConfig(engine="vasp"))),
                            RelaxResult(_fe2o3(), -38.0, True, 3, 0.01, 1.0,
                                        details={"correction_parameters": {"run_type": "GGA+U", "is_hubbard": True,
                                                                           "hubbards": {"Fe": 5.3, "O": 0.0}}}))
    assert vasp.correction == pytest.approx(-6.573)


def test_a_fine_tuned_checkpoint_must_say_its_correction(tmp_path):
    ckpt = tmp_path / "tuned.pth"
    ckpt.write_bytes(b"weights")
    with pytest.raises(AmdflowError, match=r"needs funnel\.correction"):
        policy_for("sevennet", SimpleNamespace(model="7net-0", modal=None, checkpoint=ckpt, correction="auto"))
    told = policy_for("sevennet", SimpleNamespace(model="7net-0", modal=None, checkpoint=ckpt, correction="none"))
    assert told.scheme is CorrectionScheme.NONE


def test_run_types_name_the_scheme_and_hash_every_energy_setting(tmp_path):
    from amdflow.relax.base import file_sha256, get_engine, get_funnel_engine, run_type_name

    base = get_funnel_engine(FunnelConfig(engine="sevennet")).run_type
    assert "-mp2020-" in base
    for change in ({"fmax": 0.02}, {"max_steps": 50}, {"relax_cell": False}):
        assert get_funnel_engine(FunnelConfig(engine="sevennet", **change)).run_type != base, change
    chgnet = get_engine(RelaxConfig()).run_type
    assert "-mp2020-in-model-" in chgnet and get_engine(RelaxConfig(relax_cell=False)).run_type != chgnet
    vasp = get_engine(RelaxConfig(engine="vasp")).run_type
    assert "-mp2020-" in vasp and get_engine(RelaxConfig(engine="vasp", relax_cell=False)).run_type != vasp
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert run_type_name("x", "y", "none", {"ckpt": file_sha256(a)}) != run_type_name("x", "y", "none", {"ckpt": file_sha256(b)})
    assert run_type_name("x", "y", "none", {}) != run_type_name("x", "y", "mp2020", {})


def test_known_phases_as_is_are_put_on_the_hulls_scale():
    """An MP entry (MP2020-corrected, with its parameters) joins an uncorrected hull without its correction and an
    MP2020 hull with MP2020 recomputed from its parameters; one without parameters is a clear error."""
    from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

    from amdflow.thermo.corrections import mp_parameters

    params = mp_parameters(Composition("Fe2O3"))
    entry = ComputedStructureEntry(_fe2o3(), -38.0, parameters=params, entry_id="mp-19770")
    from amdflow.thermo.corrections import _mp2020

    _mp2020().process_entries([entry], verbose=False, inplace=True)
    assert entry.correction == pytest.approx(-6.573)
    assert energy_on_scale(entry, "uncorrected") == pytest.approx(-38.0 / 5)
    assert energy_on_scale(entry, "mp2020") == pytest.approx((-38.0 - 6.573) / 5)
    bare = ComputedEntry("Fe2O3", -38.0, entry_id="mine-1")
    with pytest.raises(CorrectionError, match="known phase mine-1: its parameters name no GGA/GGA\\+U run type"):
        energy_on_scale(bare, "mp2020")


# ---------------------------------------------------------------- one scale per hull
def _task(tid: str, formula: str, e: float, engine: str = "chgnet", scheme: str = "mp2020-in-model", level: str = "final",
          kind: str = "candidate") -> dict:
    comp = Composition(formula)
    return {"task_id": tid, "formula": comp.reduced_formula, "chemsys": comp.chemical_system, "energy_per_atom": e,
            "kind": kind, "engine": engine, "level": level, "correction_scheme": scheme, "converged": True}


def _hull_item(tasks: list[dict], known: list[dict] | None = None) -> dict:
    return {"chemsys": "Al-Ni", "run_type": "rt", "sources": {}, "tasks": tasks, "known": known or []}


@pytest.mark.parametrize("intruder", [
    _task("t3", "AlNi3", -5.5, engine="vasp", scheme="mp2020"),  # a DFT energy in an ML hull
    _task("t3", "AlNi3", -5.5, scheme="none"),  # an uncorrected energy in a corrected hull
    _task("t3", "AlNi3", -5.5, engine="sevennet", scheme="mp2020", level="funnel"),  # the funnel's in the final's
])
def test_a_hull_never_mixes_engines_levels_or_correction_schemes(intruder):
    from amdflow.builders.thermo import MixedHullError, build_system

    good = [_task("ra", "Al", -3.7, kind="reference"), _task("rn", "Ni", -5.5, kind="reference"), _task("t1", "AlNi", -5.3)]
    assert build_system(_hull_item(good))["build"]["n_stable"] >= 1  # one scale: built
    with pytest.raises(MixedHullError, match="one hull takes one engine and one correction scheme"):
        build_system(_hull_item([*good, intruder]))
    known = [{"known_id": "k1", "formula": "AlNi3", "chemsys": "Al-Ni", "energy_per_atom": -5.4, "energy_scale": "uncorrected"}]
    with pytest.raises(MixedHullError, match="known phases on the uncorrected scale"):
        build_system(_hull_item(good, known))


# ---------------------------------------------------------------- guards
def test_the_trajectory_guard_names_the_first_unphysical_step():
    fe = Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert check_trajectory(fe, [11.8, 11.6, 11.7], [-8.3, -8.4, -8.4]) is None
    reason = check_trajectory(fe, [11.8, 9.0, 2.0, 1.0], [-8.3, -8.6, -40.0, -90.0])
    assert reason is not None and "after 2 steps" in reason and "2.00 A^3/atom" in reason


def test_chgnet_gets_the_same_guard(monkeypatch):
    """A CHGNet trajectory that collapses raises GuardTripped (it used to return the record-low energy)."""
    from amdflow.relax import chgnet_engine
    from amdflow.relax.base import get_engine

    fe = Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cells = [fe.lattice.matrix * f for f in (1.0, 0.8, 0.4)]  # 11.8 -> 6.0 -> 0.76 A^3/atom
    traj = SimpleNamespace(cells=cells, energies=[-16.6, -17.0, -140.0], forces=[np.zeros((2, 3))] * 3)
    fake = SimpleNamespace(relax=lambda *a, **k: {"trajectory": traj, "final_structure": fe.copy()})
    monkeypatch.setattr(chgnet_engine, "_optimizer", lambda device: (None, fake))
    with pytest.raises(GuardTripped, match="after 2 steps"):
        get_engine(RelaxConfig()).relax(fe)


class _GuardedEngine:
    """A stand-in engine whose relaxation of the listed structures trips the guard; the rest 'relax' unchanged."""

    name, note = "fake", "fake engine"

    def __init__(self, trips: set[int]):
        from amdflow.thermo.corrections import CorrectionPolicy

        self.trips = trips  # numbers of sites that trip
        self.run_type = "fake-engine-none-00000000"
        self.correction = CorrectionPolicy(CorrectionScheme.NONE, "test")
        self.relaxed: list[int] = []

    def relax(self, structure: Structure, directory: Path | None = None) -> RelaxResult:
        self.relaxed.append(len(structure))
        if len(structure) in self.trips:
            raise GuardTripped(f"the relaxation went unphysical after 3 steps: {len(structure)} sites")
        return RelaxResult(structure.copy(), -4.0 * len(structure), True, 1, 0.0, 0.1)


def test_a_reference_that_trips_the_guard_falls_back_to_the_next_structure(db, tmp_path, monkeypatch):
    """C's graphite (4 sites) trips: with no other structure of its own the stage relaxes fcc in its place, and says
    so; with fcc configured too, graphite's reference is failed and fcc's decides; every structure tripping is an error."""
    from amdflow.ops import add_campaign
    from amdflow.stages import relax as relax_stage
    from amdflow.stages import relax_reference_stage

    base = {"name": "SiC-guard", "elements": ["Si", "C"], "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}],
            "funnel": {"engine": "none"}, "output_dir": str(tmp_path / "a")}
    cfg = campaign_from_dict(base)
    add_campaign(db, cfg, workflows=True)
    engine = _GuardedEngine({4})
    engine.run_type = db.campaigns.find_one({"name": cfg.name})["run_type"]  # the reference docs add_campaign wrote
    monkeypatch.setattr(relax_stage, "level_engine", lambda cfg, level, env=None: (engine, {}))
    ref_id = relax_reference_stage(db, cfg.name, "C", "ground_state")
    task = db.tasks.find_one({"task_id": ref_id})
    assert task["reference"]["structure"] == "A_cF4_225_a" and task["reference"]["fallback_from"][0]["structure"] == "ground_state"
    assert "went unphysical" in task["reference"]["fallback_from"][0]["reason"] and engine.relaxed == [4, 1]
    doc = db.references.find_one({"ref_id": ref_id})
    assert doc["state"] == "relaxed" and doc["structure"] == "A_cF4_225_a" and doc["tried"][0]["name"].startswith("graphite")

    with_fcc = campaign_from_dict({**base, "name": "SiC-guard-2", "relax": {"reference_prototypes": ["fcc"], "fmax": 0.04},
                                   "output_dir": str(tmp_path / "b")})  # another fmax: a run type of its own
    add_campaign(db, with_fcc, workflows=True)
    engine.run_type = db.campaigns.find_one({"name": with_fcc.name})["run_type"]
    engine.relaxed.clear()
    ref_id = relax_reference_stage(db, with_fcc.name, "C", "ground_state")
    assert engine.relaxed == [4] and db.tasks.find_one({"task_id": ref_id}) is None  # fcc's own Firework decides
    assert db.references.find_one({"ref_id": ref_id})["state"] == "failed"

    engine.trips = {1, 2, 4}  # graphite and every fallback trip
    engine.run_type = db.campaigns.find_one({"name": cfg.name})["run_type"]
    with pytest.raises(AmdflowError, match=r"every reference structure of C .* tripped the potential's guard"):
        relax_reference_stage(db, cfg.name, "C", "ground_state")


@pytest.mark.slow
def test_graphite_and_diamond_are_the_references_chgnet_relaxes(db, tmp_path):
    """Through the real stage and CHGNet: C's and Si's ground states relax far below fcc (graphite by ~4 eV/atom),
    and the lowest is what `chosen_references` (the report, `amdflow show`) names."""
    from amdflow.ops import add_campaign
    from amdflow.stages import chosen_references, relax_reference_stage

    cfg = campaign_from_dict({"name": "SiC-refs", "elements": ["Si", "C"],
                              "templates": [{"source": "aflow", "prototypes": ["AB_cP2_221_b_a"]}],
                              "funnel": {"engine": "none"}, "relax": {"fmax": 0.1, "max_steps": 80, "reference_prototypes": ["fcc"]},
                              "output_dir": str(tmp_path)})
    doc = {"run_type": add_campaign(db, cfg) and db.campaigns.find_one({"name": cfg.name})["run_type"]}
    for el in cfg.elements:
        for proto in cfg.relax.reference_structures():
            relax_reference_stage(db, cfg.name, el, proto)
    chosen = chosen_references(db, doc["run_type"], cfg.elements)
    assert chosen["C"]["name"].startswith("graphite") and chosen["Si"]["name"].startswith("diamond")
    fcc_c = db.tasks.find_one({"task_id": f"ref-C-A_cF4_225_a-{doc['run_type']}"})["energy_per_atom"]
    assert chosen["C"]["energy_per_atom"] < fcc_c - 2.0 and -9.5 < chosen["C"]["energy_per_atom"] < -8.8  # CHGNet: -9.18
