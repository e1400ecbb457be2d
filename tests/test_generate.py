from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.entries.computed_entries import ComputedStructureEntry

from amdflow.campaign import campaign_from_dict
from amdflow.errors import ConfigError, TemplateError
from amdflow.generate import (
    GenerateReport,
    candidate_id,
    generate_candidates,
    substitute,
    substitutions,
)
from amdflow.generate.templates import aflow_library
from amdflow.generate.volume import atomic_volume
from amdflow.schemas import CandidateDoc

DATA = Path(__file__).parent / "data"


def cfg(elements, templates, **extra):
    """A campaign of the volume rule alone (min_bond_ratio 0, exa-AMD's): these tests check decorations, symmetry
    and the volume rule against pymatgen; the bond floor has tests of its own (test_bond_floor_*)."""
    generate = {"min_bond_ratio": 0.0, **extra.pop("generate", {})}
    return campaign_from_dict({"name": "t", "elements": elements, "templates": templates, "generate": generate, **extra})


def aflow(*labels, **kw):
    return [{"source": "aflow", "prototypes": list(labels), **kw}]


def run(c, workers=1, build=True):
    report = GenerateReport()
    docs = list(generate_candidates(c, report, workers=workers, build=build))
    return docs, report


@pytest.mark.parametrize(("k", "n", "expected"), [(2, 2, 2), (2, 3, 6), (3, 3, 6), (3, 4, 24), (4, 4, 24), (2, 5, 20)])
def test_substitution_counts(k, n, expected):
    subs = substitutions(["Na", "Cl", "K", "Br"][:k], ["Fe", "Al", "Ni", "Co", "Cu"][:n])
    assert len(subs) == expected == math.perm(n, k)
    assert len({tuple(s.values()) for s in subs}) == expected


@pytest.mark.parametrize(
    ("label", "distinct"),
    [
        ("AB_cP2_221_b_a", 3),  # B2: AB == BA (translation)
        ("AB_cF8_225_a_b", 3),  # rock salt
        ("AB2C_cF16_225_a_c_b", 3),  # L2_1 Heusler X2YZ: Y <-> Z
        ("ABC_cF12_216_b_c_a", 3),  # half-Heusler: 3 distinct orderings
        ("AB3_cP4_221_a_c", 6),  # L1_2: no colour symmetry
        ("AB3C_cP5_221_a_c_b", 6),  # perovskite: none
        ("AB5C_tP7_123_b_ci_a", 6),  # HoCoGa5: none
    ],
)
def test_symmetry_reduction_known_answers(label, distinct):
    docs, report = run(cfg(["Fe", "Al", "Ni"], aflow(label)))
    assert report.stats.assignments == 6
    assert report.stats.distinct == distinct == len(docs)
    unreduced, _ = run(cfg(["Fe", "Al", "Ni"], aflow(label), generate={"symmetry_reduce": False}))
    assert len(unreduced) == 6


def test_documents_round_trip_to_pymatgen_and_match_the_schema():
    c = cfg(["Fe", "Al", "Ni"], aflow("AB2C_cF16_225_a_c_b", "AB3C_cP5_221_a_c_b"))
    templates = dict(aflow_library())
    for doc in run(c)[0]:
        CandidateDoc.model_validate(doc)
        ours = Structure.from_dict(doc["structure"])
        ref = substitute(templates[doc["template"]["template_id"]], doc["substitution"])
        assert np.allclose(ours.lattice.matrix, ref.lattice.matrix, atol=1e-9)
        assert [s.specie.symbol for s in ours] == [s.specie.symbol for s in ref]
        assert np.allclose(ours.frac_coords % 1, ref.frac_coords % 1, atol=1e-9)
        assert ours.volume == pytest.approx(ref.volume)
        assert doc["structure"] == {**ref.as_dict(verbosity=0), "sites": doc["structure"]["sites"], "lattice": doc["structure"]["lattice"]}
        ref_sites = ref.as_dict(verbosity=0)["sites"]
        for mine, theirs in zip(doc["structure"]["sites"], ref_sites, strict=True):
            assert mine.keys() == theirs.keys() and mine["species"] == theirs["species"]
            assert np.allclose(np.mod(mine["abc"], 1.0), np.mod(theirs["abc"], 1.0), atol=1e-9)
        assert doc["candidate_id"] == candidate_id("t", ref)
        assert doc["formula"] == ref.composition.reduced_formula


