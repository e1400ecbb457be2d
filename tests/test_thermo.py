from __future__ import annotations

import csv

import pytest
from pymatgen.core import Composition

from amdflow.errors import AmdflowError
from amdflow.thermo import HullEntry, formation_energy_per_atom, hull_analysis, reference_energies
from amdflow.thermo.hull import subsystems
from tests.conftest import shared_path


def test_binary_hull_known_answers():
    entries = [
        HullEntry("A", "Fe", -8.0), HullEntry("A2", "Fe", -7.5),  # two Fe polymorphs
        HullEntry("B", "Al", -4.0),
        HullEntry("AB", "FeAl", -6.5),  # E_f = -6.5 - (-6.0) = -0.5
        HullEntry("A3B", "Fe3Al", -7.2),  # E_f = -7.2 - (-7.0) = -0.2; hull at x=0.25 is -0.25
        HullEntry("AB3", "FeAl3", -4.9),  # E_f = -4.9 - (-5.0) = +0.1; hull at x=0.75 is -0.25
    ]
    res = {r.entry_id: r for r in hull_analysis(entries)}
    assert res["AB"].formation_energy_per_atom == pytest.approx(-0.5)
    assert res["AB"].is_stable and res["AB"].e_above_hull == 0
    assert res["A3B"].e_above_hull == pytest.approx(0.05)
    assert not res["A3B"].is_stable
    assert res["AB3"].e_above_hull == pytest.approx(0.35)
    assert res["A2"].e_above_hull == pytest.approx(0.5)
    assert {d["formula"] for d in res["A3B"].decomposes_to} == {"Fe", "AlFe"}
    assert sum(d["fraction"] for d in res["A3B"].decomposes_to) == pytest.approx(1.0)
    refs = reference_energies(entries)
    assert refs == {"Fe": -8.0, "Al": -4.0}
    assert formation_energy_per_atom("Fe3Al", -7.2, refs) == pytest.approx(-0.2)


def test_missing_reference_is_clear():
    with pytest.raises(AmdflowError, match="no elemental reference for \\['Al'\\]"):
        hull_analysis([HullEntry("A", "Fe", -8.0), HullEntry("AB", "FeAl", -6.5)])
    with pytest.raises(AmdflowError, match="no elemental reference energy"):
        formation_energy_per_atom("FeAl", -6.5, {"Fe": -8.0})


def test_subsystems():
    assert subsystems("Fe-Al-Ni") == ["Al", "Fe", "Ni", "Al-Fe", "Al-Ni", "Fe-Ni", "Al-Fe-Ni"]


@pytest.mark.shared
def test_li_fe_o_pymatgen_known_values():
    path = shared_path("datasets", "li_fe_o_pymatgen", "pd_entries_test.csv")
    entries, seen = [], set()
    with open(path) as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            comp = Composition({"Li": float(row["Li"]), "Fe": float(row["Fe"]), "O": float(row["O"])})
            key = (row["Name"], comp.formula, row["Final energy"])
            if key in seen:
                continue
            seen.add(key)
            entries.append(HullEntry(f"e{i}", comp.formula, float(row["Final energy"]) / comp.num_atoms))
    assert len(entries) == 490
    res = hull_analysis(entries)
    stable = {r.formula for r in res if r.is_stable}
    # pymatgen writes LiO (peroxide) as Li2O2
    assert stable == {"Li", "Fe", "O2", "Li2O", "Li2O2", "FeO", "Fe3O4", "Fe2O3", "LiFeO2", "Li2FeO3", "Li5FeO4"}


@pytest.mark.shared
def test_sc_al_c_reference_hull():
    ref_path = shared_path("datasets", "sc_al_c_mp2019", "sc_al_c_reference_hull.csv")
    rows = list(csv.DictReader(ref_path.read_text().splitlines()))
    entries = [HullEntry(r["material_id"], r["reduced_formula"], float(r["energy_per_atom_eV"])) for r in rows]
    res = {r.entry_id: r for r in hull_analysis(entries)}
    assert sum(r.is_stable for r in res.values()) == 15
    ehull_col = next(c for c in rows[0] if "above_hull" in c)
    for r in rows:
        assert res[r["material_id"]].e_above_hull == pytest.approx(float(r[ehull_col]), abs=1e-6)