def test_subsystems_scales_and_determinism():
    c = cfg(["Fe", "Al", "Ni"], aflow("AB_cP2_221_b_a", "AB2C_cF16_225_a_c_b"), generate={"lattice_scales": [0.98, 1.0, 1.02]})
    docs, report = run(c)
    assert len(docs) == (3 + 3) * 3 and report.candidates == 18
    assert {d["lattice_scale"] for d in docs} == {0.98, 1.0, 1.02}
    assert len({d["candidate_id"] for d in docs}) == 18
    assert [d["candidate_id"] for d in docs] == [d["candidate_id"] for d in run(c)[0]]
    off = cfg(["Fe", "Al", "Ni"], aflow("AB_cP2_221_b_a", "AB2C_cF16_225_a_c_b"), generate={"include_subsystems": False})
    docs, report = run(off)
    assert {d["template"]["template_id"] for d in docs} == {"AB2C_cF16_225_a_c_b"}
    assert report.templates.skipped == [("aflow:AB_cP2_221_b_a", "subsystem template, include_subsystems is off (2 elements)")]


def test_parallel_equals_serial():
    c = cfg(["Fe", "Al", "Ni", "Co"], [{"source": "aflow", "max_sites": 6}])
    serial, rs = run(c, workers=1)
    parallel, rp = run(c, workers=2)
    assert [d["candidate_id"] for d in serial] == [d["candidate_id"] for d in parallel]
    assert rs.as_dict() == rp.as_dict()
    counted, rc = run(c, workers=2, build=False)
    assert counted == [] and rc.candidates == len(serial)


def test_chunked_tasks_give_the_same_stream(monkeypatch):
    import importlib

    substitute_module = importlib.import_module("amdflow.generate.substitute")

    c = cfg(["Fe", "Al", "Ni", "Co"], [{"source": "aflow", "max_sites": 6}], generate={"lattice_scales": [0.98, 1.0, 1.02]})
    whole = [d["candidate_id"] for d in run(c)[0]]
    monkeypatch.setattr(substitute_module, "CHUNK", 7)
    for workers in (1, 2):
        docs, report = run(c, workers=workers)
        assert [d["candidate_id"] for d in docs] == whole
        assert report.candidates == len(whole)


def test_ids_are_site_order_free():
    s = Structure(Lattice.cubic(3.0), ["Fe", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    s_rev = Structure(Lattice.cubic(3.0), ["Al", "Fe"], [[0.5, 0.5, 0.5], [1.0, 0, 0]])
    assert candidate_id("a", s) == candidate_id("a", s_rev) != candidate_id("b", s)


def test_volume_rule_known_answer():
    cu = Structure(Lattice.cubic(3.61), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    assert substitute(cu, {"Cu": "Fe"}).volume == pytest.approx(cu.volume * 7.09 / 7.11, rel=1e-6)
    assert atomic_volume("Fe") == pytest.approx(7.09e24 / 6.02214076e23)


def test_filters_known_answers():
    # rock salt with Na, Cl, Al: pairs NaCl, AlCl, AlNa; only NaCl is charge balanced (Al is +3)
    docs, report = run(cfg(["Na", "Cl", "Al"], aflow("AB_cF8_225_a_b"), generate={"charge_balance": True}))
    assert [d["formula"] for d in docs] == ["NaCl"]
    assert report.stats.filtered == {"not charge balanced": 2}
    # templates with excluded elements or big formulas are skipped with the reason
    docs, report = run(cfg(["Fe", "Al"], aflow("AB_cP2_221_b_a", "AB3_cP4_221_a_c"), generate={"exclude_elements": ["Cs"], "max_formula_atoms": 3}))
    assert dict(report.templates.skipped) == {
        "aflow:AB_cP2_221_b_a": "excluded elements (Cs)",
        "aflow:AB3_cP4_221_a_c": "formula too large (4 atoms > max_formula_atoms 3)",
    }
    assert docs == []


def test_bad_targets_are_clear():
    with pytest.raises(ConfigError, match="unknown element 'Fx'"):
        cfg(["Fe", "Fx"], aflow("AB_cP2_221_b_a"))
    with pytest.raises(ConfigError, match=r"target element\(s\) \['Ar'\] are in generate.exclude_elements"):
        cfg(["Fe", "Ar"], aflow("AB_cP2_221_b_a"))
    with pytest.raises(TemplateError, match="unknown AFLOW prototype"):
        run(cfg(["Fe", "Al"], aflow("NOT_A_LABEL")))


def test_folder_source_every_format_and_bad_files(tmp_path):
    folder = tmp_path / "templates"
    (folder / "sub").mkdir(parents=True)
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    nacl.to(filename=str(folder / "NaCl.cif"))
    nacl.get_primitive_structure().to(filename=str(folder / "sub" / "POSCAR"), fmt="poscar")
    cscl = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    cscl.to(filename=str(folder / "CsCl.vasp"), fmt="poscar")
    l12 = Structure(Lattice.cubic(3.7), ["Au", "Cu", "Cu", "Cu"], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    (folder / "many.json").write_text(json.dumps([l12.as_dict(), cscl.as_dict()]))
    entry = ComputedStructureEntry(l12, -10.0, entry_id="mp-xyz")
    (folder / "entry.json").write_text(json.dumps(entry.as_dict()))
    (folder / "broken.cif").write_text("data_x\n_cell_length_a 3\nloop_\n_atom_site_label\n")
    Structure(Lattice.cubic(3), [{"Fe": 0.5, "Al": 0.5}, "Ni"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(folder / "dis.cif"))
    docs, report = run(cfg(["Fe", "Al"], [{"source": "folder", "path": str(folder)}]))
    reasons = dict(report.templates.skipped)
    assert "unreadable" in reasons["folder:broken.cif"]
    assert reasons["folder:dis.cif"] == "disordered (partial occupancy)"
    ids = {d["template"]["template_id"] for d in docs}
    assert ids == {"NaCl.cif", "sub/POSCAR", "CsCl.vasp", "many.json#0", "many.json#1", "entry.json"}
    assert report.templates.read == 6
    # rock salt and B2 reduce to one decoration each; L1_2 gives two (Fe3Al, FeAl3)
    per = {t: sum(d["template"]["template_id"] == t for d in docs) for t in ids}
    assert per == {"NaCl.cif": 1, "sub/POSCAR": 1, "CsCl.vasp": 1, "many.json#0": 2, "many.json#1": 1, "entry.json": 2}


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(TemplateError, match="does not exist"):
        run(cfg(["Fe", "Al"], [{"source": "folder", "path": str(tmp_path / "none")}]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TemplateError, match="holds no"):
        run(cfg(["Fe", "Al"], [{"source": "folder", "path": str(tmp_path / "empty")}]))


def test_materials_project_source_from_recorded_response(monkeypatch):
    import amdflow.generate.templates as templates

    recorded = json.loads((DATA / "mp_summary_response.json").read_text())
    calls = []

    def fake_search(api_key, chemsys, material_ids):
        calls.append((api_key, chemsys, material_ids))
        return recorded["docs"]

    monkeypatch.setattr(templates, "_mp_search", fake_search)
    c = cfg(["Ce", "Co", "In"], [{"source": "mp", "chemsys": ["Ce-Co-In"]}])
    with pytest.raises(TemplateError, match="API key"):
        run(c)
    monkeypatch.setenv("AMDFLOW_MP_API_KEY", "k123")
    docs, report = run(c)
    assert report.templates.read == 2
    assert calls == [("k123", ["Ce-Co-In"], None)]
    assert {d["template"]["source"] for d in docs} == {"mp"}
    assert {d["template"]["template_id"] for d in docs} == {"mp-1001", "mp-1002"}
    assert len(docs) == 6 + 6  # HoCoGa5-type: 6 distinct; L1_2: 6 ordered pairs
    with pytest.raises(ConfigError, match="chemsys or material_ids"):
        cfg(["Ce", "Co"], [{"source": "mp"}])


@pytest.mark.slow
def test_no_decoration_lost_on_aflow_ternaries():
    """Every structure the naive generator makes (all permutations) matches one of ours."""
    targets = ["Fe", "Al", "Ni"]
    c = cfg(targets, [{"source": "aflow", "max_sites": 40}], generate={"include_subsystems": False, "scale_volume": False})
    ours, report = run(c, workers=2)
    ternary = [(label, s) for label, s in aflow_library() if len(s.composition.elements) == 3 and s.is_ordered and len(s) <= 40]
    assert report.templates.read == len(ternary) >= 40
    by_template: dict[str, list[Structure]] = {}
    for d in ours:
        by_template.setdefault(d["template"]["template_id"], []).append(Structure.from_dict(d["structure"]))
    matcher = StructureMatcher()
    lost = naive_total = 0
    for label, template in ternary:
        els = list(dict.fromkeys(s.specie.symbol for s in template))
        for mapping in substitutions(els, targets):
            naive_total += 1
            naive = substitute(template, mapping, scale_volume=False)
            formula = naive.composition.reduced_formula
            mine = [s for s in by_template.get(label, []) if s.composition.reduced_formula == formula]
            if not any(matcher.fit(naive, s) for s in mine):
                lost += 1
    assert naive_total == 6 * len(ternary)
    assert lost == 0
    assert report.stats.distinct < naive_total  # the reduction removed something


def test_raw_bson_stream_equals_dict_stream():
    """The stream MongoDB gets (RawBSONDocument) holds exactly the dict documents."""
    import bson
    from bson.codec_options import CodecOptions

    from amdflow.generate.substitute import UTC

    c = cfg(["Fe", "Al", "Ni", "Co"], [{"source": "aflow", "max_sites": 4}], generate={"lattice_scales": [1.0, 1.02]})
    plain = run(c)[0]
    options = CodecOptions(tz_aware=True, tzinfo=UTC)
    for workers in (1, 2):
        raw = list(generate_candidates(c, workers=workers, raw=True))
        assert len(raw) == len(plain)
        for r, d in zip(raw, plain, strict=True):
            assert r["candidate_id"] == d["candidate_id"]  # lazy field access, as the inserter does
            decoded = bson.decode(r.raw, codec_options=options)
            assert decoded == {**d, "created_at": decoded["created_at"], "updated_at": decoded["updated_at"]}
            assert abs((decoded["created_at"] - d["created_at"]).total_seconds()) < 60


def test_lazy_aflow_library_equals_pymatgens_decoded_library():
    """Labels read as plain JSON and structures decoded on demand give exactly what monty's loadfn gives."""
    from monty.serialization import loadfn

    from amdflow.generate.templates import aflow_library, aflow_library_path, aflow_structure

    reference = loadfn(aflow_library_path())
    ours = aflow_library()
    assert len(ours) == len(reference) == 288
    assert sum("#" in label for label, _ in ours) == len(ours) - len({it["tags"]["aflow"] for it in reference})
    for it, (label, s) in zip(reference, ours, strict=True):
        assert label.split("#")[0] == it["tags"]["aflow"]
        assert s.as_dict() == it["snl"].structure.as_dict()
    with pytest.raises(TemplateError, match="AFLOW prototype label 'nope' is not in pymatgen's AFLOW library"):
        aflow_structure("nope")


def test_prototypes_command_lists_the_library_with_filters():
    import json

    from typer.testing import CliRunner

    from amdflow.cli import app
    from amdflow.generate.templates import aflow_catalog

    catalog = aflow_catalog()
    assert len(catalog) == 288
    fcc = next(p for p in catalog if p.label == "A_cF4_225_a")
    assert (fcc.n_elements, fcc.n_sites, fcc.strukturbericht) == (1, 1, "A1")
    heusler = next(p for p in catalog if p.label == "AB2C_cF16_225_a_c_b")
    assert (heusler.n_elements, heusler.n_sites) == (3, 4)
    result = CliRunner().invoke(app, ["prototypes", "--elements", "1", "--max-sites", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 18 and all(r["n_elements"] == 1 and r["n_sites"] <= 2 for r in rows)
    assert {r["short_name"] for r in rows} == {"fcc", "bcc", "hcp", "diamond", "sc", None}


# ---------------------------------------------------------------- the bond floor (issue 26)
def _shortest_ratio(structure: Structure) -> float:
    """Independent of the generator's arrays: pymatgen's neighbour list over every pair."""
    from amdflow.generate.volume import covalent_radius

    centres, neighbours, _, dists = structure.get_neighbor_list(8.0)
    sym = [site.specie.symbol for site in structure]
    return min(d / (covalent_radius(sym[i]) + covalent_radius(sym[j])) for i, j, d in zip(centres, neighbours, dists, strict=True))


@pytest.mark.parametrize("elements", [["Ce", "Fe", "C"], ["Na", "Cl", "Mg"]])
def test_bond_floor_no_candidate_of_any_small_aflow_prototype_starts_overlapping(elements):
    """Every AFLOW prototype of up to 12 sites, for a C-containing and an alkali-halide-containing ternary: no
    candidate starts below the floor, each records its true shortest bond ratio, and without the floor (the volume
    rule alone) many would."""
    c = campaign_from_dict({"name": "t", "elements": elements, "templates": [{"source": "aflow", "max_sites": 12}],
                            "generate": {"lattice_scales": [0.96, 1.0, 1.04]}})
    docs, report = run(c, workers=2)
    floor = c.generate.min_bond_ratio
    assert floor == 0.75 and len(docs) > 300
    ratios = [_shortest_ratio(Structure.from_dict(d["structure"])) for d in docs]
    assert min(ratios) >= floor - 1e-6
    assert all(d["min_bond_ratio"] == pytest.approx(r, abs=2e-4) for d, r in zip(docs, ratios, strict=True))
    assert report.stats.filtered.get("lattice scale below the bond floor", 0) > 0  # the 0.96 copies of floored cells
    before, _ = run(cfg(elements, [{"source": "aflow", "max_sites": 12}], generate={"lattice_scales": [0.96, 1.0, 1.04]}),
                    workers=2)
    below = sum(_shortest_ratio(Structure.from_dict(d["structure"])) < floor for d in before)
    assert below > 0.05 * len(before)  # what the floor fixes is real


def test_bond_floor_scales_up_an_overlapping_cell_and_skips_one_that_cannot_hold_its_atoms():
    """A3B_cI8_229_b_a (H3S's structure; the blind campaign's lost relaxations came from it) with Ce and Fe: the
    volume rule leaves bonds at 0.41 x the radii. Reaching the floor needs 6x the volume: skipped by default with
    the reason, counted; allowed 10x voids, both cells are scaled up to exactly the floor."""
    loose = cfg(["Ce", "Fe"], aflow("A3B_cI8_229_b_a"))  # the volume rule alone
    before = {d["formula"]: d for d in run(loose)[0]}
    assert sorted(before) == ["Ce3Fe", "CeFe3"] and all(d["min_bond_ratio"] < 0.45 for d in before.values())
    default = cfg(["Ce", "Fe"], aflow("A3B_cI8_229_b_a"), generate={"min_bond_ratio": 0.75})
    docs, report = run(default)
    assert docs == [] and report.stats.filtered["bond floor needs more than 3x the volume rule's volume"] == 2
    roomy = cfg(["Ce", "Fe"], aflow("A3B_cI8_229_b_a"), generate={"min_bond_ratio": 0.75, "max_void_ratio": 10.0})
    for d in run(roomy)[0]:
        s = Structure.from_dict(d["structure"])
        assert d["min_bond_ratio"] == pytest.approx(0.75, abs=1e-4) == pytest.approx(_shortest_ratio(s), abs=1e-4)
        old = Structure.from_dict(before[d["formula"]]["structure"])
        assert s.volume / old.volume == pytest.approx((0.75 / before[d["formula"]]["min_bond_ratio"]) ** 3, rel=1e-3)


def test_bond_floor_applies_to_folder_templates_and_dry_run_counts_the_skips(tmp_path):
    """A folder template is floored like a library one: H3S's cI8 cell as a CIF, decorated with Ce and Fe, is
    skipped (would need 6x the volume) and `generate --dry-run` names the reason; a CsCl cell whose large atom
    sits on the small site is scaled up to the floor, and its 0.98 lattice copy falls below it and is skipped."""
    from typer.testing import CliRunner

    from amdflow.cli import app
    from amdflow.generate.templates import aflow_structure

    folder = tmp_path / "cifs"
    folder.mkdir()
    aflow_structure("A3B_cI8_229_b_a").to(filename=str(folder / "h3s.cif"))
    Structure(Lattice.cubic(2.2), ["K", "H"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(folder / "kh.cif"))
    c = campaign_from_dict({"name": "t", "elements": ["Cs", "Li"], "generate": {"lattice_scales": [0.98, 1.0]},
                            "templates": [{"source": "folder", "path": str(folder)}]})
    docs, report = run(c)
    assert docs and all(_shortest_ratio(Structure.from_dict(d["structure"])) >= 0.75 - 1e-6 for d in docs)
    assert {d["lattice_scale"] for d in docs} == {1.0} and report.stats.filtered["lattice scale below the bond floor"] >= 1
    (folder / "kh.cif").unlink()
    ce = campaign_from_dict({"name": "t", "elements": ["Ce", "Fe"], "templates": [{"source": "folder", "path": str(folder)}]})
    _, rep = run(ce)
    assert rep.stats.filtered["bond floor needs more than 3x the volume rule's volume"] == 2  # both H3S decorations
    path = tmp_path / "c.yaml"
    path.write_text(f"name: t\nelements: [Ce, Fe]\ntemplates:\n  - source: folder\n    path: {folder}\n")
    result = CliRunner().invoke(app, ["generate", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "2 bond floor needs more than 3x the volume rule's volume" in result.output
